"""Quantization arithmetic and the graph edits that insert QuantizeLinear/DequantizeLinear.

Arithmetic follows QuantizeLinear exactly: q = saturate(round_half_even(x / scale)
+ zero_point), per tensor or along one axis; DequantizeLinear gives back
(q - zero_point) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

# Ranges narrower than this quantize a tensor that is zero in practice; a floor keeps
# the scale a normal float32 and int32 bias scales representable.
MIN_SCALE = 2.0**-30


@dataclass(frozen=True)
class QType:
    """An integer type for quantized values: its numpy dtype and representable range."""

    name: str
    dtype: np.dtype
    qmin: int
    qmax: int

    @property
    def bits(self) -> int:
        return int(np.log2(self.qmax - self.qmin + 1))


UINT8 = QType("uint8", np.dtype(np.uint8), 0, 255)
INT8 = QType("int8", np.dtype(np.int8), -128, 127)
# int8 weights in 7 bits: two uint8 x int8 products then sum to at most 255 * 63 * 2 < 2^15,
# which the int16 pair sums of x86 kernels without VNNI hold (`reduce_range`).
INT8_REDUCED = QType("int8", np.dtype(np.int8), -64, 63)
UINT16 = QType("uint16", np.dtype(np.uint16), 0, 65535)
INT16 = QType("int16", np.dtype(np.int16), -32768, 32767)
INT32 = QType("int32", np.dtype(np.int32), -(2**31), 2**31 - 1)
QTYPES = {t.name: t for t in (UINT8, INT8, UINT16, INT16, INT32)}


@dataclass
class QParams:
    """Scale and zero point of a quantized tensor; `axis` is set for per-channel parameters."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None = None

    def broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point shaped to broadcast against a tensor of rank `ndim`."""
        if self.axis is None or self.scale.ndim == 0:
            return self.scale, self.zero_point
        shape = [1] * ndim
        shape[self.axis % ndim] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)


def activation_params(low: float, high: float, qtype: QType, symmetric: bool) -> QParams:
    """Per-tensor parameters mapping [low, high] (widened to hold 0) onto `qtype`.

    Symmetric parameters have zero point 0 and use [-qmax, qmax], so that
    negation is exact; asymmetric ones spread the range over every level and
    put 0 exactly on a level.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        amax = max(-low, high)
        scale = amax / qtype.qmax
        zero = 0 if qtype.qmin < 0 else (qtype.qmax + 1) // 2
    else:
        scale = (high - low) / (qtype.qmax - qtype.qmin)
        zero = 0
    if not np.isfinite(scale) or scale < MIN_SCALE:
        scale = 1.0 if scale == 0 or not np.isfinite(scale) else MIN_SCALE
    if not symmetric:
        zero = int(np.clip(np.rint(qtype.qmin - low / scale), qtype.qmin, qtype.qmax))
    return QParams(np.array(scale, np.float32), np.array(zero, qtype.dtype), qtype)


def weight_params(weight: np.ndarray, axis: int | None, qtype: QType = INT8) -> QParams:
    """Symmetric parameters for a constant: per channel along `axis`, or per tensor."""
    values = np.asarray(weight, np.float32)
    if axis is None:
        amax = np.array(np.max(np.abs(values)) if values.size else 0.0, np.float32)
    else:
        moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        amax = np.max(np.abs(moved), axis=1) if moved.size else np.zeros(moved.shape[0])
    scale = (np.asarray(amax, np.float64) / qtype.qmax).astype(np.float32)
    # An all-zero channel quantizes to zeros with any scale; 1 keeps it well defined.
    scale = np.where(scale > 0, np.maximum(scale, MIN_SCALE), 1.0).astype(np.float32)
    zero = np.zeros(scale.shape, qtype.dtype)
    return QParams(scale, zero, qtype, axis if axis is not None else None)


def quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """QuantizeLinear in numpy: round half to even, add the zero point, saturate."""
    scale, zero = params.broadcast(np.ndim(x))
    q = np.rint(np.asarray(x, np.float32) / scale) + zero.astype(np.float64)
    return np.asarray(np.clip(q, params.qtype.qmin, params.qtype.qmax)).astype(params.qtype.dtype)


def bias_params(input_scale: np.ndarray, weight_scale: np.ndarray) -> QParams:
    """int32 parameters of a bias added to input x weight: scale = input scale x weight scale."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    scale = np.maximum(scale, np.float32(MIN_SCALE * MIN_SCALE))
    axis = 0 if scale.ndim else None
    return QParams(scale, np.zeros(scale.shape, np.int32), INT32, axis)


# ---- graph edits --------------------------------------------------------------------------


class Namer:
    """Fresh tensor and node names that collide with nothing in the graph."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}

    def __call__(self, base: str) -> str:
        name, n = base, 1
        while name in self.used:
            name = f"{base}_{n}"
            n += 1
        self.used.add(name)
        return name


def params_constants(namer: Namer, base: str, params: QParams) -> tuple[gs.Constant, gs.Constant]:
    scale = gs.Constant(namer(f"{base}_scale"), np.asarray(params.scale, np.float32))
    zero = gs.Constant(namer(f"{base}_zero_point"), np.asarray(params.zero_point))
    return scale, zero


def _axis_attrs(params: QParams) -> dict[str, int]:
    return {"axis": int(params.axis)} if params.axis is not None and params.scale.ndim else {}


def dequantize_node(
    graph: gs.Graph,
    namer: Namer,
    quantized: gs.Tensor,
    params: QParams,
    base: str,
    output: gs.Variable | None = None,
    consts: tuple[gs.Constant, gs.Constant] | None = None,
) -> gs.Variable:
    scale, zero = consts or params_constants(namer, base, params)
    out = output or gs.Variable(namer(f"{base}_dequantized"), dtype=np.float32)
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            namer(f"{base}_DequantizeLinear"),
            attrs=_axis_attrs(params),
            inputs=[quantized, scale, zero],
            outputs=[out],
        )
    )
    return out


def quantize_activation(
    graph: gs.Graph,
    namer: Namer,
    tensor: gs.Variable,
    params: QParams,
    *,
    produced_by_quantized: bool,
    readers: list[tuple[gs.Node, int]],
) -> gs.Variable:
    """Insert Q then DQ on `tensor`.

    When the producer is quantized, every reader (and a graph output of that
    name) sees the dequantized tensor, so that the producer's only consumer is
    the Q node. Otherwise only `readers` (input slots of quantized nodes) are
    rewired, and float readers keep the original values.
    """
    consts = params_constants(namer, tensor.name, params)
    qtensor = gs.Variable(namer(f"{tensor.name}_quantized"), dtype=params.qtype.dtype)
    if produced_by_quantized:
        # The producer writes a fresh tensor; the original object (name, shape, graph
        # output slot, every reader) becomes the DQ's output.
        raw = gs.Variable(namer(f"{tensor.name}_float"), dtype=tensor.dtype, shape=tensor.shape)
        producer = tensor.inputs[0]
        producer.outputs = [raw if t is tensor else t for t in producer.outputs]
        source = raw
    else:
        source = tensor
    graph.nodes.append(
        gs.Node(
            "QuantizeLinear",
            namer(f"{tensor.name}_QuantizeLinear"),
            attrs=_axis_attrs(params),
            inputs=[source, *consts],
            outputs=[qtensor],
        )
    )
    if produced_by_quantized:
        dequantize_node(graph, namer, qtensor, params, tensor.name, output=tensor, consts=consts)
        return qtensor
    dq = dequantize_node(graph, namer, qtensor, params, tensor.name, consts=consts)
    for node, index in readers:
        node.inputs[index] = dq
    return qtensor


def quantized_constant(
    graph: gs.Graph,
    namer: Namer,
    base: str,
    values: np.ndarray,
    params: QParams,
) -> gs.Variable:
    """Store `values` quantized with `params` and return the DQ output that replaces it."""
    stored = gs.Constant(namer(f"{base}_quantized"), quantize(values, params))
    return dequantize_node(graph, namer, stored, params, base)

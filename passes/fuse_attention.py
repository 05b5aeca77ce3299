"""fuse-attention: unmasked multi-head self-attention becomes one attention node.

Rules:
- Matches the way PyTorch exports `qkv -> heads -> softmax(q k^T * c) v -> merge`:
  Reshape(x, [.., S, 3, H, D]) -> Transpose(2, 0, 3, 1, 4) -> Split(axis 0, 3 equal
  parts) -> Squeeze(0) x3 -> q, k, v; Transpose(k, 0, 1, 3, 2); MatMul(q, k^T);
  Mul or Div by a scalar constant c; Softmax(last axis); MatMul(., v);
  Transpose(0, 2, 1, 3); Reshape to [.., H * D]. Every tensor in between has one
  reader, and none is a graph output.
- `op=onnx` writes Reshape(x, [B, S, 3 H D]) -> Split(axis 2, three H D parts) ->
  Attention(q, k, v; q_num_heads=kv_num_heads=H, scale=c or 1/c), the standard
  op of opset 23, -> the original last Reshape. The opset is raised to 23 (the
  notes say so); ONNX Runtime runs it on the CPU from 1.23. The numbers are the
  same computation (the hidden dim is head-major in both): on the digits
  transformer, float or after `quantize`, the outputs are bit-identical.
- `op=ort` writes ORT's contrib ops instead: the same Reshape and Split into
  com.microsoft.MultiHeadAttention(num_heads=H, scale); and when x is the output of
  a quantized projection, as the `quantize` pass writes it (Gemm of
  DequantizeLinear'd uint8 input, int8 weight [E, 3 H D] per column or per tensor,
  and a bias; the Gemm read by the attention only) and the scale is 1/sqrt(D),
  the projection joins the attention: Reshape(uint8 input, [B, S, E]) ->
  com.microsoft.QAttention(input, weight, bias, scales, zero points;
  num_heads=H), the bias dequantized to float. Same integers, same products.
- `op=auto` (the default) is `onnx` when every provider of the run is the CPU and
  the installed onnxruntime has the kernel, `ort` otherwise (ORT's GPU providers
  run the contrib ops on the device).
- Leaves alone attention with a mask or bias added before the Softmax, other head
  layouts, and anything whose shapes are not constant where the pattern needs them.
- Measured on the digits transformer after `simplify,quantize` (benchmarks/
  accuracy.py, five runs, 1 thread, p50 vs fp32, batch 1 / batch 64): unfused
  1.14-1.24x / 1.32-1.51x; ONNX Attention 1.36-1.54x / 1.39-1.50x; QAttention
  1.32-1.52x / 1.27-1.38x: ORT's QAttention runs the projection as one small GEMM
  per batch row and head, which loses at batch 64. In float, MultiHeadAttention
  and Attention both ran 1.02-1.03x at batch 64.
- Run it after `quantize`: shape inference cannot see through a fused node, so
  the quantize pass's row-wise preparation would stop there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt.errors import ModelError, PassError
from onnxopt.graph import (
    constant_value,
    consumers,
    int_list,
    is_default,
    is_graph_output,
    producer,
    unique_name,
    upgraded,
)
from onnxopt.pass_api import Pass, PassContext, PassResult, register_pass

ONNX_ATTENTION_OPSET = 23
ONNX_ATTENTION_ORT = (1, 23)  # the first ONNX Runtime with a CPU kernel for it
CONTRIB_OPS = ("MultiHeadAttention", "QAttention")


@register_pass
class FuseAttention(Pass):
    """Fuse unmasked multi-head self-attention into one attention node."""

    name = "fuse-attention"
    op: Literal["auto", "onnx", "ort"] = "auto"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        matches = _matches(graph)
        if not matches:
            return PassResult(False, {"fused": 0}, ["no unmasked self-attention matched"])
        form, notes = self._form(ctx)
        replaced = None
        if form == "onnx" and (graph.opset or 0) < ONNX_ATTENTION_OPSET:
            before = graph.opset
            try:
                replaced = upgraded(graph, ONNX_ATTENTION_OPSET)
            except ModelError as exc:
                if self.op == "onnx":
                    raise PassError(
                        f"fuse-attention(op=onnx) needs opset {ONNX_ATTENTION_OPSET}: {exc}; "
                        "or use fuse-attention(op=ort)"
                    ) from None
                form = "ort"
                notes.append(f"the upgrade to opset 23 failed ({exc}): ORT's contrib ops instead")
            else:
                graph = replaced
                matches = _matches(graph)
                notes.append(
                    f"upgraded the opset from {before} to {ONNX_ATTENTION_OPSET}: "
                    "ONNX Attention needs 23"
                )
        taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        for match in matches:
            _replace(graph, match, taken, form)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if form == "onnx":
            notes.append(
                "attention now runs as ONNX Attention (opset 23): ONNX Runtime "
                f"{'.'.join(map(str, ONNX_ATTENTION_ORT))} or later"
            )
        else:
            ops = sorted({n.op for n in graph.nodes if n.op in CONTRIB_OPS})
            notes.append(f"the model now needs ONNX Runtime: {', '.join(ops)} (contrib ops)")
        quantized = sum(n.op == "QAttention" for n in graph.nodes)
        return PassResult(True, {"fused": len(matches), "quantized": quantized}, notes, replaced)

    def _form(self, ctx: PassContext) -> tuple[str, list[str]]:
        """Which form to write ("onnx" or "ort"), with a note saying why when `op` is auto."""
        if self.op != "auto":
            return self.op, []
        if not _ort_has_attention():
            return "ort", [
                f"onnxruntime {ort.__version__} has no ONNX Attention kernel: "
                "ORT's contrib ops instead"
            ]
        others = [p for p in ctx.providers if p != "cpu"]
        if others:
            return "ort", [
                f"provider {', '.join(others)}: ORT's contrib ops, which its GPU providers "
                "run on the device"
            ]
        return "onnx", []


def _ort_has_attention() -> bool:
    parts = ort.__version__.split(".")[:2]
    try:
        return tuple(int(p) for p in parts) >= ONNX_ATTENTION_ORT
    except ValueError:
        return False


def _matches(graph: gs.Graph) -> list[_Match]:
    return [m for node in list(graph.nodes) if (m := _match(graph, node)) is not None]


@dataclass
class _Match:
    source: gs.Tensor  # the packed q/k/v projection
    packed: list[int]  # Reshape target giving it [B, S, 3 H D]
    heads: int
    size: int
    scale: float
    merge: gs.Node  # the last Reshape, kept
    nodes: list[gs.Node]  # the nodes replaced


def _only(tensor: gs.Tensor, graph: gs.Graph, op: str) -> gs.Node | None:
    """The single default-domain reader of `tensor`, if it is an `op` node."""
    readers = consumers(tensor)
    if len(readers) != 1 or is_graph_output(graph, tensor):
        return None
    reader = readers[0]
    return reader if reader.op == op and is_default(reader) else None


def _perm(node: gs.Node | None, perm: list[int]) -> bool:
    return node is not None and list(node.attrs.get("perm", [])) == perm


def _match(graph: gs.Graph, split_shape: gs.Node) -> _Match | None:
    if split_shape.op != "Reshape" or not is_default(split_shape):
        return None
    if int(split_shape.attrs.get("allowzero", 0)):
        return None
    if (graph.opset or 0) < 13:  # Split sizes and Squeeze axes as inputs
        return None
    target = int_list(split_shape.inputs[1])
    if target is None or len(target) != 5 or target[2] != 3 or min(target[3:]) <= 0:
        return None
    heads, size = target[3], target[4]
    heads_first = _only(split_shape.outputs[0], graph, "Transpose")
    if not _perm(heads_first, [2, 0, 3, 1, 4]):
        return None
    split = _only(heads_first.outputs[0], graph, "Split")
    if split is None or int(split.attrs.get("axis", 0)) != 0 or len(split.outputs) != 3:
        return None
    sizes = int_list(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1].name else None
    if sizes not in (None, [1, 1, 1]):
        return None
    parts = []
    for out in split.outputs:
        squeeze = _only(out, graph, "Squeeze")
        if squeeze is None or len(squeeze.inputs) < 2 or int_list(squeeze.inputs[1]) != [0]:
            return None
        parts.append(squeeze)
    q, k, v = (p.outputs[0] for p in parts)
    k_t = _only(k, graph, "Transpose")
    if not _perm(k_t, [0, 1, 3, 2]):
        return None
    scores = _only(k_t.outputs[0], graph, "MatMul")
    if scores is None or scores.inputs[0] is not q or _only(q, graph, "MatMul") is not scores:
        return None
    scaled = consumers(scores.outputs[0])
    if len(scaled) != 1 or scaled[0].op not in ("Mul", "Div") or not is_default(scaled[0]):
        return None
    scaling = scaled[0]
    if scaling.inputs[0] is not scores.outputs[0] or is_graph_output(graph, scores.outputs[0]):
        return None
    factor = constant_value(scaling.inputs[1])
    if factor is None or factor.size != 1 or float(factor.reshape(-1)[0]) == 0.0:
        return None
    c = float(factor.reshape(-1)[0])
    softmax = _only(scaling.outputs[0], graph, "Softmax")
    if softmax is None or int(softmax.attrs.get("axis", -1)) not in (-1, 3):
        return None
    context = _only(softmax.outputs[0], graph, "MatMul")
    if context is None or context.inputs[1] is not v or _only(v, graph, "MatMul") is not context:
        return None
    heads_back = _only(context.outputs[0], graph, "Transpose")
    if not _perm(heads_back, [0, 2, 1, 3]):
        return None
    merge = _only(heads_back.outputs[0], graph, "Reshape")
    merged = int_list(merge.inputs[1]) if merge is not None else None
    # A 0 copies a dim of [B, S, H, D] before, of [B, S, H D] after: the same for B and S.
    if merged is None or merged[-1] != heads * size or 0 in merged[2:]:
        return None
    packed = [*target[:2], 3 * heads * size]  # 0s copy the same dims of x as before
    nodes = [split_shape, heads_first, split, *parts, k_t, scores, scaling, softmax]
    scale = c if scaling.op == "Mul" else 1 / c
    source = split_shape.inputs[0]
    return _Match(source, packed, heads, size, scale, merge, [*nodes, context, heads_back])


@dataclass
class _Projection:
    """A quantized projection x = Gemm(DQ(input), DQ(weight), bias) in integer terms."""

    input: gs.Tensor  # uint8
    input_scale: gs.Tensor
    input_zero: gs.Tensor
    weight: gs.Tensor  # int8 [E, 3 H D]
    weight_scale: gs.Tensor
    weight_zero: gs.Tensor
    bias: np.ndarray  # float32 [3 H D]
    embed: int  # E


def _dequantized(tensor: gs.Tensor) -> gs.Node | None:
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or not is_default(node):
        return None
    return node if len(node.inputs) == 3 and len(consumers(tensor)) == 1 else None


def _projection(graph: gs.Graph, match: _Match) -> _Projection | None:
    """The quantized projection feeding the attention, if QAttention can take it."""
    gemm = producer(match.source)
    if gemm is None or gemm.op != "Gemm" or not is_default(gemm) or len(gemm.inputs) != 3:
        return None
    if len(consumers(match.source)) != 1 or is_graph_output(graph, match.source):
        return None
    attrs = gemm.attrs
    if attrs.get("transA", 0) or attrs.get("transB", 0):
        return None
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    if abs(match.scale * np.sqrt(match.size) - 1.0) > 1e-6:  # QAttention's own scale
        return None
    x, w = (_dequantized(t) for t in gemm.inputs[:2])
    if x is None or w is None:
        return None
    weight = constant_value(w.inputs[0])
    hidden = 3 * match.heads * match.size
    if weight is None or weight.dtype != np.int8 or weight.ndim != 2 or weight.shape[1] != hidden:
        return None
    weight_scale = constant_value(w.inputs[1])
    per_column = weight_scale is not None and weight_scale.size == hidden
    if weight_scale is None or (weight_scale.size != 1 and not per_column):
        return None
    if per_column and int(w.attrs.get("axis", 1)) not in (1, -1):
        return None
    if x.inputs[0].dtype != np.uint8 or constant_value(x.inputs[1]) is None:
        return None
    bias = _float_bias(gemm.inputs[2], hidden)
    if bias is None or 0 in match.packed[1:2]:  # a 0 would copy E, not 3 H D
        return None
    return _Projection(*x.inputs, *w.inputs, bias, int(weight.shape[0]))


def _float_bias(tensor: gs.Tensor, size: int) -> np.ndarray | None:
    value = constant_value(tensor)
    if value is None:
        node = _dequantized(tensor)
        parts = [constant_value(t) for t in node.inputs] if node is not None else [None]
        if any(part is None for part in parts):
            return None
        quantized, scale, zero = parts
        value = (quantized.astype(np.float64) - zero.astype(np.float64)) * scale
    if value.size != size:
        return None
    return value.reshape(size).astype(np.float32)


def _replace(graph: gs.Graph, match: _Match, taken: set[str], form: str) -> None:
    def fresh(base: str) -> str:
        return unique_name(base, taken)

    base = match.nodes[0].name or "attention"
    projection = _projection(graph, match) if form == "ort" else None
    if projection is not None:
        nodes, out = _quantized(match, projection, f"{base}/qattention", fresh)
        replaced = [producer(match.source), *match.nodes]
    else:
        nodes, out = _unpacked(
            match, f"{base}/{'attention' if form == 'onnx' else 'mha'}", form, fresh
        )
        replaced = match.nodes
    graph.nodes.extend(nodes)
    match.merge.inputs[0] = out
    for node in replaced:
        node.outputs.clear()
        node.inputs.clear()


Fresh = Callable[[str], str]


def _reshape(
    source: gs.Tensor, target: list[int], name: str, dtype: np.dtype, fresh: Fresh
) -> tuple[gs.Node, gs.Variable]:
    shape = gs.Constant(fresh(f"{name}_shape"), np.array(target, np.int64))
    out = gs.Variable(fresh(name), dtype=dtype)
    return gs.Node("Reshape", fresh(f"{name}_reshape"), inputs=[source, shape], outputs=[out]), out


def _unpacked(
    match: _Match, base: str, form: str, fresh: Fresh
) -> tuple[list[gs.Node], gs.Variable]:
    """q, k, v split from the packed projection into ONNX Attention or MultiHeadAttention."""
    dtype = match.source.dtype
    reshape, packed = _reshape(match.source, match.packed, f"{base}_qkv", dtype, fresh)
    hidden = match.heads * match.size
    sizes = gs.Constant(fresh(f"{base}_split"), np.array([hidden] * 3, np.int64))
    q, k, v = (gs.Variable(fresh(f"{base}_{p}"), dtype=dtype) for p in "qkv")
    out = gs.Variable(fresh(f"{base}_out"), dtype=dtype)
    split = gs.Node("Split", fresh(f"{base}_split"), {"axis": 2}, [packed, sizes], [q, k, v])
    if form == "onnx":
        attrs = {"q_num_heads": match.heads, "kv_num_heads": match.heads, "scale": match.scale}
        attention = gs.Node("Attention", fresh(base), attrs, [q, k, v], [out])
    else:
        attrs = {"num_heads": match.heads, "scale": match.scale}
        attention = gs.Node(
            "MultiHeadAttention", fresh(base), attrs, [q, k, v], [out], domain="com.microsoft"
        )
    return [reshape, split, attention], out


def _quantized(
    match: _Match, proj: _Projection, base: str, fresh: Fresh
) -> tuple[list[gs.Node], gs.Variable]:
    target = [*match.packed[:2], proj.embed]
    reshape, tokens = _reshape(proj.input, target, f"{base}_input", np.uint8, fresh)
    bias = gs.Constant(fresh(f"{base}_bias"), proj.bias)
    out = gs.Variable(fresh(f"{base}_out"), dtype=np.float32)
    inputs = [
        tokens,
        proj.weight,
        bias,
        proj.input_scale,
        proj.weight_scale,
        gs.Variable.empty(),  # no mask
        proj.input_zero,
        proj.weight_zero,
    ]
    attrs = {"num_heads": match.heads}
    attention = gs.Node("QAttention", fresh(base), attrs, inputs, [out], domain="com.microsoft")
    return [reshape, attention], out

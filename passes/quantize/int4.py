"""Blockwise int4 weight-only quantization of MatMul weights (DequantizeLinear, opset 21).

A constant 2-D weight B [K, N] of a MatMul (a Gemm with transA=0 and alpha=1 is
first rewritten as MatMul + Add) is split along K into blocks of `block_size`
rows; each block of each column gets its own scale, amax / 7, and the values
are stored as int4 in [-8, 7] with zero point 0. A DequantizeLinear with
axis=0 and block_size restores float weights; ORT's CPU and CUDA providers fuse
DQ + MatMul into MatMulNBits, so the weights stay 4-bit in memory too.
Activations stay float. K need not be a multiple of the block size: the last
block is shorter.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.graph import constant_value, name_matches

from .placement import already_quantized
from .prepare import gemm_to_matmul
from .qdq import MIN_SCALE, Namer

INT4_MIN, INT4_MAX = -8, 7


def blockwise_params(weight: np.ndarray, block_size: int) -> np.ndarray:
    """Scales [ceil(K / block_size), N] of a [K, N] weight: max |w| of each block / 7."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    amax = np.abs(padded.reshape(blocks, block_size, n)).max(axis=1)
    scale = (amax / INT4_MAX).astype(np.float32)
    return np.where(scale > 0, np.maximum(scale, MIN_SCALE), 1.0).astype(np.float32)


def quantize_blockwise(weight: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """int4 values (as int8 numbers in [-8, 7]) of `weight` with per-block `scale`."""
    expanded = np.repeat(scale, block_size, axis=0)[: weight.shape[0]]
    return np.clip(np.rint(weight / expanded), INT4_MIN, INT4_MAX).astype(np.int8)


def _int4_constant(name: str, values: np.ndarray) -> gs.Constant:
    # numpy has no int4; onnx packs two values per byte from ml_dtypes' int4.
    tensor = onnx.numpy_helper.from_array(values.astype(ml_dtypes.int4), name)
    return gs.Constant(name, LazyValues(tensor))


def run_int4(
    graph: gs.Graph,
    block_size: int,
    ops: set[str],
    exclude_nodes: list[str],
    stats: dict[str, int | float],
    notes: list[str],
) -> bool:
    namer = Namer(graph)

    def selected(node: gs.Node) -> bool:
        return not name_matches(node.name, exclude_nodes)

    rewritten = 0
    if "Gemm" in ops:
        for node in list(graph.nodes):
            if node.op == "Gemm" and selected(node) and gemm_to_matmul(graph, node, namer):
                rewritten += 1
    count, small = 0, 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or not ({"MatMul", "Gemm"} & ops) or not selected(node):
            continue
        if already_quantized(node):
            continue
        weight = constant_value(node.inputs[1])
        if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
            continue
        if weight.shape[0] < block_size:
            small += 1
            continue
        base = node.inputs[1].name
        scale = blockwise_params(weight, block_size)
        stored = _int4_constant(
            namer(f"{base}_int4"), quantize_blockwise(weight, scale, block_size)
        )
        dequantized = gs.Variable(namer(f"{base}_dequantized"), dtype=np.float32)
        graph.nodes.append(
            gs.Node(
                "DequantizeLinear",
                namer(f"{base}_DequantizeLinear"),
                attrs={"axis": 0, "block_size": block_size},
                inputs=[stored, gs.Constant(namer(f"{base}_scale"), scale)],
                outputs=[dequantized],
            )
        )
        node.inputs[1] = dequantized
        count += 1
    if small:
        notes.append(f"left {small} MatMul weight(s) in float: fewer rows than block_size")
    stats["int4_matmuls"] = count
    if rewritten:
        stats["gemm_to_matmul"] = rewritten
    if count or rewritten:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return bool(count or rewritten)

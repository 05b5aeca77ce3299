"""Dynamic quantization: int8 weights stored, activations quantized at run time.

Each MatMul with a float input A and a constant 2-D weight B (a Gemm with
transA=0 and alpha=1 is first rewritten as MatMul + Add) becomes

    DynamicQuantizeLinear(A) -> MatMulInteger(A_q, B_q, A_zero) -> Cast -> Mul(A_scale x B_scale)

with B int8 symmetric per output column (per tensor with per_channel=false), in 7 bits
where ORT's integer kernels would saturate (`reduce_range`).
ORT fuses this chain into one DynamicQuantizeMatMul kernel. Activations get a
fresh range every run, so nothing is calibrated: the mode for MatMul-heavy
models (transformers) whose activation ranges move from input to input.
Convolutions are left float: ORT's ConvInteger is slower than its float Conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value, name_matches

from .placement import already_quantized
from .prepare import gemm_to_matmul
from .qdq import INT8, Namer, QType, quantize, weight_params


def run_dynamic(
    graph: gs.Graph,
    per_channel: bool,
    ops: set[str],
    exclude_nodes: list[str],
    stats: dict[str, int | float],
    notes: list[str],
    weight_type: QType = INT8,
) -> bool:
    namer = Namer(graph)
    excluded = 0
    for node in list(graph.nodes):
        if node.op == "Gemm" and "Gemm" in ops and _selected(node, exclude_nodes):
            if gemm_to_matmul(graph, node, namer):
                stats["gemm_to_matmul"] = stats.get("gemm_to_matmul", 0) + 1
    quantized_inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    count = 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or not ({"MatMul", "Gemm"} & ops):
            continue
        if not _selected(node, exclude_nodes):
            excluded += 1
            continue
        if already_quantized(node):
            continue
        a, b = node.inputs[0], node.inputs[1]
        weight = constant_value(b)
        if constant_value(a) is not None or weight is None or weight.ndim != 2:
            continue
        if weight.dtype != np.float32 or (a.dtype is not None and np.dtype(a.dtype) != np.float32):
            continue
        _rewrite(graph, namer, node, weight, per_channel, weight_type, quantized_inputs)
        count += 1
    if excluded:
        notes.append(f"left {excluded} MatMul node(s) in float: excluded by name")
    others = sum(1 for n in graph.nodes if n.op in ("Conv", "ConvTranspose"))
    if others:
        notes.append(f"left {others} convolution(s) in float: dynamic mode covers MatMul/Gemm")
    stats["dynamic_matmuls"] = count
    if count:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return count > 0 or bool(stats.get("gemm_to_matmul"))


def _selected(node: gs.Node, exclude_nodes: list[str]) -> bool:
    return not name_matches(node.name, exclude_nodes)


def _rewrite(
    graph: gs.Graph,
    namer: Namer,
    node: gs.Node,
    weight: np.ndarray,
    per_channel: bool,
    weight_type: QType,
    quantized_inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]],
) -> None:
    a, output = node.inputs[0], node.outputs[0]
    base = node.name or output.name
    if a.name not in quantized_inputs:
        outs = (
            gs.Variable(namer(f"{a.name}_quantized"), dtype=np.uint8),
            gs.Variable(namer(f"{a.name}_scale"), dtype=np.float32, shape=[]),
            gs.Variable(namer(f"{a.name}_zero_point"), dtype=np.uint8, shape=[]),
        )
        graph.nodes.append(
            gs.Node(
                "DynamicQuantizeLinear",
                namer(f"{a.name}_DynamicQuantizeLinear"),
                inputs=[a],
                outputs=list(outs),
            )
        )
        quantized_inputs[a.name] = outs
    a_q, a_scale, a_zero = quantized_inputs[a.name]
    params = weight_params(weight, 1 if per_channel else None, weight_type)
    b_q = gs.Constant(namer(f"{base}_weight_quantized"), quantize(weight, params))
    b_scale = gs.Constant(namer(f"{base}_weight_scale"), np.asarray(params.scale, np.float32))
    accumulated = gs.Variable(namer(f"{base}_int32"), dtype=np.int32)
    as_float = gs.Variable(namer(f"{base}_int32_float"), dtype=np.float32)
    scale = gs.Variable(namer(f"{base}_scale"), dtype=np.float32)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    graph.nodes.extend(
        [
            gs.Node(
                "MatMulInteger",
                namer(f"{base}_MatMulInteger"),
                inputs=[a_q, b_q, a_zero],
                outputs=[accumulated],
            ),
            gs.Node(
                "Cast",
                namer(f"{base}_Cast"),
                attrs={"to": onnx.TensorProto.FLOAT},
                inputs=[accumulated],
                outputs=[as_float],
            ),
            gs.Node("Mul", namer(f"{base}_scales"), inputs=[a_scale, b_scale], outputs=[scale]),
            gs.Node("Mul", namer(f"{base}_rescale"), inputs=[as_float, scale], outputs=[output]),
        ]
    )

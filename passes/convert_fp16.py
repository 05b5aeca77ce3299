"""convert-fp16: store weights and compute in float16, for GPU execution providers.

Rules:
- Every float32 node output becomes float16, and every float32 constant a node
  reads becomes a float16 copy, except in the nodes kept in float32:
  - numerically sensitive ops (`SENSITIVE_OPS`: exponentials, logarithms, roots,
    reductions and normalizations, whose float16 results overflow or lose the
    small differences they work on), plus those in `keep_ops`;
  - ops whose extra float inputs or attributes must stay float32
    (`TYPE_BOUND_OPS`: Resize scales, random generators, NMS, TopK, Range...);
  - custom-domain ops, nodes with subgraphs, Q/DQ nodes, and nodes named in
    `keep_nodes` (names or glob patterns);
  - nodes with a constant beyond float16's range (+-65504), such as a
    BatchNormalization variance of 1e11; Clip/Min/Max bounds saturate instead.
- Graph inputs and outputs stay float32, with a Cast at the boundary.
- Weights in Constant nodes are first moved to initializers, so they convert too.
- A Cast is inserted wherever a float16 tensor meets a float32 reader or the
  other way round, one per tensor and direction. Cast(to=FLOAT) inside the
  float16 region becomes Cast(to=FLOAT16).
- Non-float tensors (shapes, indices, masks) are not touched.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value, name_matches, to_model
from onnxopt.pass_api import Pass, PassContext, PassResult, register_pass

from .quantize.prepare import lift_constant_nodes
from .quantize.qdq import Namer

SENSITIVE_OPS = {
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Softmax",
    "LogSoftmax",
    "ReduceSum",
    "ReduceMean",
    "ReduceProd",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "CumSum",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
}
TYPE_BOUND_OPS = {
    "Resize",
    "Upsample",
    "Range",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "NonMaxSuppression",
    "TopK",
    "RoiAlign",
    "EyeLike",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "Constant",
}
FP16_MAX = float(np.finfo(np.float16).max)


def _float32_types(graph: gs.Graph) -> set[str]:
    """Names of the graph's float32 tensors, from onnx shape inference."""
    model = to_model(graph)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help here, the declared types are the fallback
        pass
    names = set()
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            names.add(vi.name)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            names.add(init.name)
    for tensor in graph.tensors().values():
        if tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32:
            names.add(tensor.name)
    return names


@register_pass
class ConvertFp16(Pass):
    """Store weights and compute in float16, keeping float32 I/O and sensitive ops.

    Every float32 node output and constant becomes float16 except in sensitive
    ops (exp, log, pow, roots, reductions, softmax, normalizations), ops whose
    extra inputs must stay float32 (Resize, Range, random, NMS, TopK...), custom
    ops, Q/DQ and subgraph nodes, and the ops/nodes in keep_ops/keep_nodes. Casts
    join the float16 and float32 parts, one per tensor and direction; graph inputs
    and outputs stay float32 unless keep_io_types=false. Constants beyond float16's
    range saturate at +-65504 and the notes count them.
    """

    name = "convert-fp16"
    keep_io_types: bool = True
    keep_ops: list[str] = []  # noqa: RUF012 - read only
    keep_nodes: list[str] = []  # noqa: RUF012

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        lift_constant_nodes(graph)
        float32 = _float32_types(graph)
        namer = Namer(graph)
        keep = SENSITIVE_OPS | TYPE_BOUND_OPS | set(self.keep_ops)
        half = [
            n
            for n in graph.nodes
            if n.op not in keep
            and n.domain in (None, "", "ai.onnx")
            and not name_matches(n.name, self.keep_nodes)
            and not any(isinstance(v, gs.Graph) for v in n.attrs.values())
            and any(t.name in float32 for t in [*n.inputs, *n.outputs] if t is not None)
            and not _out_of_range(n)
        ]
        out_of_range = sum(1 for n in graph.nodes if _out_of_range(n))
        half_ids = {id(n) for n in half}
        if not half:
            return PassResult(False, notes=["no node to convert"])
        # Float32 outputs of converted nodes become float16.
        converted: set[str] = set()
        for node in half:
            for tensor in node.outputs:
                if tensor.name in float32:
                    tensor.dtype = np.float16
                    converted.add(tensor.name)
            if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
                node.attrs["to"] = onnx.TensorProto.FLOAT16
            if node.op == "ConstantOfShape":
                value = node.attrs.get("value")
                if isinstance(value, gs.Constant) and value.values.dtype == np.float32:
                    values = np.asarray(value.values, np.float16)
                    node.attrs["value"] = gs.Constant(value.name, values)
        casts = _Casts(graph, namer)
        halved: dict[int, gs.Constant] = {}
        saturated = 0
        for node in list(graph.nodes):  # Casts appended below are not visited
            if id(node) in half_ids:
                for index, tensor in enumerate(node.inputs):
                    if tensor is None or tensor.name not in float32:
                        continue
                    value = constant_value(tensor) if isinstance(tensor, gs.Constant) else None
                    if value is not None:
                        if id(tensor) not in halved:
                            saturated += int(np.count_nonzero(np.abs(value) > FP16_MAX))
                            clipped = np.asarray(np.clip(value, -FP16_MAX, FP16_MAX), np.float16)
                            name = namer(f"{tensor.name}_fp16")
                            halved[id(tensor)] = gs.Constant(name, clipped)
                        node.inputs[index] = halved[id(tensor)]
                    elif tensor.name not in converted:
                        node.inputs[index] = casts.get(tensor, np.float16)
            else:
                for index, tensor in enumerate(node.inputs):
                    if tensor is not None and tensor.name in converted:
                        node.inputs[index] = casts.get(tensor, np.float32)
        outputs = 0
        for index, tensor in enumerate(list(graph.outputs)):
            if tensor.name in converted:
                graph.outputs[index] = _restore_output(graph, tensor, namer)
                outputs += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        notes = [f"kept {len(graph.nodes) - len(half) - casts.count} node(s) in float32"]
        if saturated:
            notes.append(f"{saturated} Clip/Min/Max bound(s) beyond float16 range saturated")
        if out_of_range:
            notes.append(
                f"kept {out_of_range} node(s) in float32: constants beyond float16's range"
            )
        stats = {
            "fp16_nodes": len(half),
            "fp16_constants": len(halved),
            "casts": casts.count + outputs,
        }
        return PassResult(True, stats=stats, notes=notes)


def _out_of_range(node: gs.Node) -> bool:
    """Whether a constant input would saturate in float16 and the saturation would matter.

    Clip, Min and Max bounds beyond the float16 range bound nothing a float16
    tensor can hold, so saturating them is harmless.
    """
    if node.op in ("Clip", "Min", "Max"):
        return False
    for tensor in node.inputs:
        if isinstance(tensor, gs.Constant):
            value = np.asarray(tensor.values)
            if value.dtype == np.float32 and value.size and np.abs(value).max() > FP16_MAX:
                return True
    return False


class _Casts:
    """One Cast per (tensor, target type), created on first use."""

    def __init__(self, graph: gs.Graph, namer: Namer):
        self.graph = graph
        self.namer = namer
        self.made: dict[tuple[str, str], gs.Variable] = {}
        self.count = 0

    def get(self, tensor: gs.Tensor, dtype: type) -> gs.Variable:
        key = (tensor.name, np.dtype(dtype).name)
        if key not in self.made:
            suffix = "fp16" if dtype is np.float16 else "fp32"
            out = gs.Variable(
                self.namer(f"{tensor.name}_{suffix}"), dtype=dtype, shape=tensor.shape
            )
            target = onnx.TensorProto.FLOAT16 if dtype is np.float16 else onnx.TensorProto.FLOAT
            self.graph.nodes.append(
                gs.Node(
                    "Cast",
                    self.namer(f"{tensor.name}_cast_{suffix}"),
                    attrs={"to": target},
                    inputs=[tensor],
                    outputs=[out],
                )
            )
            self.made[key] = out
            self.count += 1
        return self.made[key]


def _restore_output(graph: gs.Graph, tensor: gs.Variable, namer: Namer) -> gs.Variable:
    """Keep a float32 graph output of the same name behind a Cast from its float16 value."""
    name = tensor.name
    tensor.name = namer(f"{name}_fp16")
    restored = gs.Variable(name, dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(
        gs.Node(
            "Cast",
            namer(f"{name}_cast_fp32"),
            attrs={"to": onnx.TensorProto.FLOAT},
            inputs=[tensor],
            outputs=[restored],
        )
    )
    return restored

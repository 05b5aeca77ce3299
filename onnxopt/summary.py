"""What `onnxopt inspect` shows: ops, parameters, MACs, size, opset, inputs and outputs.

MACs are counted for Conv, ConvTranspose, Gemm and MatMul from shapes that
onnx shape inference derives after binding the input dims: those given, else
static dims and a dynamic batch of 1. Other dynamic dims (an image's height and
width) are not guessed: nodes whose shapes stay unknown, or come out as
non-positive, are counted as unknown, and the inputs left unbound are named in
`unbound` so that the report can say which --shape would count them.

Parameters are the initializers and the tensors of Constant nodes: exporters
such as Paddle's keep every weight in a Constant node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .data import bind_shape, check_shapes, model_inputs
from .errors import FeedError
from .model import default_opset
from .report import Table

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ModelSummary:
    nodes: int
    ops: Counter[str]
    parameters: int
    parameter_bytes: int
    model_bytes: int
    opset: int
    ir_version: int
    macs: int
    macs_unknown: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    macs_by_op: dict[str, int] = field(default_factory=dict)
    unbound: list[str] = field(default_factory=list)

    @property
    def macs_text(self) -> str:
        """The MAC count, or "unknown" with the --shape that would count it when nodes
        depend on dims nobody bound (a partial sum would read as the model's cost)."""
        if not self.macs_unknown:
            return f"{self.macs:,}"
        nodes = f"{self.macs_unknown} node{'s' * (self.macs_unknown > 1)}"
        hint = f": pass --shape {' '.join(self.unbound)} (N: your size)" if self.unbound else ""
        return f"unknown ({nodes} of unknown shape{hint}; {self.macs:,} counted)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "ops": dict(self.ops.most_common()),
            "parameters": self.parameters,
            "parameter_bytes": self.parameter_bytes,
            "model_bytes": self.model_bytes,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "macs": self.macs,
            "macs_by_op": self.macs_by_op,
            "macs_unknown_nodes": self.macs_unknown,
            "unbound_inputs": self.unbound,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


def _shape_map(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, list], list[str]]:
    """Inferred shapes with the inputs bound as far as `shapes` and a batch of 1 go, and
    `name=dims` (N for each dim left dynamic) for the inputs left partly unbound."""
    unbound: list[str] = []
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    specs = {s.name: s for s in model_inputs(model)}
    for vi in bound.graph.input:
        if vi.name not in specs:
            continue
        try:
            dims = bind_shape(specs[vi.name], shapes)
        except FeedError:  # dynamic dims beyond the batch and no --shape for them
            declared = specs[vi.name].shape
            dims = tuple(
                1 if i == 0 and not isinstance(d, int) else d for i, d in enumerate(declared)
            )
            unbound.append(specs[vi.name].shape_hint())
        for dim, value in zip(vi.type.tensor_type.shape.dim, dims, strict=True):
            if isinstance(value, int):
                dim.Clear()
                dim.dim_value = value
    # Shapes stored by the exporter (Paddle writes -1 for dynamic dims) would clash with
    # the bound ones and stop inference there: infer every shape afresh.
    del bound.graph.value_info[:]
    for vi in bound.graph.output:
        vi.type.tensor_type.ClearField("shape")
    try:
        bound = onnx.shape_inference.infer_shapes(bound, data_prop=True)
    except Exception:
        pass
    out: dict[str, list] = {}
    for vi in [*bound.graph.input, *bound.graph.value_info, *bound.graph.output]:
        dims = [
            d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
        ]
        if vi.type.tensor_type.HasField("shape"):
            out[vi.name] = dims
    for init in bound.graph.initializer:
        out[init.name] = list(init.dims)
    return out, unbound


def macs_per_sample(
    model: onnx.ModelProto, shapes: dict[str, tuple[int | str | None, ...]]
) -> int | None:
    """MACs of one sample from shapes already inferred (`model.inferred_shapes`), a
    dynamic first dim counted as 1; None when any Conv, Gemm or MatMul cannot be sized."""
    dims = {
        name: [1 if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shape)]
        for name, shape in shapes.items()
    }
    dims.update({init.name: list(init.dims) for init in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type in MAC_OPS and node.domain in ("", "ai.onnx"):
            macs = _macs(node, dims)
            if macs is None:
                return None
            total += macs
    return total


def _macs(node: onnx.NodeProto, shapes: dict[str, list]) -> int | None:
    def known(name: str) -> list | None:
        dims = shapes.get(name)
        # Exporters write -1 for unknown dims, and a wrong shape can infer to 0 or less.
        sized = dims is not None and all(isinstance(d, int) and d > 0 for d in dims)
        return dims if sized else None

    if node.op_type in ("Conv", "ConvTranspose"):
        weight, out, inp = known(node.input[1]), known(node.output[0]), known(node.input[0])
        if weight is None or out is None or inp is None:
            return None
        kernel = int(np.prod(weight[2:]))
        if node.op_type == "Conv":
            return int(np.prod(out)) * weight[1] * kernel
        return int(np.prod(inp)) * weight[1] * kernel
    if node.op_type == "Gemm":
        a, out = known(node.input[0]), known(node.output[0])
        if a is None or out is None:
            return None
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return int(np.prod(out)) * k
    if node.op_type == "MatMul":
        a, out = known(node.input[0]), known(node.output[0])
        if a is None or out is None:
            return None
        return int(np.prod(out)) * a[-1]
    return None


def summarize(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
) -> ModelSummary:
    check_shapes(shapes or {}, model_inputs(model))
    shape_map, unbound = _shape_map(model, shapes or {})
    macs_by_op: Counter[str] = Counter()
    unknown = 0
    for node in model.graph.node:
        if node.op_type in MAC_OPS and node.domain in ("", "ai.onnx"):
            macs = _macs(node, shape_map)
            if macs is None:
                unknown += 1
            else:
                macs_by_op[node.op_type] += macs
    tensors = [*model.graph.initializer, *_constant_tensors(model.graph)]
    fed = {s.name for s in model_inputs(model)}
    params = sum(int(np.prod(t.dims)) for t in tensors)
    param_bytes = sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize() for t in tensors)
    return ModelSummary(
        nodes=len(model.graph.node),
        ops=Counter(n.op_type for n in model.graph.node),
        parameters=params,
        parameter_bytes=param_bytes,
        model_bytes=model.ByteSize(),
        opset=default_opset(model),
        ir_version=model.ir_version,
        macs=sum(macs_by_op.values()),
        macs_unknown=unknown,
        inputs=[_describe_value(i) for i in model.graph.input if i.name in fed],
        outputs=[_describe_value(o) for o in model.graph.output],
        macs_by_op=dict(macs_by_op),
        unbound=unbound,
    )


def _constant_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The tensors that Constant nodes of the main graph hold in their `value`."""
    return [
        attr.t
        for node in graph.node
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        for attr in node.attribute
        if attr.name == "value"
    ]


def _describe_value(vi: onnx.ValueInfoProto) -> str:
    """`name: dtype [batchx3x?x?]`: a symbolic dim keeps a short name (8 characters at
    most, such as batch or seq) and is `?` otherwise (p2o.DynamicDimension.0)."""
    tensor_type = vi.type.tensor_type
    dims = "x".join(
        str(d.dim_value)
        if d.HasField("dim_value")
        else d.dim_param
        if d.dim_param.isidentifier() and len(d.dim_param) <= 8
        else "?"
        for d in tensor_type.shape.dim
    )
    dtype = (
        onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if tensor_type.elem_type
        else "?"
    )
    return f"{vi.name}: {np.dtype(dtype) if dtype != '?' else dtype} [{dims}]"


def summary_tables(summary: ModelSummary, label: str = "model") -> list[Table]:
    facts = Table(f"{label}", ["property", "value"])
    facts.rows += [
        ["nodes", summary.nodes],
        ["parameters", f"{summary.parameters:,}"],
        ["parameter bytes", f"{summary.parameter_bytes:,}"],
        ["model bytes", f"{summary.model_bytes:,}"],
        ["MACs", summary.macs_text],
        ["opset / IR", f"{summary.opset} / {summary.ir_version}"],
        *[["input", i] for i in summary.inputs],
        *[["output", o] for o in summary.outputs],
    ]
    ops = Table("Ops", ["op", "count"], [[op, n] for op, n in summary.ops.most_common()])
    return [facts, ops]

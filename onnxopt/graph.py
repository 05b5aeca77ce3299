"""The graph IR passes work on: onnx-graphsurgeon's Graph plus the helpers every pass needs.

A pass receives a `gs.Graph`. These helpers answer the questions every pass
asks (who produces this tensor, who consumes it, is it a constant and what is
its value) and do the edits every pass makes (replace a tensor everywhere,
bypass a node) while keeping graph output names stable.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains
from onnx_graphsurgeon.ir.tensor import SparseValues

Tensor = gs.Tensor
Node = gs.Node
Graph = gs.Graph
Constant = gs.Constant
Variable = gs.Variable

DEFAULT_DOMAINS = ("", "ai.onnx")


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a ModelProto into a graph (constant values load lazily)."""
    return gs.import_onnx(model)


def upgraded(graph: gs.Graph, target: int) -> gs.Graph:
    """`graph` converted to opset `target` (onnxopt.model.upgrade_opset; a no-op at or above).

    The weights are read into arrays at once, so that the converted ModelProto can
    go instead of staying alive under the graph's lazy constants.
    """
    from .model import upgrade_opset

    if (graph.opset or 0) >= target:
        return graph
    converted = to_graph(upgrade_opset(to_model(graph), target))
    for tensor in converted.tensors().values():
        if isinstance(tensor, gs.Constant):
            _ = tensor.values
    return converted


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export `graph`, keeping the model-level fields of `like` (IR version, metadata, docs)."""
    model = _export(graph)
    _hoist_shared_initializers(model.graph)
    if like is not None:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
        model.ir_version = max(like.ir_version, needed)
        model.doc_string = like.doc_string
        model.domain = like.domain
        model.model_version = like.model_version
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
        # Keep imports of domains the graph no longer names only if functions need them.
        known = {entry.domain for entry in model.opset_import}
        for entry in like.opset_import:
            if entry.domain not in known and entry.domain not in DEFAULT_DOMAINS:
                model.opset_import.append(entry)
    _declare_initializers(model)
    return model


def _declare_initializers(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too; GraphSurgeon drops those.

    The main graph lists them again (the model keeps its IR version and what old
    runtimes expect); a subgraph's inputs are positional, so a subgraph initializer
    raises the IR version to 4 instead.
    """
    if model.ir_version >= 4:
        return
    graph = model.graph
    declared = {vi.name for vi in graph.input}
    for tensor in graph.initializer:
        if tensor.name not in declared:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
            declared.add(tensor.name)

    def subgraph_initializers(g: onnx.GraphProto) -> bool:
        for node in g.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    if sub.initializer or subgraph_initializers(sub):
                        return True
        return False

    if subgraph_initializers(graph):
        model.ir_version = 4


def _export(graph: gs.Graph) -> onnx.ModelProto:
    # GraphSurgeon's own export builds a GraphProto and then copies it into a model, so
    # every weight briefly exists three times; here each piece is written straight into
    # the one ModelProto (a weight is copied once, as it is exported).
    model = onnx.ModelProto()
    model.ir_version = graph.ir_version if graph.ir_version is not None else onnx.IR_VERSION
    _export_graph(graph, model.graph)
    model.opset_import.extend(update_import_domains(graph))
    model.functions.extend(OnnxExporter.export_function(f) for f in graph.functions)
    model.producer_name = graph.producer_name or ""
    model.producer_version = graph.producer_version or ""
    return model


def _export_graph(graph: gs.Graph, out: onnx.GraphProto) -> None:
    out.name = graph.name or ""
    if graph.doc_string:
        out.doc_string = graph.doc_string
    out.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    out.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    out.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    tensors = graph.tensors()
    for tensor in tensors.values():
        if not isinstance(tensor, gs.Constant):
            continue
        if isinstance(tensor._values, SparseValues):
            out.sparse_initializer.append(OnnxExporter.export_sparse_tensor_proto(tensor))
        else:
            out.initializer.append(OnnxExporter.export_tensor_proto(tensor))
    boundary = {t.name for t in [*graph.inputs, *graph.outputs]}
    out.value_info.extend(
        OnnxExporter.export_value_info_proto(t, False)
        for name, t in tensors.items()
        if name not in boundary
        and isinstance(t, gs.Variable)
        and (t.dtype is not None or t.shape is not None)
    )


def _hoist_shared_initializers(graph: onnx.GraphProto) -> None:
    # GraphSurgeon's exporter writes an outer weight into every subgraph that reads it
    # (and not into the outer graph when only subgraphs read it). Identical copies are
    # hoisted to the main graph, which every subgraph sees; a name whose copies differ
    # is a subgraph's own constant and stays where it is.
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}

    def visit(g: onnx.GraphProto, top: bool) -> None:
        if not top:
            for tensor in g.initializer:
                copies.setdefault(tensor.name, []).append((g, tensor))
        for node in g.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub, False)

    visit(graph, True)
    top_names = {t.name for t in graph.initializer}
    for name, found in copies.items():
        if len(found) < 2 and name not in top_names:
            continue
        first = found[0][1].SerializeToString()
        if any(t.SerializeToString() != first for _, t in found[1:]):
            continue
        if name not in top_names:
            graph.initializer.append(found[0][1])
            top_names.add(name)
        for g, _ in found:
            keep = [t for t in g.initializer if t.name != name]
            del g.initializer[:]
            g.initializer.extend(keep)


# Ops only a quantized model has: their presence marks a candidate as lossy.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
    }
)


def is_default(node: gs.Node) -> bool:
    """Whether the node belongs to the standard ONNX domain (GraphSurgeon may leave it None)."""
    return (node.domain or "") in DEFAULT_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read `tensor` (each once, in graph order of discovery)."""
    seen: list[gs.Node] = []
    for node in tensor.outputs:
        if all(node is not s for s in seen):
            seen.append(node)
    return seen


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name):
        return None
    if isinstance(tensor, gs.Constant):
        try:
            return np.asarray(tensor.values)
        except Exception:  # a data type numpy cannot hold is simply not a known constant
            return None
    node = producer(tensor)
    if node is None or node.op != "Constant" or not is_default(node):
        return None
    attr = node.attrs.get("value")
    if isinstance(attr, gs.Constant):
        return np.asarray(attr.values)
    if isinstance(attr, np.ndarray):
        return attr
    for key, dtype in (
        ("value_float", np.float32),
        ("value_int", np.int64),
        ("value_floats", np.float32),
        ("value_ints", np.int64),
    ):
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=dtype)
    return None


def int_list(tensor: gs.Tensor | None) -> list[int] | None:
    """A constant integer tensor as a flat list (axes, shapes, pads), else None."""
    value = constant_value(tensor)
    if value is None or value.dtype.kind not in "iu":
        return None
    return [int(v) for v in value.reshape(-1)]


def is_absent(tensor: gs.Tensor | None) -> bool:
    """An omitted optional input or output (empty name)."""
    return tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(inp is tensor for inp in graph.inputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def can_rename(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether `tensor` may take another name: an intermediate written by a node of `graph`."""
    if not isinstance(tensor, gs.Variable) or not tensor.inputs:
        return False
    if is_graph_input(graph, tensor) or is_graph_output(graph, tensor):
        return False
    writer = tensor.inputs[0]
    return any(node is writer for node in graph.nodes)


def swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make `node` read `new` wherever it read `old`."""
    for i, tensor in enumerate(node.inputs):
        if tensor is old:  # gs keeps consumer lists in sync on item assignment only
            node.inputs[i] = new


def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of `old` read `new` instead.

    When `old` is a graph output its name must survive: if `new` is an
    intermediate of this graph it takes over the name, otherwise an Identity
    keeps it.
    """
    for node in list(old.outputs):
        swap_input(node, old, new)
    if not is_graph_output(graph, old):
        return
    index = next(i for i, t in enumerate(graph.outputs) if t is old)
    name, dtype, shape = old.name, old.dtype, old.shape
    old.name = f"{name}__replaced"
    if can_rename(graph, new):
        new.name = name
        new.dtype = dtype if dtype is not None else new.dtype
        new.shape = shape if shape is not None else new.shape
        graph.outputs[index] = new
    else:
        out = gs.Variable(name, dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node("Identity", name=f"{name}__keep", inputs=[new], outputs=[out]))
        graph.outputs[index] = out


def detach(node: gs.Node) -> None:
    """Disconnect a node so that tidy() drops it."""
    node.inputs.clear()
    node.outputs.clear()


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`... whichever is not in `taken` (which then holds it)."""
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name


def name_matches(name: str | None, patterns: Iterable[str]) -> bool:
    """Whether `name` matches any of the glob `patterns` (`conv*`, `/blocks/*/MatMul`):
    how every pass option that names nodes reads its patterns."""
    return any(fnmatch.fnmatchcase(name or "", p) for p in patterns)


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every subgraph below it, outermost first."""
    found = [graph]
    for sub in subgraphs(graph):
        found.extend(all_graphs(sub))
    return found


def bypass(graph: gs.Graph, node: gs.Node, keep: int = 0) -> None:
    """Remove `node`, wiring its input `keep` to wherever its first output went."""
    source = node.inputs[keep]
    target = node.outputs[0]
    replace_tensor(graph, target, source)
    detach(node)


def subgraphs(graph: gs.Graph) -> list[gs.Graph]:
    """Direct subgraphs (If branches, Loop and Scan bodies) of the graph's nodes."""
    subs: list[gs.Graph] = []
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                subs.append(value)
            elif isinstance(value, list):
                subs.extend(v for v in value if isinstance(v, gs.Graph))
    return subs


def tidy(graph: gs.Graph) -> gs.Graph:
    """Drop nodes and tensors that no output needs, then sort topologically."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
    graph.toposort(recurse_subgraphs=True)
    return graph


def op_histogram(graph: gs.Graph | onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op type the main graph holds."""
    nodes = graph.graph.node if isinstance(graph, onnx.ModelProto) else graph.nodes
    return Counter(node.op_type if hasattr(node, "op_type") else node.op for node in nodes)


def node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)

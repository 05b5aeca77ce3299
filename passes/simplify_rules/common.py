"""Small graph questions the simplify passes share: domains, subgraphs, scalar constants, names."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    can_rename,
    is_graph_output,
    subgraphs,
    swap_input,
)

# Ops whose output is not a function of their inputs: never folded, never deduplicated.
RANDOM_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


def has_subgraph(node: gs.Node) -> bool:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            return True
        if isinstance(value, list) and any(isinstance(v, gs.Graph) for v in value):
            return True
    return False


def unwritable(graph: gs.Graph) -> str:
    """Why GraphSurgeon cannot write this model back as it read it ('' when it can).

    It drops TYPE_PROTO attributes (an Optional without input needs its `type`)
    and cannot export optional-typed values: a pass that edited such a model
    would hand back a broken one, so the simplify passes leave it alone.
    """
    for g in all_graphs(graph):
        for node in g.nodes:
            if node.op == "Optional" and (node.domain or "") in ("", "ai.onnx") and not node.inputs:
                return "an Optional node without input (its type attribute would be lost)"
        values = [*g.inputs, *g.outputs, *(t for n in g.nodes for t in n.outputs)]
        if any(getattr(t, "type", "tensor_type") == "optional_type" for t in values):
            return "optional-typed values"
    return ""


def all_graphs(graph: gs.Graph, skip: gs.Graph | None = None) -> Iterator[gs.Graph]:
    """The graph and every subgraph below it, outermost first (leaving out `skip`)."""
    if graph is skip:
        return
    yield graph
    for sub in subgraphs(graph):
        yield from all_graphs(sub, skip)


def all_names(graph: gs.Graph, skip: gs.Graph | None = None) -> set[str]:
    """Every tensor and node name in the graph and its subgraphs (leaving out `skip`)."""
    names: set[str] = set()
    for g in all_graphs(graph, skip):
        names.update(t.name for t in g.inputs + g.outputs)
        for node in g.nodes:
            if node.name:
                names.add(node.name)
            names.update(t.name for t in node.inputs + node.outputs if t.name)
    return names


def replace_with_constant(graph: gs.Graph, tensor: gs.Variable, value: np.ndarray) -> None:
    """Make every reader of `tensor` read a constant instead; the writer is left to tidy().

    A graph output keeps its name, type and shape: it becomes the output of a
    Constant node, because an output must stay a named value of this graph.
    """
    value = np.asarray(value)
    if is_graph_output(graph, tensor):
        writer = tensor.inputs[0] if tensor.inputs else None
        if writer is not None:
            index = next(i for i, t in enumerate(writer.outputs) if t is tensor)
            writer.outputs[index] = gs.Variable(f"{tensor.name}__folded")
        const = gs.Constant(f"{tensor.name}__value", value)
        graph.nodes.append(
            gs.Node(
                "Constant", name=f"{tensor.name}__const", attrs={"value": const}, outputs=[tensor]
            )
        )
        return
    const = gs.Constant(tensor.name, value)
    tensor.name = f"{tensor.name}__folded"
    for node in list(tensor.outputs):
        swap_input(node, tensor, const)


def reroute(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every reader of `old` read `new`; False (and nothing done) if that is not safe.

    When `old` is a graph output, `new` takes over its name, type and declared
    shape, which needs `new` to be an intermediate of this graph; otherwise the
    rewrite would need an extra node and is declined.
    """
    if old is new:
        return False
    if is_graph_output(graph, old):
        if not can_rename(graph, new):
            return False
        name = old.name
        old.name = f"{name}__old"
        new.name = name
        new.dtype = old.dtype if old.dtype is not None else new.dtype
        new.shape = old.shape if old.shape is not None else new.shape
        graph.outputs = [new if t is old else t for t in graph.outputs]
    for node in list(old.outputs):
        swap_input(node, old, new)
    return True


def is_read(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether anything sees `tensor`: a node, or an output of this graph or of a subgraph
    below it (a branch may return an outer value as it is), which the user or the
    enclosing node reads."""
    return bool(tensor.outputs) or any(is_graph_output(g, tensor) for g in all_graphs(graph))


def sole_reader(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading `tensor`, when exactly one does and it is not a graph output."""
    readers = tensor.outputs
    if len(readers) != 1 or is_graph_output(graph, tensor):
        return None
    if sum(1 for t in readers[0].inputs if t is tensor) != 1:
        return None
    return readers[0]


def tidy(graph: gs.Graph) -> gs.Graph:
    """Drop what no output needs, then sort every (sub)graph topologically.

    Same effect as onnxopt.graph.tidy, with a linear-time sort: the simplify
    passes call it after every round, on graphs of thousands of nodes.
    """
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
    for g in all_graphs(graph):
        toposort(g)
    return graph


def _outer_reads(node: gs.Node) -> list[gs.Tensor]:
    """Tensors the node's subgraphs read (those written inside simply never match outside)."""
    reads: list[gs.Tensor] = []
    for value in node.attrs.values():
        subs = value if isinstance(value, list) else [value]
        for sub in subs:
            if isinstance(sub, gs.Graph):
                for g in all_graphs(sub):
                    for inner in g.nodes:
                        reads.extend(inner.inputs)
    return reads


def toposort(graph: gs.Graph) -> None:
    """Order the graph's nodes so every node follows the writers of what it reads (stable)."""
    nodes = list(graph.nodes)
    writer = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    state = [0] * len(nodes)  # 0 new, 1 in progress, 2 placed
    order: list[gs.Node] = []
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, False)]
        while stack:
            index, expanded = stack.pop()
            if expanded:
                if state[index] != 2:
                    state[index] = 2
                    order.append(nodes[index])
                continue
            if state[index]:
                continue
            state[index] = 1
            stack.append((index, True))
            node = nodes[index]
            reads = list(node.inputs)
            if has_subgraph(node):
                reads += _outer_reads(node)
            for tensor in reversed(reads):
                before = writer.get(id(tensor))
                if before is not None and before != index and state[before] == 0:
                    stack.append((before, False))
    graph.nodes = order

"""Run the row-wise part of a transformer on 2-D tensors, so its linear layers become Gemms.

A transformer's linear layers see [batch, tokens, features] activations: each
MatMul by a constant weight and the Add of its bias work row by row, as do the
LayerNormalization, GELU and residual Adds between them. ORT's int8 kernel for a
3-D MatMul has no bias input, so every bias stays a separate float Add; on 2-D
rows `MatMul + Add` becomes one Gemm and then one QGemm with an int32 bias.

`flatten_rows` finds connected regions of such row-wise nodes over tensors that
share their leading dims, reshapes each tensor entering a region to
[-1, features] once, and reshapes back where a tensor leaves it (attention
reshapes, token pooling, graph outputs). Results are unchanged: a row-wise op
computes the same numbers on the same rows in either layout.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import consumers, is_default, is_graph_output, producer
from onnxopt.passes.simplify_rules.shapes import ShapeTable

from .qdq import Namer

ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
UNARY = {"Erf", "Relu", "Gelu", "Sigmoid", "Tanh", "Sqrt", "Neg", "Abs", "Exp", "Log", "Clip"}


def flatten_rows(graph: gs.Graph, namer: Namer, skip: Callable[[gs.Node], bool]) -> int:
    """Flatten each row-wise region that holds a MatMul + bias Add; return how many regions."""
    table = ShapeTable(graph)
    done: set[int] = set()
    count = 0
    for seed in list(graph.nodes):
        if id(seed) in done or not _linear(seed, table) or skip(seed):
            continue
        lead = _lead(seed.inputs[0], table)
        if lead is None:
            continue
        region = _grow(seed, lead, table, skip)
        done.update(region)
        if any(_has_bias_add(n, region) for n in region.values() if n.op == "MatMul"):
            _flatten(graph, region, lead, table, namer)
            count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return count


def ranks(graph: gs.Graph) -> dict[str, int]:
    """The rank of every tensor shape inference can tell (for the Gemm rewrite after this one)."""
    table = ShapeTable(graph)
    found = {name: table.rank(t) for name, t in graph.tensors().items()}
    return {name: rank for name, rank in found.items() if rank is not None}


def _lead(tensor: gs.Tensor, table: ShapeTable) -> tuple | None:
    """The two leading dims of a rank-3 float variable with a static last dim, if restorable."""
    if not isinstance(tensor, gs.Variable):
        return None
    shape = table.shape(tensor)
    dtype = table.dtype(tensor)
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        return None
    if dtype is None or dtype.kind != "f" or any(d is None for d in shape[:2]):
        return None
    if sum(not isinstance(d, int) for d in shape[:2]) > 1:
        return None  # the way back is Reshape(x, [d0, d1, n]) with at most one -1
    return tuple(shape[:2])


def _linear(node: gs.Node, table: ShapeTable) -> bool:
    """MatMul of a rank-3 activation by a constant 2-D weight."""
    return (
        node.op == "MatMul"
        and is_default(node)
        and len(node.inputs) == 2
        and isinstance(node.inputs[1], gs.Constant)
        and len(node.inputs[1].shape) == 2
        and table.rank(node.inputs[0]) == 3
    )


def _row_constant(tensor: gs.Tensor) -> bool:
    """A constant that broadcasts along the last dim only (a scalar or a row vector)."""
    if not isinstance(tensor, gs.Constant):
        return False
    shape = tuple(tensor.shape)
    return len(shape) <= 3 and all(d == 1 for d in shape[:-1])


def _row_wise(node: gs.Node, lead: tuple, table: ShapeTable) -> bool:
    """Whether the node works row by row with every variable in and out led by `lead`."""
    if not is_default(node) or len(node.outputs) != 1:
        return False
    variables = [t for t in node.inputs if isinstance(t, gs.Variable)]
    if node.op == "MatMul":
        ok = _linear(node, table)
    elif node.op in ELEMENTWISE:
        ok = len(node.inputs) == 2 and all(
            _row_constant(t) or isinstance(t, gs.Variable) for t in node.inputs
        )
    elif node.op in UNARY:
        ok = all(_row_constant(t) for t in node.inputs[1:] if t.name)
        variables = [node.inputs[0]] if isinstance(node.inputs[0], gs.Variable) else []
    elif node.op == "LayerNormalization":
        ok = int(node.attrs.get("axis", -1)) in (-1, 2) and all(
            _row_constant(t) for t in node.inputs[1:]
        )
        variables = variables[:1]
    else:
        return False
    if not ok or not variables:
        return False
    return all(_lead(t, table) == lead for t in [*variables, *node.outputs])


def _grow(seed: gs.Node, lead: tuple, table: ShapeTable, skip) -> dict[int, gs.Node]:  # noqa: ANN001
    region = {id(seed): seed}
    todo = [seed]
    while todo:
        node = todo.pop()
        tensors = [t for t in [*node.inputs, *node.outputs] if isinstance(t, gs.Variable)]
        for tensor in tensors:
            near = [producer(tensor), *consumers(tensor)]
            for other in near:
                if other is None or id(other) in region or skip(other):
                    continue
                if _row_wise(other, lead, table):
                    region[id(other)] = other
                    todo.append(other)
    return region


def _has_bias_add(matmul: gs.Node, region: dict[int, gs.Node]) -> bool:
    readers = consumers(matmul.outputs[0])
    return (
        len(readers) == 1
        and id(readers[0]) in region
        and readers[0].op == "Add"
        and any(_row_constant(t) and t.shape for t in readers[0].inputs)
    )


def _flatten(
    graph: gs.Graph, region: dict[int, gs.Node], lead: tuple, table: ShapeTable, namer: Namer
) -> None:
    inside = set(region)
    # Every variable the region reads or writes, with its width, before any is replaced.
    variables: dict[int, tuple[gs.Variable, int]] = {}
    for node in region.values():
        for tensor in [*node.inputs, *node.outputs]:
            if isinstance(tensor, gs.Variable) and tensor.name:
                variables[id(tensor)] = (tensor, int(table.shape(tensor)[2]))  # type: ignore[index]
    for tensor, width in variables.values():
        source = producer(tensor)
        readers = consumers(tensor)
        outside = [r for r in readers if id(r) not in inside]
        enters = source is None or id(source) not in inside
        leaves = is_graph_output(graph, tensor) or bool(outside)
        if enters and not outside and _reshape_to(source, [-1, width], namer):
            tensor.shape = None  # the Reshape that made it now makes the rows
            continue
        if leaves and not enters and not is_graph_output(graph, tensor):
            if all(_retarget(r, lead, namer) for r in outside):
                tensor.shape = None  # the Reshapes that read it now read the rows
                continue
        rows = gs.Variable(namer(f"{tensor.name}_rows"), dtype=tensor.dtype, shape=None)
        if enters:
            _add_reshape(graph, namer, f"{tensor.name}_to_rows", tensor, [-1, width], rows)
        elif leaves:
            # The region writes the 2-D rows; the original name is rebuilt for the rest.
            source.outputs[source.outputs.index(tensor)] = rows
            back = [*_restore(lead), width]
            _add_reshape(graph, namer, f"{tensor.name}_from_rows", rows, back, tensor)
        else:
            tensor.shape = None  # an inner tensor: now 2-D, shape left to inference
            continue
        for reader in readers:
            if id(reader) in inside:
                reader.inputs[reader.inputs.index(tensor)] = rows
    for node in region.values():
        if node.op == "LayerNormalization":
            node.attrs["axis"] = -1
        for index, tensor in enumerate(node.inputs):
            if node.op != "MatMul" and _row_constant(tensor) and len(tensor.shape) > 1:
                node.inputs[index] = gs.Constant(
                    namer(f"{tensor.name}_row"), np.ascontiguousarray(tensor.values).reshape(-1)
                )


def _add_reshape(
    graph: gs.Graph, namer: Namer, name: str, data: gs.Tensor, dims: list[int], out: gs.Tensor
) -> None:
    target = gs.Constant(namer(f"{name}_shape"), _target(dims))
    graph.nodes.append(gs.Node("Reshape", namer(name), inputs=[data, target], outputs=[out]))


def _reshape_to(node: gs.Node | None, dims: list[int], namer: Namer) -> bool:
    """Point a Reshape with a constant target at `dims` instead (it then makes the rows)."""
    if node is None or node.op != "Reshape" or not is_default(node):
        return False
    if not isinstance(node.inputs[1], gs.Constant) or int(node.attrs.get("allowzero", 0)):
        return False
    node.inputs[1] = gs.Constant(namer(f"{node.inputs[1].name}_rows"), _target(dims))
    return True


def _retarget(node: gs.Node, lead: tuple, namer: Namer) -> bool:
    """Let a Reshape read the rows instead of the 3-D tensor; False if its target cannot.

    Its target may copy the input's dims (0): those become the leading dims, known
    or one -1, since a 0 would now copy the rows' dims.
    """
    if node.op != "Reshape" or not is_default(node) or int(node.attrs.get("allowzero", 0)):
        return False
    target = node.inputs[1]
    if not isinstance(target, gs.Constant):
        return False
    dims = [int(d) for d in np.asarray(target.values).reshape(-1)]
    restored = _restore(lead)
    for i, d in enumerate(dims):
        if d == 0:
            if i >= 2:
                return False
            dims[i] = restored[i]
    if dims.count(-1) > 1:
        return False
    node.inputs[1] = gs.Constant(namer(f"{target.name}_rows"), _target(dims))
    return True


def _restore(lead: tuple) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in lead]


def _target(dims: list[int]) -> np.ndarray:
    return np.array(dims, dtype=np.int64)

"""Fold shape computations over static dimensions without running anything.

- `Shape(x)` (with its `start`/`end`) becomes a constant when every selected
  dimension of x is known.
- `Size(x)` becomes a constant when every dimension is known.
- When only some dimensions are known, a `Gather` on axis 0 or a `Slice` on
  axis 0 that reads only known dimensions of a `Shape` output becomes a
  constant, so `Shape -> Gather(1)` folds even with a dynamic batch.

Dimensions come from onnx shape inference (ShapeTable); a symbolic or unknown
dimension is never guessed.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxopt.graph import constant_value, int_list, is_default, unique_name

from .common import replace_with_constant
from .shapes import Dim, ShapeTable


def _selected(node: gs.Node, shape: tuple[Dim, ...]) -> list[Dim]:
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    return list(shape)[slice(start, None if end is None else int(end))]


def _static(dims: list[Dim]) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in dims)


def fold_static_shapes(graph: gs.Graph, table: ShapeTable) -> int:
    """Fold Shape/Size nodes and Gather/Slice reads of known dims; returns tensors folded."""
    folded = 0
    for node in list(graph.nodes):
        if not is_default(node) or not node.inputs or not node.outputs:
            continue
        if node.op not in ("Shape", "Size"):
            continue
        shape = table.shape(node.inputs[0])
        if shape is None:
            continue
        out = node.outputs[0]
        if node.op == "Size":
            if _static(list(shape)):
                replace_with_constant(graph, out, np.array(math.prod(shape), dtype=np.int64))
                folded += 1
            continue
        dims = _selected(node, shape)
        if _static(dims):
            replace_with_constant(graph, out, np.array(dims, dtype=np.int64))
            folded += 1
            continue
        for reader in list(out.outputs):
            value = _partial_read(reader, out, dims)
            if value is not None:
                replace_with_constant(graph, reader.outputs[0], value)
                folded += 1
    return folded


def _partial_read(reader: gs.Node, shape_out: gs.Tensor, dims: list[Dim]) -> np.ndarray | None:
    """The value a Gather/Slice of a Shape output reads, when it reads only known dims."""
    if not is_default(reader) or not reader.inputs or reader.inputs[0] is not shape_out:
        return None
    rank = len(dims)
    if reader.op == "Gather" and int(reader.attrs.get("axis", 0)) == 0 and len(reader.inputs) > 1:
        indices = constant_value(reader.inputs[1])
        if indices is None or indices.dtype.kind not in "iu":
            return None
        picked = [int(i) for i in indices.reshape(-1)]
        if any(not -rank <= i < rank for i in picked):
            return None
        chosen = [dims[i] for i in picked]
        if not _static(chosen):
            return None
        return np.array(chosen, dtype=np.int64).reshape(indices.shape)
    if reader.op == "Slice" and len(reader.inputs) >= 3:
        starts, ends = int_list(reader.inputs[1]), int_list(reader.inputs[2])
        axes = int_list(reader.inputs[3]) if len(reader.inputs) > 3 else [0]
        steps = int_list(reader.inputs[4]) if len(reader.inputs) > 4 else [1]
        if None in (starts, ends, axes, steps) or axes not in ([0], [-1]):
            return None
        if len(starts) != 1 or len(ends) != 1 or len(steps) != 1 or steps[0] == 0:
            return None
        chosen = dims[slice(*_clamp(starts[0], ends[0], steps[0], rank))]
        if not _static(chosen):
            return None
        return np.array(chosen, dtype=np.int64)
    return None


def _clamp(start: int, end: int, step: int, size: int) -> tuple[int | None, int | None, int]:
    """ONNX Slice bounds as a Python slice (both clamp the same way once made explicit)."""
    if step > 0:
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        return start, end, step
    start = max(0, min(size - 1, start + size if start < 0 else start))
    end = max(-1, min(size - 1, end + size if end < 0 else end))
    return start, (None if end < 0 else end), step


# ---- Reshape targets built from the input's own shape --------------------------------------

# A known value, or (id(tensor), axis, dim): that tensor's dim, with its symbolic name
# when shape inference gave one (equal names from one inference are equal values).
Element = int | tuple[int, int, Dim]


def shape_elements(tensor: gs.Tensor, table: ShapeTable, depth: int = 0) -> list[Element] | None:
    """The elements of a small int tensor built from constants and Shape reads, if traceable."""
    value = constant_value(tensor)
    if value is not None:
        return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" else None
    if depth > 16 or not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if not is_default(node) or not node.inputs:
        return None
    op = node.op
    if op == "Shape":
        shape = table.shape(node.inputs[0])
        if shape is None:
            return None
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        axes = list(range(len(shape)))[slice(start, None if end is None else int(end))]
        source = id(node.inputs[0])
        return [shape[a] if isinstance(shape[a], int) else (source, a, shape[a]) for a in axes]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        if op == "Cast" and np_kind(int(node.attrs.get("to", 0))) not in "iu":
            return None
        return shape_elements(node.inputs[0], table, depth + 1)
    if op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [shape_elements(t, table, depth + 1) for t in node.inputs]
        if any(p is None for p in parts):
            return None
        return [e for p in parts for e in p]  # type: ignore[union-attr]
    inner = shape_elements(node.inputs[0], table, depth + 1)
    if inner is None:
        return None
    if op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and len(node.inputs) > 1:
        picked = int_list(node.inputs[1])
        if picked is None or any(not -len(inner) <= i < len(inner) for i in picked):
            return None
        return [inner[i] for i in picked]
    if op == "Slice" and len(node.inputs) >= 3:
        starts, ends = int_list(node.inputs[1]), int_list(node.inputs[2])
        axes = int_list(node.inputs[3]) if len(node.inputs) > 3 else [0]
        steps = int_list(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if None in (starts, ends, axes, steps) or axes not in ([0], [-1]) or steps == [0]:
            return None
        return inner[slice(*_clamp(starts[0], ends[0], steps[0], len(inner)))]
    return None


def np_kind(elem: int) -> str:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)).kind
    except (KeyError, TypeError, ValueError):
        return "?"


def static_reshape_target(node: gs.Node, table: ShapeTable) -> np.ndarray | None:
    """A constant target equivalent to a Reshape's computed one, or None.

    An element equal to the input's own dim at the same position becomes 0
    (copy): the dim read from the input itself, or from any tensor whose dim has
    the same symbolic name. One remaining unknown element becomes -1 when the
    known factors on both sides prove that -1 resolves to exactly that dim.
    """
    if len(node.inputs) < 2 or constant_value(node.inputs[1]) is not None:
        return None
    elements = shape_elements(node.inputs[1], table)
    data = node.inputs[0]
    shape = table.shape(data)
    if elements is None or shape is None:
        return None
    allowzero = int(node.attrs.get("allowzero", 0))
    source = id(data)
    target: list[int] = []
    unknown: list[int] = []
    for k, element in enumerate(elements):
        if isinstance(element, int):
            target.append(element)
        elif not allowzero and k < len(shape) and _same_dim(element, source, k, shape[k]):
            target.append(0)
        else:
            target.append(-1)
            unknown.append(k)
    if target.count(-1) > 1 or (allowzero and 0 in target):
        return None
    if unknown:
        position = unknown[0]
        element = elements[position]
        if not isinstance(element, tuple) or element[0] != source:
            return None
        if not _same_product(target, position, shape, element[1]):
            return None
    return np.array(target, dtype=np.int64)


def _same_dim(element: tuple[int, int, Dim], source: int, axis: int, dim: Dim) -> bool:
    if element[:2] == (source, axis):
        return True
    return isinstance(dim, str) and element[2] == dim


def _same_product(target: list[int], skip: int, shape: tuple, axis: int) -> bool:
    """Whether the target's other elements multiply to the input's other dims."""
    left_int, left_sym = 1, Counter()
    for k, t in enumerate(target):
        if k == skip:
            continue
        if t == 0:
            if isinstance(shape[k], int):
                left_int *= shape[k]
            else:
                left_sym[k] += 1
        else:
            left_int *= t
    right_int, right_sym = 1, Counter()
    for i, d in enumerate(shape):
        if i == axis:
            continue
        if isinstance(d, int):
            right_int *= d
        else:
            right_sym[i] += 1
    return left_int == right_int and left_sym == right_sym


def fold_reshape_targets(graph: gs.Graph, table: ShapeTable, taken: set[str]) -> int:
    """Give Reshapes whose target is computed from shapes an equivalent constant target."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "Reshape" or not is_default(node):
            continue
        target = static_reshape_target(node, table)
        if target is None:
            continue
        name = unique_name(f"{node.inputs[1].name}__static", taken)
        node.inputs[1] = gs.Constant(name, target)
        folded += 1
    return folded

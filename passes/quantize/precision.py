"""Which nodes stay float and which get 16-bit activations: user overrides and transformer defaults.

User overrides match node names (exact or glob patterns) or op types:
`float_nodes`/`float_ops` keep nodes float, `int16_nodes`/`int16_ops` give them
16-bit activations (weights stay int8). Float wins over int16 when both match.

Transformer defaults (on unless `transformer_defaults=false`) leave in float, and
say so in the notes, what 8 bits cannot hold:
- attention masks: an Add on the way into a Softmax (through scalar Mul/Div and
  data movers) whose other operand is a constant at or below -1000, or is computed
  (Cast, Sub, Mul, Where, Unsqueeze...) from such a constant or from an integer or
  boolean graph input. Its range is set by the mask, not by the scores: one uint8
  step would be 40 where the scores differ by 0.1. The Add, the nodes computing the
  mask and the path into the Softmax stay float. After calibration, any tensor
  whose range is dominated by such values (min <= -1000 and max below 1% of |min|)
  stays float as well, with the nodes that write and read it.
- Softmax, and its decomposed form ReduceMax-Sub-Exp-ReduceSum-Div: attention
  probabilities spread over many keys fall below one uint8 step (1/255).
- LayerNormalization and its decomposed form ReduceMean-Sub-Pow-ReduceMean-Add-
  Sqrt-Div with the scale Mul and shift Add after it (and RMS norm, the same
  without the mean): divisions by a computed value and squares of small numbers.
- Gather from a constant table (embeddings): the table is a weight that a uint8
  activation range would flatten, and ORT has no integer kernel for it.
A node the user names in `int16_nodes` or `int16_ops` gets 16 bits even where a
default would leave it float: the user asked for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.calibration import Calibration
from onnxopt.graph import constant_value, consumers, name_matches, producer

from .placement import Plan

MASK_VALUE = -1e3  # a constant at or below this, added to attention scores, is a mask
MASK_DOMINANCE = 0.01  # max below this share of |min|: the range is the mask's
NAMES_SHOWN = 24  # node names listed per reason in the notes

MASK = "attention mask (large negative values added before Softmax)"
MASK_RANGE = "range dominated by a masking constant"
SOFTMAX = "Softmax and its internals"
NORM = "LayerNormalization and its internals"
EMBEDDING = "embedding lookup (Gather from a constant table)"

# Ops a mask is computed with, from an integer input or a large negative constant.
MASK_OPS = {
    "Cast",
    "Sub",
    "Mul",
    "Add",
    "Neg",
    "Where",
    "Not",
    "And",
    "Or",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Expand",
    "Tile",
    "Transpose",
    "Concat",
    "Slice",
    "Min",
    "Max",
    "ConstantOfShape",
}
# Ops between a masked Add and its Softmax that keep the mask's values in the tensor.
PASS_THROUGH = {"Mul", "Div", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast", "Identity"}
MAX_CONE = 16


@dataclass
class Overrides:
    """The precision options of the quantize pass."""

    float_nodes: list[str] = field(default_factory=list)  # names or glob patterns
    int16_nodes: list[str] = field(default_factory=list)
    float_ops: set[str] = field(default_factory=set)
    int16_ops: set[str] = field(default_factory=set)
    transformer_defaults: bool = True


@dataclass
class Precision:
    """Node names kept float (with the reason) and node names with 16-bit activations."""

    float_nodes: dict[str, str] = field(default_factory=dict)
    int16_nodes: set[str] = field(default_factory=set)

    def with_moves(self, moves: Mapping[str, str]) -> Precision:
        """A copy where each named node takes the precision it is mapped to ("int16"/"float")."""
        float_nodes = dict(self.float_nodes)
        int16_nodes = set(self.int16_nodes)
        for name, precision in moves.items():
            if precision == "float":
                float_nodes[name] = "moved to float to meet the target"
                int16_nodes.discard(name)
            else:
                float_nodes.pop(name, None)
                int16_nodes.add(name)
        return Precision(float_nodes, int16_nodes)


def resolve(graph: gs.Graph, overrides: Overrides) -> tuple[Precision, list[str]]:
    """The precision of each node of `graph` and the notes that explain it."""
    notes: list[str] = []
    user_float = {
        n.name
        for n in graph.nodes
        if n.name and (name_matches(n.name, overrides.float_nodes) or n.op in overrides.float_ops)
    }
    user_int16 = {
        n.name
        for n in graph.nodes
        if n.name and (name_matches(n.name, overrides.int16_nodes) or n.op in overrides.int16_ops)
    } - user_float
    for option, patterns in (
        ("float_nodes", overrides.float_nodes),
        ("int16_nodes", overrides.int16_nodes),
    ):
        unmatched = [p for p in patterns if not any(name_matches(n.name, [p]) for n in graph.nodes)]
        if unmatched:
            notes.append(f"{option}: no node matches {', '.join(unmatched)}")
    precision = Precision({name: "float_nodes/float_ops" for name in user_float}, user_int16)
    if user_float:
        notes.append(summary("by float_nodes/float_ops", sorted(user_float)))
    if user_int16:
        notes.append(
            summary("with 16-bit activations by int16_nodes/int16_ops", sorted(user_int16))
        )
    if overrides.transformer_defaults:
        found = transformer_defaults(graph)
        kept = {
            name: reason
            for name, reason in found.items()
            if name not in user_int16 and name not in user_float
        }
        for name, reason in kept.items():
            precision.float_nodes.setdefault(name, reason)
        notes.extend(reason_notes(kept, "transformer defaults left"))
    return precision, notes


def summary(what: str, names: list[str], verb: str = "left") -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    place = "in float " if "16-bit" not in what else ""
    return f"{verb} {len(names)} node(s) {place}{what}: {shown}{more}"


def reason_notes(reasons: Mapping[str, str], verb: str) -> list[str]:
    """One line per reason: how many nodes, which (the first few)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    return [summary(f"({reason})", names, verb) for reason, names in sorted(by_reason.items())]


# ---- transformer defaults -----------------------------------------------------------------


def transformer_defaults(graph: gs.Graph) -> dict[str, str]:
    """Node name -> reason for every node the transformer defaults keep float."""
    found: dict[str, str] = {}

    def mark(nodes: Iterable[gs.Node], reason: str) -> None:
        for node in nodes:
            if node.name and node.name not in found:
                found[node.name] = reason

    for node in graph.nodes:
        if node.op == "Softmax":
            mark(_masked_path(node), MASK)
            mark([node], SOFTMAX)
        elif node.op == "LayerNormalization":
            mark([node], NORM)
        elif node.op == "Sqrt":
            mark(_decomposed_norm(node), NORM)
        elif node.op == "Exp":
            mark(_decomposed_softmax(node), SOFTMAX)
        elif node.op == "Gather" and _is_table(node.inputs[0]):
            mark([node], EMBEDDING)
    return found


def _is_table(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return np.dtype(tensor.dtype).kind == "f" and len(tensor.shape) >= 2
    value = constant_value(tensor)
    return value is not None and value.dtype.kind == "f" and value.ndim >= 2


def _masked_path(softmax: gs.Node) -> list[gs.Node]:
    """The mask Adds before `softmax`, the nodes computing their masks and the path between."""
    marked: list[gs.Node] = []
    path: list[gs.Node] = []
    tensor = softmax.inputs[0]
    for _ in range(8):
        node = producer(tensor)
        if node is None:
            break
        if node.op in ("Add", "Sub", "Where") and len(node.inputs) >= 2:
            operands = [t for t in node.inputs if t is not None]
            cones = [(t, _mask_cone(t)) for t in operands]
            masks = [(t, cone) for t, cone in cones if cone is not None]
            rest = [t for t, cone in cones if cone is None and constant_value(t) is None]
            if masks and len(rest) == 1:
                marked += [*path, node]
                for _, cone in masks:
                    marked += cone
                tensor = rest[0]
                path = []
                continue
            break
        if node.op not in PASS_THROUGH:
            break
        computed = [t for t in node.inputs if t is not None and constant_value(t) is None]
        if len(computed) != 1:
            break
        path.append(node)
        tensor = computed[0]
    return marked


def _mask_cone(tensor: gs.Tensor) -> list[gs.Node] | None:
    """The nodes computing `tensor` when it is a mask (see the module docstring), else None."""
    value = constant_value(tensor)
    if value is not None:
        return [] if _large_negative(value) else None
    nodes: list[gs.Node] = []
    stack = [tensor]
    seen: set[int] = set()
    evidence = False
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        value = constant_value(current)
        if value is not None:
            evidence |= _large_negative(value)
            continue
        node = producer(current)
        if node is None:
            # A graph input: an integer or boolean one is a mask (or token ids compared to pad).
            evidence |= current.dtype is not None and np.dtype(current.dtype).kind in "biu"
            continue
        if node.op == "Shape":
            continue  # a shape is no value of the main computation
        if node.op not in MASK_OPS or len(nodes) >= MAX_CONE:
            return None
        nodes.append(node)
        stack.extend(t for t in node.inputs if t is not None and t.name)
        if node.op == "ConstantOfShape":
            fill = node.attrs.get("value")
            if isinstance(fill, gs.Constant):
                evidence |= _large_negative(np.asarray(fill.values))
    return nodes if evidence else None


def _large_negative(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" and value.size > 0 and float(np.min(value)) <= MASK_VALUE


def _only_reader(tensor: gs.Tensor, op: str) -> gs.Node | None:
    readers = consumers(tensor)
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _scalar_const_operand(node: gs.Node) -> gs.Tensor | None:
    """The non-constant operand of a binary node whose other operand is a scalar constant."""
    if len(node.inputs) != 2:
        return None
    for index in (0, 1):
        value = constant_value(node.inputs[1 - index])
        if value is not None and value.size == 1 and constant_value(node.inputs[index]) is None:
            return node.inputs[index]
    return None


def _decomposed_norm(sqrt: gs.Node) -> list[gs.Node]:
    """ReduceMean-Sub-Pow-ReduceMean-Add-Sqrt-Div (+ scale Mul, shift Add) around `sqrt`."""
    add_eps = producer(sqrt.inputs[0])
    if add_eps is None or add_eps.op != "Add":
        return []
    variance = _scalar_const_operand(add_eps)
    mean_sq = producer(variance) if variance is not None else None
    if mean_sq is None or mean_sq.op != "ReduceMean":
        return []
    square = producer(mean_sq.inputs[0])
    if square is None:
        return []
    if square.op == "Pow":
        exponent = constant_value(square.inputs[1])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(())) != 2.0:
            return []
    elif not (square.op == "Mul" and square.inputs[0] is square.inputs[1]):
        return []
    nodes = [sqrt, add_eps, mean_sq, square]
    centered = square.inputs[0]
    sub = producer(centered)
    if sub is not None and sub.op == "Sub":
        mean = producer(sub.inputs[1])
        if mean is not None and mean.op == "ReduceMean" and mean.inputs[0] is sub.inputs[0]:
            nodes += [sub, mean]
    out = sqrt.outputs[0]
    divide = next((r for r in consumers(out) if r.op == "Div" and r.inputs[1] is out), None)
    if divide is None:
        reciprocal = _only_reader(out, "Reciprocal")
        if reciprocal is None:
            return nodes
        nodes.append(reciprocal)
        divide = next((r for r in consumers(reciprocal.outputs[0]) if r.op == "Mul"), None)
        if divide is None:
            return nodes
    nodes.append(divide)
    tail = divide.outputs[0]
    for op in ("Mul", "Add"):
        after = _only_reader(tail, op)
        if after is None or not any(constant_value(t) is not None for t in after.inputs):
            break
        nodes.append(after)
        tail = after.outputs[0]
    return nodes


def _decomposed_softmax(exp: gs.Node) -> list[gs.Node]:
    """ReduceMax-Sub-Exp-ReduceSum-Div around `exp`."""
    out = exp.outputs[0]
    total = next((r for r in consumers(out) if r.op == "ReduceSum"), None)
    if total is None:
        return []
    divide = next(
        (r for r in consumers(out) if r.op == "Div" and r.inputs[1] is total.outputs[0]), None
    )
    if divide is None:
        return []
    nodes = [exp, total, divide]
    sub = producer(exp.inputs[0])
    if sub is not None and sub.op == "Sub":
        peak = producer(sub.inputs[1])
        if peak is not None and peak.op == "ReduceMax" and peak.inputs[0] is sub.inputs[0]:
            nodes += [sub, peak]
    return nodes


def mask_dominated(plan: Plan, calibration: Calibration) -> dict[str, tuple[float, float]]:
    """Calibrated points whose range is the mask's: min <= -1000 and max < 1% of |min|."""
    found: dict[str, tuple[float, float]] = {}
    for name in plan.calibrated:
        stats = calibration.stats.get(name)
        if stats is None or not stats.seen:
            continue
        if stats.min <= MASK_VALUE and stats.max < MASK_DOMINANCE * -stats.min:
            found[name] = (stats.min, stats.max)
    return found

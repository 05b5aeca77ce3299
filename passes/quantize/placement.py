"""Where Q/DQ pairs go: the ops ONNX Runtime's CPU provider turns into integer kernels.

The plan is made in three steps over the graph in topological order:

1. Compute ops (Conv, MatMul, Gemm) with a constant weight are quantized: their
   activation inputs get Q/DQ, their weight is stored as int8, a Conv/Gemm bias
   as int32.
2. An op that ORT runs on integers (Add, Mul, Concat, pooling, Sigmoid, Softmax,
   LeakyRelu) or that only moves data (MaxPool, nearest Resize, Reshape,
   Transpose, Squeeze, Unsqueeze, Flatten, Slice, Gather, Split, Expand, Tile) is
   quantized when one of its inputs is already integer, i.e. written by a
   quantized op. Data movers keep their input's scale and zero point, which is
   what lets ORT drop their Q/DQ.
3. Ops from step 2 whose output no quantized op reads are given back to float,
   repeatedly, so that no Q/DQ pair is left that only costs time.

A Mul by a positive scalar of an integer tensor becomes a DQ of those integers
with the scale multiplied: no op and no rounding are left of it.

A lone MatMul/Gemm with fewer than `min_weights` weights, whose input no
quantized op writes and whose output no compute op reads, stays float: the
QuantizeLinear it would need costs more than its integer kernel saves.

A quantized op writes integers (a Q on its output), except MatMul and Gemm,
which write float (ORT's MatMulIntegerToFloat, QGemm) unless a compute op reads
their output. A Relu or Clip that is the only reader of a quantized op's output
moves the Q behind it: ORT then deletes the activation and fuses the rest.

Per-node precision: nodes named in `float_nodes` are never quantized; nodes in
`int16_nodes` get 16-bit activations (weights stay int8). A tensor's Q/DQ pair
has one type for all its readers and its writer, and data movers share their
input's parameters, so 16 bits spread over every tensor tied to an int16 node
that way: its producer and the other readers of those tensors see 16 bits too.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    QUANTIZED_OPS,
    constant_value,
    consumers,
    is_graph_output,
    name_matches,
    producer,
)

COMPUTE = {"Conv", "MatMul", "Gemm"}
BINARY = {"Add", "Mul"}
VARIADIC = {"Concat"}
UNARY = {"AveragePool", "GlobalAveragePool", "Sigmoid", "Softmax", "LeakyRelu"}
# Ops that only move or select values: ORT removes their Q/DQ when the scales match.
DATA_MOVERS = {
    "MaxPool",
    "Resize",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Slice",
    "Gather",
    "GatherElements",
    "Split",
    "Expand",
    "Tile",
}
ABSORBED = {"Relu", "Clip"}
DEFAULT_OPS = COMPUTE | BINARY | VARIADIC | UNARY | DATA_MOVERS
# Ops that ORT 1.32 on CPU leaves in float even with Q/DQ around them; quantizing
# them (include_ops) only makes sense for other execution providers.
OPT_IN_OPS = {"ConvTranspose", "HardSigmoid", "HardSwish", "Tanh"}


@dataclass
class Weight:
    node: gs.Node
    index: int
    axis: int | None


@dataclass
class Bias:
    node: gs.Node
    index: int
    activation: gs.Tensor
    weight_index: int


@dataclass
class Plan:
    """What the quantizer will do; tensors are keyed by name."""

    nodes: list[gs.Node] = field(default_factory=list)
    # Tensors that get a Q: the float tensor and whether its producer is quantized.
    points: dict[str, gs.Variable] = field(default_factory=dict)
    produced: set[str] = field(default_factory=set)
    # Input slots of quantized nodes that read each point's DQ.
    readers: dict[str, list[tuple[gs.Node, int]]] = field(default_factory=dict)
    # Points whose parameters are those of another point (data movers).
    same_as: dict[str, str] = field(default_factory=dict)
    # Constant operands of binary ops and Concat, quantized like activations.
    constants: list[tuple[gs.Node, int]] = field(default_factory=list)
    weights: list[Weight] = field(default_factory=list)
    biases: list[Bias] = field(default_factory=list)
    # Multiplications by a positive scalar turned into a DQ of their input's integers
    # with a scaled scale: output name -> (input name, factor).
    aliases: dict[str, tuple[str, float]] = field(default_factory=dict)
    alias_nodes: list[gs.Node] = field(default_factory=list)
    # Reason -> the nodes left float for it.
    skipped: dict[str, list[str]] = field(default_factory=dict)
    # The quantized node that writes each produced point.
    writers: dict[str, gs.Node] = field(default_factory=dict)
    # Points and alias outputs with 16-bit parameters, and the quantized nodes that read
    # or write one of them.
    wide: set[str] = field(default_factory=set)
    wide_nodes: set[str] = field(default_factory=set)

    def skip(self, reason: str, node: gs.Node) -> None:
        self.skipped.setdefault(reason, []).append(node.name or node.op)

    @property
    def calibrated(self) -> list[str]:
        """Points whose range comes from calibration (data movers inherit theirs)."""
        return [name for name in self.points if name not in self.same_as]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def precisions(self) -> dict[str, str]:
        """Node name -> "int8" or "int16" for every quantized node; the rest stay float."""
        return {
            n.name: "int16" if n.name in self.wide_nodes else "int8" for n in self.nodes if n.name
        }

    def touching(self, point: str) -> list[gs.Node]:
        """The quantized nodes that write or read `point`."""
        found = [self.writers[point]] if point in self.writers else []
        return found + [node for node, _ in self.readers.get(point, []) if node not in found]


def _is_float_constant(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        # dtype without loading the values: planning must not copy every weight.
        return np.dtype(tensor.dtype).kind == "f"
    value = constant_value(tensor)
    return value is not None and value.dtype.kind == "f"


def _rank(tensor: gs.Tensor) -> int:
    if isinstance(tensor, gs.Constant):
        return len(tensor.shape)
    return constant_value(tensor).ndim


def already_quantized(node: gs.Node) -> bool:
    if node.op in QUANTIZED_OPS or node.op.startswith("QLinear"):
        return True
    for tensor in node.inputs:
        source = producer(tensor) if tensor is not None else None
        if source is not None and source.op == "DequantizeLinear":
            return True
    return any(c.op == "QuantizeLinear" for t in node.outputs for c in consumers(t))


class Planner:
    """Builds a Plan for one graph; see the module docstring for the rules."""

    def __init__(
        self,
        graph: gs.Graph,
        *,
        ops: set[str],
        exclude_nodes: list[str],
        per_channel: bool,
        float_nodes: Collection[str] = (),
        int16_nodes: Collection[str] = (),
        min_weights: int = 0,
    ):
        self.graph = graph
        self.min_weights = min_weights
        self.ops = ops
        self.exclude_nodes = exclude_nodes
        self.per_channel = per_channel
        self.float_nodes = set(float_nodes)
        self.int16_nodes = set(int16_nodes)
        self.plan = Plan()
        self.integer: set[str] = set()  # tensors that quantized ops write as integers
        self.quantized: set[int] = set()  # id() of quantized nodes
        # Per quantized node: what each input slot is ("act", "const", "weight", "bias").
        self.slots: dict[int, list[tuple]] = {}
        self.aliases: dict[int, tuple[gs.Tensor, float]] = {}

    def build(self) -> Plan:
        self.graph.toposort()
        candidates: list[gs.Node] = []
        for node in self.graph.nodes:
            if not self._eligible(node):
                continue
            if node.op == "Mul" and self._has_integer_input(node):
                alias = _scale_alias(node, self.integer)
                if alias is not None:
                    self.aliases[id(node)] = alias
                    self.quantized.add(id(node))
                    candidates.append(node)
                    self.integer.add(node.outputs[0].name)
                    continue
            slots = self._compute_slots(node) if node.op in COMPUTE else None
            if node.op not in COMPUTE and self._has_integer_input(node):
                slots = self._follower_slots(node)
            if slots is None:
                continue
            self.slots[id(node)] = slots
            self.quantized.add(id(node))
            candidates.append(node)
            if node.op not in ("MatMul", "Gemm"):
                # MatMul and Gemm write integers only when a compute op reads them (below).
                self.integer.update(self._output_point(t).name for t in node.outputs)
        self._give_back_dead_ends(candidates)
        self._record(candidates)
        self._widen()
        return self.plan

    # ---- eligibility ------------------------------------------------------------------

    def _eligible(self, node: gs.Node) -> bool:
        if node.op not in self.ops:
            return False
        if node.domain not in (None, "", "ai.onnx"):
            return False
        if node.name and node.name in self.float_nodes:
            return False  # the precision settings say why, in their own notes
        if name_matches(node.name, self.exclude_nodes):
            self.plan.skip("excluded by name", node)
            return False
        if already_quantized(node):
            self.plan.skip("already quantized", node)
            return False
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return False
        for tensor in node.outputs:
            if tensor.dtype is not None and np.dtype(tensor.dtype) != np.float32:
                self.plan.skip("not float32", node)
                return False
        return True

    def _has_integer_input(self, node: gs.Node) -> bool:
        data = node.inputs[:1] if node.op in DATA_MOVERS or node.op in UNARY else node.inputs
        return any(t is not None and t.name in self.integer for t in data)

    # ---- what each input slot is ------------------------------------------------------

    def _compute_slots(self, node: gs.Node) -> list[tuple] | None:
        inputs = node.inputs
        has_bias = len(inputs) > 2 and inputs[2] is not None and bool(inputs[2].name)
        if node.op == "Conv":
            if len(inputs) < 2 or not _is_float_constant(inputs[1]):
                self.plan.skip("Conv without a constant weight", node)
                return None
            if has_bias and not _is_float_constant(inputs[2]):
                self.plan.skip("Conv with a computed bias", node)
                return None
            slots: list[tuple] = [("act", 0), ("weight", 1, 0 if self.per_channel else None)]
            return slots + ([("bias", 2, 0, 1)] if has_bias else [])
        if node.op == "MatMul":
            a, b = (_is_float_constant(t) for t in inputs[:2])
            if a == b:
                self.plan.skip("MatMul without exactly one constant input", node)
                return None
            if self._small(node, inputs[1] if b else inputs[0], inputs[0] if b else inputs[1]):
                return None
            rank = _rank(inputs[1] if b else inputs[0])
            axis = 1 if (b and rank == 2 and self.per_channel) else None
            return [("act", 0 if b else 1), ("weight", 1 if b else 0, axis)]
        # Gemm
        if node.attrs.get("transA", 0) or not _is_float_constant(inputs[1]):
            self.plan.skip("Gemm with transA or a computed B", node)
            return None
        if node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            self.plan.skip("Gemm with alpha or beta other than 1", node)
            return None
        if self._small(node, inputs[1], inputs[0]):
            return None
        axis = (0 if node.attrs.get("transB", 0) else 1) if self.per_channel else None
        if has_bias:
            if not _is_float_constant(inputs[2]) or _rank(inputs[2]) != 1:
                self.plan.skip("Gemm with a computed or 2-D C", node)
                return None
        return [("act", 0), ("weight", 1, axis)] + ([("bias", 2, 0, 1)] if has_bias else [])

    def _small(self, node: gs.Node, weight: gs.Tensor, act: gs.Tensor) -> bool:
        """A lone MatMul/Gemm too small for int8 to pay for the QuantizeLinear it needs.

        Below `min_weights` weights a row costs fewer multiply-adds than ORT spends
        on launching a QuantizeLinear and the integer kernel. Only a layer that
        would need that QuantizeLinear for itself (no quantized op writes its input)
        and whose output no compute op reads (else the next layer would lose its
        integer input) stays float: an embedding, a classifier head.
        """
        if not self.min_weights or weight.shape is None or act.name in self.integer:
            return False
        if node.name in self.int16_nodes:
            return False  # asked for by name
        if int(np.prod(weight.shape)) >= self.min_weights:
            return False
        writer = producer(act)
        if writer is not None and writer.op in ABSORBED and writer.inputs:
            writer = producer(writer.inputs[0])
        if writer is not None and id(writer) in self.quantized:
            return False
        if _feeds_compute(node.outputs[0], self.ops & COMPUTE):
            return False
        self.plan.skip(
            f"{node.op} with fewer than {self.min_weights} weights between float tensors", node
        )
        return True

    def _follower_slots(self, node: gs.Node) -> list[tuple] | None:
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", b"nearest"):
            self.plan.skip("Resize other than nearest", node)
            return None
        if node.op not in BINARY and node.op not in VARIADIC:
            return [("act", 0)]
        if node.op == "Concat" and len(node.inputs) < 2:
            return None
        slots: list[tuple] = []
        for index, tensor in enumerate(node.inputs):
            value = constant_value(tensor)
            if value is None:
                slots.append(("act", index))
            elif value.dtype.kind == "f" and value.size == 1:
                slots.append(("const", index))
            else:
                # A per-channel constant would lose most of its precision in one scale.
                self.plan.skip(f"{node.op} with a non-scalar constant", node)
                return None
        return slots

    def _output_point(self, tensor: gs.Tensor) -> gs.Tensor:
        """The tensor that gets the Q: behind a sole Relu/Clip reader, else `tensor` itself."""
        readers = consumers(tensor)
        if len(readers) == 1 and not is_graph_output(self.graph, tensor):
            act = readers[0]
            if act.op in ABSORBED and act.inputs[0] is tensor and _constant_bounds(act):
                return act.outputs[0]
        return tensor

    # ---- pruning and recording ----------------------------------------------------------

    def _give_back_dead_ends(self, candidates: list[gs.Node]) -> None:
        """Return followers to float until each has an integer input and a quantized reader."""
        followers = [n for n in candidates if n.op not in COMPUTE]
        changed = True
        while changed:
            changed = False
            for node in followers:
                if id(node) not in self.quantized:
                    continue
                if id(node) in self.aliases:
                    # A rescaled DQ is never dearer than a float Mul: keep it while its
                    # input stays integer.
                    if self._has_integer_input(node):
                        continue
                    self.quantized.discard(id(node))
                    self.integer.discard(node.outputs[0].name)
                    changed = True
                    continue
                points = [self._output_point(t) for t in node.outputs]
                read = any(
                    id(reader) in self.quantized and reader is not node
                    for point in points
                    for reader in consumers(point)
                )
                if read and self._has_integer_input(node):
                    continue
                self.quantized.discard(id(node))
                self.integer.difference_update(p.name for p in points)
                changed = True

    def _record(self, candidates: list[gs.Node]) -> None:
        plan = self.plan
        kept = [n for n in candidates if id(n) in self.quantized]
        compute = {id(n) for n in kept if n.op in COMPUTE}
        for node in kept:
            plan.nodes.append(node)
            if id(node) in self.aliases:
                source, factor = self.aliases[id(node)]
                plan.aliases[node.outputs[0].name] = (source.name, factor)
                plan.alias_nodes.append(node)
                continue
            slots = self.slots[id(node)]
            for slot in slots:
                kind, index = slot[0], slot[1]
                if kind == "act":
                    tensor = node.inputs[index]
                    if tensor.name in plan.aliases:
                        continue  # already read from a DQ
                    plan.points.setdefault(tensor.name, tensor)
                    plan.readers.setdefault(tensor.name, []).append((node, index))
                elif kind == "const":
                    plan.constants.append((node, index))
                elif kind == "weight":
                    plan.weights.append(Weight(node, index, slot[2]))
                else:
                    act = next(s[1] for s in slots if s[0] == "act")
                    plan.biases.append(Bias(node, index, node.inputs[act], slot[3]))
            for tensor in node.outputs:
                point = self._output_point(tensor)
                if node.op in ("MatMul", "Gemm"):
                    if not any(id(r) in compute for r in consumers(point)):
                        continue
                    self.integer.add(point.name)
                plan.points[point.name] = point
                plan.produced.add(point.name)
                plan.writers[point.name] = node
                if node.op in DATA_MOVERS:
                    plan.same_as[point.name] = node.inputs[0].name

    def _widen(self) -> None:
        """Give 16-bit parameters to every point tied to an int16 node (see the docstring)."""
        plan = self.plan
        if not self.int16_nodes:
            return

        def root(name: str) -> str:
            while True:
                if name in plan.aliases:
                    name = plan.aliases[name][0]
                    continue
                source = plan.same_as.get(name)
                if source is None or (source not in plan.points and source not in plan.aliases):
                    return name
                name = source

        marked: set[str] = set()
        for node in plan.nodes:
            if node.name not in self.int16_nodes:
                continue
            if id(node) in self.aliases:
                marked.add(node.outputs[0].name)
                continue
            for slot in self.slots[id(node)]:
                if slot[0] == "act":
                    marked.add(node.inputs[slot[1]].name)
            marked.update(n for n, w in plan.writers.items() if w is node)
        roots = {root(name) for name in marked}
        plan.wide = {n for n in [*plan.points, *plan.aliases] if root(n) in roots}
        for name in plan.wide:
            if name in plan.aliases:
                plan.wide_nodes.update(
                    n.name for n in plan.alias_nodes if n.outputs[0].name == name
                )
                continue
            plan.wide_nodes.update(n.name for n in plan.touching(name))
        plan.wide_nodes.update(n.name for n in plan.nodes if n.name in self.int16_nodes)


def _feeds_compute(tensor: gs.Tensor, compute: set[str]) -> bool:
    """Whether a compute op reads `tensor`, directly or through Relu, Clip and data movers."""
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        for reader in consumers(current):
            if reader.op in compute:
                return True
            if reader.op in ABSORBED or reader.op in DATA_MOVERS:
                stack.extend(reader.outputs)
    return False


def _scale_alias(node: gs.Node, integer: set[str]) -> tuple[gs.Tensor, float] | None:
    """(x, c) when `node` is Mul(x, c) with x integer and c a positive finite scalar."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    for index in (0, 1):
        x, other = node.inputs[index], node.inputs[1 - index]
        value = constant_value(other)
        if x.name not in integer or value is None or value.dtype.kind != "f" or value.size != 1:
            continue
        factor = float(value.reshape(()))
        if np.isfinite(factor) and factor > 0.0:
            return x, factor
    return None


def _constant_bounds(node: gs.Node) -> bool:
    if node.op == "Relu":
        return True
    if "min" in node.attrs or "max" in node.attrs:  # Clip before opset 11
        return True
    bounds = [t for t in node.inputs[1:] if t is not None and t.name]
    return all(constant_value(t) is not None for t in bounds)


def plan_quantization(
    graph: gs.Graph,
    *,
    ops: set[str],
    exclude_nodes: list[str],
    per_channel: bool,
    float_nodes: Collection[str] = (),
    int16_nodes: Collection[str] = (),
    min_weights: int = 0,
) -> Plan:
    """The quantization plan of `graph` (sorted topologically in place)."""
    return Planner(
        graph,
        ops=ops,
        exclude_nodes=exclude_nodes,
        per_channel=per_channel,
        float_nodes=float_nodes,
        int16_nodes=int16_nodes,
        min_weights=min_weights,
    ).build()

"""fold-constants: replace computations on constants with their values."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value, is_absent, is_default, is_graph_output, subgraphs
from onnxopt.pass_api import Pass, PassContext, PassResult, register_pass

from .simplify_rules.common import (
    RANDOM_OPS,
    all_names,
    has_subgraph,
    replace_with_constant,
    tidy,
    unwritable,
)
from .simplify_rules.evaluate import evaluate
from .simplify_rules.inline_if import inline_constant_ifs
from .simplify_rules.shapes import ShapeTable, constant_nbytes, np_dtype
from .simplify_rules.static_shapes import fold_reshape_targets, fold_static_shapes

# Ops whose outputs can be far larger than their inputs: folding them is where models bloat.
GENERATORS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample"})
# Quantization boundaries stay visible to runtimes; control flow is handled on its own.
NEVER_FOLD = RANDOM_OPS | {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "Constant",
    "If",
    "Loop",
    "Scan",
}
MAX_ROUNDS = 8


class _LazyTable:
    """Shape inference for the whole model, run only when a rule first needs it."""

    def __init__(self, root: gs.Graph) -> None:
        self.root = root
        self.table: ShapeTable | None = None

    def get(self) -> ShapeTable:
        if self.table is None:
            self.table = ShapeTable(self.root)
        return self.table


@register_pass
class FoldConstants(Pass):
    """Evaluate subgraphs whose inputs are all constant and store their values.

    Matches, in the main graph and recursively in If/Loop/Scan bodies:
    - Constant nodes, which become initializers (unless they are graph outputs);
    - Shape and Size of tensors whose dimensions are known, and Gather/Slice
      reads of the known dimensions of a partly dynamic shape;
    - every node of the default ONNX domain whose inputs are all constant. The
      tensors where such a constant region meets the rest of the graph are
      computed together in one ONNX Runtime session per graph and stored as
      initializers; the nodes behind them disappear;
    - If nodes whose condition is constant, which are replaced by the branch
      they always take.
    - Range reads its bounds as scalars: a one-element constant bound of rank 1
      or more becomes a scalar (ORT takes both, the onnx checker only scalars;
      folding can make a [1]-shaped value visible to it).
    Leaves alone, and says so in its counts:
    - a computation that would allocate more than `max_bytes`: the bytes of the
      outputs of every node it runs, summed, are estimated from inferred shapes
      (or from the constant shape inputs of ConstantOfShape, Expand, Tile and
      Range) before anything runs; the node where the sum passes the budget
      stays, and what it reads may still fold (kept_memory). Such a generator
      whose output size cannot be estimated stays too (kept_unknown_size);
    - a folded tensor larger than `size_threshold` bytes (kept_large);
    - a folded tensor that adds more than `growth_limit` bytes beyond the
      constants it is computed from, as ConstantOfShape, Expand, Tile or Range
      outputs typically would (kept_growth): the model must not grow;
    - nodes of other domains (custom ops, com.microsoft), random ops, Dropout,
      QuantizeLinear/DequantizeLinear, and control-flow nodes themselves;
    - anything ONNX Runtime fails to compute (eval_failures);
    - a model GraphSurgeon cannot write back (optional-typed values, an Optional
      node without input): nothing is changed (unwritable).
    Graph outputs keep their names: a graph output that turns out constant is
    written by a Constant node.
    """

    name = "fold-constants"
    size_threshold: int = 64 * 2**20
    growth_limit: int = 1024
    fold_shapes: bool = True
    max_bytes: int = 256 * 2**20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        reason = unwritable(graph)
        if reason:
            return PassResult(
                changed=False, stats={"unwritable": 1}, notes=[f"model left alone: {reason}"]
            )
        opsets = [onnx.helper.make_opsetid("", graph.opset)]
        opsets += [
            onnx.helper.make_opsetid(d.domain, d.version)
            for d in graph.import_domains or []
            if d.domain not in ("", "ai.onnx")
        ]
        nodes_before = _count_nodes(graph)
        changed = False
        kept: dict[str, str] = {}
        for _ in range(MAX_ROUNDS):
            tables = _LazyTable(graph)
            kept.clear()
            if self._fold_graph(graph, graph, tables, opsets, ctx, stats, kept) == 0:
                break
            changed = True
            tidy(graph)
        stats.update(Counter(kept.values()))
        stats["subgraphs"] = len(_all_subgraphs(graph))
        stats["nodes_removed"] = nodes_before - _count_nodes(graph)
        notes = []
        if stats["kept_growth"] or stats["kept_large"]:
            notes.append(
                f"left {stats['kept_growth'] + stats['kept_large']} constant tensors unfolded "
                f"because folding them would grow the model (growth_limit={self.growth_limit}, "
                f"size_threshold={self.size_threshold} bytes)"
            )
        if stats["kept_memory"] or stats["kept_unknown_size"]:
            notes.append(
                f"left {stats['kept_memory'] + stats['kept_unknown_size']} computations unfolded "
                f"because they could allocate more than max_bytes={self.max_bytes} bytes"
            )
        if stats["eval_failures"]:
            notes.append(f"ONNX Runtime could not compute {stats['eval_failures']} tensors")
        return PassResult(changed=changed, stats=dict(sorted(stats.items())), notes=notes)

    # ---- one graph -----------------------------------------------------------------------

    def _fold_graph(
        self,
        graph: gs.Graph,
        root: gs.Graph,
        tables: _LazyTable,
        opsets: list[onnx.OperatorSetIdProto],
        ctx: PassContext,
        stats: Counter[str],
        kept: dict[str, str],
    ) -> int:
        done = _lower_constants(graph)
        stats["constants_lowered"] += done
        if self.fold_shapes and any(n.op in ("Shape", "Size") for n in graph.nodes):
            folded = fold_static_shapes(graph, tables.get())
            stats["shapes_folded"] += folded
            done += folded
            folded = fold_reshape_targets(graph, tables.get(), all_names(root))
            stats["reshape_targets_folded"] += folded
            done += folded
        folded = self._fold_regions(graph, tables, opsets, ctx, kept)
        stats["tensors_folded"] += folded
        done += folded
        inlined = inline_constant_ifs(graph, root)
        stats["ifs_inlined"] += inlined
        done += inlined
        scalars = _scalar_range_bounds(graph)
        stats["range_bounds_scalar"] += scalars
        done += scalars
        for sub in subgraphs(graph):
            done += self._fold_graph(sub, root, tables, opsets, ctx, stats, kept)
        return done

    def _fold_regions(
        self,
        graph: gs.Graph,
        tables: _LazyTable,
        opsets: list[onnx.OperatorSetIdProto],
        ctx: PassContext,
        kept: dict[str, str],
    ) -> int:
        """Fold the constant regions of one graph; `kept` collects what stays and why."""
        excluded: set[int] = set()
        folded = 0
        for _ in range(MAX_ROUNDS):
            foldable = _foldable_nodes(graph, excluded)
            if not foldable:
                break
            frontier = _frontier(graph, foldable)
            cones = {name: _cone(tensor, foldable) for name, tensor in frontier.items()}
            costs: dict[str, int] = {}
            heavy: dict[int, tuple[gs.Node, str]] = {}
            for name, cone in cones.items():
                costs[name], over = self._cost(cone, tables.get())
                if over is not None:
                    heavy[id(over[0])] = over
            if heavy:
                # Too big to compute: that node stays; what feeds it may still fold.
                excluded.update(heavy)
                kept.update({n.outputs[0].name: reason for n, reason in heavy.values()})
                continue
            refused = {
                name: reason
                for name, tensor in frontier.items()
                if (reason := self._refusal(tensor, cones[name], tables.get()))
            }
            # A refused tensor's writer stays; what it feeds is no longer constant.
            excluded.update(id(frontier[name].inputs[0]) for name in refused)
            kept.update(refused)
            if refused:
                continue
            values, failed = {}, []
            for batch in _batches(list(frontier), costs, self.max_bytes):
                got, lost = evaluate(
                    {n: cones[n] for n in batch},
                    {n: frontier[n] for n in batch},
                    opsets,
                    ctx.threads,
                )
                values.update(got)
                failed.extend(lost)
            for name in failed:
                kept[name] = "eval_failures"
                excluded.add(id(frontier[name].inputs[0]))
            for name, value in values.items():
                reason = self._refusal_by_value(value, cones[name])
                if reason:
                    kept[name] = reason
                    excluded.add(id(frontier[name].inputs[0]))
                    continue
                replace_with_constant(graph, frontier[name], value)
                folded += 1
            if not failed and len(values) == folded:
                break
            # Something stayed: its constant inputs may still fold, so look again.
        return folded

    def _refusal(self, tensor: gs.Tensor, cone: list[gs.Node], table: ShapeTable) -> str:
        """The size guard, judged from inferred shapes before anything is computed."""
        size = table.nbytes(tensor)
        if size is None:
            # Unknown size: computing it is safe unless a generator could make it huge.
            return "kept_unknown_size" if any(n.op in GENERATORS for n in cone) else ""
        if size > self.size_threshold:
            return "kept_large"
        if size > max(self.growth_limit, _leaf_bytes(cone)):
            return "kept_growth"
        return ""

    def _cost(
        self, cone: list[gs.Node], table: ShapeTable
    ) -> tuple[int, tuple[gs.Node, str] | None]:
        """Estimated bytes the cone's nodes write, and the node that breaks the budget."""
        total = 0
        for node in cone:
            for out in node.outputs:
                if is_absent(out):
                    continue
                size = table.nbytes(out)
                if size is None:
                    size = _generator_bytes(node, out, table)
                if size is None:
                    if node.op in GENERATORS:
                        return total, (node, "kept_unknown_size")
                    continue
                total += size
                if total > self.max_bytes:
                    return total, (node, "kept_memory")
        return total, None

    def _refusal_by_value(self, value: np.ndarray, cone: list[gs.Node]) -> str:
        if value.nbytes > self.size_threshold:
            return "kept_large"
        if value.nbytes > max(self.growth_limit, _leaf_bytes(cone)):
            return "kept_growth"
        return ""


# ---- helpers -------------------------------------------------------------------------------


def _count_nodes(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in [graph, *_all_subgraphs(graph)])


def _all_subgraphs(graph: gs.Graph) -> list[gs.Graph]:
    found = []
    for sub in subgraphs(graph):
        found.append(sub)
        found.extend(_all_subgraphs(sub))
    return found


def _lower_constants(graph: gs.Graph) -> int:
    """Constant nodes become initializers (graph outputs excepted: they must stay node outputs)."""
    lowered = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or not is_default(node) or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if is_graph_output(graph, out) or "sparse_value" in node.attrs:
            continue
        value = constant_value(out)
        if value is None or value.dtype == object:
            continue
        replace_with_constant(graph, out, value)
        node.outputs.clear()
        lowered += 1
    return lowered


def _candidate(node: gs.Node) -> bool:
    if not is_default(node) or node.op in NEVER_FOLD or has_subgraph(node):
        return False
    if "Sequence" in node.op or node.op.startswith("Optional"):
        return False
    return any(not is_absent(t) for t in node.inputs) and bool(node.outputs)


def _foldable_nodes(graph: gs.Graph, excluded: set[int]) -> dict[int, gs.Node]:
    """Nodes (in graph order) whose inputs are all constant, directly or through such nodes."""
    foldable: dict[int, gs.Node] = {}
    for node in graph.nodes:
        if id(node) in excluded or not _candidate(node):
            continue
        if all(
            is_absent(t) or isinstance(t, gs.Constant) or (t.inputs and id(t.inputs[0]) in foldable)
            for t in node.inputs
        ):
            foldable[id(node)] = node
    return foldable


def _frontier(graph: gs.Graph, foldable: dict[int, gs.Node]) -> dict[str, gs.Tensor]:
    """Outputs of foldable nodes that something else reads (a node, a subgraph, the graph)."""
    frontier: dict[str, gs.Tensor] = {}
    for node in foldable.values():
        for tensor in node.outputs:
            if is_absent(tensor):
                continue
            if is_graph_output(graph, tensor) or any(id(r) not in foldable for r in tensor.outputs):
                frontier[tensor.name] = tensor
    return frontier


def _cone(tensor: gs.Tensor, foldable: dict[int, gs.Node]) -> list[gs.Node]:
    """The foldable nodes that compute `tensor`, in graph order."""
    seen: dict[int, gs.Node] = {}
    stack = [tensor]
    while stack:
        current = stack.pop()
        if not current.inputs:
            continue
        node = current.inputs[0]
        if id(node) in seen or id(node) not in foldable:
            continue
        seen[id(node)] = node
        stack.extend(t for t in node.inputs if not isinstance(t, gs.Constant) and not is_absent(t))
    order = {id(n): i for i, n in enumerate(foldable.values())}
    return sorted(seen.values(), key=lambda n: order[id(n)])


def _batches(names: list[str], costs: dict[str, int], budget: int) -> list[list[str]]:
    """Group the tensors to compute so that no one session holds more than the budget."""
    batches: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name in names:
        if current and total + costs[name] > budget:
            batches.append(current)
            current, total = [], 0
        current.append(name)
        total += costs[name]
    if current:
        batches.append(current)
    return batches


def _generator_bytes(node: gs.Node, out: gs.Tensor, table: ShapeTable) -> int | None:
    """Output bytes of ConstantOfShape/Expand/Tile/Range from their constant inputs."""
    dtype = table.dtype(out)
    values = [None if is_absent(t) else constant_value(t) for t in node.inputs]
    try:
        if node.op == "ConstantOfShape" and values and values[0] is not None:
            value = node.attrs.get("value")
            itemsize = np_dtype(value.dtype).itemsize if isinstance(value, gs.Constant) else 4
            return int(np.prod(values[0].astype(np.float64))) * itemsize
        if dtype is None:
            return None
        if node.op == "Expand" and len(values) == 2 and values[1] is not None:
            data = table.static_shape(node.inputs[0])
            if data is None:
                return None
            shape = np.broadcast_shapes(tuple(data), tuple(int(d) for d in values[1]))
            return int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if node.op == "Tile" and len(values) == 2 and values[1] is not None:
            data = table.static_shape(node.inputs[0])
            if data is None or len(data) != values[1].size:
                return None
            count = np.prod(np.asarray(data, np.float64) * values[1].astype(np.float64))
            return int(count) * dtype.itemsize
        if node.op == "Range" and len(values) == 3 and all(v is not None for v in values):
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in values)
            if delta == 0:
                return None
            return max(0, math.ceil((limit - start) / delta)) * dtype.itemsize
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def _scalar_range_bounds(graph: gs.Graph) -> int:
    """Make Range read one-element constant bounds as scalars; returns how many changed."""
    changed = 0
    scalars: dict[int, gs.Constant] = {}
    for node in graph.nodes:
        if node.op != "Range" or not is_default(node):
            continue
        for i, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or len(tensor.shape) == 0:
                continue
            if math.prod(tensor.shape) != 1:
                continue
            value = constant_value(tensor)
            if value is None:
                continue
            if id(tensor) not in scalars:
                scalars[id(tensor)] = gs.Constant(f"{tensor.name}__scalar", value.reshape(()))
            node.inputs[i] = scalars[id(tensor)]
            changed += 1
    return changed


def _leaf_bytes(cone: list[gs.Node]) -> int:
    """Bytes of the stored constants a cone reads."""
    leaves: dict[str, gs.Constant] = {}
    for node in cone:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                leaves.setdefault(tensor.name, tensor)
    return sum(constant_nbytes(t) for t in leaves.values())

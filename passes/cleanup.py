"""cleanup: remove what computes nothing, merge what computes the same thing."""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from onnxopt.graph import int_list, is_absent, is_default
from onnxopt.pass_api import Pass, PassContext, PassResult, register_pass

from .simplify_rules.common import all_graphs, is_read, reroute, tidy, toposort, unwritable
from .simplify_rules.dedup import dedup_initializers, eliminate_common_subexpressions
from .simplify_rules.noops import no_op_source
from .simplify_rules.shapes import ShapeTable

MAX_ROUNDS = 10
# Ops that only reinterpret the shape of their first input.
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


@register_pass
class Cleanup(Pass):
    """Remove dead and no-op nodes, merge Transpose/Reshape chains, deduplicate.

    Rules, applied to the main graph and every If/Loop/Scan body until none applies:
    - dead nodes, and initializers nothing reads, are dropped (graph inputs stay:
      the model keeps its signature);
    - Identity, and Dropout at inference (no training_mode, mask unread), are bypassed;
    - no-ops are bypassed: Cast to the type the input has, Reshape/Expand to the
      shape it has, Transpose with the identity permutation, Pad by zeros, Slice
      that keeps everything, Tile by ones, one-input Concat, Flatten of a 2-D
      tensor on axis 1, and x*1, x+0, x-0, x/1 when broadcasting does not
      change x's shape or type;
    - Transpose(Transpose(x)) becomes one Transpose (or nothing), and a Reshape
      of a Reshape/Flatten/Squeeze/Unsqueeze reads the original tensor when its
      target has no 0 entries (which would copy the intermediate's dims);
    - identical initializers become one; nodes with the same op, attributes and
      inputs become one (common-subexpression elimination).
    Shapes come from onnx shape inference; when a dimension is unknown the rule
    that needs it does not apply. A no-op whose output is a graph output is
    removed only when its input can take the output's name; otherwise it stays.
    A node output that is a graph output counts as read (a Dropout's mask, a
    no-op's second output). A model GraphSurgeon cannot write back
    (optional-typed values) is left alone (unwritable).
    """

    name = "cleanup"
    cse: bool = True
    dedup: bool = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        reason = unwritable(graph)
        if reason:
            return PassResult(
                changed=False, stats={"unwritable": 1}, notes=[f"model left alone: {reason}"]
            )
        before = _count(graph)
        constants_before = _constants(graph)
        table: ShapeTable | None = None
        changed = False
        for _ in range(MAX_ROUNDS):
            tidy(graph)
            if table is None and _needs_shapes(graph):
                table = ShapeTable(graph)
            edits = 0
            for g in all_graphs(graph):
                edits += self._round(g, table or _EMPTY, stats)
            if self.dedup:
                merged = dedup_initializers(graph)
                stats["initializers_merged"] += merged
                edits += merged
            if edits == 0:
                break
            changed = True
        after = _count(graph)
        changed = changed or after != before or _constants(graph) != constants_before
        stats["nodes_removed"] = before - after
        return PassResult(changed=changed, stats=dict(sorted(stats.items())))

    def _round(self, graph: gs.Graph, table: ShapeTable, stats: Counter[str]) -> int:
        edits = 0
        for node in list(graph.nodes):
            if not node.outputs or not is_default(node):
                continue
            if any(not is_absent(t) and is_read(graph, t) for t in node.outputs[1:]):
                continue  # a second output someone reads (a Dropout mask) keeps the node
            source = no_op_source(node, table)
            if source is not None and reroute(graph, node.outputs[0], source):
                node.outputs.clear()
                node.inputs.clear()
                stats[f"removed_{node.op}"] += 1
                edits += 1
                continue
            if node.op == "Transpose" and _merge_transposes(graph, node):
                stats["transposes_merged"] += 1
                edits += 1
            elif node.op == "Reshape" and _skip_reshape_input(node):
                stats["reshapes_merged"] += 1
                edits += 1
        if self.cse:
            toposort(graph)
            merged = eliminate_common_subexpressions(graph)
            stats["cse_merged"] += merged
            edits += merged
        return edits


class _Empty(ShapeTable):
    def __init__(self) -> None:
        self._info = {}


_EMPTY = _Empty()


def _count(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in all_graphs(graph))


def _constants(graph: gs.Graph) -> set[str]:
    """Names of the constants the model holds (a subgraph's copy of an outer one counts once)."""
    return {
        t.name
        for g in all_graphs(graph)
        for t in g.tensors().values()
        if isinstance(t, gs.Constant)
    }


def _needs_shapes(graph: gs.Graph) -> bool:
    ops = {"Cast", "CastLike", "Reshape", "Expand", "Slice", "Flatten", "Transpose"}
    ops |= {"Add", "Sub", "Mul", "Div"}
    return any(n.op in ops for g in all_graphs(graph) for n in g.nodes)


def _merge_transposes(graph: gs.Graph, node: gs.Node) -> bool:
    """Transpose(Transpose(x, p1), p2) -> Transpose(x, p1[p2]), or x when that is the identity."""
    inner_out = node.inputs[0]
    inner = inner_out.inputs[0] if inner_out.inputs else None
    if inner is None or inner.op != "Transpose" or not is_default(inner):
        return False
    p1, p2 = inner.attrs.get("perm"), node.attrs.get("perm")
    if p1 is None or p2 is None or len(p1) != len(p2):
        return False
    perm = [int(p1[i]) for i in p2]
    source = inner.inputs[0]
    if perm == list(range(len(perm))):
        if not reroute(graph, node.outputs[0], source):
            return False
        node.outputs.clear()
        node.inputs.clear()
        return True
    node.attrs["perm"] = perm
    node.inputs[0] = source
    return True


def _skip_reshape_input(node: gs.Node) -> bool:
    """Reshape(R(x), s) -> Reshape(x, s) when R only reshapes and s copies no dims."""
    if len(node.inputs) < 2:
        return False
    inner_out = node.inputs[0]
    inner = inner_out.inputs[0] if inner_out.inputs else None
    if inner is None or inner.op not in RESHAPES or not is_default(inner) or not inner.inputs:
        return False
    target = int_list(node.inputs[1])
    if target is None or (0 in target and not int(node.attrs.get("allowzero", 0))):
        return False
    node.inputs[0] = inner.inputs[0]
    return True

"""fuse-bn: fold BatchNormalization, per-channel Mul/Add and Pad into the layer next to them."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value, int_list, is_absent, is_default, unique_name
from onnxopt.pass_api import Pass, PassContext, PassResult, register_pass

from .simplify_rules.affine import LINEAR_OPS, fold_affine, out_channels, output_rank, per_channel
from .simplify_rules.common import all_graphs, all_names, is_read, sole_reader, tidy, unwritable
from .simplify_rules.shapes import ShapeTable

MAX_ROUNDS = 10
AFFINE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")
POOLS = ("AveragePool", "MaxPool")


@register_pass
class FuseBn(Pass):
    """Fold BatchNormalization, per-channel Mul/Add and Pad into Conv, ConvTranspose and Gemm.

    Rules, in the main graph and every If/Loop/Scan body, repeated until none applies:
    - BatchNormalization (inference mode, only Y read) right after a Conv,
      ConvTranspose or Gemm with a constant weight becomes new weights and
      bias of that layer; ConvTranspose groups and Gemm's transB, alpha and
      beta are respected;
    - Mul, Add, Sub or Div by a constant that broadcasts per output channel
      (shape [C], [1,C] or [1,C,1,1]; a scalar too) after such a layer folds
      the same way (Sub and Div only with the layer output as first operand);
    - Pad with constant zeros on spatial axes only, read only by a Conv (or an
      AveragePool that then counts padding, or a MaxPool when the pad value is
      -inf), moves into the reader's pads (explicit pads only, no ceil_mode);
    - MatMul of a 2-D activation by a constant 2-D matrix, followed by Add of a
      constant [N] or [1,N] bias, becomes one Gemm.
    The layer's output must have no other reader, so nothing else sees the
    changed values; a tensor that is a graph output counts as read (the user
    reads it), as do a BatchNormalization's extra outputs and MaxPool's Indices,
    whose values a fold would change. A shared weight is never edited in place: the fold writes
    new initializers. Anything else (dynamic weights, training-mode BN, other
    domains) is left alone, and so is a model GraphSurgeon cannot write back
    (optional-typed values; counted as unwritable).
    """

    name = "fuse-bn"
    fold_pad: bool = True
    fold_mul_add: bool = True
    matmul_add_to_gemm: bool = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        reason = unwritable(graph)
        if reason:
            return PassResult(
                changed=False, stats={"unwritable": 1}, notes=[f"model left alone: {reason}"]
            )
        taken = all_names(graph)

        def fresh(base: str) -> str:
            return unique_name(base, taken)

        changed = False
        for _ in range(MAX_ROUNDS):
            table = _Shapes(graph)
            edits = 0
            for g in all_graphs(graph):
                members = {id(n) for n in g.nodes}
                for node in list(g.nodes):
                    if not node.outputs or not is_default(node):
                        continue
                    if node.op in AFFINE_OPS and self._affine_allowed(node):
                        if _fold_into_producer(g, node, fresh, table, members):
                            stats[f"fused_{node.op}"] += 1
                            edits += 1
                    elif node.op == "Pad" and self.fold_pad:
                        if _fold_pad(g, node):
                            stats["fused_Pad"] += 1
                            edits += 1
                    elif node.op == "MatMul" and self.matmul_add_to_gemm:
                        if _matmul_add_to_gemm(g, node, table.get(), fresh):
                            stats["matmul_add_to_gemm"] += 1
                            edits += 1
            if edits == 0:
                break
            changed = True
            tidy(graph)
        return PassResult(changed=changed, stats=dict(sorted(stats.items())))

    def _affine_allowed(self, node: gs.Node) -> bool:
        return node.op == "BatchNormalization" or self.fold_mul_add


def _producer(
    graph: gs.Graph, tensor: gs.Tensor, reader: gs.Node, members: set[int]
) -> gs.Node | None:
    """The default-domain node of this graph writing `tensor`, if `reader` is its only reader."""
    if not tensor.inputs or sole_reader(graph, tensor) is not reader:
        return None
    producer = tensor.inputs[0]
    if not is_default(producer) or id(producer) not in members:
        return None
    live = [t for t in producer.outputs if not is_absent(t) and (is_read(graph, t) or t is tensor)]
    return producer if len(live) == 1 else None


def _fold_into_producer(
    graph: gs.Graph, node: gs.Node, fresh, table: _Shapes, members: set[int]
) -> bool:
    sides = [0] if node.op in ("BatchNormalization", "Sub", "Div") else [0, 1]
    for side in sides:
        if len(node.inputs) < 2 or side >= len(node.inputs):
            continue
        x = node.inputs[side]
        producer = _producer(graph, x, node, members)
        if producer is None:
            continue
        if producer.op in LINEAR_OPS:
            channels, rank = out_channels(producer), output_rank(producer)
        elif producer.op == "BatchNormalization" and node.op != "BatchNormalization":
            channels, rank = _bn_channels(producer), table.get().rank(x)
        else:
            continue
        if channels is None or rank is None:
            continue
        affine = _affine_of(graph, node, side, rank, channels)
        if affine is None:
            continue
        if producer.op == "BatchNormalization":
            done = _fold_into_bn(producer, affine[0], affine[1], fresh)
        else:
            done = fold_affine(producer, affine[0], affine[1], fresh)
        if not done:
            continue
        # The layer now computes y itself, under y's name: x's value changed, so x's
        # name goes (every surviving name keeps its meaning, for per-layer checks).
        y = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        producer.outputs[0] = y
        return True
    return False


def _bn_channels(bn: gs.Node) -> int | None:
    if int(bn.attrs.get("training_mode", 0)) or len(bn.inputs) != 5:
        return None
    params = [constant_value(t) for t in bn.inputs[1:]]
    if any(p is None or p.ndim != 1 or p.dtype.kind != "f" for p in params):
        return None
    return int(params[0].shape[0])


def _fold_into_bn(bn: gs.Node, scale: np.ndarray | None, shift: np.ndarray | None, fresh) -> bool:
    """BN(x) * scale + shift as one BN: scale multiplies its scale and bias, shift adds to bias."""
    gamma, beta = constant_value(bn.inputs[1]), constant_value(bn.inputs[2])
    if gamma is None or beta is None:
        return False
    g, b = gamma.astype(np.float64), beta.astype(np.float64)
    if scale is not None:
        g, b = g * scale, b * scale
    if shift is not None:
        b = b + shift
    base = bn.name or "bn"
    bn.inputs[1] = gs.Constant(fresh(f"{base}.fused_scale"), g.astype(gamma.dtype))
    bn.inputs[2] = gs.Constant(fresh(f"{base}.fused_bias"), b.astype(beta.dtype))
    return True


class _Shapes:
    """Shape inference for the whole model, run the first time a rule asks for it."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.table: ShapeTable | None = None

    def get(self) -> ShapeTable:
        if self.table is None:
            self.table = ShapeTable(self.graph)
        return self.table


def _affine_of(
    graph: gs.Graph, node: gs.Node, side: int, rank: int, channels: int
) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """(scale, shift) vectors over output channels for this node, or None."""
    if node.op == "BatchNormalization":
        if int(node.attrs.get("training_mode", 0)) or len(node.inputs) != 5:
            return None
        if any(not is_absent(t) and is_read(graph, t) for t in node.outputs[1:]):
            return None
        scale, bias, mean, var = (constant_value(t) for t in node.inputs[1:])
        if any(v is None or v.shape != (channels,) for v in (scale, bias, mean, var)):
            return None
        if any(v.dtype.kind != "f" for v in (scale, bias, mean, var)):
            return None
        eps = float(node.attrs.get("epsilon", 1e-5))
        s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        return s, bias.astype(np.float64) - mean.astype(np.float64) * s
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    value = constant_value(node.inputs[1 - side])
    vector = None if value is None else per_channel(value, rank, channels)
    if vector is None:
        return None
    if node.op == "Mul":
        return vector, None
    if node.op == "Add":
        return None, vector
    if node.op == "Sub":
        return None, -vector
    if node.op == "Div" and np.all(vector != 0):
        return 1.0 / vector, None
    return None


def _pads_of(pad: gs.Node) -> tuple[list[int], float] | None:
    """(pads over all axes, constant value) of a constant-mode Pad, or None."""
    mode = pad.attrs.get("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else str(mode)) != "constant":
        return None
    if len(pad.inputs) > 1:
        pads = int_list(pad.inputs[1])
        value_tensor = pad.inputs[2] if len(pad.inputs) > 2 else None
        value = 0.0
        if not is_absent(value_tensor):
            found = constant_value(value_tensor)
            if found is None or found.size != 1:
                return None
            value = float(found.reshape(-1)[0])
        if len(pad.inputs) > 3 and not is_absent(pad.inputs[3]) and pads is not None:
            axes = int_list(pad.inputs[3])
            rank = _rank_hint(pad)
            if axes is None or rank is None:
                return None
            full = [0] * (2 * rank)
            for i, axis in enumerate(axes):
                axis = axis + rank if axis < 0 else axis
                full[axis] = pads[i]
                full[axis + rank] = pads[i + len(axes)]
            pads = full
    else:
        pads = [int(p) for p in pad.attrs.get("pads", [])] or None
        value = float(pad.attrs.get("value", 0.0))
    if pads is None:
        return None
    return pads, value


def _rank_hint(pad: gs.Node) -> int | None:
    shape = pad.inputs[0].shape
    return len(shape) if shape is not None else None


def _fold_pad(graph: gs.Graph, pad: gs.Node) -> bool:
    reader = sole_reader(graph, pad.outputs[0])
    if reader is None or not is_default(reader) or reader.op not in ("Conv", *POOLS):
        return False
    if reader.inputs[0] is not pad.outputs[0]:
        return False
    found = _pads_of(pad)
    if found is None:
        return False
    pads, value = found
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads) or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return False
    if str(reader.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "b'NOTSET'"):
        return False
    spatial = rank - 2
    existing = [int(p) for p in reader.attrs.get("pads", [0] * (2 * spatial))]
    if len(existing) != 2 * spatial:
        return False
    if reader.op == "Conv" and value != 0.0:
        return False
    if reader.op in POOLS and int(reader.attrs.get("ceil_mode", 0)):
        return False
    if reader.op == "AveragePool":
        if value != 0.0:
            return False
        if not int(reader.attrs.get("count_include_pad", 0)) and any(existing):
            return False
        reader.attrs["count_include_pad"] = 1
    if reader.op == "MaxPool":
        if not (math.isinf(value) and value < 0):
            return False
        indices = reader.outputs[1] if len(reader.outputs) > 1 else None
        if indices is not None and not is_absent(indices) and is_read(graph, indices):
            return False
    begins, ends = pads[2:rank], pads[rank + 2 :]
    reader.attrs["pads"] = [e + p for e, p in zip(existing, begins + ends, strict=True)]
    reader.inputs[0] = pad.inputs[0]
    return True


def _matmul_add_to_gemm(graph: gs.Graph, matmul: gs.Node, table: ShapeTable, fresh) -> bool:
    if len(matmul.inputs) != 2 or len(matmul.outputs) != 1:
        return False
    a, b = matmul.inputs
    weight = constant_value(b)
    if weight is None or weight.ndim != 2 or weight.dtype.kind != "f" or table.rank(a) != 2:
        return False
    add = sole_reader(graph, matmul.outputs[0])
    if add is None or add.op != "Add" or not is_default(add) or len(add.inputs) != 2:
        return False
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    bias = constant_value(other)
    columns = weight.shape[1]
    if bias is None or bias.dtype != weight.dtype or bias.shape not in ((columns,), (1, columns)):
        return False
    y = add.outputs[0]
    add.outputs.clear()
    add.inputs.clear()
    matmul.outputs.clear()
    matmul.inputs.clear()
    graph.nodes.append(
        gs.Node(
            "Gemm", name=fresh(f"{matmul.name or 'matmul'}_gemm"), inputs=[a, b, other], outputs=[y]
        )
    )
    return True

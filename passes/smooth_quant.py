"""smooth-quant: move per-channel activation outliers into the weights of MatMul and Gemm."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.calibration import channel_stats
from onnxopt.errors import PassError
from onnxopt.graph import (
    constant_value,
    consumers,
    is_default,
    is_graph_output,
    name_matches,
    producer,
    to_model,
    unique_name,
)
from onnxopt.pass_api import DATA_HINT, Pass, PassContext, PassResult, register_pass

# Smoothing factors are kept in this band: beyond it a channel that is all but
# silent (or a weight row of zeros) would get an absurd scale for no gain.
MIN_FACTOR, MAX_FACTOR = 1e-5, 1e5


@dataclass
class _Linear:
    """A MatMul or Gemm whose weight is constant: rows (or columns) indexed by input channel."""

    node: gs.Node
    index: int  # the weight's input slot
    channel_axis: int  # the weight axis that runs over the activation's channels


@dataclass
class _Group:
    """An activation and the smoothable layers that read it."""

    tensor: gs.Variable
    linears: list[_Linear] = field(default_factory=list)


@register_pass
class SmoothQuant(Pass):
    """Move per-channel activation outliers into the weights of MatMul and Gemm (SmoothQuant).

    Matches MatMul (activation x constant 2-D weight) and Gemm (transA=0, constant
    weight) whose activation input has outlier channels: the largest per-channel
    max |x| over the calibration data (ctx.feeds) is at least `min_outlier_ratio`
    times the median one. For such an activation X, read by layers with weights
    W, it computes per input channel j
        s_j = max|X_j| ^ alpha / max|W_j| ^ (1 - alpha)
    (max|W_j| over every layer that reads X), multiplies weight row j by s_j and
    divides X by s_j, so the product is unchanged and the activation range
    shrinks where the outliers were. The division is folded into the producer of X:
    - LayerNormalization over the last axis with a constant scale (and bias);
    - Mul by a constant that is a scalar or runs along the last axis;
    - Add of such a constant to the output of a foldable producer (a decomposed
      LayerNorm's `x * gamma + beta`), whose output only that Add reads.
    Every reader of X must be a smoothable layer, or folding would change what the
    others see. With no foldable producer, `insert_mul=true` inserts a Mul by 1/s
    in front of the smoothable readers (an extra op at run time); otherwise X is
    left alone and the notes say so. Activations without outliers, layers outside
    `include_nodes` or inside `exclude_nodes` (node names or glob patterns),
    subgraphs and other domains are left alone. New constants are written for
    every edit, so a shared weight or LayerNorm scale is never changed in place.
    Run it before `quantize`.
    """

    name = "smooth-quant"
    alpha: float = 0.5
    min_outlier_ratio: float = 5.0
    include_nodes: list[str] = []  # noqa: RUF012 - read only
    exclude_nodes: list[str] = []  # noqa: RUF012
    insert_mul: bool = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not 0.0 <= self.alpha <= 1.0:
            raise PassError(f"smooth-quant: alpha must be in [0, 1], got {self.alpha}")
        if self.min_outlier_ratio < 1.0:
            raise PassError(
                f"smooth-quant: min_outlier_ratio must be 1 or more, got {self.min_outlier_ratio}"
            )
        stats: Counter[str] = Counter()
        notes: list[str] = []
        groups = self._groups(graph)
        if not groups:
            notes.append("no MatMul or Gemm with a constant weight to smooth")
            return PassResult(False, dict(stats), notes)
        if ctx.feeds is None:
            raise PassError(f"smooth-quant needs calibration data: {DATA_HINT}")
        names = [g.tensor.name for g in groups]
        channels = channel_stats(
            to_model(graph),
            ctx.feeds,
            names,
            axis=-1,
            track_max=True,
            providers=tuple(ctx.providers),
            threads=ctx.threads,
            progress=lambda done, total: ctx.report("smooth-quant statistics", done, total),
        )
        taken = {t for t in graph.tensors()} | {n.name for n in graph.nodes if n.name}
        skipped: dict[str, list[str]] = {}
        for group in groups:
            reason = self._smooth(graph, group, channels[group.tensor.name].max_abs, taken, stats)
            if reason:
                skipped.setdefault(reason, []).append(group.tensor.name)
                stats["skipped_activations"] += 1
        for reason, tensors in skipped.items():
            shown = ", ".join(tensors[:4]) + (" ..." if len(tensors) > 4 else "")
            notes.append(f"left {len(tensors)} activation(s) alone, {reason}: {shown}")
        if stats["smoothed_activations"]:
            graph.cleanup(remove_unused_graph_inputs=False)
            if stats["inserted_mul"]:
                graph.toposort()
        return PassResult(stats["smoothed_activations"] > 0, dict(stats), notes)

    # ---- matching ---------------------------------------------------------------------

    def _selected(self, node: gs.Node) -> bool:
        if self.include_nodes and not name_matches(node.name, self.include_nodes):
            return False
        return not name_matches(node.name, self.exclude_nodes)

    def _linear(self, node: gs.Node) -> _Linear | None:
        if not is_default(node) or len(node.inputs) < 2 or not self._selected(node):
            return None
        weight = constant_value(node.inputs[1])
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
            return None
        if constant_value(node.inputs[0]) is not None:
            return None
        if node.op == "MatMul":
            return _Linear(node, 1, 0)
        if node.op == "Gemm" and not node.attrs.get("transA", 0):
            return _Linear(node, 1, 1 if node.attrs.get("transB", 0) else 0)
        return None

    def _groups(self, graph: gs.Graph) -> list[_Group]:
        groups: dict[str, _Group] = {}
        for node in graph.nodes:
            linear = self._linear(node)
            if linear is None:
                continue
            tensor = node.inputs[0]
            group = groups.setdefault(tensor.name, _Group(tensor))
            if all(existing.node is not node for existing in group.linears):
                group.linears.append(linear)
        return list(groups.values())

    # ---- the edit -----------------------------------------------------------------------

    def _smooth(
        self,
        graph: gs.Graph,
        group: _Group,
        x_max: np.ndarray,
        taken: set[str],
        stats: Counter[str],
    ) -> str | None:
        """Smooth one activation; return why it was left alone, or None when done."""
        weights = [constant_value(lin.node.inputs[lin.index]) for lin in group.linears]
        channels = weights[0].shape[group.linears[0].channel_axis]
        if x_max.size != channels or any(
            w.shape[lin.channel_axis] != channels
            for w, lin in zip(weights, group.linears, strict=True)
        ):
            return "their channel count does not match the weights"
        positive = x_max[x_max > 0]
        if positive.size == 0:
            return "they are zero on the calibration data"
        ratio = float(x_max.max() / np.median(positive))
        if ratio < self.min_outlier_ratio:
            return f"no outlier channels (largest max|x| below {self.min_outlier_ratio:g}x median)"
        w_max = np.max(
            [
                np.abs(w).max(axis=1 - lin.channel_axis)
                for w, lin in zip(weights, group.linears, strict=True)
            ],
            axis=0,
        ).astype(np.float64)
        factors = np.ones(channels, np.float64)
        live = (x_max > 0) & (w_max > 0)
        factors[live] = x_max[live] ** self.alpha / w_max[live] ** (1.0 - self.alpha)
        factors = np.clip(factors, MIN_FACTOR, MAX_FACTOR)
        tensor = group.tensor
        readers = consumers(tensor)
        linear_nodes = [lin.node for lin in group.linears]
        only_linears = not is_graph_output(graph, tensor) and all(
            any(r is n for n in linear_nodes) for r in readers
        )
        fold = _fold_plan(graph, tensor, channels) if only_linears else None
        if fold is not None:
            for node, index in fold:
                _divide_constant(node, index, factors, taken)
                stats[f"folded_into_{node.op}"] += 1
        elif self.insert_mul:
            dtype = weights[0].dtype  # the activation's type: MatMul takes one type
            inverse = gs.Constant(
                unique_name(f"{tensor.name}_smooth_inverse", taken), (1.0 / factors).astype(dtype)
            )
            smoothed = gs.Variable(unique_name(f"{tensor.name}_smoothed", taken), dtype)
            graph.nodes.append(
                gs.Node(
                    "Mul",
                    unique_name(f"{tensor.name}_smooth", taken),
                    inputs=[tensor, inverse],
                    outputs=[smoothed],
                )
            )
            for lin in group.linears:
                lin.node.inputs[0] = smoothed
            stats["inserted_mul"] += 1
        elif not only_linears:
            return "other nodes read them too (insert_mul=true would add a Mul)"
        else:
            return "no LayerNormalization or constant Mul/Add before them (insert_mul=true)"
        for lin, weight in zip(group.linears, weights, strict=True):
            shape = [-1, 1] if lin.channel_axis == 0 else [1, -1]
            scaled = (weight.astype(np.float64) * factors.reshape(shape)).astype(weight.dtype)
            old = lin.node.inputs[lin.index]
            lin.node.inputs[lin.index] = gs.Constant(
                unique_name(f"{old.name}_smoothed", taken), scaled
            )
            stats["smoothed_layers"] += 1
        stats["smoothed_activations"] += 1
        return None


def _along_last_axis(tensor: gs.Tensor, channels: int) -> bool:
    """Whether a constant divided by s (along the last axis) keeps the op's output shape."""
    value = constant_value(tensor)
    if value is None or value.dtype.kind != "f":
        return False
    return value.ndim == 0 or value.shape[-1] in (1, channels)


def _fold_plan(
    graph: gs.Graph, tensor: gs.Tensor, channels: int
) -> list[tuple[gs.Node, int]] | None:
    """The constant inputs (node, slot) that divided by s divide `tensor` by s, or None."""
    node = producer(tensor)
    if node is None or not is_default(node):
        return None
    if any(o is not tensor and o.outputs for o in node.outputs):
        return None  # LayerNormalization's mean or inverse deviation is read elsewhere
    if node.op == "LayerNormalization":
        axis = node.attrs.get("axis", -1)
        rank = len(tensor.shape) if tensor.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
        plan = [(node, 1)]
        if len(node.inputs) > 2 and node.inputs[2].name:
            plan.append((node, 2))
        if not all(_along_last_axis(node.inputs[i], channels) for _, i in plan):
            return None
        return plan
    if node.op not in ("Mul", "Add") or len(node.inputs) != 2:
        return None
    for slot in (0, 1):
        if not _along_last_axis(node.inputs[slot], channels):
            continue
        other = node.inputs[1 - slot]
        if constant_value(other) is not None:
            return None
        if node.op == "Mul":
            return [(node, slot)]
        # Add: (y + c) / s = y / s + c / s, so y's producer must absorb 1/s as well.
        if len(consumers(other)) != 1 or is_graph_output(graph, other):
            return None
        inner = _fold_plan(graph, other, channels)
        return None if inner is None else [*inner, (node, slot)]
    return None


def _divide_constant(node: gs.Node, index: int, factors: np.ndarray, taken: set[str]) -> None:
    old = node.inputs[index]
    value = constant_value(old).astype(np.float64)
    shape = value.shape[:-1] + (factors.size,) if value.ndim else (factors.size,)
    divided = (np.broadcast_to(value, shape) / factors).astype(constant_value(old).dtype)
    node.inputs[index] = gs.Constant(unique_name(f"{old.name}_smoothed", taken), divided)

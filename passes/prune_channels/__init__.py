"""prune-channels: remove whole channels from the ONNX graph, across residuals and concats.

The dependency analysis (`dependency`, rules in `rules`, `shape_rules`, `linear`) finds
the channel groups; `importance` ranks their classes, `selection` picks what goes,
`recovery` puts back what the removed channels contributed, `apply` rewrites the
graph and `greedy` optionally stops at an output budget.

Public helpers for the `inspect` view: `analyze(model)` returns the `ChannelGroup`s,
`group_table(model)` the table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.bench import bench
from onnxopt.errors import PassError
from onnxopt.graph import tidy, to_model
from onnxopt.pass_api import Pass, PassContext, PassResult, register_pass
from onnxopt.passes.quantize.mixed import holdout_split

from .analysis import analyze, analyze_graph, group_table
from .apply import Slicer, apply_edits
from .dependency import Analysis, ChannelGroup
from .greedy import greedy_keep, parse_budget
from .importance import data_importance, weight_importance
from .offsets import apply_offsets, apply_weights
from .recovery import Recovery, exact_classes, plan_recovery
from .search import (
    DEFAULT_CEILING,
    Measure,
    confirmed,
    levels,
    removal_ratios,
    search_removals,
)
from .selection import choose, group_targets
from .statistics import MAX_GRAM_FEATURES, CalibrationStats, PatchSpec, gather
from .target import HeldOut, macs_of, target_of

__all__ = ["ChannelGroup", "PruneChannels", "analyze", "build_pruned", "group_table"]

RATIO_NOTE_LIMIT = 40
LATENCY_RUNS = 20
LATENCY_WARMUP = 3
MEASURABLY_FASTER = 1.05  # a p25 or median ratio below this is within this machine's noise


def build_pruned(
    an: Analysis,
    keep_class: np.ndarray,
    stats: CalibrationStats | None = None,
    *,
    bias_compensation: bool = False,
    reconstruct: bool = False,
    ridge: float = 1e-3,
    held: CalibrationStats | None = None,
) -> tuple[gs.Graph, Recovery]:
    """A fresh graph of the analysed model with only the kept classes, recovery applied."""
    keep_elem = an.keep_elements(keep_class)
    rec = plan_recovery(
        an,
        keep_elem,
        stats,
        bias_compensation=bias_compensation,
        reconstruct=reconstruct,
        ridge=ridge,
        held=held,
    )
    graph = an.graph.copy()
    slicer = Slicer(graph, an, keep_elem)
    apply_weights(slicer, rec)
    apply_edits(slicer)
    apply_offsets(slicer, rec)
    tidy(graph)
    return graph, rec


def _parameters(graph: gs.Graph) -> int:
    """Elements held in constants: initializers and Constant nodes."""
    total = sum(
        int(np.prod(t.shape)) for t in graph.tensors().values() if isinstance(t, gs.Constant)
    )
    for node in graph.nodes:
        value = node.attrs.get("value") if node.op == "Constant" else None
        if isinstance(value, gs.Constant):
            total += int(np.prod(value.shape))
    return total


@register_pass
class PruneChannels(Pass):
    """Remove low-importance channels as whole structures, consistently across the graph.

    Matches: channel groups found by the dependency analysis. A group is every channel
    that must go together: a producer's output channels and its consumers' input
    channels, tied through BatchNorm/InstanceNorm, elementwise ops (residual Add, Mul
    gates of squeeze-excitation blocks), pooling, Resize, Pad, Concat and Split/Slice
    offsets, Flatten/Reshape blocks before a Gemm, depthwise and grouped Convs.
    Produces: smaller weights and tensors. Dead or constant channels go first, with
    their constant contribution folded into the consumer (outputs unchanged); then the
    least important classes by filter norm (`norm`, `aggregate` with consumers' weights)
    or, with `data_aware`, by mean |activation| x weight norm, up to `ratio` per group
    (`mode=uniform`), `ratio` of all prunable channels ranked together (`mode=global`),
    or below `threshold` (`mode=threshold`); `round_to`, `min_channels` and `protect`
    (fnmatch patterns of producers' node, output or weight names) limit it. With calibration data
    (--data), `bias_compensation` folds the removed channels' mean into the next bias
    and `reconstruct` refits the consumers' kept weights by ridge least squares; the
    output error before and after recovery is reported. `greedy_metric` (cosine:0.99,
    rel_error:0.05) accepts the planned removals group by group while the budget holds.
    `target` (quantize's syntax: cosine:X, rel_error:X, top1:X, or a callable) searches
    the largest pruning that meets it (rules in `search`), `ratio` then being the most
    any group may lose; without data it prunes by magnitude and says accuracy was not
    checked. Data is split: the last `holdout` share is never fitted; the target, the
    reported errors and the recovery checks use it. Each consumer keeps the recovery
    (none, bias compensation, reconstruction) with the smallest held-out error of its
    own output, and the whole model keeps recovery only if it lowers the held-out
    output error. `round_to` defaults to 8 (the AVX2 block of ORT's convolutions); a
    group that loses only exact classes is not rounded. With `latency_check` the
    notes say when the result is not measurably faster than its input.
    Leaves alone: groups that reach a graph output, meet an op without a channel rule
    (LRN, attention-head reshapes, custom ops...), or need a shape or constant that
    cannot be proven (run fold-constants first); `inspect --prune-groups` lists why.
    """

    name = "prune-channels"
    ratio: float | None = None
    mode: Literal["uniform", "global", "threshold"] = "uniform"
    threshold: float = 0.0
    norm: Literal["l1", "l2"] = "l2"
    aggregate: Literal["sum", "mean", "max", "none"] = "sum"
    round_to: int = 8
    min_channels: int = 1
    protect: list[str] = []  # read only, never mutated
    exact: bool = True
    data_aware: bool = False
    bias_compensation: bool = False
    reconstruct: bool | None = None
    ridge: float = 1e-3
    greedy_metric: str = ""
    target: str | Callable[[dict, dict], bool] | None = None
    holdout: float = 0.25
    latency_check: bool = True

    def _check(self) -> None:
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise PassError(f"prune-channels ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1 or self.min_channels < 1:
            raise PassError("prune-channels round_to and min_channels must be at least 1")
        if self.threshold < 0 or self.ridge < 0:
            raise PassError("prune-channels threshold and ridge must not be negative")
        if not 0.0 < self.holdout < 1.0:
            raise PassError(f"prune-channels holdout must be in (0, 1), got {self.holdout}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self._check()
        target = target_of(self.target)
        budget = parse_budget(self.greedy_metric)
        reconstruct = self.reconstruct
        if reconstruct is None:  # on by default where a target comes with data
            reconstruct = target is not None and ctx.feeds is not None
        recovering = self.bias_compensation or reconstruct
        wanted = [
            name
            for name, on in (
                ("data_aware", self.data_aware),
                ("bias_compensation", self.bias_compensation),
                ("reconstruct", bool(self.reconstruct)),
                ("greedy_metric", budget is not None),
            )
            if on
        ]
        if wanted and ctx.feeds is None:
            raise PassError(
                f"prune-channels {', '.join(wanted)} needs calibration data: pass --data "
                "with a .npz file or folder of inputs"
            )
        graph.toposort()
        an = analyze_graph(graph, ctx.shapes, list(self.protect))
        prunable = [g for g in an.groups if g.prunable]
        stats: dict[str, int | float] = {
            "groups": sum(1 for g in an.groups if g.producers),
            "groups_prunable": len(prunable),
            "channels": sum(g.channels for g in an.groups if g.producers),
            "channels_prunable": sum(g.channels for g in prunable),
        }
        notes = _frozen_notes(an)
        if not prunable:
            return PassResult(False, stats, notes)

        held: HeldOut | None = None
        calib = held_stats = None
        if ctx.feeds is not None and (wanted or target is not None):
            calib_feeds, held_feeds, separate = holdout_split(ctx.feeds, self.holdout)
            held = HeldOut(an.model, held_feeds, target, ctx.providers, ctx.threads)
            stats["holdout_samples"] = len(held)
            if not separate:
                notes.append("one sample only: the figures are measured on the data fitted")
            if wanted or recovering:
                calib = self._calibrate(an, calib_feeds, ctx, prunable, reconstruct)
            if recovering and separate:
                held_stats = self._calibrate(an, held_feeds, ctx, prunable, reconstruct, True)
        elif target is not None:
            notes.append(
                f"accuracy was not checked: target {target.label} needs data (--data); "
                "channels were pruned by weight magnitude alone"
            )
        if self.data_aware and calib is not None:
            scores = data_importance(an, calib.mean_abs, self.norm, self.aggregate)
        else:
            scores = weight_importance(an, self.norm, self.aggregate)
        exact = exact_classes(an) if self.exact else np.zeros(an.n_classes, dtype=bool)
        prunable_mask = np.zeros(an.n_classes, dtype=bool)
        for g in prunable:
            prunable_mask[g.classes] = True
        exact &= prunable_mask
        recovery = {
            "bias_compensation": self.bias_compensation,
            "reconstruct": reconstruct,
            "ridge": self.ridge,
            "held": held_stats,
        }

        def build(keep: np.ndarray) -> gs.Graph:
            return build_pruned(an, keep, calib, **recovery)[0]

        ceiling = self.ratio
        if ceiling is None:
            ceiling = DEFAULT_CEILING if target is not None and held is not None else 0.3
        if target is not None and held is not None:
            keep = self._search(an, prunable, scores, exact, ceiling, held, build, stats, notes)
        else:
            targets = group_targets(
                an,
                scores,
                exact,
                mode=self.mode,
                ratio=ceiling,
                threshold=self.threshold,
                round_to=self.round_to,
                min_channels=self.min_channels,
            )
            keep = choose(an, scores, exact, targets, self.min_channels)
            if budget is not None and held is not None:

                def evaluate(trial: np.ndarray) -> tuple[float, float]:
                    measured = held(to_model(build(trial)), count_macs=False)
                    return measured.cosine, measured.rel_error

                keep, info = greedy_keep(an, keep, scores, budget, evaluate)
                stats.update(info)
        if keep.all():
            return PassResult(False, stats, notes)

        pruned, rec = build_pruned(an, keep, calib, **recovery)
        stats.update({k: v for k, v in rec.counts.items() if v})
        checked = [c for c in rec.checks if "reconstruct" in c.errors]
        if checked:  # each consumer's own held-out output error, relative to its output
            stats["layer_error_removed_median"] = float(
                np.median([c.errors["plain"] for c in checked])
            )
            stats["layer_error_reconstructed_median"] = float(
                np.median([c.errors["reconstruct"] for c in checked])
            )
        if held is not None:
            pruned = _better_of(an, keep, pruned, held, recovering, stats, notes)
        stats.update(_removal_stats(an, keep, exact, graph, pruned))
        stats.update(_macs_stats(an, pruned, held))
        notes.append(_ratio_note(an, keep))
        if self.latency_check:
            feed = held.feeds[:1] if held is not None else None
            _latency_note(an.model, to_model(pruned), ctx, feed, stats, notes)
        return PassResult(True, stats, notes, graph=pruned)

    def _search(
        self,
        an: Analysis,
        prunable: list[ChannelGroup],
        scores: np.ndarray,
        exact: np.ndarray,
        ceiling: float,
        held: HeldOut,
        build: Callable[[np.ndarray], gs.Graph],
        stats: dict[str, int | float],
        notes: list[str],
    ) -> np.ndarray:
        group_levels = {}
        for g in prunable:
            n_exact = int(np.count_nonzero(exact[g.classes]))
            min_keep = min(self.min_channels, g.size)
            group_levels[g.id] = levels(g, n_exact, ceiling, self.round_to, min_keep)

        def keep_of(plan: dict[int, int]) -> np.ndarray:
            return choose(an, scores, exact, plan, self.min_channels)

        def measure(plan: dict[int, int], part: str = "search") -> Measure:
            return held(to_model(build(keep_of(plan))), part=part)

        plan, best, record = search_removals(prunable, group_levels, measure)
        found = confirmed(record, lambda p: measure(p, "all"))
        if found is not None:
            plan, best = found
        elif best.met:  # the search's finalists all failed the confirmation
            plan = {g.id: group_levels[g.id][0] for g in prunable}
            best = measure(plan, "all")
        assert held.target is not None
        stats["target_met"] = int(best.met)
        stats["search_evaluations"] = record.evaluations
        if best.value is not None:
            stats["target_value"] = round(best.value, 6)
        label = held.target.label
        if best.met:
            notes.append(f"target {label} met on {len(held)} held-out sample(s)")
        else:
            notes.append(
                f"target {label} not met on {len(held)} held-out sample(s) even with only the "
                "exact removals: nothing else was removed"
            )
        notes.extend(f"search: {step}" for step in record.steps)
        return keep_of(plan)

    def _calibrate(
        self,
        an: Analysis,
        feeds: Any,
        ctx: PassContext,
        prunable: list[ChannelGroup],
        reconstruct: bool,
        held: bool = False,
    ) -> CalibrationStats:
        groups = {g.id for g in prunable}
        axes: dict[str, int] = {}
        grams: list[tuple[int, str, PatchSpec | None]] = []
        for absorber in an.absorbers:
            lay = an.layouts[absorber.tensor]
            if not groups & {int(g) for g in an.class_group[an.elem_class[lay.elems]]}:
                continue
            axes[absorber.tensor] = lay.axis
            if reconstruct:
                patch = _patches(an, absorber.node, absorber.tensor)
                if patch is not None and lay.length * patch.taps < MAX_GRAM_FEATURES:
                    grams.append((absorber.node, absorber.tensor, patch))
                elif lay.length < MAX_GRAM_FEATURES:
                    grams.append((absorber.node, absorber.tensor, None))
        return gather(
            an.model,
            feeds,
            axes,
            mean_abs=self.data_aware and not held,
            mean=self.bias_compensation or reconstruct,
            grams=grams,
            providers=ctx.providers,
            threads=ctx.threads,
        )


def _better_of(
    an: Analysis,
    keep: np.ndarray,
    pruned: gs.Graph,
    held: HeldOut,
    recovering: bool,
    stats: dict[str, int | float],
    notes: list[str],
) -> gs.Graph:
    """The recovered model, or the plain one when recovery made the held-out error worse."""
    after = held(to_model(pruned), count_macs=False)
    if recovering:
        plain = build_pruned(an, keep)[0]
        before = held(to_model(plain), count_macs=False)
        stats["cosine_before_recovery"] = before.cosine
        stats["rel_error_before_recovery"] = before.rel_error
        stats["cosine_with_recovery"] = after.cosine
        stats["rel_error_with_recovery"] = after.rel_error
        if before.rel_error < after.rel_error:
            notes.append(
                f"recovery made the held-out error worse (rel_error {before.rel_error:.4g} -> "
                f"{after.rel_error:.4g}): the model is returned without it"
            )
            stats["recovery_dropped"] = 1
            pruned, after = plain, before
    stats["cosine"], stats["rel_error"] = after.cosine, after.rel_error
    return pruned


def _macs_stats(an: Analysis, pruned: gs.Graph, held: HeldOut | None) -> dict[str, int]:
    """MACs of one sample before and after, dynamic dims bound to a held-out feed's."""
    feed = held.feeds[0] if held is not None else None
    before = onnx.ModelProto()
    before.CopyFrom(an.model)
    counts = {"macs_before": macs_of(before, feed), "macs_after": macs_of(to_model(pruned), feed)}
    return {k: v for k, v in counts.items() if v is not None}


def _ratio_note(an: Analysis, keep: np.ndarray) -> str:
    ratios = removal_ratios(an, keep)
    names = {g.id: g.producers[0] if g.producers else str(g.id) for g in an.groups}
    parts = [f"{names[gid]} {r:.2f}" for gid, r in sorted(ratios.items()) if r > 0]
    shown = parts[:RATIO_NOTE_LIMIT]
    more = f", and {len(parts) - len(shown)} more" if len(parts) > len(shown) else ""
    return "share of classes removed per group: " + ", ".join(shown) + more


def _latency_note(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    ctx: PassContext,
    feed: list[dict[str, np.ndarray]] | None,
    stats: dict[str, int | float],
    notes: list[str],
) -> None:
    """Interleaved latency of the input and the pruned model; says when it is no faster."""
    try:
        result = bench(
            [before, after],
            ctx.providers[:1],
            labels=["input", "pruned"],
            feeds=feed,
            threads=ctx.threads,
            warmup=LATENCY_WARMUP,
            runs=LATENCY_RUNS,
        )
    except Exception as error:  # noqa: BLE001 - a timing is a report, never a reason to fail
        notes.append(f"latency not measured: {error}")
        return
    a, b = result.timings
    p25, p50 = a.percentile(25) / b.percentile(25), a.p50 / b.p50
    stats["speedup_p25"], stats["speedup_p50"] = round(p25, 3), round(p50, 3)
    threads = ctx.threads if ctx.threads else "default"
    line = (
        f"latency p50 {a.p50:.3g} -> {b.p50:.3g} ms ({p50:.2f}x, p25 {p25:.2f}x; "
        f"{LATENCY_RUNS} interleaved runs, threads {threads})"
    )
    if min(p25, p50) < MEASURABLY_FASTER:
        line += ": not measurably faster than its input"
    notes.append(line)


def _patches(an: Analysis, index: int, tensor: str) -> PatchSpec | None:
    """The im2col view of a group-1 Conv with a kernel larger than 1 and a known input shape."""
    node = an.graph.nodes[index]
    if node.op != "Conv" or int(node.attrs.get("group", 1)) != 1:
        return None
    kernel = tuple(int(k) for k in node.inputs[1].shape[2:])
    shape = an.shapes.get(tensor)
    if int(np.prod(kernel)) == 1 or shape is None:
        return None
    spatial = shape[2:]
    if not all(isinstance(d, int) for d in spatial):
        return None
    return PatchSpec.of(node.attrs, kernel, tuple(spatial))


def _removal_stats(
    an: Analysis,
    keep: np.ndarray,
    exact: np.ndarray,
    before: gs.Graph,
    after: gs.Graph,
) -> dict[str, int]:
    keep_elem = an.keep_elements(keep)
    removed = sum(
        int(np.count_nonzero(~keep_elem[an.layouts[root.tensor].elems])) for root in an.roots
    )
    return {
        "groups_pruned": len({int(an.class_group[c]) for c in np.nonzero(~keep)[0]}),
        "classes_removed": int(np.count_nonzero(~keep)),
        "classes_removed_exactly": int(np.count_nonzero(~keep & exact)),
        "channels_removed": removed,
        "parameters_before": _parameters(before),
        "parameters_after": _parameters(after),
    }


def _frozen_notes(an: Analysis, limit: int = 5) -> list[str]:
    reasons = Counter(g.frozen[0] for g in an.groups if g.frozen and g.producers)
    notes = [f"{n} group(s) frozen: {why}" for why, n in reasons.most_common(limit)]
    if len(reasons) > limit:
        notes.append(f"{len(reasons) - limit} more reasons: see inspect --prune-groups")
    return notes

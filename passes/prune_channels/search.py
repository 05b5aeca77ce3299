"""The largest pruning that meets an accuracy target on held-out feeds.

Rules:
- Each prunable group has levels: the number of classes it loses at ratios 0, 0.05,
  0.10, ... up to the ceiling (`ratio` when given, else 0.9), after `round_to` and
  `min_channels`; level 0 removes only the exact (dead or constant) classes.
- Sensitivity: every group is pruned alone by one level, with recovery, and the
  relative error of the model outputs on the held-out feeds is measured, with the
  MACs that step saves.
- Allocation: a level step is an item whose cost is the group's sensitivity grown
  quadratically with the classes removed, and whose gain is the MACs it saves
  (linear). Items are ranked by cost per MAC saved: one global greedy order, in which
  a group's levels come in order.
- Search: the whole order is tried first, then a binary search finds the longest
  prefix of it that meets the target, then up to `EXTRA_TRIES` single items past
  that prefix are tried one by one (a group whose item fails takes no further
  item). Every model tried is built with recovery and measured on the held-out
  feeds; only a measured model that met the target is returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .dependency import Analysis, ChannelGroup
from .selection import rounded_target

LEVEL_STEP = 0.05
DEFAULT_CEILING = 0.9
EXTRA_TRIES = 8


@dataclass
class Measure:
    met: bool
    value: float | None  # the target's metric (None for a callable target)
    cosine: float
    rel_error: float
    macs: int | None


@dataclass
class SearchRecord:
    evaluations: int = 0
    sensitivity: dict[int, float] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)


def levels(group: ChannelGroup, n_exact: int, ceiling: float, round_to: int, min_keep: int):
    """Distinct class counts the group may lose, ascending, the first one the exact floor."""
    out: list[int] = []
    for k in range(int(math.floor(ceiling / LEVEL_STEP + 1e-9)) + 1):
        wanted = max(int(k * LEVEL_STEP * group.size + 1e-9), n_exact)
        removed = rounded_target(group.size, wanted, round_to, min_keep)
        if not out or removed > out[-1]:
            out.append(removed)
    return out


def search_removals(
    groups: Sequence[ChannelGroup],
    group_levels: dict[int, list[int]],
    measure: Callable[[dict[int, int]], Measure],
    base_macs: int | None,
) -> tuple[dict[int, int], Measure, SearchRecord]:
    """Removal count per group: the largest found that meets the target (see module rules)."""
    record = SearchRecord()
    base = {g.id: group_levels[g.id][0] for g in groups}

    def run(plan: dict[int, int], label: str) -> Measure:
        record.evaluations += 1
        result = measure(plan)
        record.steps.append(f"{label}: {_describe(result)}")
        return result

    start = run(base, "exact removals only")
    # Sensitivity of one level step per group.
    items: list[tuple[float, int, int, int]] = []  # (priority, group, level index, count)
    for g in groups:
        steps = group_levels[g.id]
        if len(steps) < 2:
            continue
        trial = dict(base)
        trial[g.id] = steps[1]
        result = measure(trial)
        record.evaluations += 1
        error = max(result.rel_error, 1e-12)
        record.sensitivity[g.id] = error
        saved = 1.0
        if base_macs is not None and start.macs is not None and result.macs is not None:
            saved = max(float(start.macs - result.macs), 1.0)
        first = steps[1] - steps[0]
        for j in range(1, len(steps)):
            grown = ((steps[j] - steps[0]) ** 2 - (steps[j - 1] - steps[0]) ** 2) / first**2
            gain = saved * (steps[j] - steps[j - 1]) / first
            items.append((error * grown / gain, g.id, j, steps[j]))
    items.sort(key=lambda item: (item[0], item[1], item[2]))

    def prefix(k: int) -> dict[int, int]:
        plan = dict(base)
        for _, gid, _, count in items[:k]:
            plan[gid] = count
        return plan

    best_k, best = 0, start
    if not start.met:
        return base, start, record
    full = run(prefix(len(items)), f"all {len(items)} level steps")
    if full.met:
        return prefix(len(items)), full, record
    lo, hi = 0, len(items)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = run(prefix(mid), f"first {mid} of {len(items)} level steps")
        if result.met:
            lo, best_k, best = mid, mid, result
        else:
            hi = mid
    plan = prefix(best_k)
    blocked: set[int] = set()
    tries = 0
    for _, gid, _, count in items[best_k:]:
        if tries >= EXTRA_TRIES:
            break
        if gid in blocked or count <= plan[gid]:
            continue
        trial = {**plan, gid: count}
        tries += 1
        result = run(trial, f"one more step of group {gid}")
        if result.met:
            plan, best = trial, result
        else:
            blocked.add(gid)
    return plan, best, record


def _describe(result: Measure) -> str:
    parts = []
    if result.value is not None:
        parts.append(f"metric {result.value:.4g}")
    parts.append(f"cosine {result.cosine:.4g}")
    if result.macs is not None:
        parts.append(f"MACs {result.macs:,}")
    parts.append("met" if result.met else "not met")
    return ", ".join(parts)


def removal_ratios(an: Analysis, keep: np.ndarray) -> dict[int, float]:
    """Share of each group's classes removed."""
    return {
        g.id: float(np.count_nonzero(~keep[g.classes])) / g.size
        for g in an.groups
        if g.prunable and g.size
    }

"""Which channel classes to remove: a uniform ratio, a global ratio, or a threshold.

- uniform: each prunable group loses `ratio` of its classes (rounded down);
- global: all prunable classes are ranked together on importance divided by their
  group's mean, and the lowest `ratio` of them go;
- threshold: classes whose importance is below `threshold` go.

Classes that can be removed exactly (dead or constant channels) always go first.
Then `min_channels` (at least that many classes stay in every group and every
producer), `round_to` (the kept count of a group is rounded to a multiple, never
below one multiple; a group that loses only exact classes is not rounded) and
the structural limits (every Split or Slice output keeps a
channel) are applied. Ties are broken by class order, so the result is deterministic.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .dependency import Analysis, ChannelGroup
from .importance import normalize_per_group


def _constraints(an: Analysis, min_channels: int) -> list[tuple[np.ndarray, int]]:
    """(classes, minimum kept) for every producer and every Split/Slice output."""
    out = []
    for space in an.spaces:
        if space.fixed:
            continue
        classes = np.unique(an.elem_class[space.base : space.base + space.size])
        out.append((classes, min(max(min_channels, 1), classes.size)))
    for tensor, begin, end in an.ranges:
        elems = an.layouts[tensor].elems[begin:end]
        out.append((np.unique(an.elem_class[elems]), 1))
    return out


def rounded_target(n: int, target: int, round_to: int, min_keep: int) -> int:
    target = max(0, min(target, n - min_keep))
    if round_to > 1 and n >= round_to:
        keep = n - target
        keep = round_to * int(np.floor(keep / round_to + 0.5))
        keep = min(max(keep, round_to, min_keep), n)
        target = n - keep
    return target


def group_targets(
    an: Analysis,
    scores: np.ndarray,
    exact: np.ndarray,
    *,
    mode: str,
    ratio: float,
    threshold: float,
    round_to: int,
    min_channels: int,
) -> dict[int, int]:
    """How many classes each prunable group should lose."""
    groups = [g for g in an.groups if g.prunable]
    wanted: dict[int, int] = {}
    if mode == "global":
        normalized = normalize_per_group(an, scores)
        pool = np.concatenate([g.classes for g in groups]) if groups else np.zeros(0, int)
        key = np.where(exact[pool], -1.0, normalized[pool])
        order = pool[np.lexsort((pool, key))]
        chosen = order[: int(ratio * pool.size + 1e-9)]
        counts = defaultdict(int)
        for c in chosen:
            counts[int(an.class_group[c])] += 1
        wanted = {g.id: counts[g.id] for g in groups}
    elif mode == "threshold":
        wanted = {g.id: int(np.count_nonzero(scores[g.classes] < threshold)) for g in groups}
    else:
        wanted = {g.id: int(ratio * g.size + 1e-9) for g in groups}
    targets = {}
    for g in groups:
        n_exact = int(np.count_nonzero(exact[g.classes]))
        min_keep = min(max(min_channels, 1), g.size)
        if wanted[g.id] <= n_exact:  # only exact removals: rounding would change outputs
            targets[g.id] = min(n_exact, g.size - min_keep)
            continue
        targets[g.id] = rounded_target(g.size, wanted[g.id], round_to, min_keep)
    return targets


def choose(
    an: Analysis,
    scores: np.ndarray,
    exact: np.ndarray,
    targets: dict[int, int],
    min_channels: int,
) -> np.ndarray:
    """Keep mask per class: each group drops its `target` least important classes."""
    keep = np.ones(an.n_classes, dtype=bool)
    constraints = _constraints(an, min_channels)
    kept_count = [c.size for c, _ in constraints]
    of_class: dict[int, list[int]] = defaultdict(list)
    for k, (classes, _) in enumerate(constraints):
        for c in classes.tolist():
            of_class[c].append(k)
    by_id: dict[int, ChannelGroup] = {g.id: g for g in an.groups}
    for gid, target in sorted(targets.items()):
        classes = by_id[gid].classes
        order = classes[np.lexsort((classes, scores[classes], ~exact[classes]))]
        removed = 0
        for c in order.tolist():
            if removed >= target:
                break
            if any(kept_count[k] - 1 < constraints[k][1] for k in of_class[c]):
                continue
            for k in of_class[c]:
                kept_count[k] -= 1
            keep[c] = False
            removed += 1
    return keep

"""Accuracy budgets for lossy models: which metric, which threshold, and the task metrics.

A quantized, half-precision or pruned model cannot pass an element-wise tolerance
check, nor should it: what matters is whether it still gives the same answers.
A budget names metrics with thresholds, in the syntax of `quantize(target=...)`:
`cosine:0.99,top1:0.99`. The metrics:
- `cosine`: cosine similarity of the output over all samples, at least the threshold;
- `sqnr`: signal-to-quantization-noise ratio in dB, at least the threshold;
- `rel_rms`: RMS error relative to the reference's RMS, ||c - r|| / ||r||, at most;
- `top1`, `top5`: class scores; the share of rows whose reference top-1 class is the
  candidate's top-1 (top-5) class, at least the threshold;
- `map`: probability maps; the IoU of the maps thresholded at `map_threshold`
  (default 0.3, the binarization threshold of DB text detection's post-processing), at
  least the threshold. The share of equal pixels is reported too, but background
  dominates it (a page is mostly background): IoU is what fails a broken model;
- `nn`: embeddings; the share of rows whose nearest neighbour (by cosine, among the
  other rows) is the same row in both models, at least the threshold.

Which task metric applies is read from the reference output's form, on its first sample:
integer or bool -> `equal` (share of equal elements, judged by the top1 threshold);
rank 2 with at least 2 columns, or rank 3 whose last axis holds probability rows
(non-negative, summing to 1) -> class scores; rank 3 or more with every value in [0, 1]
-> probability map; other rank-3 float outputs -> embeddings (rows of the last axis);
anything else -> cosine and SQNR only. A metric of the default budget that applies to no
output is skipped; one the user names must apply to some output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FeedError

# At most: the metric holds when the value is at or below the threshold.
AT_MOST = frozenset({"rel_rms"})
METRICS = ("cosine", "sqnr", "rel_rms", "top1", "top5", "map", "nn")
TASK_METRICS = {"classes": ("top1", "top5"), "map": ("map",), "embedding": ("nn",)}
# Measured in docs/accuracy.md ("Verify a lossy model"): good int8 models of PP-OCRv4 det,
# the text-direction classifier and both digits models pass, every-scale-halved ones fail.
# The task metric judges; cosine and SQNR are floors against gross breakage, set where
# a good model is far above them on every input size tried (not only the one measured).
DEFAULT_BUDGET: dict[str, float] = {
    "cosine": 0.9,
    "sqnr": 6.0,
    "top1": 0.98,
    "top5": 0.99,
    "map": 0.85,
    "nn": 0.9,
}
MAP_THRESHOLD = 0.3
MAX_EMBEDDING_ROWS = 2048


def parse_budget(value: str | Mapping[str, float] | None) -> dict[str, float]:
    """A budget from 'metric:threshold,...' (or a mapping); None gives the default budget."""
    if value is None:
        return dict(DEFAULT_BUDGET)
    items = value.items() if isinstance(value, Mapping) else _pairs(str(value))
    budget: dict[str, float] = {}
    for metric, threshold in items:
        metric = str(metric).strip().lower()
        if metric not in METRICS or not math.isfinite(threshold) or threshold < 0:
            raise FeedError(
                f"budget must be metric:threshold[,...] with metric one of {', '.join(METRICS)} "
                f"and a finite threshold >= 0 (such as cosine:0.99,top1:0.99), got {value!r}"
            )
        if metric not in AT_MOST and metric != "sqnr" and threshold > 1:
            raise FeedError(f"budget: {metric} lies in [0, 1], got {metric}:{threshold:g}")
        budget[metric] = float(threshold)
    if not budget:
        raise FeedError("budget is empty: give metric:threshold such as cosine:0.99")
    return budget


def _pairs(text: str) -> list[tuple[str, float]]:
    pairs = []
    for item in text.split(","):
        metric, sep, number = item.partition(":")
        try:
            threshold = float(number) if sep else math.nan
        except ValueError:
            threshold = math.nan
        pairs.append((metric, threshold))
    return pairs


def describe_budget(budget: Mapping[str, float], map_threshold: float) -> str:
    parts = []
    for metric, threshold in budget.items():
        sign = "<=" if metric in AT_MOST else ">="
        unit = " dB" if metric == "sqnr" else ""
        extra = f" at {map_threshold:g}" if metric == "map" else ""
        parts.append(f"{metric}{extra} {sign} {threshold:g}{unit}")
    return ", ".join(parts)


def output_form(ref: np.ndarray) -> str:
    """exact, classes, map, embedding or values: see the module docstring."""
    if ref.dtype.kind not in "fc":
        return "exact"
    if ref.ndim == 2 and ref.shape[1] >= 2:
        return "classes"
    if ref.ndim == 3 and ref.shape[-1] >= 2 and _probability_rows(ref):
        return "classes"
    if ref.ndim >= 3 and ref.size and np.all(np.isfinite(ref)):
        if float(ref.min()) >= 0.0 and float(ref.max()) <= 1.0:
            return "map"
    if ref.ndim == 3 and ref.shape[-1] >= 2:
        return "embedding"
    return "values"


def _probability_rows(ref: np.ndarray) -> bool:
    if not ref.size or float(ref.min()) < 0.0:
        return False
    return bool(np.allclose(ref.sum(-1, dtype=np.float64), 1.0, atol=1e-3))


@dataclass
class TaskStats:
    """The task metric of one output, accumulated sample by sample."""

    name: str
    map_threshold: float = MAP_THRESHOLD
    form: str | None = None
    rows: int = 0
    top1: int = 0
    top5: int = 0
    pixels: int = 0
    pixels_equal: int = 0
    intersection: int = 0
    union: int = 0
    equal: int = 0
    elements: int = 0
    _ref_rows: list[np.ndarray] = field(default_factory=list, repr=False)
    _cand_rows: list[np.ndarray] = field(default_factory=list, repr=False)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if self.form is None:
            self.form = output_form(ref)
        if self.form == "exact":
            self.equal += int(np.count_nonzero(ref == cand))
            self.elements += ref.size
        elif self.form == "classes":
            r = ref.reshape(-1, ref.shape[-1])
            c = cand.reshape(-1, cand.shape[-1])
            truth = r.argmax(1)
            self.rows += len(truth)
            self.top1 += int(np.count_nonzero(c.argmax(1) == truth))
            if r.shape[1] > 5:
                top5 = np.argpartition(-c, 4, axis=1)[:, :5]
                self.top5 += int(np.count_nonzero((top5 == truth[:, None]).any(1)))
        elif self.form == "map":
            a, b = ref > self.map_threshold, cand > self.map_threshold
            self.pixels += a.size
            self.pixels_equal += int(np.count_nonzero(a == b))
            self.intersection += int(np.count_nonzero(a & b))
            self.union += int(np.count_nonzero(a | b))
        elif self.form == "embedding":
            kept = sum(len(x) for x in self._ref_rows)
            room = MAX_EMBEDDING_ROWS - kept
            if room > 0:
                self._ref_rows.append(ref.reshape(-1, ref.shape[-1])[:room].astype(np.float32))
                self._cand_rows.append(cand.reshape(-1, cand.shape[-1])[:room].astype(np.float32))

    def values(self) -> dict[str, float]:
        """The task metrics that apply to this output, by budget name."""
        if self.form == "exact" and self.elements:
            return {"equal": self.equal / self.elements}
        if self.form == "classes" and self.rows:
            out = {"top1": self.top1 / self.rows}
            if self.top5:
                out["top5"] = self.top5 / self.rows
            return out
        if self.form == "map" and self.pixels:
            iou = self.intersection / self.union if self.union else 1.0
            return {"map": iou, "map_pixels": self.pixels_equal / self.pixels}
        if self.form == "embedding":
            nn = _neighbour_agreement(self._ref_rows, self._cand_rows)
            return {"nn": nn} if nn is not None else {}
        return {}

    def describe(self) -> str:
        values = self.values()
        if not values:
            return "-"
        names = {"map": "map IoU", "map_pixels": "pixels", "equal": "equal", "nn": "nn"}
        return ", ".join(f"{names.get(k, k)} {100 * v:.2f} %" for k, v in values.items())


def _neighbour_agreement(ref: list[np.ndarray], cand: list[np.ndarray]) -> float | None:
    if not ref:
        return None
    r, c = np.concatenate(ref), np.concatenate(cand)
    if len(r) < 3:
        return None
    nearest = []
    for rows in (r, c):
        unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        nearest.append(similarity.argmax(1))
    return float(np.mean(nearest[0] == nearest[1]))


def judge(
    budget: Mapping[str, float], error: Any, task: TaskStats
) -> tuple[bool, list[str], set[str]]:
    """Whether one output keeps the budget: (passed, the misses, the metrics that applied)."""
    misses: list[str] = []
    applied: set[str] = set()
    values = task.values()
    if task.form == "exact":
        applied.add("top1")
        share = values.get("equal", 1.0)
        floor = budget.get("top1", DEFAULT_BUDGET["top1"])
        if share < floor:
            misses.append(f"equal {share:.4f} < {floor:g}")
        return not misses, misses, applied
    measured = dict(values)
    measured |= {"cosine": error.cosine, "sqnr": error.sqnr_db, "rel_rms": error.rel_rms}
    for metric, threshold in budget.items():
        if metric not in measured:
            continue
        applied.add(metric)
        value = measured[metric]
        ok = value <= threshold if metric in AT_MOST else value >= threshold
        if not ok:
            sign = ">" if metric in AT_MOST else "<"
            misses.append(f"{metric} {value:.4g} {sign} {threshold:g}")
    if error.nonfinite:
        misses.append(f"{error.nonfinite} non-finite values differ")
    return not misses, misses, applied

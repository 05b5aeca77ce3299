"""Running statistics of one tensor, updated a sample at a time.

`TensorStats`: min and max over all samples, optionally their moving averages
over samples (each sample's min/max blended in with `averaging_constant`), and
optionally a `Histogram` whose range doubles as new data arrives.

`ChannelStats`: the running mean of |x| per channel along one axis (by default
1, the channel axis of NCHW and of [batch, features]), and with `track_max` the
running max of |x| per channel.

`onnxopt.calibration` feeds them and draws ranges from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol

import numpy as np

from .errors import FeedError
from .histogram import Histogram


class Statistic(Protocol):
    """Anything that can be updated with one sample's value of a tensor."""

    def update(self, x: np.ndarray) -> None: ...


@dataclass
class TensorStats:
    """Running min/max (optionally moving-averaged) and an optional histogram of one tensor."""

    name: str
    min: float = math.inf
    max: float = -math.inf
    average_min: float = math.nan
    average_max: float = math.nan
    averaging_constant: float = 0.01
    samples: int = 0
    elements: int = 0
    nonfinite: int = 0
    histogram: Histogram | None = None

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        low, high = float(x.min()), float(x.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            finite = x[np.isfinite(x)]
            self.nonfinite += int(x.size - finite.size)
            x = finite
            if x.size == 0:
                return
            low, high = float(x.min()), float(x.max())
        self.update_range(low, high, int(x.size))
        if self.histogram is not None:
            self.histogram.update(x, amax=max(abs(low), abs(high)))

    def update_samples(self, x: np.ndarray, bounds: Sequence[int]) -> None:
        """`update` with each sample x[bounds[i]:bounds[i + 1]] in turn, in fewer passes.

        Min, max and their moving averages take each sample's own values. The
        histogram takes a run of samples in one update while they fit its current
        range: the bins do not move, so the counts are those of one sample at a
        time. A sample that sets or grows the range goes alone, and a batch with
        a non-finite value goes one sample at a time.
        """
        spans = [(start, end) for start, end in pairwise(bounds) if end > start]
        rows = x.reshape(x.shape[0], -1)  # a batch: samples' rows along the first dim
        lows = highs = np.zeros(0)
        if len(spans) > 1 and rows.shape[1]:
            starts = [start for start, _ in spans]
            lows = np.minimum.reduceat(rows.min(axis=1), starts).astype(np.float64)
            highs = np.maximum.reduceat(rows.max(axis=1), starts).astype(np.float64)
        if not lows.size or not (np.isfinite(lows).all() and np.isfinite(highs).all()):
            for start, end in spans:
                self.update(x[start:end])
            return
        self.update_ranges(lows, highs, [(end - start) * rows.shape[1] for start, end in spans])
        hist = self.histogram
        if hist is None:
            return
        amaxes = np.maximum(np.abs(lows), np.abs(highs))
        i = 0
        while i < len(spans):
            if hist.limit == 0.0 or amaxes[i] > hist.limit:
                hist.update(x[spans[i][0] : spans[i][1]], amax=float(amaxes[i]))
                i += 1
                continue
            j = i + 1
            while j < len(spans) and amaxes[j] <= hist.limit:
                j += 1
            hist.update(x[spans[i][0] : spans[j - 1][1]], amax=float(amaxes[i:j].max()))
            i = j

    def update_range(self, low: float, high: float, elements: int) -> None:
        """Add one sample known only by its min, max and size (no histogram)."""
        self.update_ranges([low], [high], [elements])

    def update_ranges(
        self, lows: Sequence[float], highs: Sequence[float], elements: Sequence[int]
    ) -> None:
        """Add samples known only by their min, max and size, in order (no histogram).

        A sample whose min or max is not finite is set aside whole: only in-graph
        reductions give one, and they cannot say which of its values were finite.
        A sample of no elements is no sample.
        """
        c = self.averaging_constant
        for low, high, size in zip(_floats(lows), _floats(highs), _ints(elements), strict=True):
            if not (math.isfinite(low) and math.isfinite(high)):
                self.nonfinite += size
                continue
            if size <= 0:
                continue
            self.min, self.max = min(self.min, low), max(self.max, high)
            if self.samples == 0:
                self.average_min, self.average_max = low, high
            else:
                self.average_min += c * (low - self.average_min)
                self.average_max += c * (high - self.average_max)
            self.samples += 1
            self.elements += size

    @property
    def seen(self) -> bool:
        return self.samples > 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "min": _finite_or_none(self.min),
            "max": _finite_or_none(self.max),
            "average_min": _finite_or_none(self.average_min),
            "average_max": _finite_or_none(self.average_max),
            "averaging_constant": self.averaging_constant,
            "samples": self.samples,
            "elements": self.elements,
            "nonfinite": self.nonfinite,
        }
        if self.histogram is not None:
            data["histogram"] = self.histogram.to_json()
        return data

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> TensorStats:
        hist = data.get("histogram")
        return cls(
            name,
            min=_float_or(data["min"], math.inf),
            max=_float_or(data["max"], -math.inf),
            average_min=_float_or(data["average_min"], math.nan),
            average_max=_float_or(data["average_max"], math.nan),
            averaging_constant=float(data["averaging_constant"]),
            samples=int(data["samples"]),
            elements=int(data["elements"]),
            nonfinite=int(data["nonfinite"]),
            histogram=Histogram.from_json(hist) if hist is not None else None,
        )


def _finite_or_none(value: float) -> float | None:
    # JSON has no infinities or NaN; an unseen tensor stores null.
    return value if math.isfinite(value) else None


def _float_or(value: float | None, default: float) -> float:
    return default if value is None else float(value)


@dataclass
class ChannelStats:
    """Running mean of |x| per channel along `axis` (1 by default: NCHW channels, features).

    `mean_abs[c]` is the mean of |x| over every element of channel c in every sample seen;
    with `track_max`, `max_abs[c]` is the largest |x| of channel c.
    """

    name: str
    axis: int = 1
    sum_abs: np.ndarray | None = None
    count: int = 0
    track_max: bool = False
    peak_abs: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if x.ndim == 0:
            raise FeedError(f"tensor '{self.name}' is a scalar: it has no channel axis")
        axis = self.axis % x.ndim
        others = tuple(i for i in range(x.ndim) if i != axis)
        magnitude = np.abs(x)
        sums = magnitude.sum(axis=others, dtype=np.float64)
        if self.sum_abs is None:
            self.sum_abs = sums
        elif self.sum_abs.shape != sums.shape:
            raise FeedError(
                f"tensor '{self.name}' has {sums.size} channels on axis {self.axis} in one "
                f"sample and {self.sum_abs.size} in another: bind the shape with --shape"
            )
        else:
            self.sum_abs += sums
        self.count += x.size // max(x.shape[axis], 1)
        if self.track_max and magnitude.size:
            peaks = magnitude.max(axis=others).astype(np.float64)
            self.peak_abs = peaks if self.peak_abs is None else np.maximum(self.peak_abs, peaks)

    @property
    def mean_abs(self) -> np.ndarray:
        if self.sum_abs is None or self.count == 0:
            return np.zeros(0)
        return self.sum_abs / self.count

    @property
    def max_abs(self) -> np.ndarray:
        """The largest |x| per channel (needs `track_max`; empty before any sample)."""
        if not self.track_max:
            raise ValueError(f"channel statistics of '{self.name}' were kept without track_max")
        return self.peak_abs if self.peak_abs is not None else np.zeros(0)


def _floats(values: Sequence[float] | np.ndarray) -> list[float]:
    # Python floats: per-sample arithmetic on numpy scalars costs several times as much.
    return values.tolist() if isinstance(values, np.ndarray) else [float(v) for v in values]


def _ints(values: Sequence[int] | np.ndarray) -> list[int]:
    return values.tolist() if isinstance(values, np.ndarray) else [int(v) for v in values]

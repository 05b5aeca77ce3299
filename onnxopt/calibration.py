"""Streaming statistics of tensors over a data set, and the calibration ranges drawn from them.

Feeds go through ONNX Runtime a bounded batch at a time (`batching`: one
sample, or several where the model's batch dim allows); each named tensor
updates its running statistics sample by sample and is let go, so memory holds
one run's tensors plus the statistics, however many samples there are. Min/max
calibration without histograms reads only each sample's min, max and size,
reduced inside the graph (`minmax`).

The statistics themselves live in `statistics`: `TensorStats` (min, max, their
moving averages, an optional `Histogram`) for quantization ranges, and
`ChannelStats` (mean and max |x| per channel) for pruning and SmoothQuant.

Range methods (`Calibration.range`): `minmax`, `percentile` (of |x| when
symmetric, of both tails when not), `entropy` (the |x| threshold whose quantized
copy is closest in KL divergence) and `mse` (the threshold minimising the
expected squared quantization error). The last three need histograms.

A calibration can be saved as JSON (never pickle) and reused: the file carries a
key made of the model, the tensor names, the feeds' first sample and count and
the statistics settings, and a file whose key differs is not used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from .batching import batches, plan_batches, run_threads, small_job
from .errors import FeedError
from .files import check_not_read
from .histogram import DEFAULT_BINS, Histogram
from .minmax import NO_SAMPLES, Progress, collect_ranges
from .model import inferred_shapes
from .report import write_text
from .runtime import float_tensor_names, iter_tensors
from .statistics import ChannelStats, Statistic, TensorStats

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
RANGE_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")
CACHE_FORMAT = "onnxopt-calibration"
CACHE_VERSION = 1


def collect(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    stats: Mapping[str, Statistic | Sequence[Statistic]],
    *,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Run every feed once and update each tensor's statistics; return the sample count.

    Samples share a run where the model allows it (`batching`); each statistic
    ends as if it had seen one sample's rows at a time (`TensorStats` takes a
    run's samples in fewer passes, with the same result).
    """
    total = _length(feeds)
    shapes = inferred_shapes(model)
    plan = plan_batches(model, list(stats), shapes)
    threads = run_threads(small_job(model, shapes, total), threads)
    bounds: deque[list[int]] = deque()

    def joined() -> Iterator[dict[str, np.ndarray]]:
        for batch in batches(feeds, plan.rows):
            bounds.append(batch.bounds)
            yield batch.feed

    count = 0
    for values in iter_tensors(model, joined(), list(stats), providers=providers, threads=threads):
        rows = bounds.popleft()
        for name, targets in stats.items():
            for stat in targets if isinstance(targets, Sequence) else (targets,):
                if plan.rows == 1:
                    stat.update(values[name])
                elif isinstance(stat, TensorStats):
                    stat.update_samples(values[name], rows)
                else:
                    for start, end in pairwise(rows):
                        stat.update(values[name][start:end])
        for _ in pairwise(rows):
            count += 1
            if progress is not None:
                progress(count, total)
        # Drop this run's tensors before ORT allocates the next run's.
        values = value = None  # noqa: F841
    if count == 0:
        raise FeedError(NO_SAMPLES)
    return count


def _length(feeds: Iterable[Any]) -> int | None:
    try:
        return len(feeds)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass
class Calibration:
    """Statistics of named tensors over a data set, with the ranges they give."""

    stats: dict[str, TensorStats]
    samples: int
    key: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def has_histograms(self) -> bool:
        return all(s.histogram is not None for s in self.stats.values())

    def range(self, name: str, method: str = "minmax", **options: Any) -> tuple[float, float]:
        """The calibration range [low, high] of a tensor (`compute_range` and its options)."""
        return compute_range(self.stats[name], method, **options)

    def save(self, path: str | os.PathLike) -> Path:
        check_not_read(path, "calibration cache")
        data = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "key": self.key,
            "samples": self.samples,
            "settings": self.settings,
            "tensors": {name: s.to_json() for name, s in self.stats.items()},
        }
        return write_text(path, json.dumps(data, allow_nan=False))

    @classmethod
    def load(cls, path: str | os.PathLike, key: str | None = None) -> Calibration | None:
        """The calibration stored at `path`, or None if there is none or its key differs."""
        target = Path(path)
        if not target.is_file():
            return None
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
            return None
        if key is not None and data.get("key") != key:
            return None
        stats = {name: TensorStats.from_json(name, s) for name, s in data["tensors"].items()}
        return cls(stats, int(data["samples"]), data["key"], dict(data.get("settings", {})))


def compute_range(
    stats: TensorStats,
    method: str = "minmax",
    *,
    symmetric: bool = False,
    percentile: float = 99.99,
    bits: int = 8,
    moving_average: bool = False,
) -> tuple[float, float]:
    """The range [low, high] for quantizing a tensor with `bits` bits, widened to hold 0.

    Symmetric ranges are [-a, a]. Histogram methods clip |x| at a threshold and
    then keep the data's own side limits: [max(min, -T), min(max, T)].
    """
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {method!r}; choose one of {RANGE_METHODS}")
    if not stats.seen:
        return 0.0, 0.0
    low, high = (stats.average_min, stats.average_max) if moving_average else (stats.min, stats.max)
    if method != "minmax":
        hist = stats.histogram
        if hist is None:
            raise ValueError(f"range method '{method}' needs histograms: calibrate with them")
        if method == "percentile":
            p_low, p_high = hist.percentile_range(percentile, symmetric)
            low, high = max(low, p_low), min(high, p_high)
        else:
            if method == "entropy":
                levels = _levels_of_larger_side(low, high, bits, symmetric)
                threshold = hist.entropy_threshold(levels=min(levels, hist.bins // 2))
            else:
                span_low = -max(abs(low), abs(high)) if symmetric else low
                span_high = max(abs(low), abs(high)) if symmetric else high
                threshold = hist.mse_threshold(2**bits - 1, span_low, span_high)
            if threshold > 0.0:
                low, high = max(low, -threshold), min(high, threshold)
    if symmetric:
        amax = max(abs(low), abs(high))
        return -amax, amax
    return min(low, 0.0), max(high, 0.0)


def _levels_of_larger_side(low: float, high: float, bits: int, symmetric: bool) -> int:
    """How many of the 2**bits levels fall on the side of zero that holds the larger |x|.

    The entropy search measures |x|: a symmetric grid gives each side half the levels,
    an asymmetric one spreads them over [low, high], so the larger side gets its
    share of that span (all of them for one-sided data).
    """
    if symmetric:
        return 2 ** (bits - 1)
    span = max(high, 0.0) - min(low, 0.0)  # the grid always holds 0
    if span <= 0.0:
        return 2**bits
    return max(2 ** (bits - 1), round(2**bits * max(abs(low), abs(high)) / span))


def cache_key(
    model: onnx.ModelProto,
    names: Sequence[str],
    feeds: Iterable[dict[str, np.ndarray]] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """A hex digest identifying the model, the tensor set, the data and the settings.

    The data enters as its sample count and its first sample's bytes, which is
    cheap and catches a changed data file in practice.
    """
    digest = hashlib.sha256()
    digest.update(model.graph.SerializeToString(deterministic=True))
    digest.update("\0".join(sorted(names)).encode())
    if feeds is not None:
        digest.update(str(_length(feeds)).encode())
        for feed in feeds:
            for name in sorted(feed):
                value = np.ascontiguousarray(feed[name])
                digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
                digest.update(value.tobytes())
            break
    digest.update(json.dumps(dict(settings or {}), sort_keys=True).encode())
    return digest.hexdigest()


def calibrate(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    names: Sequence[str] | None = None,
    *,
    histograms: bool = True,
    bins: int = DEFAULT_BINS,
    averaging_constant: float = 0.01,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    progress: Progress | None = None,
    cache: str | os.PathLike | None = None,
    nonnegative: Collection[str] = (),
) -> Calibration:
    """Statistics of `names` (default: every float node output) over `feeds`.

    Without histograms, the tensors in `nonnegative` (such as Relu outputs) get
    no min reduction: their min is recorded as 0, the low end of every range
    drawn from them (`minmax`). With `cache`, a stored calibration with the same
    key is returned without running anything, and a fresh one is written there.
    """
    wanted = list(names) if names is not None else float_tensor_names(model)
    settings = {
        "histograms": histograms,
        "bins": bins if histograms else 0,
        "averaging_constant": averaging_constant,
    }
    if nonnegative and not histograms:
        settings["nonnegative"] = sorted(set(nonnegative) & set(wanted))
    key = cache_key(model, wanted, feeds, settings) if cache is not None else ""
    if cache is not None:
        check_not_read(cache, "calibration cache")  # before any work, not after it
        stored = Calibration.load(cache, key)
        if stored is not None:
            return stored
    stats = {
        name: TensorStats(
            name,
            averaging_constant=averaging_constant,
            histogram=Histogram(bins) if histograms else None,
        )
        for name in wanted
    }
    if histograms:
        samples = collect(
            model, feeds, stats, providers=providers, threads=threads, progress=progress
        )
    else:
        samples = collect_ranges(
            model,
            feeds,
            stats,
            nonnegative=nonnegative,
            providers=providers,
            threads=threads,
            progress=progress,
            total=_length(feeds),
        )
    result = Calibration(stats, samples, key, settings)
    if cache is not None:
        result.save(cache)
    return result


def channel_stats(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    names: Sequence[str],
    *,
    axis: int = 1,
    track_max: bool = False,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, ChannelStats]:
    """Mean |x| (and with `track_max` max |x|) per channel along `axis` of each named tensor."""
    stats = {name: ChannelStats(name, axis, track_max=track_max) for name in names}
    collect(model, feeds, stats, providers=providers, threads=threads, progress=progress)
    return stats


__all__ = [
    "RANGE_METHODS",
    "Calibration",
    "ChannelStats",
    "Histogram",
    "RangeMethod",
    "Statistic",
    "TensorStats",
    "cache_key",
    "calibrate",
    "channel_stats",
    "collect",
    "compute_range",
]

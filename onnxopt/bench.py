"""Latency of several models on several execution providers, interleaved.

Every (model, provider) pair gets its own session and warm-up. Then the timed
runs are interleaved: round r runs every pair once, starting at a different
pair each round, so that a burst of load on a shared machine hits all models
alike and the ratios between them survive it. The speed-up column divides the
first model's median by each model's median on the same provider, and samples/s
is the batch over the median too, so the two columns always agree.

A speed-up is shown as "≈1.0x" when it is within the run-to-run spread: when the
95 % confidence interval of the median of the per-round ratios (paired runs of the
same round; distribution-free, from order statistics) contains 1, or when it lies
within 10 % of 1: two sessions of one model, interleaved, came out up to 7 % apart on
a 2-core machine shared with other jobs (tests/test_bench.py's identical-model bench).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .data import FeedSource, load_feeds
from .model import load_model
from .runtime import create_session, run

NOISE_FLOOR = 1.1


@dataclass
class Timing:
    label: str
    provider: str
    batch: int
    latencies_ms: list[float] = field(default_factory=list)
    speedup: float | None = None
    speedup_interval: tuple[float, float] | None = None
    baseline: bool = False

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return float(np.mean(self.latencies_ms))

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency (the statistic the speed-up uses)."""
        return self.batch * 1000.0 / self.p50

    @property
    def noise(self) -> bool:
        """Whether the speed-up is within the run-to-run spread (see the module docstring)."""
        if self.speedup is None:
            return False
        low, high = self.speedup_interval or (math.nan, math.nan)
        return low <= 1.0 <= high or abs(math.log(self.speedup)) < math.log(NOISE_FLOOR)

    @property
    def speedup_text(self) -> str:
        if self.speedup is None:
            return "-"
        if self.baseline:
            return "1.00x"
        return "≈1.0x" if self.noise else f"{self.speedup:.2f}x"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.label,
            "provider": self.provider,
            "batch": self.batch,
            "runs": len(self.latencies_ms),
            "p50_ms": self.p50,
            "p90_ms": self.p90,
            "p99_ms": self.p99,
            "mean_ms": self.mean,
            "throughput_per_s": self.throughput,
            "speedup_vs_first": self.speedup,
            "speedup_interval_95": list(self.speedup_interval) if self.speedup_interval else None,
            "speedup_within_noise": self.noise,
        }


@dataclass
class BenchResult:
    timings: list[Timing]
    runs: int
    warmup: int
    threads: int | None

    def timing(self, label: str, provider: str = "cpu") -> Timing:
        return next(t for t in self.timings if t.label == label and t.provider == provider)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "warmup": self.warmup,
            "threads": self.threads,
            "results": [t.to_dict() for t in self.timings],
        }


def _label(source: Any, index: int) -> str:
    if isinstance(source, str | Path):
        return Path(source).name
    return f"model{index}"


def bench(
    models: Sequence[Any],
    providers: Sequence[str] = ("cpu",),
    *,
    labels: Sequence[str] | None = None,
    feeds: FeedSource | str | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 100,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time `models` (paths, bytes or ModelProtos) on each provider, interleaved."""
    loaded: list[onnx.ModelProto] = [load_model(m) for m in models]
    names = list(labels) if labels else [_label(m, i) for i, m in enumerate(models)]
    if feeds is None or isinstance(feeds, str):
        feeds = load_feeds(loaded[0], feeds, shapes=shapes, count=1, seed=seed)
    feed = next(iter(feeds))
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    pairs: list[tuple[Timing, Any]] = []
    for provider in providers:
        for name, model in zip(names, loaded, strict=True):
            session = create_session(model, [provider], threads=threads)
            run(session, feed)  # fails early, before any timing, on a bad feed
            pairs.append((Timing(name, provider, batch), session))
    for _, session in pairs:
        for _ in range(warmup):
            session.run(None, feed)
    for r in range(runs):
        offset = r % len(pairs)
        for timing, session in pairs[offset:] + pairs[:offset]:
            start = time.perf_counter_ns()
            session.run(None, feed)
            timing.latencies_ms.append((time.perf_counter_ns() - start) / 1e6)
        if progress:
            progress(r + 1, runs)
    for provider in providers:
        group = [t for t, _ in pairs if t.provider == provider]
        group[0].baseline = True
        for timing in group:
            timing.speedup = group[0].p50 / timing.p50
            timing.speedup_interval = median_interval(
                np.asarray(group[0].latencies_ms) / np.asarray(timing.latencies_ms)
            )
    return BenchResult([t for t, _ in pairs], runs, warmup, threads)


def median_interval(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """The ~95 % confidence interval of the median: order statistics n/2 -+ z*sqrt(n)/2.

    Distribution-free (a sign test), so a few slow rounds on a shared machine widen it
    only as much as they move the middle.
    """
    ordered = np.sort(values)
    n = len(ordered)
    if n == 0:
        return (math.nan, math.nan)
    half = z * math.sqrt(n) / 2
    low = max(0, int(math.floor(n / 2 - half)))
    high = min(n - 1, int(math.ceil(n / 2 + half)) - 1)
    return float(ordered[low]), float(ordered[max(low, high)])

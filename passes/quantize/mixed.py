"""Automatic mixed precision: more bits for the most sensitive nodes until a target holds.

The feeds are split: the first part calibrates (and ranks), the last `holdout`
share only measures. The target compares the model outputs of a candidate with
those of the float model on the held-out feeds:
- `cosine:X`: cosine similarity of every float output, over all held-out samples, >= X;
- `rel_error:X`: relative L2 error ||cand - ref|| / ||ref|| of every float output <= X;
- `top1:X`: share of rows of every 2-D output whose argmax agrees with the float model >= X;
- a Python callable `f(ref, cand) -> bool` (API only): each dict maps output names to
  the held-out samples' outputs stacked along the first axis.

If the all-int8 model misses the target, its quantized nodes are ranked by
sensitivity (`onnxopt.analyze`: lowest isolated SQNR first, on calibration
feeds) and moved one at a time: each node goes through `fallback` (int16
activations, then float, by default), re-measured after every move, until the
target holds or no node is left. A move carries the node's Q/DQ-coupled
neighbours with it: to int16, every node tied to its tensors (a tensor has one
Q/DQ type, data movers share their input's parameters); to float, the quantized
nodes that write its inputs as integers (else the float node would still read
8-bit values). Every step reuses the one calibration; the notes list each step
with the nodes it moved and the metric after it. A node keeps the best level it
tried, and only when that beats the model before the move (a callable target
gives no number: its last level is kept). The latency of the result is compared
with the all-int8 model's (interleaved, on one held-out feed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxopt.bench import bench
from onnxopt.data import FeedSource
from onnxopt.errors import PassError
from onnxopt.pass_api import data_hint
from onnxopt.runtime import create_session, run
from onnxopt.verify import ErrorStats

from .placement import DATA_MOVERS, Plan
from .precision import Precision

if TYPE_CHECKING:
    from .static import Build

METRICS = ("cosine", "rel_error", "top1")
ANALYZE_SAMPLES = 8
BENCH_RUNS = 20
BENCH_WARMUP = 3

Outputs = dict[str, np.ndarray]


@dataclass
class Target:
    """An accuracy target: a built-in metric with a threshold, or a user callable."""

    label: str
    metric: str | None = None
    threshold: float = 0.0
    check: Callable[[Outputs, Outputs], Any] | None = None

    def score(self, value: float | None) -> float:
        """Higher is better, for any metric."""
        if value is None:
            return 0.0
        return -value if self.metric == "rel_error" else value

    def evaluate(self, ref: list[Outputs], cand: list[Outputs]) -> tuple[bool, float | None]:
        """Whether the target holds, and the metric's worst value over the outputs."""
        if self.check is not None:
            return bool(self.check(_stacked(ref), _stacked(cand))), None
        return self.evaluate_stats(float_output_stats(ref, cand))

    def evaluate_stats(self, outputs: list[ErrorStats]) -> tuple[bool, float | None]:
        """`evaluate` on error statistics already gathered (not for a callable target)."""
        values = []
        for stats in outputs:
            if self.metric == "cosine":
                values.append(stats.cosine)
            elif self.metric == "rel_error":
                values.append(math.sqrt(stats.err_sq / stats.ref_sq) if stats.ref_sq else 0.0)
            elif stats.argmax_agreement is not None:
                values.append(stats.argmax_agreement)
        if not values:
            raise PassError(
                f"target {self.label}: the model has no output this metric applies to "
                "(top1 needs a 2-D float output); pick cosine or rel_error"
            )
        if self.metric == "rel_error":
            worst = max(values)
            return worst <= self.threshold, worst
        worst = min(values)
        return worst >= self.threshold, worst


def parse_target(value: Any) -> Target:
    """A Target from the option's value: 'metric:threshold' or a callable."""
    if callable(value):
        return Target(f"{getattr(value, '__name__', 'callable')}()", check=value)
    metric, sep, number = str(value).partition(":")
    metric = metric.strip().lower()
    try:
        threshold = float(number)
    except ValueError:
        threshold = math.nan
    if not sep or metric not in METRICS or not math.isfinite(threshold) or threshold < 0:
        raise PassError(
            f"quantize: target must be metric:threshold with metric one of "
            f"{', '.join(METRICS)} (such as cosine:0.99 or rel_error:0.05), got {value!r}"
        )
    if metric != "rel_error" and threshold > 1:
        raise PassError(f"quantize: cosine and top1 thresholds lie in [0, 1], got {value!r}")
    return Target(f"{metric}:{threshold:g}", metric, threshold)


def float_output_stats(ref: list[Outputs], cand: list[Outputs]) -> list[ErrorStats]:
    """Error statistics of each float output over every run (integer outputs have none)."""
    found = []
    for name in ref[0]:
        if ref[0][name].dtype.kind != "f":
            continue
        stats = ErrorStats(name)
        for r, c in zip(ref, cand, strict=True):
            stats.update(r[name], c[name])
        found.append(stats)
    return found


def _stacked(outputs: list[Outputs]) -> Outputs:
    stacked = {}
    for name in outputs[0]:
        arrays = [o[name] for o in outputs]
        try:
            stacked[name] = np.concatenate([a.reshape(1) if a.ndim == 0 else a for a in arrays])
        except ValueError:
            stacked[name] = arrays  # shapes differ past the first axis: the list as it is
    return stacked


# ---- feeds ------------------------------------------------------------------------------------


class FeedSlice(FeedSource):
    """Samples [start, stop) of a re-iterable feed source, read lazily."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], start: int, stop: int):
        self.feeds = feeds
        self.start, self.stop = start, stop
        self.specs = list(getattr(feeds, "specs", []))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(iter(self.feeds), self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def split_feeds(feeds: Any, holdout: float) -> tuple[FeedSlice, FeedSlice]:
    """(calibration, held-out): the last `holdout` share of the samples is held out."""
    if feeds is None:
        raise PassError(f"quantize with a target needs data: {data_hint()}")
    calibration, held_out, separate = holdout_split(feeds, holdout)
    if not separate:
        raise PassError(
            "quantize with a target needs at least 2 samples (one to calibrate, one held out "
            f"to measure), got {len(calibration)}: pass more data"
        )
    return calibration, held_out


def holdout_split(feeds: Any, holdout: float) -> tuple[Any, Any, bool]:
    """(fitted feeds, held-out feeds, whether they differ): the last `holdout` share
    (one sample at least) is held out; a single sample cannot be split and serves both."""
    try:
        count = len(feeds)
    except TypeError:
        feeds = list(feeds)
        count = len(feeds)
    held = max(1, round(count * holdout))
    if count - held < 1:
        return feeds, feeds, False
    return FeedSlice(feeds, 0, count - held), FeedSlice(feeds, count - held, count), True


def outputs_of(
    model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], providers, threads
) -> list[Outputs]:
    session = create_session(model, providers, threads=threads)
    return [run(session, feed) for feed in feeds]


# ---- the search -------------------------------------------------------------------------------


@dataclass
class Step:
    moved: str  # the ranked node moved in this step ("" for the all-int8 start)
    precision: str
    changed: dict[str, str]  # every node whose precision changed -> its new precision
    met: bool
    value: float | None
    kept: bool = False  # whether the search went on from this step's model


@dataclass
class Search:
    """The steps taken and the result."""

    steps: list[Step] = field(default_factory=list)
    ranked: int = 0

    @property
    def met(self) -> bool:
        return any(step.met for step in self.steps)

    @property
    def final(self) -> Step:
        """The last step the search went on from: the model it returns."""
        return [step for step in self.steps if step.kept][-1]


def sensitivity_order(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    providers,
    threads,
) -> list[str]:
    """Quantized node names, most sensitive first (data movers left out: they follow)."""
    from onnxopt.analyze import analyze

    samples = list(itertools.islice(iter(feeds), ANALYZE_SAMPLES))
    result = analyze(reference, quantized, samples, providers=providers, threads=threads)
    return [layer.node for layer in result.layers if layer.op not in DATA_MOVERS]


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, str]:
    """Nodes whose precision differs between two builds (float when no longer quantized)."""
    names = set(before) | set(after)
    return {
        n: after.get(n, "float")
        for n in sorted(names)
        if before.get(n, "float") != after.get(n, "float")
    }


def format_value(target: Target, value: float | None, met: bool) -> str:
    if value is None:
        return "met" if met else "not met"
    return f"{target.metric} {value:.6g}" + (" (met)" if met else "")


def latency(
    int8: onnx.ModelProto, mixed: onnx.ModelProto, feeds: FeedSource, threads: int | None
) -> tuple[float, float]:
    """Median latency in ms of the all-int8 and the final model, interleaved on one feed."""
    result = bench(
        [int8, mixed],
        labels=["int8", "mixed"],
        feeds=feeds,
        threads=threads,
        warmup=BENCH_WARMUP,
        runs=BENCH_RUNS,
    )
    return result.timing("int8").p50, result.timing("mixed").p50


def search(
    target: Target,
    start: Build,
    rebuild: Callable[[Precision], Build],
    reference: onnx.ModelProto,
    calibration_feeds: FeedSource,
    holdout_feeds: FeedSource,
    *,
    fallback: list[str],
    max_moves: int,
    providers,
    threads: int | None,
) -> tuple[Build, Search]:
    """Move the most sensitive nodes to higher precision until `target` holds (see above)."""
    ref_outputs = outputs_of(reference, holdout_feeds, providers, threads)

    def measure(build: Build) -> tuple[bool, float | None]:
        return target.evaluate(
            ref_outputs, outputs_of(build.model(), holdout_feeds, providers, threads)
        )

    record = Search()
    met, value = measure(start)
    record.steps.append(Step("", "int8", {}, met, value, kept=True))
    if met:
        return start, record
    ranking = sensitivity_order(reference, start.model(), calibration_feeds, providers, threads)
    record.ranked = len(ranking)
    moves: dict[str, str] = {}
    moved = 0
    current, current_value = start, value
    for name in ranking:
        if max_moves and moved >= max_moves:
            break
        tried: list[tuple[Step, Build, dict[str, str]]] = []
        for level in fallback:
            now = current.plan.precisions()
            if now.get(name, "float") in (level, "float"):
                continue  # already there, or gone to float with a neighbour
            group = float_group(current.plan, name) if level == "float" else [name]
            extra = {member: level for member in group}
            candidate = rebuild(start.precision.with_moves({**moves, **extra}))
            met, value = measure(candidate)
            step = Step(name, level, changes(now, candidate.plan.precisions()), met, value)
            record.steps.append(step)
            if met:
                step.kept = True
                return candidate, record
            tried.append((step, candidate, extra))
        if not tried:
            continue
        # Keep the best level tried, and only if it beats what was there: float can lose
        # to int16 when it frees coupled neighbours, and a move can make things worse.
        # Without a number (a callable target) the last level tried is kept.
        step, candidate, extra = tried[-1]
        if all(t[0].value is not None for t in tried):
            step, candidate, extra = max(tried, key=lambda t: target.score(t[0].value))
            if target.score(step.value) <= target.score(current_value):
                continue
        step.kept = True
        moves.update(extra)
        moved += 1
        current, current_value = candidate, step.value
    return current, record


def float_group(plan: Plan, name: str) -> list[str]:
    """`name` and the quantized nodes that write its inputs as integers.

    A float node whose input comes from a Q placed by its producer still reads that
    input rounded to 8 bits; the producer (through the data movers that share its
    parameters) goes to float with it, so that the input really is float.
    """
    node = next((n for n in plan.nodes if n.name == name), None)
    if node is None:
        return [name]
    group = [name]
    pending = [t.name for t in node.inputs if t is not None and t.name]
    seen: set[str] = set()
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in plan.aliases:
            pending.append(plan.aliases[tensor][0])
            continue
        writer = plan.writers.get(tensor)
        if writer is None or not writer.name:
            continue
        if writer.name not in group:
            group.append(writer.name)
        if tensor in plan.same_as:
            pending.append(plan.same_as[tensor])
    return group

"""Several samples in one ONNX Runtime call, where the model allows it.

Calibration statistics are per sample (a sample's min and max feed the moving
averages), so samples may share a run only if each one's part of every tensor
read can be cut back out. A model gives that when all its inputs start with the
same named dynamic dim (the batch) and onnx shape inference carries that name
as the first dim of every tensor the caller reads: sample i is then rows
`bounds[i]:bounds[i + 1]` of each of them.

A run holds at most `MAX_ROWS` rows and at most `BATCH_BYTES` of the model's
batch-led tensors (counted at 4 bytes an element from their static per-row
sizes), so memory does not grow with the number of samples. A model whose
per-row sizes are not all static, or whose tensors lose the batch name, runs
one sample at a time. On a small model most of a run is the call itself: the
digits CNN calibrates 100 samples in 2 runs instead of 100. For the same reason
`run_threads` gives a job of few multiply-adds one thread: ORT's pool would cost
more to start than it saves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .data import NpzFeeds, model_inputs
from .model import inferred_shapes
from .summary import macs_per_sample

Shapes = dict[str, tuple[int | str | None, ...]]

MAX_ROWS = 64
BATCH_BYTES = 32 * 2**20
# Below this many multiply-adds over all samples, runs take one thread (`run_threads`).
SMALL_JOB_MACS = 2**27


@dataclass
class BatchPlan:
    """How many rows one run may hold, and each read tensor's elements per row."""

    rows: int = 1
    row_elements: dict[str, int] = field(default_factory=dict)


@dataclass
class Batch:
    """Consecutive feeds joined along the batch dim; sample i is rows bounds[i]:bounds[i + 1]."""

    feed: dict[str, np.ndarray]
    bounds: list[int]

    @property
    def samples(self) -> int:
        return len(self.bounds) - 1


def plan_batches(
    model: onnx.ModelProto, names: Sequence[str], shapes: Shapes | None = None
) -> BatchPlan:
    """The batching `model` allows when the tensors `names` are read (rows=1: none).

    `shapes` are the model's inferred shapes if the caller has them already.
    """
    specs = model_inputs(model)
    firsts = {spec.shape[0] if spec.shape else None for spec in specs}
    batch = firsts.pop() if len(firsts) == 1 else None
    if not isinstance(batch, str) or any(
        not isinstance(d, int) for spec in specs for d in spec.shape[1:]
    ):
        return BatchPlan()
    row_elements: dict[str, int] = {}
    for name, shape in (shapes if shapes is not None else inferred_shapes(model)).items():
        if shape and shape[0] == batch:
            if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
                return BatchPlan()
            row_elements[name] = math.prod(shape[1:])
    if not names or any(name not in row_elements for name in names):
        return BatchPlan()
    row_bytes = 4 * max(1, sum(row_elements.values()))
    rows = max(1, min(MAX_ROWS, BATCH_BYTES // row_bytes))
    return BatchPlan(rows, {name: row_elements[name] for name in names})


def small_job(model: onnx.ModelProto, shapes: Shapes, samples: int | None) -> bool:
    """Whether running every sample once needs under `SMALL_JOB_MACS` multiply-adds
    (never for a stream of unknown length or a model that cannot be sized)."""
    if samples is None:
        return False
    macs = macs_per_sample(model, shapes)
    return macs is not None and macs * samples < SMALL_JOB_MACS


def run_threads(small: bool, threads: int | None) -> int | None:
    """Intra-op threads for a session that runs every sample once: the caller's choice,
    else one thread for a `small_job`, else ORT's default.

    Starting ORT's thread pool costs milliseconds that a tiny model never wins back:
    the digits CNN (0.6 M MACs a sample) calibrated 100 samples in 12-13 ms on one
    thread against 12-24 ms with the default pool, 400 samples in 39-43 against
    43-52 ms; the two broke even near 1600 samples (1 G MACs) and the pool was
    10 % faster at 6400.
    """
    if threads is not None:
        return threads
    return 1 if small else None


def batches(feeds: Iterable[dict[str, np.ndarray]], rows: int) -> Iterator[Batch]:
    """Consecutive feeds joined along axis 0 up to `rows` rows; a feed whose other dims
    differ from the batch's starts a new one. With rows=1 each feed is passed as is.
    An .npz source is sliced a batch at a time instead (no batch spans two files)."""
    if rows > 1 and isinstance(feeds, NpzFeeds):
        for feed, samples in feeds.row_slices(rows):
            step = _rows(feed) // samples
            yield Batch(feed, list(range(0, samples * step + 1, step)))
        return
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for feed in feeds:
        count = _rows(feed)
        if pending and (held + count > rows or not _same_layout(pending[0], feed)):
            yield _join(pending)
            pending, held = [], 0
        pending.append(feed)
        held += count
    if pending:
        yield _join(pending)


def _rows(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _same_layout(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(
        a[k].ndim > 0 and a[k].shape[1:] == b[k].shape[1:] and a[k].dtype == b[k].dtype for k in a
    )


def _join(feeds: list[dict[str, np.ndarray]]) -> Batch:
    bounds = [0]
    for feed in feeds:
        bounds.append(bounds[-1] + _rows(feed))
    if len(feeds) == 1:
        return Batch(feeds[0], bounds)
    joined = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    return Batch(joined, bounds)

"""Each sample's min, max and size of named tensors, computed inside the ORT graph.

Min/max calibration needs three numbers per tensor and sample. Reductions added
to the graph (only while its session is built) spare ORT from copying every whole
tensor out to Python:
- max: ReduceMax;
- min: ReduceMin, except for tensors the caller declares non-negative (Relu
  outputs): their min is recorded as 0, the low end of every range drawn from
  them anyway, and is not read at all (49 of ResNet-50's 71 calibrated tensors);
- size: from the inferred shape when it is static, else a Size node.

Tensors of rank 3 or more are reduced in two steps: over the trailing axes, which
ORT splits across its threads, then over what is left. A single whole-tensor
reduction of a [1, 256, 56, 56] tensor took 2-3x as long; calibrating PP-OCRv4
detection's 16 samples went from 156 to 123 ms a sample, with every scale and
zero point unchanged. When samples share a run (`batching`), the second step
keeps the batch axis (tensors of unknown rank are flattened to [rows, -1]), and
a sample's numbers are those of its rows. A small job (`batching.small_job`)
reduces in one step: it runs on one thread unless told otherwise, so there is
nothing to split, and the digits CNN then needs 8 reads instead of 15 (its
calibration took a median 10.3 against 10.7 ms, 10 alternating fresh processes
each).

The session runs at ORT's extended optimization level: its Conv + activation
and Conv + Add fusions gave bit-identical ranges on ResNet-50, PP-OCRv4
detection, the text-direction classifier and the digits CNN (every scale and
zero point of the quantized models equal) and calibrated ResNet-50's 16 samples
about 7 % faster than the basic level (median 1.10 against 1.18 s, 5 alternating
fresh processes each). The full level (NCHWc convolutions) was about as fast, but its
convolutions round differently: the calibrated maxima moved by up to 4e-7
relative, enough to flip lines of a 400-line agreement test, and PP-OCRv4's
peak memory rose by 110 MB. A small job (`batching.small_job`) is built at the
full level all the same: there the convolutions are most of what is left to
cut, and NCHWc ran the digits CNN's 100 samples in 2.1 against 3.6 ms. Its
ranges stay within 1e-6 relative of the extended level's (six scales of the
quantized digits CNN moved in their last bits, its top-1 did not). Calibrating
the digits CNN took a median 10.8 ms at the full level, 11.5 at the basic and
12.1 at the extended (10 alternating fresh processes each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from .batching import BatchPlan, Shapes, batches, plan_batches, run_threads, small_job
from .errors import FeedError
from .model import default_opset, inferred_shapes
from .runtime import run, session_with_outputs

Progress = Callable[[int, int | None], None]
NO_SAMPLES = "the calibration data holds no samples: pass a file or folder with some"


class RangeStatistic(Protocol):
    def update_ranges(
        self, lows: Sequence[float], highs: Sequence[float], elements: Sequence[int]
    ) -> None: ...


@dataclass
class RangeReads:
    """The nodes that read each tensor's numbers, and where each number is found."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    mins: dict[str, str] = field(default_factory=dict)
    maxs: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, str | int] = field(default_factory=dict)

    @property
    def outputs(self) -> list[str]:
        sizes = [s for s in self.sizes.values() if isinstance(s, str)]
        return [*self.mins.values(), *self.maxs.values(), *sizes]


def range_reads(
    model: onnx.ModelProto,
    names: Sequence[str],
    nonnegative: Collection[str] = (),
    plan: BatchPlan | None = None,
    shapes: Shapes | None = None,
    split: bool = True,
) -> RangeReads:
    """Nodes reading each named tensor's min, max and size: per sample, or per row
    when `plan` batches samples. With `split`, tensors of rank 3 or more are reduced
    over their trailing axes first (for ORT's threads; one step without)."""
    shapes = shapes if shapes is not None else inferred_shapes(model)
    per_row = plan is not None and plan.rows > 1
    reads = RangeReads()
    reduce = _Reducer(reads.nodes, default_opset(model))
    for name in names:
        shape = shapes.get(name)
        rank = len(shape) if shape is not None else None
        source = name
        if per_row and (rank is None or rank < 2):
            source = f"{name}/onnxopt_rows"
            reads.nodes.append(helper.make_node("Flatten", [name], [source], axis=1))
            rank = 2
        for op, found in (("ReduceMin", reads.mins), ("ReduceMax", reads.maxs)):
            if op == "ReduceMin" and name in nonnegative:
                continue
            out = found[name] = f"{name}/onnxopt_{op}"
            if split and rank is not None and rank >= 3:
                # Trailing axes first: ORT spreads that over its threads, and a whole-
                # tensor reduction of a [1, 256, 56, 56] tensor took 2-3x as long.
                inner = reduce(op, source, f"{out}_inner", list(range(2, rank)))
                reduce(op, inner, out, [1] if per_row else None)
            else:
                reduce(op, source, out, list(range(1, rank)) if per_row else None)
        if per_row:
            reads.sizes[name] = plan.row_elements[name]
        elif shape is not None and all(isinstance(d, int) and d > 0 for d in shape):
            reads.sizes[name] = math.prod(shape)
        else:
            out = reads.sizes[name] = f"{name}/onnxopt_Size"
            reads.nodes.append(helper.make_node("Size", [name], [out]))
    return reads


class _Reducer:
    """Appends ReduceMin/ReduceMax nodes (keepdims=0) in the form the opset wants."""

    def __init__(self, nodes: list[onnx.NodeProto], opset: int) -> None:
        self.nodes, self.opset = nodes, opset
        self.constants: dict[tuple[int, ...], str] = {}

    def __call__(self, op: str, source: str, out: str, axes: list[int] | None) -> str:
        if axes is None:  # every axis
            self.nodes.append(helper.make_node(op, [source], [out], keepdims=0))
        elif self.opset < 18:
            self.nodes.append(helper.make_node(op, [source], [out], keepdims=0, axes=axes))
        else:
            self.nodes.append(helper.make_node(op, [source, self._axes(axes)], [out], keepdims=0))
        return out

    def _axes(self, axes: list[int]) -> str:
        key = tuple(axes)
        if key not in self.constants:
            name = self.constants[key] = f"onnxopt_axes_{'_'.join(map(str, axes))}"
            self.nodes.append(helper.make_node("Constant", [], [name], value_ints=axes))
        return self.constants[key]


def collect_ranges(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    stats: Mapping[str, RangeStatistic],
    *,
    nonnegative: Collection[str] = (),
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    progress: Progress | None = None,
    total: int | None = None,
) -> int:
    """Run every feed once and give each statistic every sample's (min, max, size);
    return the sample count."""
    shapes = inferred_shapes(model)
    plan = plan_batches(model, list(stats), shapes)
    small = small_job(model, shapes, total)
    reads = range_reads(model, list(stats), nonnegative, plan, shapes, split=not small)
    wanted = reads.outputs
    session = session_with_outputs(
        model,
        wanted,
        providers,
        threads=run_threads(small, threads),
        optimization="all" if small else "extended",
        extra_nodes=reads.nodes,
    )
    count = 0
    for batch in batches(feeds, plan.rows):
        values = run(session, batch.feed, wanted)
        for name, stat in stats.items():
            stat.update_ranges(*_sample_ranges(values, reads, name, batch.bounds))
        for _ in range(batch.samples):
            count += 1
            if progress is not None:
                progress(count, total)
    if count == 0:
        raise FeedError(NO_SAMPLES)
    return count


def _sample_ranges(
    values: dict[str, np.ndarray], reads: RangeReads, name: str, bounds: list[int]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The min, max and size of tensor `name` for each sample of one run that has rows."""
    highs = values[reads.maxs[name]]
    lows = values[reads.mins[name]] if name in reads.mins else np.zeros_like(highs)
    size = reads.sizes[name]
    per = int(values[size]) if isinstance(size, str) else size
    if len(bounds) == 2 and highs.ndim == 0:
        return lows.reshape(1), highs.reshape(1), [per]
    spans = [(start, end) for start, end in zip(bounds, bounds[1:], strict=False) if end > start]
    if not spans:
        return np.zeros(0), np.zeros(0), []
    starts = [start for start, _ in spans]
    lows, highs = np.minimum.reduceat(lows, starts), np.maximum.reduceat(highs, starts)
    return lows, highs, [(end - start) * per for start, end in spans]

"""Samples sharing an ORT run: when a model allows it, and what calibration sees then."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import minmax
from onnxopt.batching import (
    MAX_ROWS,
    SMALL_JOB_MACS,
    batches,
    plan_batches,
    run_threads,
    small_job,
)
from onnxopt.calibration import TensorStats, calibrate
from onnxopt.data import ListFeeds, NpzFeeds, model_inputs
from onnxopt.histogram import Histogram
from onnxopt.model import inferred_shapes
from onnxopt.runtime import float_tensor_names, iter_tensors
from onnxopt.test_models import builders, digits

SAMPLES = 70  # one full batch of MAX_ROWS and a partial one


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return onnx.load(digits.DIGITS_CNN)


@pytest.fixture(scope="module")
def cnn_feeds(cnn: onnx.ModelProto) -> ListFeeds:
    x_train, *_ = digits.load_digits_split()
    return ListFeeds([{"image": x_train[i : i + 1]} for i in range(SAMPLES)], model_inputs(cnn))


def _names(model: onnx.ModelProto) -> list[str]:
    return ["image", *float_tensor_names(model)]


def test_a_named_batch_dim_lets_samples_share_a_run(cnn, cnn_feeds) -> None:
    names = _names(cnn)
    plan = plan_batches(cnn, names)
    assert plan.rows == MAX_ROWS
    # Per-row sizes agree with what ORT returns for one sample.
    (one,) = iter_tensors(cnn, cnn_feeds.take(1), names)
    assert plan.row_elements == {n: math.prod(one[n].shape[1:]) for n in names}


def _model(input_shape: list, reshape_to: list[int] | None = None) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    inits = []
    out = "r"
    if reshape_to is not None:
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [2], reshape_to))
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["flat"]))
        out = "flat"
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("model", "names"),
    [
        (builders.cnn(batch=1, size=16), ["image"]),  # fixed batch
        (_model(["n", 4, "w"]), ["r"]),  # a dynamic dim past the batch
        (_model(["n", 4, 6], reshape_to=[-1, 6]), ["r", "flat"]),  # the batch name is lost
    ],
    ids=["fixed-batch", "dynamic-width", "reshaped-batch"],
)
def test_models_that_cannot_batch_run_one_sample_at_a_time(model, names) -> None:
    assert plan_batches(model, names).rows == 1


def test_the_batch_is_bounded_by_the_bytes_of_a_row() -> None:
    wide = _model(["n", 1024, 1024])  # 8 MiB a row over x and r
    assert plan_batches(wide, ["r"]).rows == 4
    assert plan_batches(_model(["n", 4, 6]), ["r"]).rows == MAX_ROWS


def test_batches_join_consecutive_feeds_and_start_anew_on_another_layout() -> None:
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 4, 6)).astype(np.float32)} for _ in range(5)]
    feeds.append({"x": rng.standard_normal((2, 4, 7)).astype(np.float32)})
    found = list(batches(feeds, rows=3))
    assert [b.bounds for b in found] == [[0, 1, 2, 3], [0, 1, 2], [0, 2]]
    np.testing.assert_array_equal(found[0].feed["x"], np.concatenate([f["x"] for f in feeds[:3]]))
    assert found[2].feed["x"] is feeds[5]["x"]  # a lone feed is passed as is
    assert [b.samples for b in batches(feeds, rows=1)] == [1] * 6


def test_batched_minmax_calibration_keeps_per_sample_statistics(cnn, cnn_feeds) -> None:
    names = _names(cnn)
    c = 0.1
    result = calibrate(cnn, cnn_feeds, names, histograms=False, averaging_constant=c)
    assert result.samples == SAMPLES
    per_sample = list(iter_tensors(cnn, cnn_feeds, names))  # one sample per run
    for name in names:
        lows = [float(v[name].min()) for v in per_sample]
        highs = [float(v[name].max()) for v in per_sample]
        average = lows[0]
        for low in lows[1:]:
            average += c * (low - average)
        stats = result.stats[name]
        assert stats.min == pytest.approx(min(lows), rel=1e-6, abs=1e-6)
        assert stats.max == pytest.approx(max(highs), rel=1e-6, abs=1e-6)
        assert stats.average_min == pytest.approx(average, rel=1e-5, abs=1e-6)
        assert stats.samples == SAMPLES
        assert stats.elements == sum(v[name].size for v in per_sample)


def test_batched_histograms_equal_per_sample_histograms(cnn, cnn_feeds) -> None:
    names = ["/5/Relu_output_0", "/12/Gemm_output_0"]
    result = calibrate(cnn, cnn_feeds, names, bins=256)
    reference = {}
    for name in names:
        stats = TensorStats(name, histogram=Histogram(256))
        for values in iter_tensors(cnn, cnn_feeds, [name]):
            stats.update(values[name])
        reference[name] = stats
    for name in names:
        ours, theirs = result.stats[name].histogram, reference[name].histogram
        assert ours.limit == theirs.limit
        np.testing.assert_array_equal(ours.counts, theirs.counts)
        assert result.stats[name].average_max == pytest.approx(reference[name].average_max)


@pytest.mark.parametrize("case", ["grows", "zeros-first", "non-finite", "no-histogram"])
def test_update_samples_equals_one_update_per_sample(case) -> None:
    # Samples of 1-3 rows (and one of none); their ranges grow twice mid-batch, so
    # runs of samples share a histogram update and the growing ones go alone.
    rng = np.random.default_rng(3)
    sizes = [2, 1, 3, 0, 2, 1, 2, 3, 1]
    scales = [1.0, 0.5, 0.8, 1.0, 4.0, 1.0, 0.2, 9.0, 1.0]
    parts = [
        rng.standard_normal((n, 5)).astype(np.float32) * s
        for n, s in zip(sizes, scales, strict=True)
    ]
    if case == "zeros-first":
        parts[0][:] = 0.0
    if case == "non-finite":
        parts[5][0, 2] = np.inf
    batch = np.concatenate(parts)
    bounds = [0, *np.cumsum(sizes).tolist()]
    bins = 0 if case == "no-histogram" else 64

    def fresh() -> TensorStats:
        return TensorStats("t", averaging_constant=0.3, histogram=Histogram(bins) if bins else None)

    joined, alone = fresh(), fresh()
    joined.update_samples(batch, bounds)
    for part in parts:
        alone.update(part)
    for field_name in ("min", "max", "average_min", "average_max", "samples", "elements"):
        assert getattr(joined, field_name) == getattr(alone, field_name), field_name
    assert joined.nonfinite == alone.nonfinite == (1 if case == "non-finite" else 0)
    if bins:
        assert joined.histogram.limit == alone.histogram.limit
        np.testing.assert_array_equal(joined.histogram.counts, alone.histogram.counts)
        assert joined.histogram.total == batch.size - joined.nonfinite


def test_small_jobs_run_on_one_thread_and_the_caller_decides_first(cnn) -> None:
    shapes = inferred_shapes(cnn)
    # Three 3x3 Convs (1->16 and 16->32 channels at 8x8, 32->64 at 4x4), Gemms 64x64, 64x10.
    per_sample = 16 * 64 * 9 + 32 * 64 * 16 * 9 + 64 * 16 * 32 * 9 + 64 * 64 + 64 * 10
    most = SMALL_JOB_MACS // per_sample  # the most samples that still make a small job
    assert small_job(cnn, shapes, most) and run_threads(True, None) == 1
    assert not small_job(cnn, shapes, most + 1) and run_threads(False, None) is None
    assert not small_job(cnn, shapes, None)  # a stream of unknown length
    assert run_threads(True, 2) == 2 and run_threads(False, 1) == 1  # the caller decides first
    # A Conv that cannot be sized (dynamic image dims) is never a small job.
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(cnn)
    dims = dynamic.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    assert not small_job(dynamic, inferred_shapes(dynamic), 1)


def test_a_small_job_builds_at_the_full_level_with_the_ranges_of_the_extended_one(
    cnn, cnn_feeds, monkeypatch
) -> None:
    names = _names(cnn)
    relu = {n.output[0] for n in cnn.graph.node if n.op_type == "Relu"}
    levels: list[str] = []
    build = minmax.session_with_outputs

    def recorded(*args, **kwargs):
        levels.append(kwargs["optimization"])
        return build(*args, **kwargs)

    monkeypatch.setattr(minmax, "session_with_outputs", recorded)
    assert small_job(cnn, inferred_shapes(cnn), len(cnn_feeds))
    small = calibrate(cnn, cnn_feeds, names, histograms=False, nonnegative=relu)
    # A stream of unknown length is never a small job.
    stream = calibrate(cnn, iter(list(cnn_feeds)), names, histograms=False, nonnegative=relu)
    assert levels == ["all", "extended"]
    for name in names:
        a, b = small.stats[name], stream.stats[name]
        assert a.elements == b.elements and a.samples == b.samples == SAMPLES
        for field_name in ("min", "max", "average_min", "average_max"):
            expected = getattr(b, field_name)
            assert getattr(a, field_name) == pytest.approx(expected, rel=1e-6, abs=1e-7), (
                name,
                field_name,
            )


@pytest.mark.parametrize("limit", [None, 9])
def test_npz_batches_are_slices_of_the_same_samples(tmp_path, cnn, limit) -> None:
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for n in (7, 5)]
    for i, part in enumerate(parts):
        np.savez(tmp_path / f"part{i}.npz", image=part)
    source = NpzFeeds(tmp_path, model_inputs(cnn), limit=limit)
    sliced = list(batches(source, rows=3))
    assert all(isinstance(b.feed["image"], np.ndarray) for b in sliced)
    # Slices never span two files: 7 samples give 3 + 3 + 1, then 5 (or the 2 left
    # under the limit) give 3 + 2.
    expected = [[3, 3, 1, 3, 2], [3, 3, 1, 2]][limit is not None]
    assert [b.samples for b in sliced] == expected
    assert all(b.bounds == list(range(b.samples + 1)) for b in sliced)
    rows = np.concatenate([b.feed["image"] for b in sliced])
    np.testing.assert_array_equal(rows, np.concatenate(parts)[:limit])
    # The same samples one at a time, as the source yields them.
    np.testing.assert_array_equal(rows, np.concatenate([f["image"] for f in source]))


def test_range_updates_set_aside_nonfinite_samples_and_skip_empty_ones() -> None:
    stats = TensorStats("t", averaging_constant=0.5)
    stats.update_ranges([1.0, np.nan, -2.0, 5.0], [3.0, 1.0, np.inf, 9.0], [4, 5, 6, 0])
    assert (stats.samples, stats.elements, stats.nonfinite) == (1, 4, 11)
    assert (stats.min, stats.max, stats.average_min, stats.average_max) == (1.0, 3.0, 1.0, 3.0)
    stats.update_ranges([-1.0, 0.0], [5.0, 1.0], [2, 2])
    assert (stats.min, stats.max) == (-1.0, 5.0)
    # Moving averages in order, c = 0.5: min 1 -> 0 -> 0, max 3 -> 4 -> 2.5.
    assert (stats.average_min, stats.average_max) == (0.0, 2.5)

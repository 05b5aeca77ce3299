"""Streaming calibration statistics against numpy computed over all samples at once."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxopt.calibration import (
    Calibration,
    ChannelStats,
    TensorStats,
    cache_key,
    calibrate,
    channel_stats,
    compute_range,
)
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.errors import FeedError
from onnxopt.histogram import Histogram
from onnxopt.runtime import iter_tensors
from onnxopt.test_models import builders

SAMPLES = 6


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    # Ranges differ per tensor and grow per sample.
    return builders.scaled_relu([2, 4, 16])


@pytest.fixture(scope="module")
def feeds(model: onnx.ModelProto) -> ListFeeds:
    # Each sample is wider than the last, so histogram ranges must grow several times.
    rng = np.random.default_rng(0)
    arrays = [
        (rng.standard_normal((2, 4, 16)) * 4.0**i + 0.5).astype(np.float32) for i in range(SAMPLES)
    ]
    return ListFeeds([{"x": a} for a in arrays], model_inputs(model))


@pytest.fixture(scope="module")
def everything(model: onnx.ModelProto, feeds: ListFeeds) -> dict[str, np.ndarray]:
    """Every sample of every tensor, concatenated: the numpy reference."""
    names = ["scaled", "y", "z"]
    values = list(iter_tensors(model, feeds, names))
    return {n: np.concatenate([v[n].ravel() for v in values]) for n in names}


def test_minmax_equals_numpy_over_all_samples(model, feeds, everything) -> None:
    result = calibrate(model, feeds, ["scaled", "y", "z"], histograms=False)
    assert result.samples == SAMPLES
    for name, data in everything.items():
        assert result.stats[name].min == float(data.min())
        assert result.stats[name].max == float(data.max())
        assert result.stats[name].elements == data.size
        assert result.stats[name].histogram is None


def test_streamed_histogram_equals_numpy_histogram_with_the_final_limit(
    model, feeds, everything
) -> None:
    result = calibrate(model, feeds, ["scaled", "z"], bins=512)
    for name in ("scaled", "z"):
        hist = result.stats[name].histogram
        data = everything[name]
        # The limit doubled from the first sample's max |x| until it held every value.
        amax = float(np.abs(data).max())
        assert amax <= hist.limit < 2 * amax
        reference, _ = np.histogram(data, bins=512, range=(-hist.limit, hist.limit))
        # Values on a bin edge may land on either side; nothing else may differ.
        assert hist.counts.sum() == data.size
        assert np.abs(hist.counts - reference).sum() <= 2


@pytest.mark.parametrize("q", [0.1, 5.0, 50.0, 95.0, 99.9])
def test_histogram_percentile_is_within_one_bin_of_numpy(model, feeds, everything, q) -> None:
    result = calibrate(model, feeds, ["scaled"], bins=1024)
    hist = result.stats["scaled"].histogram
    expected = np.percentile(everything["scaled"], q, method="inverted_cdf")
    assert abs(hist.percentile(q) - expected) <= hist.width


def test_histogram_doubling_is_exact() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.uniform(-1, 1, 1000), rng.uniform(-7.5, 7.5, 1000)
    hist = Histogram(64)
    hist.update(small.astype(np.float32))
    first_limit = hist.limit
    hist.update(large.astype(np.float32))
    assert hist.limit == first_limit * 8  # doubled three times to hold 7.5
    reference, _ = np.histogram(
        np.concatenate([small, large]).astype(np.float32), 64, (-hist.limit, hist.limit)
    )
    # Merging is exact; only the first sample's maximum, which sat on the old upper
    # edge and now sits on an inner edge, may be counted one bin lower than numpy does.
    assert hist.counts.sum() == 2000
    assert np.abs(hist.counts - reference).sum() <= 2


def test_zeros_before_any_scale_are_counted_at_zero() -> None:
    hist = Histogram(16)
    hist.update(np.zeros(10, np.float32))
    hist.update(np.array([-1.0, 1.0], np.float32))
    assert hist.total == 12
    assert hist.counts[8] == 10 + 0  # the bin [0, w) holds the zeros
    assert hist.percentile(50) == pytest.approx(0.0, abs=hist.width)


def test_moving_average_follows_the_per_sample_recurrence(model, feeds) -> None:
    c = 0.25
    result = calibrate(model, feeds, ["z"], histograms=False, averaging_constant=c)
    mins = [float(v["z"].min()) for v in iter_tensors(model, feeds, ["z"])]
    expected = mins[0]
    for m in mins[1:]:
        expected = expected + c * (m - expected)
    assert result.stats["z"].average_min == pytest.approx(expected, rel=1e-6)
    low, _ = result.range("z", "minmax", moving_average=True)
    assert low == pytest.approx(min(expected, 0.0), rel=1e-6)


def test_ranges_hold_zero_and_symmetric_ranges_are_symmetric() -> None:
    stats = TensorStats("t", histogram=Histogram(256))
    stats.update(np.linspace(2.0, 5.0, 1000, dtype=np.float32))
    for method in ("minmax", "percentile", "entropy", "mse"):
        low, high = compute_range(stats, method)
        assert low == 0.0 and 4.5 < high <= 5.0
        s_low, s_high = compute_range(stats, method, symmetric=True)
        assert s_low == -s_high and s_high == pytest.approx(high)


def test_percentile_clips_outliers_that_minmax_keeps() -> None:
    rng = np.random.default_rng(2)
    data = rng.standard_normal(100_000).astype(np.float32)
    data[:5] = 100.0  # a handful of outliers
    stats = TensorStats("t", histogram=Histogram(2048))
    stats.update(data)
    assert compute_range(stats, "minmax")[1] == 100.0
    low, high = compute_range(stats, "percentile", percentile=99.9)
    expected = np.percentile(data, 99.9, method="inverted_cdf")
    assert abs(high - expected) <= stats.histogram.width
    assert abs(low - np.percentile(data, 0.1, method="inverted_cdf")) <= stats.histogram.width


def test_entropy_and_mse_clip_a_gaussian_tail_but_not_a_uniform_one() -> None:
    rng = np.random.default_rng(3)
    gaussian = TensorStats("g", histogram=Histogram(2048))
    gaussian.update(rng.standard_normal(200_000).astype(np.float32))
    amax = max(-gaussian.min, gaussian.max)
    for method in ("entropy", "mse"):
        low, high = compute_range(gaussian, method, symmetric=True)
        # A clipped range, but not one that cuts into the bulk of the distribution.
        assert 2.5 < high < 0.95 * amax, method
    uniform = TensorStats("u", histogram=Histogram(2048))
    uniform.update(rng.uniform(-1, 1, 200_000).astype(np.float32))
    for method in ("entropy", "mse"):
        assert compute_range(uniform, method, symmetric=True)[1] > 0.97, method


def test_entropy_range_does_not_jump_when_a_one_sided_tensor_gets_a_tiny_negative_tail() -> None:
    # An asymmetric 8-bit grid over [-0.001, 13] gives the positive side ~256 levels,
    # as over [0, 13]: the KL search must count them so, not fall back to the
    # symmetric grid's 128 (which picks a different threshold on this data).
    rng = np.random.default_rng(4)
    positive = rng.exponential(1.0, 200_000)
    ranges = []
    for data in (positive, np.concatenate([positive, -rng.uniform(0, 1e-3, 50)])):
        stats = TensorStats("t", histogram=Histogram(2048))
        stats.update(data.astype(np.float32))
        ranges.append(compute_range(stats, "entropy"))
        with_half_levels = stats.histogram.entropy_threshold(levels=128)
    assert ranges[0][1] < positive.max()  # a clipped range: the tail is long
    assert abs(ranges[1][1] - ranges[0][1]) <= 2 * stats.histogram.width
    assert abs(ranges[1][1] - with_half_levels) > 10 * stats.histogram.width


def test_range_methods_need_histograms() -> None:
    stats = TensorStats("t")
    stats.update(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="needs histograms"):
        compute_range(stats, "entropy")


def test_channel_stats_match_numpy_mean_abs(model, feeds) -> None:
    stats = channel_stats(model, feeds, ["scaled", "z"], axis=1)
    values = list(iter_tensors(model, feeds, ["scaled", "z"]))
    for name in ("scaled", "z"):
        stacked = np.concatenate([v[name] for v in values], axis=0)  # [N*2, 4, 16]
        expected = np.abs(stacked).mean(axis=(0, 2))
        np.testing.assert_allclose(stats[name].mean_abs, expected, rtol=1e-6)
        assert stats[name].mean_abs.shape == (4,)


def test_channel_stats_on_the_last_axis() -> None:
    stats = ChannelStats("t", axis=-1)
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    b = -a * 2
    stats.update(a)
    stats.update(b)
    expected = np.abs(np.concatenate([a, b])).mean(axis=(0, 1))
    np.testing.assert_allclose(stats.mean_abs, expected)


def test_channel_stats_track_the_max_abs_per_channel(model, feeds) -> None:
    stats = channel_stats(model, feeds, ["scaled", "z"], axis=-1, track_max=True)
    values = list(iter_tensors(model, feeds, ["scaled", "z"]))
    for name in ("scaled", "z"):
        stacked = np.concatenate([v[name] for v in values], axis=0)  # [N*2, 4, 16]
        expected = np.abs(stacked).max(axis=(0, 1))
        np.testing.assert_array_equal(stats[name].max_abs, expected)
        assert stats[name].max_abs.shape == (16,)
        # The mean is kept as before beside the max.
        expected_mean = np.abs(stacked).mean(axis=(0, 1), dtype=np.float64)
        np.testing.assert_allclose(stats[name].mean_abs, expected_mean, rtol=1e-9)
    untracked = ChannelStats("t", axis=-1)
    untracked.update(np.ones((2, 3), np.float32))
    assert untracked.peak_abs is None
    with pytest.raises(ValueError, match="track_max"):
        _ = untracked.max_abs


def test_progress_reports_every_sample(model, feeds) -> None:
    calls: list[tuple[int, int | None]] = []
    calibrate(model, feeds, ["y"], histograms=False, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, SAMPLES) for i in range(1, SAMPLES + 1)]


class _Counting(ListFeeds):
    """Feeds that count how many samples were drawn from them."""

    drawn = 0

    def __iter__(self):
        for feed in super().__iter__():
            type(self).drawn += 1
            yield feed


def test_cache_is_json_and_reused_only_under_the_same_key(model, feeds, tmp_path) -> None:
    path = tmp_path / "calib.json"
    counting = _Counting(list(feeds), model_inputs(model))
    first = calibrate(model, counting, ["scaled", "y"], cache=path)
    drawn_first = _Counting.drawn
    assert drawn_first == SAMPLES + 1  # the data's fingerprint reads the first sample
    data = json.loads(path.read_text())
    assert data["format"] == "onnxopt-calibration" and set(data["tensors"]) == {"scaled", "y"}

    second = calibrate(model, counting, ["scaled", "y"], cache=path)
    assert _Counting.drawn - drawn_first == 1  # only the fingerprint: no inference
    for name in ("scaled", "y"):
        assert second.stats[name].min == first.stats[name].min
        assert second.stats[name].max == first.stats[name].max
        np.testing.assert_array_equal(
            second.stats[name].histogram.counts, first.stats[name].histogram.counts
        )
        assert second.range(name, "entropy") == first.range(name, "entropy")

    # Another tensor set, other data or other settings: the stored file does not apply.
    assert Calibration.load(path, cache_key(model, ["scaled"], feeds)) is None
    other = ListFeeds([{"x": f["x"] + 1} for f in feeds], model_inputs(model))
    key = cache_key(model, ["scaled", "y"], other, first.settings)
    assert Calibration.load(path, key) is None
    assert Calibration.load(path, first.key) is not None


def test_unseen_tensors_and_empty_data(model) -> None:
    empty = ListFeeds([], model_inputs(model))
    for histograms in (True, False):  # captured tensors, and min/max reduced in the graph
        with pytest.raises(FeedError, match="no samples"):
            calibrate(model, empty, ["y"], histograms=histograms)
    assert compute_range(TensorStats("t"), "minmax") == (0.0, 0.0)


def test_default_names_cover_every_float_output_of_a_real_model() -> None:
    model = builders.cnn(seed=0)
    feeds = ListFeeds(
        [
            {"image": np.random.default_rng(i).standard_normal((1, 3, 32, 32), np.float32)}
            for i in range(2)
        ],
        model_inputs(model),
    )
    result = calibrate(model, feeds, histograms=False)
    outputs = {o for n in model.graph.node for o in n.output}
    assert "logits" in result.stats
    assert set(result.stats) <= outputs
    assert all(s.samples == 2 for s in result.stats.values())


def test_scalar_and_float64_tensors_go_into_the_histogram() -> None:
    hist = Histogram(16)
    hist.update(np.array(2.0, np.float32))  # a 0-d tensor, as shape arithmetic yields
    hist.update(np.array([1.0, -3.0], np.float64))
    assert hist.limit == 4.0 and hist.total == 3
    # 2.0, the first limit, sits on an inner edge after doubling: one bin below numpy's.
    assert hist.counts[11] == 1  # 2.0 in [1.5, 2)
    assert hist.counts[10] == 1 and hist.counts[2] == 1  # 1.0 in [1, 1.5), -3.0 in [-3, -2.5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_asymmetric_ranges_keep_the_low_end_of_skewed_and_one_sided_data(side: str) -> None:
    """Planted bug #23.7: taking low as -p(q) (or -T) instead of the low tail's own end
    makes an all-negative tensor quantize to (0, 0); the low end is held to numpy's."""
    rng = np.random.default_rng(7)
    tail = (rng.exponential(1.0, 200_000) + 0.5).astype(np.float32)
    data = -tail if side == "left" else tail  # left: all negative, long tail to -inf
    stats = TensorStats("t", histogram=Histogram(2048))
    stats.update(data)
    width = stats.histogram.width
    low, high = compute_range(stats, "percentile", percentile=99.9)
    if side == "left":
        assert high == 0.0
        assert abs(low - np.percentile(data, 0.1, method="inverted_cdf")) <= width
        assert stats.histogram.percentile_range(99.9, False)[1] == pytest.approx(
            np.percentile(data, 99.9, method="inverted_cdf"), abs=width
        )
    else:
        assert low == 0.0
        assert abs(high - np.percentile(data, 99.9, method="inverted_cdf")) <= width
    for method in ("entropy", "mse"):
        low, high = compute_range(stats, method)
        near, far = (high, low) if side == "left" else (low, high)
        assert near == 0.0, method
        # the clipped end lies inside the data and keeps at least its 99th percentile
        p99 = float(np.percentile(np.abs(data), 99))
        assert p99 <= abs(far) <= float(np.abs(data).max()) + width, (method, far)


def test_a_range_with_a_negative_tail_and_positive_bulk_keeps_both_ends() -> None:
    rng = np.random.default_rng(8)
    data = np.concatenate([rng.uniform(-3.0, -1.0, 30_000), rng.uniform(0.5, 1.0, 70_000)]).astype(
        np.float32
    )
    stats = TensorStats("t", histogram=Histogram(2048))
    stats.update(data)
    low, high = compute_range(stats, "percentile", percentile=99.0)
    width = stats.histogram.width
    assert abs(low - np.percentile(data, 1.0, method="inverted_cdf")) <= width
    assert abs(high - np.percentile(data, 99.0, method="inverted_cdf")) <= width


def test_a_batch_dim_declared_as_minus_one_still_counts_every_sample() -> None:
    """Paddle exports declare the batch as dim_value -1; shape inference carries it, and a
    tensor whose other dims are static ([-1, C, 1, 1] after GlobalAveragePool) once got a
    negative size, so none of its samples counted and its scale fell back to 1.0 (the
    text-direction classifier quantized to 53 % on 400 lines instead of 98 %)."""
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            onnx.helper.make_node("Relu", ["pooled"], ["y"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 4, 3, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((2, 4, 3, 3)).astype(np.float32) for _ in range(3)]
    feeds = ListFeeds([{"x": a} for a in arrays], model_inputs(model))
    stats = calibrate(model, feeds, ["pooled"], histograms=False).stats["pooled"]
    pooled = [a.mean(axis=(2, 3)) for a in arrays]
    assert stats.samples == 3
    assert stats.max == pytest.approx(max(float(p.max()) for p in pooled), rel=1e-6)
    assert stats.min == pytest.approx(min(float(p.min()) for p in pooled), rel=1e-6)

"""In-graph min/max/size reads against numpy over the same tensors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxopt.batching import plan_batches
from onnxopt.calibration import calibrate, compute_range
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.minmax import range_reads
from onnxopt.model import inferred_shapes
from onnxopt.runtime import float_tensor_names, iter_tensors
from onnxopt.test_models import builders, digits


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return builders.cnn(batch=1, size=16)


@pytest.fixture(scope="module")
def cnn_feeds(cnn: onnx.ModelProto) -> ListFeeds:
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(5)]
    return ListFeeds([{"image": a} for a in arrays], model_inputs(cnn))


def _relu_outputs(model: onnx.ModelProto) -> set[str]:
    return {n.output[0] for n in model.graph.node if n.op_type == "Relu"}


def test_reads_skip_what_is_known(cnn) -> None:
    names = float_tensor_names(cnn)
    relu = _relu_outputs(cnn)
    reads = range_reads(cnn, names, nonnegative=relu)
    reduced = {(n.op_type, n.input[0]) for n in reads.nodes}
    for name in names:
        assert (name in reads.mins) == (name not in relu)
        assert ("ReduceMin", name) in reduced or name in relu
        assert ("ReduceMax", name) in reduced
        # The Reshape's target comes from Shape ops: inference cannot size its output.
        assert isinstance(reads.sizes[name], int) == (name != "reshape")
    assert [n.input[0] for n in reads.nodes if n.op_type == "Size"] == ["reshape"]
    # 4-D tensors are reduced over H and W first, then over what is left.
    shapes = inferred_shapes(cnn)
    for node in reads.nodes:
        if node.op_type.startswith("Reduce") and node.input[0] in names:
            rank = len(shapes[node.input[0]])
            axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
            assert axes == ([[2, 3]] if rank == 4 else []), node.input[0]


def test_minmax_calibration_matches_numpy_and_nonnegative_ranges_do_not_move(
    cnn, cnn_feeds
) -> None:
    names = float_tensor_names(cnn)
    relu = _relu_outputs(cnn)
    plain = calibrate(cnn, cnn_feeds, names, histograms=False)
    known = calibrate(cnn, cnn_feeds, names, histograms=False, nonnegative=relu)
    seen = list(iter_tensors(cnn, cnn_feeds, names))
    for name in names:
        data = np.concatenate([v[name].ravel() for v in seen])
        for result in (plain, known):
            stats = result.stats[name]
            assert stats.max == pytest.approx(float(data.max()), rel=1e-6, abs=1e-6)
            assert stats.elements == data.size
        assert plain.stats[name].min == pytest.approx(float(data.min()), rel=1e-6, abs=1e-6)
        if name in relu:
            assert known.stats[name].min == 0.0 and data.min() >= 0.0
        for symmetric in (False, True):
            assert known.range(name, symmetric=symmetric) == plain.range(name, symmetric=symmetric)
    assert known.settings["nonnegative"] == sorted(relu)


def test_unsplit_reads_reduce_each_row_in_one_node() -> None:
    model = onnx.load(digits.DIGITS_CNN)
    names = ["image", *float_tensor_names(model)]
    shapes = inferred_shapes(model)
    plan = plan_batches(model, names, shapes)
    assert plan.rows > 1
    split = range_reads(model, names, plan=plan, shapes=shapes)
    reads = range_reads(model, names, plan=plan, shapes=shapes, split=False)
    reduces = [n for n in reads.nodes if n.op_type.startswith("Reduce")]
    assert len(reduces) == 2 * len(names) < len(split.nodes)
    for node in reduces:
        rank = len(shapes[node.input[0]])
        axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
        assert axes == [list(range(1, rank))], node.input[0]  # every axis but the rows'


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMin's axes: an attribute, then an input
def test_row_reads_give_each_sample_its_own_range(opset: int) -> None:
    model = builders.scaled_relu(["batch", 4, 5], opset)
    rng = np.random.default_rng(1)
    arrays = [(rng.standard_normal((1, 4, 5)) * (i + 1)).astype(np.float32) for i in range(7)]
    arrays[3][0, 0, 0] = np.inf  # this sample is set aside, the others still count
    feeds = ListFeeds([{"x": a} for a in arrays], model_inputs(model))
    result = calibrate(model, feeds, ["scaled", "z"], histograms=False, averaging_constant=0.5)
    finite = [a for i, a in enumerate(arrays) if i != 3]
    for name, f in (("scaled", lambda a: a * 3), ("z", lambda a: a * 3 - 1)):
        stats = result.stats[name]
        assert stats.samples == 6 and stats.nonfinite == 20
        assert stats.min == min(float(f(a).min()) for a in finite)
        assert stats.max == max(float(f(a).max()) for a in finite)
        expected = float(f(finite[0]).max())
        for a in finite[1:]:
            expected += 0.5 * (float(f(a).max()) - expected)
        assert stats.average_max == pytest.approx(expected, rel=1e-6)
    assert compute_range(result.stats["z"]) == result.range("z")

"""The smooth-quant pass: exact in float, formula checked in numpy, better int8 with outliers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import ListFeeds, RandomFeeds, model_inputs
from onnxopt.errors import PassError
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import optimize
from onnxopt.runtime import iter_tensors
from onnxopt.test_models.builders import transformer_block
from onnxopt.verify import verify

OUTLIERS = [3, 17, 40]


def outlier_block() -> onnx.ModelProto:
    """The builder's transformer block with a few LayerNorm channels made 30x larger."""
    model = transformer_block(seed=0)
    for tensor in model.graph.initializer:
        if tensor.name in ("ln1.scale", "ln2.scale"):
            values = numpy_helper.to_array(tensor).copy()
            values[OUTLIERS] *= 30.0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def outputs(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def assert_same_function(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> None:
    for x, y in zip(outputs(a, feeds), outputs(b, feeds), strict=True):
        x, y = x.astype(np.float64), y.astype(np.float64)
        assert np.linalg.norm(y - x) <= 1e-5 * np.linalg.norm(x)
        assert np.max(np.abs(y - x)) <= 1e-5 * np.max(np.abs(x))


@pytest.fixture(scope="module")
def block() -> onnx.ModelProto:
    return outlier_block()


@pytest.fixture(scope="module")
def calib(block) -> RandomFeeds:
    return RandomFeeds(model_inputs(block), 32, seed=1)


@pytest.fixture(scope="module")
def held_out(block) -> RandomFeeds:
    return RandomFeeds(model_inputs(block), 16, seed=2)


@pytest.fixture(scope="module")
def smoothed(block, calib):
    return optimize(block, "smooth-quant", PassContext(feeds=calib), strict=True)


def test_float_outputs_stay_the_same(block, smoothed, held_out) -> None:
    record = smoothed.records[0]
    assert record.status == "changed"
    assert record.stats["smoothed_activations"] == 2  # the inputs of q/k/v and of ff1
    assert record.stats["smoothed_layers"] == 4
    assert record.stats["folded_into_LayerNormalization"] == 4  # scale and bias of ln1, ln2
    assert "inserted_mul" not in record.stats
    assert any("no outlier channels" in n and "attn.merge_heads" in n for n in record.notes)
    assert_same_function(block, smoothed.model, held_out)
    ops = [n.op_type for n in smoothed.model.graph.node]
    assert ops == [n.op_type for n in block.graph.node]  # nothing inserted


def test_factors_follow_the_smoothquant_formula(block, smoothed, calib) -> None:
    before, after = initializers(block), initializers(smoothed.model)
    x_max = np.zeros(64)
    for values in iter_tensors(block, calib, ["ln1"]):
        x_max = np.maximum(x_max, np.abs(values["ln1"]).reshape(-1, 64).max(axis=0))
    w_max = np.max([np.abs(before[f"attn.{p}.weight"]).max(axis=1) for p in "qkv"], axis=0)
    factors = np.sqrt(x_max) / np.sqrt(w_max)  # alpha = 0.5
    ln1 = node(smoothed.model, "ln1")
    np.testing.assert_allclose(after[ln1.input[1]], before["ln1.scale"] / factors, rtol=1e-5)
    np.testing.assert_allclose(after[ln1.input[2]], before["ln1.bias"] / factors, rtol=1e-5)
    for p in "qkv":
        weight = after[node(smoothed.model, f"attn.{p}.matmul").input[1]]
        np.testing.assert_allclose(weight, before[f"attn.{p}.weight"] * factors[:, None], 1e-5)
    # In the smoothed model the outlier channels have a range much closer to the others.
    new_max = np.zeros(64)
    for values in iter_tensors(smoothed.model, calib, ["ln1"]):
        new_max = np.maximum(new_max, np.abs(values["ln1"]).reshape(-1, 64).max(axis=0))
    np.testing.assert_allclose(new_max, x_max / factors, rtol=1e-4)
    assert x_max.max() / np.median(x_max) > 30
    assert new_max.max() / np.median(new_max) < 8


def test_smoothing_makes_int8_more_accurate(block, calib, held_out) -> None:
    ctx = PassContext(feeds=calib)
    plain = optimize(block, "quantize", ctx, strict=True).model
    smooth = optimize(block, "smooth-quant,quantize", ctx, strict=True).model
    plain_out = verify(block, plain, held_out).outputs[0]
    smooth_out = verify(block, smooth, held_out).outputs[0]
    assert plain_out.cosine < 0.99
    # 0.9975 with 7-bit weights (reduce_range, CPUs without VNNI); above 0.998 with 8 bits.
    assert smooth_out.cosine > 0.995
    assert smooth_out.sqnr_db > plain_out.sqnr_db + 6.0


def test_exclusions_and_a_block_without_outliers(block, calib) -> None:
    ctx = PassContext(feeds=calib)
    some = optimize(block, "smooth-quant(exclude_nodes=attn.*)", ctx, strict=True).records[0]
    assert some.stats["smoothed_layers"] == 1  # ff1 only
    only = optimize(block, "smooth-quant(include_nodes=attn.q.*)", ctx, strict=True).records[0]
    # q alone cannot be smoothed: k and v read the same LayerNorm output.
    assert only.status == "unchanged"
    assert any("other nodes read them too" in n for n in only.notes)
    plain = transformer_block(seed=0)
    record = optimize(plain, "smooth-quant", PassContext(feeds=calib), strict=True).records[0]
    assert record.status == "unchanged"
    assert record.stats["skipped_activations"] == 4


def decomposed_norm_gemm(extra_reader: bool = False) -> onnx.ModelProto:
    """x * gamma + beta (gamma with two outlier channels) into a Gemm with transB=1."""
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    gamma[[2, 9]] *= 40.0
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "gamma"], ["scaled"], "scale"),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"], "shift"),
        helper.make_node("Gemm", ["shifted", "w", "b"], ["y"], "fc", transB=1),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["shifted"], ["side"], "side"))
        outs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [4, 16]))
    graph = helper.make_graph(
        nodes,
        "norm_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        outs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model: onnx.ModelProto, count: int, seed: int) -> ListFeeds:
    rng = np.random.default_rng(seed)
    data = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(count)]
    return ListFeeds(data, model_inputs(model))


def test_mul_add_producer_and_gemm_columns() -> None:
    model = decomposed_norm_gemm()
    result = optimize(model, "smooth-quant", PassContext(feeds=feeds_for(model, 8, 0)))
    record = result.records[0]
    assert record.status == "changed"
    assert record.stats["folded_into_Mul"] == 1 and record.stats["folded_into_Add"] == 1
    assert_same_function(model, result.model, feeds_for(model, 4, 1))
    before, after = initializers(model), initializers(result.model)
    fc = node(result.model, "fc")
    factors = after[fc.input[1]][0] / before["w"][0]  # columns of a transB weight
    np.testing.assert_allclose(after[fc.input[1]], before["w"] * factors[None, :], rtol=1e-5)
    assert factors[[2, 9]].min() > 3 * np.median(factors)  # the outliers moved the most


def test_other_readers_need_insert_mul() -> None:
    model = decomposed_norm_gemm(extra_reader=True)
    feeds = feeds_for(model, 8, 0)
    left = optimize(model, "smooth-quant", PassContext(feeds=feeds)).records[0]
    assert left.status == "unchanged"
    assert any("other nodes read them too (insert_mul=true" in n for n in left.notes)
    result = optimize(model, "smooth-quant(insert_mul=true)", PassContext(feeds=feeds))
    assert result.records[0].stats["inserted_mul"] == 1
    assert_same_function(model, result.model, feeds_for(model, 4, 1))
    side = node(result.model, "side")
    assert side.input[0] == "shifted"  # the other reader still sees the original values
    fc = node(result.model, "fc")
    mul = next(n for n in result.model.graph.node if fc.input[0] in n.output)
    assert mul.op_type == "Mul" and mul.input[0] == "shifted"


def test_bad_options_and_missing_data(block, calib) -> None:
    with pytest.raises(PassError, match="needs calibration data"):
        optimize(block, "smooth-quant", PassContext(), strict=True)
    with pytest.raises(PassError, match="alpha must be in"):
        optimize(block, "smooth-quant(alpha=1.5)", PassContext(feeds=calib), strict=True)

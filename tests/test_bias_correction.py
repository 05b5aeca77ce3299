"""The quantize pass's bias correction: each layer's own mean shift, folded into an int32 bias."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import ListFeeds, model_inputs
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import optimize
from onnxopt.runtime import iter_tensors


def make_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def feeds_of(model: onnx.ModelProto, shape, count: int, seed: int, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    name = model.graph.input[0].name
    arrays = [(rng.standard_normal(shape) * scale + shift).astype(np.float32) for _ in range(count)]
    return ListFeeds([{name: a} for a in arrays], model_inputs(model))


def quantize(model, spec, feeds) -> onnx.ModelProto:
    result = optimize(model, spec, PassContext(feeds=feeds), strict=True)
    assert result.records[-1].status == "changed", result.records[-1]
    onnx.checker.check_model(result.model, full_check=True)
    return result.model


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dequantized(model: onnx.ModelProto, tensor: str) -> np.ndarray:
    """The float value of the constant that the DQ writing `tensor` dequantizes."""
    dq = next(n for n in model.graph.node if tensor in n.output)
    values = inits(model)
    q, scale, zero = (values[i] for i in dq.input)
    axis = dq.attribute[0].i if dq.attribute else None
    if axis is not None and scale.ndim:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q.astype(np.float64) - zero) * scale


def input_qdq(model: onnx.ModelProto, name: str):
    """Quantize then dequantize like the model's Q/DQ pair on graph input `name`."""
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
    values = inits(model)
    scale, zero = float(values[q.input[1]]), int(values[q.input[2]])
    info = np.iinfo(values[q.input[2]].dtype)

    def apply(x: np.ndarray) -> np.ndarray:
        levels = np.clip(np.rint(x / np.float32(scale)) + zero, info.min, info.max)
        return ((levels - zero) * np.float32(scale)).astype(np.float32)

    return apply, scale


def bias_input(model: onnx.ModelProto, node_name: str, index: int) -> str:
    return next(n for n in model.graph.node if n.name == node_name).input[index]


# ---- exact values on single layers ------------------------------------------------------------


def test_gemm_bias_is_moved_by_its_own_mean_shift() -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((10, 32)) * rng.uniform(0.02, 1.0, (10, 1))).astype(np.float32)
    bias = (rng.standard_normal(10) * 0.1).astype(np.float32)
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], "fc", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 10])],
        [const("w", weight), const("b", bias)],
    )
    feeds = feeds_of(model, (16, 32), 8, seed=1, scale=0.5, shift=0.7)
    # min_weights=0: a lone 32x10 layer would otherwise stay float (too small to pay).
    plain = quantize(model, "quantize(per_channel=false,min_weights=0)", feeds)
    corrected = quantize(
        model, "quantize(per_channel=false,min_weights=0,bias_correction=true)", feeds
    )
    qdq, _ = input_qdq(plain, "x")
    w_q = dequantized(plain, bias_input(plain, "fc", 1))
    b_q = dequantized(plain, bias_input(plain, "fc", 2))
    # Own shift: mean over rows of x_q (W_q - W)^T + (b_q - b), everything from numpy.
    x_q = np.concatenate([qdq(f["x"]) for f in feeds]).astype(np.float64)
    shift = x_q.mean(axis=0) @ (w_q - weight).T + (b_q - bias)
    assert np.abs(shift).max() > 1e-3  # per-tensor weights: a shift worth correcting
    new_bias = dequantized(corrected, bias_input(corrected, "fc", 2))
    bias_scale = inits(corrected)[
        next(n for n in corrected.graph.node if bias_input(corrected, "fc", 2) in n.output).input[1]
    ]
    np.testing.assert_allclose(new_bias, bias - shift, atol=float(bias_scale) * 0.51 + 1e-7)
    # Same weights and input parameters: only the bias moved.
    np.testing.assert_array_equal(w_q, dequantized(corrected, bias_input(corrected, "fc", 1)))


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [1, 0, 2, 1], "strides": [2, 2], "group": 2},
        {"auto_pad": "SAME_UPPER", "strides": [2, 1]},
        {"pads": [2, 1, 0, 2], "dilations": [2, 2]},
    ],
)
def test_conv_without_bias_gets_one_that_cancels_its_shift(attrs) -> None:
    rng = np.random.default_rng(2)
    group = attrs.get("group", 1)
    weight = rng.standard_normal((6, 4 // group, 3, 3)) * rng.uniform(0.05, 1, (6, 1, 1, 1))
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], "conv", kernel_shape=[3, 3], **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [const("w", weight)],
    )
    feeds = feeds_of(model, (2, 4, 9, 10), 6, seed=3, shift=0.5)
    plain = quantize(model, "quantize(per_channel=false)", feeds)
    corrected = quantize(model, "quantize(per_channel=false,bias_correction=true)", feeds)
    # Own shift = mean(y_q - conv(x_q, W)): ORT's float Conv on the dequantized input does
    # the geometry (pads, strides, groups, dilations) instead of the code under test.
    qdq, _ = input_qdq(plain, "x")
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    diffs = [
        cand.run(None, f)[0].astype(np.float64) - ref.run(None, {"x": qdq(f["x"])})[0]
        for f in feeds
    ]
    shift = np.concatenate(diffs).mean(axis=(0, 2, 3))
    conv = next(n for n in corrected.graph.node if n.name == "conv")
    assert len(conv.input) == 3  # a bias was added
    new_bias = dequantized(corrected, conv.input[2])
    bias_dq = next(n for n in corrected.graph.node if conv.input[2] in n.output)
    step = inits(corrected)[bias_dq.input[1]]
    assert inits(corrected)[bias_dq.input[0]].dtype == np.int32
    np.testing.assert_allclose(new_bias, -shift, atol=float(np.max(step)) * 0.51 + 1e-6)


def test_matmul_bias_add_is_corrected_and_a_bare_matmul_gets_one() -> None:
    rng = np.random.default_rng(4)
    weight = (rng.standard_normal((16, 12)) * rng.uniform(0.02, 1.0, (1, 12))).astype(np.float32)
    bias = (rng.standard_normal(12) * 0.1).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8, 12])
    with_add = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], "mm"),
            helper.make_node("Add", ["b", "m"], ["y"], "bias"),
        ],
        [x],
        [y],
        [const("w", weight), const("b", bias)],
    )
    bare = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], [x], [y], [const("w", weight)]
    )
    feeds = feeds_of(with_add, (4, 8, 16), 6, seed=5, shift=0.4)
    for model, base in ((with_add, bias), (bare, np.zeros(12, np.float32))):
        # fold=false keeps MatMul + Add as they are (else they run on rows as one Gemm,
        # whose int32 bias the cnn test below covers).
        # min_weights=0: a lone 16x12 layer would otherwise stay float (too small to pay).
        plain = quantize(model, "quantize(per_channel=false,fold=false,min_weights=0)", feeds)
        corrected = quantize(
            model,
            "quantize(per_channel=false,fold=false,min_weights=0,bias_correction=true)",
            feeds,
        )
        qdq, _ = input_qdq(plain, "x")
        w_q = dequantized(plain, bias_input(plain, "mm", 1))
        x_q = np.concatenate([qdq(f["x"]).reshape(-1, 16) for f in feeds]).astype(np.float64)
        shift = x_q.mean(axis=0) @ (w_q - weight)
        add = next(n for n in corrected.graph.node if n.op_type == "Add")
        if model is bare:
            assert add.name == "mm_bias_correction"
        constant = next(inits(corrected)[i] for i in add.input if i in inits(corrected))
        np.testing.assert_allclose(constant.reshape(-1), base - shift, rtol=1e-5, atol=1e-6)


# ---- a whole network --------------------------------------------------------------------------


def cnn() -> onnx.ModelProto:
    """Conv-Relu, depthwise Conv-Relu (per-tensor weights suffer most there), pool, Gemm."""
    rng = np.random.default_rng(6)
    depthwise = rng.standard_normal((8, 1, 3, 3)) * rng.uniform(0.02, 1.0, (8, 1, 1, 1))
    initializers = [
        const("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3),
        const("b1", rng.standard_normal(8) * 0.1),
        const("w2", depthwise),
        const("b2", rng.standard_normal(8) * 0.1),
        const("w3", rng.standard_normal((10, 8)) * 0.5),
        const("b3", np.zeros(10)),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1] * 4, group=8),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], "gap"),
        helper.make_node("Reshape", ["gap", "flat"], ["features"], "flatten"),
        helper.make_node("Gemm", ["features", "w3", "b3"], ["logits"], "head", transB=1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializers,
    )


def channel_mean_error(ref: onnx.ModelProto, cand: onnx.ModelProto, name: str, feeds) -> float:
    """Mean over channels of |mean error of that channel| on `feeds` (iter_tensors)."""
    total, count = None, 0
    for a, b in zip(
        iter_tensors(ref, feeds, [name]), iter_tensors(cand, feeds, [name]), strict=True
    ):
        diff = b[name].astype(np.float64) - a[name]
        axis = 1
        sums = diff.sum(axis=tuple(i for i in range(diff.ndim) if i != axis))
        total = sums if total is None else total + sums
        count += diff.size // diff.shape[axis]
    return float(np.abs(total / count).mean())


def test_per_channel_mean_error_drops_on_held_out_data() -> None:
    model = cnn()
    calib = feeds_of(model, (1, 3, 16, 16), 16, seed=7)
    held_out = feeds_of(model, (1, 3, 16, 16), 16, seed=8)
    plain = quantize(model, "quantize(per_channel=false)", calib)
    result = optimize(
        model,
        "quantize(per_channel=false,bias_correction=true)",
        PassContext(feeds=calib),
        strict=True,
    )
    corrected = result.model
    record = result.records[-1]
    assert record.stats["bias_corrected_layers"] == 3
    assert any(n.startswith("bias correction: 3 layer(s) corrected") for n in record.notes)
    before = {n: channel_mean_error(model, plain, n, held_out) for n in ("c2", "logits")}
    after = {n: channel_mean_error(model, corrected, n, held_out) for n in ("c2", "logits")}
    assert after["c2"] < before["c2"] / 3
    assert after["logits"] < before["logits"] / 2
    # Still a valid model that ORT runs, with the same outputs' shapes.
    session = ort.InferenceSession(
        corrected.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert session.run(None, held_out.feeds[0])[0].shape == (1, 10)

"""fuse-bn: BatchNorm, per-channel Mul/Add and Pad folded into Conv/ConvTranspose/Gemm."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import optimize
from onnxopt.graph import op_histogram
from onnxopt.runtime import create_session
from onnxopt.test_models import builders, digits

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, T.FLOAT, shape)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return create_session(model, optimization="disable").run(None, feed)


def _assert_close(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    for x, y in zip(_run(a, feed), _run(b, feed), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * float(np.abs(x).max()))


def _bn(prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        nh.from_array(RNG.uniform(0.5, 1.5, channels).astype(np.float32), f"{prefix}.scale"),
        nh.from_array(RNG.normal(0, 0.3, channels).astype(np.float32), f"{prefix}.bias"),
        nh.from_array(RNG.normal(0, 0.3, channels).astype(np.float32), f"{prefix}.mean"),
        nh.from_array(RNG.uniform(0.2, 2.0, channels).astype(np.float32), f"{prefix}.var"),
    ]


def _bn_node(x: str, y: str, prefix: str) -> onnx.NodeProto:
    names = [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return h.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-3)


def _fuse(model: onnx.ModelProto):
    result = optimize(model, "fuse-bn", strict=True)
    return result.model, result.records[0]


def test_cnn_has_no_batchnorm_left_and_same_outputs() -> None:
    model = builders.cnn(seed=3)
    out, record = _fuse(model)
    assert op_histogram(out)["BatchNormalization"] == 0
    assert record.stats["fused_BatchNormalization"] == 4
    assert len(out.graph.node) == len(model.graph.node) - 4
    _assert_close(model, out, {"image": RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)})


def test_digits_cnn_batchnorms_fold_and_accuracy_holds() -> None:
    model = onnx.load(digits.DIGITS_CNN)
    result = optimize(model, "simplify", strict=True)
    assert op_histogram(result.model)["BatchNormalization"] == 0
    assert len(result.model.graph.node) == len(model.graph.node) - 3
    _, _, x_test, y_test = digits.load_digits_split()
    assert digits.top1(result.model, x_test, y_test) == pytest.approx(
        digits.top1(model, x_test, y_test)
    )
    _assert_close(model, result.model, {"image": x_test[:64]})


@pytest.mark.parametrize(("group", "bias"), [(1, True), (2, False), (4, True)])
def test_conv_transpose_groups(group: int, bias: bool) -> None:
    c_in, c_out = 4, 8
    w = RNG.standard_normal((c_in, c_out // group, 3, 3)).astype(np.float32)
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [
        h.make_node("ConvTranspose", inputs, ["c"], group=group, strides=[2, 2]),
        _bn_node("c", "y", "bn"),
    ]
    inits = [nh.from_array(w, "w"), *_bn("bn", c_out)]
    if bias:
        inits.append(nh.from_array(RNG.standard_normal(c_out).astype(np.float32), "b"))
    model = _model(nodes, [_vi("x", [1, c_in, 5, 5])], [_vi("y", [1, c_out, 11, 11])], inits)
    out, _ = _fuse(model)
    assert op_histogram(out) == {"ConvTranspose": 1}
    _assert_close(model, out, {"x": RNG.standard_normal((1, c_in, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize(("trans_b", "alpha", "beta"), [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_with_batchnorm_mul_and_add(trans_b: int, alpha: float, beta: float) -> None:
    w = RNG.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    nodes = [
        h.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=alpha, beta=beta),
        _bn_node("g", "n", "bn"),
        h.make_node("Mul", ["n", "s"], ["m"]),
        h.make_node("Add", ["d", "m"], ["y"]),
    ]
    inits = [
        nh.from_array(w, "w"),
        nh.from_array(RNG.standard_normal(6).astype(np.float32), "c"),
        nh.from_array(RNG.standard_normal((1, 6)).astype(np.float32), "s"),
        nh.from_array(RNG.standard_normal(6).astype(np.float32), "d"),
        *_bn("bn", 6),
    ]
    model = _model(nodes, [_vi("x", [3, 5])], [_vi("y", [3, 6])], inits)
    out, record = _fuse(model)
    assert op_histogram(out) == {"Gemm": 1}
    assert record.stats["fused_Mul"] == record.stats["fused_Add"] == 1
    _assert_close(model, out, {"x": RNG.standard_normal((3, 5)).astype(np.float32)})


def test_grouped_conv_per_channel_mul_sub_div() -> None:
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"], group=2, pads=[1, 1, 1, 1]),
        h.make_node("Mul", ["c", "s"], ["m"]),
        h.make_node("Sub", ["m", "d"], ["e"]),
        h.make_node("Div", ["e", "q"], ["y"]),
    ]
    inits = [
        nh.from_array(RNG.standard_normal((6, 2, 3, 3)).astype(np.float32), "w"),
        nh.from_array(RNG.standard_normal((6, 1, 1)).astype(np.float32), "s"),
        nh.from_array(np.array(0.25, np.float32), "d"),
        nh.from_array(RNG.uniform(1, 2, (1, 6, 1, 1)).astype(np.float32), "q"),
    ]
    model = _model(nodes, [_vi("x", [1, 4, 7, 7])], [_vi("y", [1, 6, 7, 7])], inits)
    out, _ = _fuse(model)
    assert op_histogram(out) == {"Conv": 1}
    assert [o.name for o in out.graph.output] == ["y"]
    _assert_close(model, out, {"x": RNG.standard_normal((1, 4, 7, 7)).astype(np.float32)})


def test_not_per_channel_or_shared_output_is_left_alone() -> None:
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"]),
        h.make_node("Mul", ["c", "row"], ["m"]),  # varies along W: not per channel
        h.make_node("Conv", ["x", "w"], ["c2"]),
        _bn_node("c2", "n", "bn"),
        h.make_node("Relu", ["c2"], ["r"]),  # c2 has a second reader: BN cannot fold
        h.make_node("Sum", ["m", "n", "r"], ["y"]),
    ]
    inits = [
        nh.from_array(RNG.standard_normal((3, 2, 1, 1)).astype(np.float32), "w"),
        nh.from_array(RNG.standard_normal((1, 1, 1, 4)).astype(np.float32), "row"),
        *_bn("bn", 3),
    ]
    model = _model(nodes, [_vi("x", [1, 2, 4, 4])], [_vi("y", [1, 3, 4, 4])], inits)
    out, record = _fuse(model)
    assert record.status == "unchanged"
    assert op_histogram(out)["BatchNormalization"] == 1


def test_shared_weight_is_not_changed_for_the_other_reader() -> None:
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c1"]),
        _bn_node("c1", "n", "bn"),
        h.make_node("Conv", ["x", "w"], ["c2"], strides=[2, 2]),
    ]
    inits = [
        nh.from_array(RNG.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
        *_bn("bn", 3),
    ]
    model = _model(
        nodes, [_vi("x", [1, 2, 8, 8])], [_vi("n", [1, 3, 6, 6]), _vi("c2", [1, 3, 3, 3])], inits
    )
    out, _ = _fuse(model)
    assert op_histogram(out) == {"Conv": 2}
    _assert_close(model, out, {"x": RNG.standard_normal((1, 2, 8, 8)).astype(np.float32)})


def test_mul_add_after_batchnorm_fold_into_it() -> None:
    nodes = [
        h.make_node("Relu", ["x"], ["r"]),
        _bn_node("r", "n", "bn"),
        h.make_node("Mul", ["n", "s"], ["m"]),
        h.make_node("Add", ["m", "d"], ["y"]),
    ]
    inits = [
        *_bn("bn", 4),
        nh.from_array(RNG.standard_normal((4, 1, 1)).astype(np.float32), "s"),
        nh.from_array(RNG.standard_normal((4, 1, 1)).astype(np.float32), "d"),
    ]
    model = _model(nodes, [_vi("x", [2, 4, 3, 3])], [_vi("y", [2, 4, 3, 3])], inits)
    out, _ = _fuse(model)
    assert op_histogram(out) == {"Relu": 1, "BatchNormalization": 1}
    _assert_close(model, out, {"x": RNG.standard_normal((2, 4, 3, 3)).astype(np.float32)})


PADS = [
    ("Conv", {"pads": [0, 0, 1, 1]}, 0.0, True),
    ("AveragePool", {"kernel_shape": [3, 3], "count_include_pad": 1}, 0.0, True),
    ("AveragePool", {"kernel_shape": [3, 3]}, 0.0, True),
    ("MaxPool", {"kernel_shape": [3, 3]}, -np.inf, True),
    ("MaxPool", {"kernel_shape": [3, 3]}, 0.0, False),
    ("Conv", {}, 1.0, False),
    ("AveragePool", {"kernel_shape": [3, 3], "ceil_mode": 1, "strides": [2, 2]}, 0.0, False),
]


@pytest.mark.parametrize(("op", "attrs", "value", "folds"), PADS)
def test_pad_into_conv_and_pools(op: str, attrs: dict, value: float, folds: bool) -> None:
    reader_inputs = ["p", "w"] if op == "Conv" else ["p"]
    nodes = [
        h.make_node("Pad", ["x", "pads", "v"], ["p"]),
        h.make_node(op, reader_inputs, ["y"], **attrs),
    ]
    inits = [
        nh.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
        nh.from_array(np.array(value, np.float32), "v"),
        nh.from_array(RNG.standard_normal((2, 3, 3, 3)).astype(np.float32), "w"),
    ]
    model = _model(nodes, [_vi("x", [1, 3, 6, 6])], [_vi("y", ["n", "c", "h", "w"])], inits)
    out, _ = _fuse(model)
    assert op_histogram(out).get("Pad", 0) == (0 if folds else 1)
    _assert_close(model, out, {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)})


def test_pad_on_channel_axis_stays() -> None:
    nodes = [h.make_node("Pad", ["x", "pads"], ["p"]), h.make_node("Conv", ["p", "w"], ["y"])]
    inits = [
        nh.from_array(np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64), "pads"),
        nh.from_array(RNG.standard_normal((2, 4, 1, 1)).astype(np.float32), "w"),
    ]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 2, 4, 4])], inits)
    out, record = _fuse(model)
    assert record.status == "unchanged" and op_histogram(out)["Pad"] == 1


def test_matmul_add_becomes_gemm_only_for_2d() -> None:
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["m"]),
        h.make_node("Add", ["b", "m"], ["y"]),
        h.make_node("MatMul", ["x3", "w"], ["m3"]),
        h.make_node("Add", ["m3", "b"], ["z"]),
    ]
    inits = [
        nh.from_array(RNG.standard_normal((5, 6)).astype(np.float32), "w"),
        nh.from_array(RNG.standard_normal(6).astype(np.float32), "b"),
    ]
    inputs = [_vi("x", ["n", 5]), _vi("x3", [2, 3, 5])]
    model = _model(nodes, inputs, [_vi("y", ["n", 6]), _vi("z", [2, 3, 6])], inits)
    out, record = _fuse(model)
    assert op_histogram(out) == {"Gemm": 1, "MatMul": 1, "Add": 1}
    assert record.stats["matmul_add_to_gemm"] == 1
    feed = {
        "x": RNG.standard_normal((4, 5)).astype(np.float32),
        "x3": RNG.standard_normal((2, 3, 5)).astype(np.float32),
    }
    _assert_close(model, out, feed)


def test_maxpool_indices_read_as_a_graph_output_keep_the_pad() -> None:
    """Folding the pad would change which flat index each maximum has (issue #16, item 9)."""
    pad = h.make_node("Pad", ["x", "pads", "ninf"], ["p"], mode="constant")
    pool = h.make_node("MaxPool", ["p"], ["y", "idx"], kernel_shape=[3, 3])
    pads = nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    ninf = nh.from_array(np.array(-np.inf, np.float32), "ninf")
    outputs = [_vi("y", [1, 2, 10, 10]), h.make_tensor_value_info("idx", T.INT64, [1, 2, 10, 10])]
    model = _model([pad, pool], [_vi("x", [1, 2, 10, 10])], outputs, [pads, ninf])
    result = optimize(model, "fuse-bn")
    assert op_histogram(result.model)["Pad"] == 1
    assert result.records[0].stats.get("fused_Pad", 0) == 0
    feed = {"x": RNG.standard_normal((1, 2, 10, 10)).astype(np.float32)}
    (y0, i0), (y1, i1) = _run(model, feed), _run(result.model, feed)
    assert np.array_equal(i0, i1) and np.array_equal(y0, y1)

"""The quantize pass, static mode: QDQ numbers against numpy, ORT fusion, real accuracy."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import ListFeeds, RandomFeeds, model_inputs
from onnxopt.errors import PassError
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import optimize
from onnxopt.runtime import int8_pair_sums_saturate, iter_tensors
from onnxopt.test_models.digits import DIGITS_CNN, load_digits_split, top1


def small_cnn(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu, a residual Add, global pooling and a Gemm head."""
    rng = np.random.default_rng(seed)

    def const(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        const("w1", (8, 3, 3, 3), 0.3),
        const("b1", (8,), 0.1),
        const("w2", (8, 8, 3, 3), 0.15),
        const("b2", (8,), 0.1),
        const("w3", (10, 8), 0.4),
        const("b3", (10,), 0.1),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("Add", ["r2", "p1"], ["sum"], "residual"),
        helper.make_node("GlobalAveragePool", ["sum"], ["gap"], "gap"),
        helper.make_node("Reshape", ["gap", "flat"], ["flat_out"], "flatten"),
        helper.make_node("Gemm", ["flat_out", "w3", "b3"], ["logits"], "head", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model: onnx.ModelProto, count: int, seed: int) -> ListFeeds:
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(count)]
    return ListFeeds([{"x": a} for a in arrays], model_inputs(model))


def quantized(model: onnx.ModelProto, spec: str, feeds=None) -> onnx.ModelProto:
    result = optimize(model, spec, PassContext(feeds=feeds), strict=True)
    assert result.records[-1].status == "changed", result.records[-1]
    return result.model


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """Op types after ORT's graph optimizations, as ORT would run the model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def np_quant_dequant(x: np.ndarray, scale: float, zero: int, qmin: int, qmax: int) -> np.ndarray:
    q = np.clip(np.rint(x.astype(np.float32) / np.float32(scale)) + zero, qmin, qmax)
    return ((q - zero) * np.float32(scale)).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return small_cnn()


@pytest.fixture(scope="module")
def calib(model) -> ListFeeds:
    return feeds_for(model, 16, seed=1)


@pytest.fixture(scope="module")
def qmodel(model, calib) -> onnx.ModelProto:
    return quantized(model, "quantize", calib)


def _qdq_pairs(qmodel: onnx.ModelProto, float_names: set[str]):
    """(Q node, DQ node, original float tensor name) for every activation Q."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in qmodel.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in qmodel.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dq = next(r for r in readers[node.output[0]] if r.op_type == "DequantizeLinear")
        original = dq.output[0] if dq.output[0] in float_names else node.input[0]
        yield node, dq, original


def test_activation_scales_are_the_calibrated_minmax_ranges(model, calib, qmodel) -> None:
    names = ["x", "r1", "p1", "r2", "sum", "gap", "flat_out"]
    seen = list(iter_tensors(model, calib, names))
    low = {n: min(float(v[n].min()), 0.0) for n in names for v in seen[:1]}
    high = {n: max(float(v[n].max()), 0.0) for n in names for v in seen[:1]}
    for v in seen:
        for n in names:
            low[n], high[n] = min(low[n], float(v[n].min())), max(high[n], float(v[n].max()))
    init = initializers(qmodel)
    checked = set()
    for q, _, original in _qdq_pairs(qmodel, set(names)):
        scale, zero = float(init[q.input[1]]), int(init[q.input[2]])
        assert init[q.input[2]].dtype == np.uint8
        source = "r1" if original == "p1" else original  # MaxPool keeps its input's scale
        expected_scale = (high[source] - low[source]) / 255
        assert scale == pytest.approx(expected_scale, rel=1e-6), original
        assert zero == int(np.clip(np.rint(-low[source] / expected_scale), 0, 255)), original
        checked.add(original)
    # Relu outputs carry the Q (ORT then drops the Relu), and their zero point is 0.
    assert {"x", "r1", "p1", "r2", "sum", "gap", "flat_out"} <= checked
    assert "c1" not in checked and "c2" not in checked
    assert all(
        int(init[q.input[2]]) == 0
        for q, _, o in _qdq_pairs(qmodel, {"r1", "r2"})
        if o in {"r1", "r2"}
    )


def test_every_qdq_pair_matches_numpy_quantize_dequantize(model, calib, qmodel) -> None:
    init = initializers(qmodel)
    pairs = list(_qdq_pairs(qmodel, {n for node in model.graph.node for n in node.output}))
    wanted = sorted({n for q, dq, _ in pairs for n in (q.input[0], dq.output[0])})
    for values in iter_tensors(qmodel, calib.take(4), wanted):
        for q, dq, _ in pairs:
            scale, zero = float(init[q.input[1]]), int(init[q.input[2]])
            expected = np_quant_dequant(values[q.input[0]], scale, zero, 0, 255)
            got = values[dq.output[0]]
            # ORT may round a value lying exactly halfway the other way: one step, rarely.
            off = np.abs(got - expected) > 1e-6 * max(scale, 1.0)
            assert off.mean() < 1e-3, q.name
            assert np.abs(got - expected).max() <= scale * 1.0001, q.name


@pytest.mark.parametrize("reduce_range,qmax", [(False, 127), (True, 63)])
def test_weights_are_int8_symmetric_per_output_channel(model, calib, reduce_range, qmax) -> None:
    qmodel = quantized(model, f"quantize(reduce_range={str(reduce_range).lower()})", calib)
    floats = initializers(model)
    init = initializers(qmodel)
    found = {}
    for node in qmodel.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in init:
            continue
        q = init[node.input[0]]
        if q.dtype != np.int8:
            continue
        scale = init[node.input[1]]
        source = next(n for n, w in floats.items() if w.shape == q.shape and w.dtype == np.float32)
        w = floats[source]
        axis = node.attribute[0].i if node.attribute else 1
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        np.testing.assert_allclose(scale, amax / qmax, rtol=1e-6)
        shape = [1] * w.ndim
        shape[axis] = -1
        np.testing.assert_array_equal(q, np.rint(w / (amax / qmax).reshape(shape)).astype(np.int8))
        assert np.abs(q).max() == qmax and q.min() >= -qmax
        found[source] = axis
    # Conv weights along axis 0; the Gemm weight [10, 8] with transB=1 also along its rows.
    assert found == {"w1": 0, "w2": 0, "w3": 0}


def test_unset_reduce_range_follows_the_cpu_flags(model, calib) -> None:
    # /proc/cpuinfo is read here on its own, not through the pass's helper.
    flags = next(
        (line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("flags")),
        "",
    ).split()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    saturates = x86 and not ({"avx512_vnni", "avx_vnni"} & set(flags))
    result = optimize(model, "quantize", PassContext(feeds=calib), strict=True)
    q = [
        numpy_helper.to_array(t)
        for t in result.model.graph.initializer
        if t.data_type == TensorProto.INT8
    ]
    assert max(int(np.abs(w).max()) for w in q) == (63 if saturates else 127)
    noted = any("7 bits" in n for n in result.records[0].notes)
    assert noted == saturates


def test_bias_is_int32_with_input_scale_times_weight_scale(model, qmodel) -> None:
    floats, init = initializers(model), initializers(qmodel)
    nodes = {o: n for n in qmodel.graph.node for o in n.output}
    for conv_name, bias_name in (("conv1", "b1"), ("conv2", "b2"), ("head", "b3")):
        conv = next(n for n in qmodel.graph.node if n.name == conv_name)
        x_scale = init[nodes[conv.input[0]].input[1]]
        w_scale = init[nodes[conv.input[1]].input[1]]
        bias_dq = nodes[conv.input[2]]
        q, scale = init[bias_dq.input[0]], init[bias_dq.input[1]]
        assert q.dtype == np.int32
        np.testing.assert_allclose(scale, x_scale * w_scale, rtol=1e-6)
        np.testing.assert_array_equal(q, np.rint(floats[bias_name] / scale).astype(np.int32))


def test_ort_runs_integer_kernels_and_no_qdq_pair_is_left_idle(qmodel, tmp_path) -> None:
    ops = optimized_ops(qmodel, tmp_path)
    assert ops.count("QLinearConv") == 2
    assert "QGemm" in ops and "QLinearAdd" in ops and "QLinearGlobalAveragePool" in ops
    assert "Conv" not in ops and "Relu" not in ops and "Gemm" not in ops
    # Only the model input is quantized in float; everything after stays integer.
    assert ops.count("QuantizeLinear") == 1
    produced = {n.output[0]: n.op_type for n in qmodel.graph.node}
    for node in qmodel.graph.node:
        if node.op_type == "QuantizeLinear":
            assert produced.get(node.input[0]) != "DequantizeLinear"


def test_quantized_output_stays_close_to_float(model, qmodel) -> None:
    test = feeds_for(model, 8, seed=7)
    from onnxopt.test_models.broken import halved_scales, relative_error

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, feed)[0] for feed in test])

    reference = run(model)

    def close(candidate: np.ndarray) -> bool:
        a, b = reference.ravel(), candidate.ravel()
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        # cosine is blind to a uniform scale error: the relative error is not
        return cosine > 0.999 and relative_error(reference, candidate) < 0.05

    assert close(run(qmodel))  # 0.9998 / 0.022 here
    assert not close(run(halved_scales(qmodel)))  # 0.993 / 0.80: a bound of 0.99 let it by


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_digits_cnn_int8_loses_at_most_half_a_point(digits, method) -> None:
    x_train, _, x_test, y_test = digits
    model = onnx.load(DIGITS_CNN)
    calib = ListFeeds([{"image": x_train[i : i + 1]} for i in range(100)], model_inputs(model))
    qmodel = quantized(model, f"quantize(calibrate={method})", calib)
    fp32, int8 = top1(model, x_test, y_test), top1(qmodel, x_test, y_test)
    assert fp32 - int8 <= 0.5, (fp32, int8)
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)


def test_static_mode_without_data_says_to_pass_data(model) -> None:
    with pytest.raises(PassError, match=r"quantize needs calibration data: pass data= \(a \.npz"):
        optimize(model, "quantize", PassContext())


def test_opset_12_is_upgraded_for_per_channel_weights(calib) -> None:
    model = small_cnn(opset=12)
    result = optimize(model, "quantize", PassContext(feeds=calib), strict=True)
    record = result.records[0]
    assert any("opset from 12 to 13" in note for note in record.notes)
    assert result.model.opset_import[0].version == 13
    axes = [
        a.i
        for n in result.model.graph.node
        if n.op_type == "DequantizeLinear"
        for a in n.attribute
        if a.name == "axis"
    ]
    assert axes and set(axes) == {0}
    ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_per_tensor_weights_need_no_upgrade(calib) -> None:
    model = small_cnn(opset=12)
    qmodel = quantized(model, "quantize(per_channel=false)", calib)
    assert qmodel.opset_import[0].version == 12
    init = initializers(qmodel)
    scales = [init[n.input[1]] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"]
    assert all(s.ndim == 0 for s in scales)


def test_int8_symmetric_and_int16_activations(model, calib) -> None:
    int8 = quantized(model, "quantize(activations=int8)", calib)
    init = initializers(int8)
    zeros = [init[n.input[2]] for n in int8.graph.node if n.op_type == "QuantizeLinear"]
    assert zeros and all(z.dtype == np.int8 and int(z) == 0 for z in zeros)
    int16 = quantized(model, "quantize(activations=int16)", calib)
    assert int16.opset_import[0].version == 21
    init = initializers(int16)
    zeros = [init[n.input[2]] for n in int16.graph.node if n.op_type == "QuantizeLinear"]
    assert zeros and all(z.dtype == np.int16 for z in zeros)


def test_lone_small_layers_stay_float_but_chains_and_large_layers_do_not() -> None:
    # x feeds three branches: a lone 16x8 Gemm (128 weights), a 16x32 -> Relu -> 32x4
    # chain of small Gemms, and a lone 16x64 Gemm (1024 weights, the threshold).
    rng = np.random.default_rng(0)
    shapes = {"lone": (16, 8), "first": (16, 32), "second": (32, 4), "large": (16, 64)}
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, f"w_{n}")
        for n, s in shapes.items()
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w_lone"], ["y_lone"], "lone"),
        helper.make_node("Gemm", ["x", "w_first"], ["h"], "first"),
        helper.make_node("Relu", ["h"], ["h_relu"], "relu"),
        helper.make_node("Gemm", ["h_relu", "w_second"], ["y_chain"], "second"),
        helper.make_node("Gemm", ["x", "w_large"], ["y_large"], "large"),
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, size])
        for name, size in (("y_lone", 8), ("y_chain", 4), ("y_large", 64))
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    graph = helper.make_graph(nodes, "branches", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = ListFeeds(
        [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)],
        model_inputs(model),
    )

    def integer_layers(spec: str) -> tuple[set[str], list[str]]:
        result = optimize(model, spec, PassContext(feeds=feeds), strict=True)
        written = {o: n.op_type for n in result.model.graph.node for o in n.output}
        gemms = [n for n in result.model.graph.node if n.op_type == "Gemm"]
        quantized = {n.name for n in gemms if written.get(n.input[0]) == "DequantizeLinear"}
        return quantized, result.records[-1].notes

    quantized, notes = integer_layers("quantize")
    assert quantized == {"first", "second", "large"}
    assert (
        "left 1 node(s) in float (Gemm with fewer than 1024 weights between float "
        "tensors): lone" in notes
    )
    assert integer_layers("quantize(min_weights=0)")[0] == set(shapes)
    assert integer_layers("quantize(min_weights=100000)")[0] == {"first", "second"}
    assert integer_layers("quantize(int16_nodes=lone)")[0] == set(shapes)  # asked for
    with pytest.raises(PassError, match="min_weights must be 0"):
        optimize(model, "quantize(min_weights=-1)", PassContext(feeds=feeds))


def test_exclusions_leave_nodes_float(model, calib, tmp_path) -> None:
    by_name = quantized(model, "quantize(exclude_nodes=conv2|head)", calib)
    producers = {o: n.op_type for n in by_name.graph.node for o in n.output}
    conv2 = next(n for n in by_name.graph.node if n.name == "conv2")
    assert producers.get(conv2.input[1]) is None  # the float weight, no DQ
    head = next(n for n in by_name.graph.node if n.name == "head")
    assert producers.get(head.input[1]) is None
    # Without its Convs the head is a lone small layer between float tensors: min_weights=0
    # keeps it quantized, so that the pass has something to do.
    by_op = quantized(model, "quantize(exclude_ops=Conv,min_weights=0)", calib)
    assert "QLinearConv" not in optimized_ops(by_op, tmp_path)


def test_an_already_quantized_model_is_left_alone(qmodel, calib) -> None:
    result = optimize(qmodel, "quantize", PassContext(feeds=calib), strict=True)
    record = result.records[0]
    assert record.status == "unchanged"
    assert sum(n.op_type == "QuantizeLinear" for n in result.model.graph.node) == sum(
        n.op_type == "QuantizeLinear" for n in qmodel.graph.node
    )


def test_histogram_methods_and_cache_reuse(model, calib, tmp_path) -> None:
    cache = tmp_path / "calib.json"
    spec = f"quantize(calibrate=percentile,percentile=99.9,cache={cache})"
    first = quantized(model, spec, calib)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    second = quantized(model, spec, calib)
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    assert first.SerializeToString() == second.SerializeToString()
    entropy = quantized(model, f"quantize(calibrate=entropy,cache={cache})", calib)
    # The same statistics give another range with another method.
    a, b = initializers(first), initializers(entropy)
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.endswith("_scale") and k in b)


def test_bad_options_are_one_line_errors(model, calib) -> None:
    with pytest.raises(PassError, match="block_size must be a power of two"):
        optimize(model, "quantize(weights=int4,block_size=48)", PassContext(feeds=calib))
    with pytest.raises(PassError, match="cannot quantize Foo"):
        optimize(model, "quantize(include_ops=Conv|Foo)", PassContext(feeds=calib))


def test_random_feeds_work_when_given_explicitly(model) -> None:
    feeds = RandomFeeds(model_inputs(model), 4, seed=3)
    qmodel = quantized(model, "quantize(calibrate=mse)", feeds)
    assert sum(n.op_type == "QuantizeLinear" for n in qmodel.graph.node) >= 5


def test_transformer_static_keeps_attention_and_norms_float() -> None:
    from onnxopt.test_models import builders

    model = builders.transformer_block(seed=0)
    calib = RandomFeeds(model_inputs(model), 8, seed=1)
    qmodel = quantized(model, "quantize", calib)
    producers = {o: n.op_type for n in qmodel.graph.node for o in n.output}
    for node in qmodel.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "Erf"):
            assert producers.get(node.input[0]) != "DequantizeLinear", node.name
        if node.name == "attn.scores":  # Q x K^T: two computed inputs
            assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
    # The six linear layers (row-wise, so now Gemms with their biases) have int8 weights.
    weighted = [n for n in qmodel.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert sum(producers.get(n.input[1]) == "DequantizeLinear" for n in weighted) == 6
    test = RandomFeeds(model_inputs(model), 4, seed=9)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(qmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in test:
        a, b = ref.run(None, feed)[0].ravel(), cand.run(None, feed)[0].ravel()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


@pytest.mark.parametrize("shape", [[8, 64], [1, 8, 64], ["batch", 8, 64]])
def test_matmul_with_bias_add_keeps_integer_kernels(shape, tmp_path) -> None:
    # ORT's MatMulAddFusion runs before its QDQ rules: a MatMul + [N] bias Add with known
    # shapes would become a float Gemm with the weight dequantized at every call.
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], "mm"),
        helper.make_node("Add", ["m", "b"], ["y"], "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mm_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    concrete = [d if isinstance(d, int) else 2 for d in shape]
    feeds = ListFeeds(
        [{"x": rng.standard_normal(concrete).astype(np.float32)} for _ in range(4)],
        model_inputs(model),
    )
    qmodel = quantized(model, "quantize", feeds)
    ops = optimized_ops(qmodel, tmp_path)
    assert "DequantizeLinear" not in ops
    assert ops.count("QGemm") + ops.count("MatMulIntegerToFloat") == 1
    x = feeds.feeds[0]["x"]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(qmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = ref.run(None, {"x": x})[0], got.run(None, {"x": x})[0]
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) < 0.05 * float(np.abs(a).max())


@pytest.mark.parametrize("reduce_range", ["false", "true"])
def test_seven_bit_weights_keep_ort_exact_where_eight_bits_saturate(reduce_range) -> None:
    # A uint8 activation at 255 times two weights at +-127 overflows an int16 pair sum
    # on x86 without VNNI; with 7-bit weights the integer result matches numpy's.
    if reduce_range == "false" and not int8_pair_sums_saturate():
        pytest.skip("this CPU has VNNI: ORT's integer kernels do not saturate here")
    w = np.ones((64, 16), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones((4, 64), np.float32)  # ranges hold 0, so 1.0 quantizes to 255
    feeds = ListFeeds([{"x": x}], model_inputs(model))
    spec = f"quantize(reduce_range={reduce_range},min_weights=0)"
    qmodel = quantized(model, spec, feeds)
    got = ort.InferenceSession(qmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    y = got.run(None, {"x": x})[0]
    error = float(np.abs(y - x @ w).max())
    if reduce_range == "true":
        assert error < 0.05 * 32
    else:
        assert error > 0.05 * 32


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_an_all_negative_activation_keeps_its_low_end_through_the_pass(method: str) -> None:
    """Planted bug #23.7 through the pass: x -> Abs -> Neg is all negative with a long
    left tail; its Q must put zero at 255 and span the data's low tail (not (0, 0))."""
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Abs", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["neg"]),
            helper.make_node("MatMul", ["neg", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    arrays = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(64)]
    feeds = ListFeeds([{"x": a} for a in arrays], model_inputs(model))
    q = quantized(model, f"quantize(calibrate={method},min_weights=0)", feeds)
    init = initializers(q)
    (node,) = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "neg"]
    scale, zero = float(init[node.input[1]]), int(init[node.input[2]])
    data = -np.abs(np.concatenate(arrays))
    assert zero == 255
    assert float(np.percentile(data, 1)) >= -scale * 255 >= float(data.min()) - scale
    session = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"x": a})[0] for a in arrays[:16]])
    want = np.concatenate([reference.run(None, {"x": a})[0] for a in arrays[:16]])
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.999

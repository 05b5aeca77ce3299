"""Per-layer error analysis: isolated and accumulated errors of real quantized models."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxopt.analyze import analyze, quantized_nodes
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.errors import FeedError, ModelError
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import optimize
from onnxopt.report import render_html, render_markdown, write_json
from onnxopt.runtime import iter_tensors
from onnxopt.test_models.digits import DIGITS_CNN, load_digits_split

TRANSFORMER = Path(__file__).resolve().parents[1] / "test_models" / "digits_transformer.onnx"


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def quantize(model: onnx.ModelProto, x_train: np.ndarray, spec: str = "quantize"):
    calib = ListFeeds([{"image": x_train[i : i + 1]} for i in range(64)], model_inputs(model))
    result = optimize(model, spec, PassContext(feeds=calib), strict=True)
    assert result.records[-1].status == "changed"
    return result.model


def feeds_of(model: onnx.ModelProto, x: np.ndarray, count: int = 4, batch: int = 32):
    return ListFeeds(
        [{"image": x[i * batch : (i + 1) * batch]} for i in range(count)], model_inputs(model)
    )


@pytest.fixture(scope="module")
def cnn(digits):
    x_train, _, x_test, _ = digits
    model = onnx.load(str(DIGITS_CNN))
    qmodel = quantize(model, x_train)
    feeds = feeds_of(model, x_test)
    return model, qmodel, feeds, analyze(model, qmodel, feeds)


def test_first_quantized_node_has_equal_isolated_and_accumulated_error(cnn) -> None:
    _, _, _, result = cnn
    first = result.layer(result.order[0])
    assert first.node == "/0/Conv"  # reads the graph input: nothing before it is quantized
    assert 30.0 < first.isolated_sqnr_db < 80.0
    assert first.accumulated_sqnr_db == pytest.approx(first.isolated_sqnr_db, abs=1e-6)
    assert first.accumulated_rel_error == pytest.approx(first.isolated_rel_error, rel=1e-6)
    assert first.accumulated_cosine == pytest.approx(first.isolated_cosine, abs=1e-9)
    assert first.isolated_rel_error == pytest.approx(10 ** (-first.isolated_sqnr_db / 20), 1e-9)


def test_errors_accumulate_towards_the_output(cnn) -> None:
    _, _, _, result = cnn
    last = result.layer(result.order[-1])
    assert last.node == "/14/Gemm" and last.output == "logits"
    assert last.accumulated_sqnr_db <= last.isolated_sqnr_db + 0.5
    # Every node after the first carries the error of those before it.
    later = [result.layer(n) for n in result.order[1:]]
    assert sum(e.accumulated_sqnr_db < e.isolated_sqnr_db for e in later) == len(later)


def test_isolated_error_of_a_conv_matches_numpy(cnn) -> None:
    model, qmodel, feeds, result = cnn
    conv = next(n for n in qmodel.graph.node if n.name == "/3/Conv")
    init = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}

    def dequantized(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dq = producer[name]
        assert dq.op_type == "DequantizeLinear"
        return tuple(init.get(i) for i in dq.input)  # (integers or None, scale, zero point)

    _, x_scale, x_zero = dequantized(conv.input[0])
    wq, w_scale, w_zero = dequantized(conv.input[1])
    bq, b_scale, b_zero = dequantized(conv.input[2])
    weight = (wq.astype(np.float32) - w_zero.astype(np.float32)[:, None, None, None]) * w_scale[
        :, None, None, None
    ]
    bias = (bq.astype(np.float32) - b_zero.astype(np.float32)) * b_scale
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"])
    node.attribute.extend(conv.attribute)  # the same pads, strides and groups
    single = helper.make_model(
        helper.make_graph(
            [node],
            "conv",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    # The float model's Conv input, and its BatchNorm output (folded into this Conv).
    names = ["/2/Relu_output_0", "/4/BatchNormalization_output_0"]
    signal = noise = 0.0
    for values in iter_tensors(model, feeds, names):
        x, reference = values[names[0]], values[names[1]].astype(np.float64)
        q = np.clip(np.rint(x / x_scale) + x_zero.astype(np.float32), 0, 255)
        fake = ((q - x_zero.astype(np.float32)) * x_scale).astype(np.float32)
        y = session.run(None, {"x": fake})[0].astype(np.float64)
        signal += float(np.sum(reference**2))
        noise += float(np.sum((y - reference) ** 2))
    expected = 10 * math.log10(signal / noise)
    measured = result.layer("/3/Conv")
    assert measured.output == "/4/BatchNormalization_output_0"
    assert measured.isolated_sqnr_db == pytest.approx(expected, abs=1e-3)
    # Quantizing the input and the weights costs more than the weights alone would.
    assert measured.accumulated_sqnr_db < measured.isolated_sqnr_db


def test_a_node_left_in_float_is_not_analysed(digits) -> None:
    x_train, _, x_test, _ = digits
    model = onnx.load(str(DIGITS_CNN))
    qmodel = quantize(model, x_train, "quantize(exclude_nodes=/3/Conv)")
    result = analyze(model, qmodel, feeds_of(model, x_test, count=2))
    assert "/3/Conv" not in result.order
    # The excluded Conv still reads a dequantized input, but its float weights keep it out.
    assert "/3/Conv" not in {n.name for n in quantized_nodes(qmodel)}
    assert {"/0/Conv", "/7/Conv", "/12/Gemm", "/14/Gemm"} <= set(result.order)


def test_ranking_table_json_and_plot(cnn, tmp_path) -> None:
    _, _, _, result = cnn
    isolated = [e.isolated_sqnr_db for e in result.layers]
    assert isolated == sorted(isolated)
    assert len(result.layers) == len(result.order) == 8
    (table,) = result.tables()
    assert [row[1] for row in table.rows] == [e.node for e in result.layers]
    assert table.rows[0][3] == result.layers[0].isolated_sqnr_db
    assert table.rows[0][5] == f"{result.layers[0].isolated_cosine:.6f}"
    assert len(result.tables(max_rows=3)[0].rows) == 3
    markdown = render_markdown([table]).splitlines()
    assert markdown[4].startswith(f"| 1 | {result.layers[0].node} | {result.layers[0].op} |")
    data = json.loads(write_json(tmp_path / "a.json", result.to_dict()).read_text())
    assert data["samples"] == 4
    assert [layer["node"] for layer in data["layers"]] == [e.node for e in result.layers]
    png = result.plot_png()
    assert png is not None and png.startswith(b"\x89PNG")
    from PIL import Image

    width, height = Image.open(io.BytesIO(png)).size
    assert width >= 600 and height >= 400
    import base64

    page = render_html(result.tables(), images=[base64.b64encode(png).decode()])
    assert page.count("<img") == 1 and "/14/Gemm" in page


def test_feeds_walked_once_give_the_same_result(cnn) -> None:
    model, qmodel, feeds, result = cnn
    seen: list[tuple[int, int | None]] = []
    counted = analyze(model, qmodel, feeds, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 4) and seen[-1] == (4, 4) and counted.samples == 4
    again = analyze(model, qmodel, (feed for feed in feeds))
    assert again.samples == result.samples
    for a, b in zip(again.layers, result.layers, strict=True):
        assert a.node == b.node
        assert a.isolated_sqnr_db == pytest.approx(b.isolated_sqnr_db, abs=1e-9)


def test_refuses_a_float_model_and_different_inputs(cnn) -> None:
    model, qmodel, feeds, _ = cnn
    with pytest.raises(ModelError, match="no node that reads a DequantizeLinear"):
        analyze(model, model, feeds)
    other = onnx.ModelProto()
    other.CopyFrom(qmodel)
    other.graph.input[0].name = "pixels"
    for node in other.graph.node:
        node.input[:] = ["pixels" if i == "image" else i for i in node.input]
    with pytest.raises(FeedError, match="take different inputs"):
        analyze(model, other, feeds)


def test_transformer_ranks_the_feed_forward_output_projection_first(digits) -> None:
    """The most sensitive MatMul reads the GELU output, the input with the heaviest tail."""
    x_train, _, x_test, _ = digits
    model = onnx.load(str(TRANSFORMER))
    # min_weights=0: the small embedding and head are quantized too, to be ranked.
    qmodel = quantize(model, x_train, "quantize(min_weights=0)")
    feeds = feeds_of(model, x_test, count=8, batch=16)
    result = analyze(model, qmodel, feeds)
    assert len(result.layers) == 10  # 9 MatMul with weights and the Gemm head
    top = result.layers[0]
    assert top.node == "/blocks/blocks.0/feed_forward/feed_forward.3/MatMul"
    # Independently: the crest factor (max |x| / rms) of each quantized node's input.
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    floats = {o for n in model.graph.node for o in n.output}
    inputs = {}
    for node in quantized_nodes(qmodel):
        dq = producer[node.input[0]]
        name = node.input[0] if node.input[0] in floats else producer[dq.input[0]].input[0]
        if name not in floats:  # rows: made from a float tensor, or turned back into one
            made = producer[name]
            back = [n.output[0] for n in qmodel.graph.node if n.input[:1] == [name]]
            name = (
                made.input[0] if made.op_type == "Reshape" else next(b for b in back if b in floats)
            )
        inputs[node.name] = name
    peaks = dict.fromkeys(inputs.values(), 0.0)
    squares = dict.fromkeys(inputs.values(), 0.0)
    count = dict.fromkeys(inputs.values(), 0)
    for values in iter_tensors(model, feeds, list(peaks)):
        for name in peaks:
            x = values[name].astype(np.float64)
            peaks[name] = max(peaks[name], float(np.abs(x).max()))
            squares[name] += float(np.sum(x * x))
            count[name] += x.size
    crest = {n: peaks[t] / math.sqrt(squares[t] / count[t]) for n, t in inputs.items()}
    assert max(crest, key=crest.get) == top.node
    assert crest[top.node] > 1.5 * sorted(crest.values())[-2]
    assert top.isolated_sqnr_db < result.layers[1].isolated_sqnr_db - 1.0


def test_int16_activations_upgrade_the_opset_and_cut_the_input_error(cnn, digits) -> None:
    model, _, feeds, int8 = cnn
    qmodel = quantize(model, digits[0], "quantize(activations=int16)")
    assert qmodel.opset_import[0].version == 21 > model.opset_import[0].version
    int16 = analyze(model, qmodel, feeds)
    assert int16.order == int8.order and not int16.notes
    # A data mover only adds its input's quantization error. 8 more bits would give 48 dB
    # more, but held-out images beyond the calibrated range are clipped: about 15 dB here.
    pool8, pool16 = int8.layer("/6/MaxPool"), int16.layer("/6/MaxPool")
    assert pool8.isolated_sqnr_db + 10.0 < pool16.isolated_sqnr_db < pool8.isolated_sqnr_db + 25.0
    # The Conv keeps its int8 weights, which then dominate its error.
    conv8, conv16 = int8.layer("/3/Conv"), int16.layer("/3/Conv")
    assert conv8.isolated_sqnr_db < conv16.isolated_sqnr_db < conv8.isolated_sqnr_db + 15.0


def test_plot_is_none_without_matplotlib(cnn, monkeypatch) -> None:
    _, _, _, result = cnn
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert result.plot_png() is None


def scaled_chain() -> onnx.ModelProto:
    """Conv -> hard-swish (its last Mul by 1/6) -> Conv -> Relu -> Conv with weight outliers."""
    rng = np.random.default_rng(0)
    w_c = rng.normal(0, 0.1, (8, 8, 3, 3)).astype(np.float32)
    w_c[:, 0, 0, 0] = 40.0  # per-channel int8 then rounds every other weight to 0
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "w_a"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w_b"),
        numpy_helper.from_array(w_c, "w_c"),
        numpy_helper.from_array(np.array(1 / 6, np.float32), "sixth"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    pads = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w_a"], ["a"], "conv_a", **pads),
        # Hard-swish as Paddle exports it: x * clip(x + 3, 0, 6) / 6, the Div a Mul.
        helper.make_node("Add", ["a", "three"], ["a3"], "hswish_add"),
        helper.make_node("Clip", ["a3", "zero", "six"], ["a_clip"], "hswish_clip"),
        helper.make_node("Mul", ["a", "a_clip"], ["a_mul"], "hswish_mul"),
        helper.make_node("Mul", ["a_mul", "sixth"], ["a_scaled"], "scale"),
        helper.make_node("Conv", ["a_scaled", "w_b"], ["b"], "conv_b", **pads),
        helper.make_node("Relu", ["b"], ["b_relu"], "relu_b"),
        helper.make_node("Conv", ["b_relu", "w_c"], ["y"], "conv_c", **pads),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_scalar_mul_merged_into_a_scale_is_accounted_for() -> None:
    model = scaled_chain()
    rng = np.random.default_rng(1)
    feeds = ListFeeds(
        [{"x": rng.normal(0, 1, (1, 4, 16, 16)).astype(np.float32)} for _ in range(8)],
        model_inputs(model),
    )
    qmodel = optimize(model, "quantize", PassContext(feeds=feeds), strict=True).model
    # The Mul by 1/6 is gone: a DequantizeLinear with a sixth of its Q's scale writes its output.
    assert "scale" not in {n.name for n in qmodel.graph.node}
    assert any(
        n.op_type == "DequantizeLinear" and n.output[0] == "a_scaled" for n in qmodel.graph.node
    )
    result = analyze(model, qmodel, feeds)
    print(result.layers)
    assert result.layers[0].node == "conv_c"
    for e in result.layers:
        for cosine, sqnr in (
            (e.isolated_cosine, e.isolated_sqnr_db),
            (e.accumulated_cosine, e.accumulated_sqnr_db),
        ):
            assert not (cosine > 0.999 and sqnr < 20), e
    merged = result.layer("hswish_mul")
    assert merged.output == "a_scaled" and merged.isolated_sqnr_db > 30

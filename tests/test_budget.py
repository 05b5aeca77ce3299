"""Lossy verify: budgets, task metrics against numpy, good int8 passes, broken int8 fails."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import PassContext, optimize, verify
from onnxopt.budget import DEFAULT_BUDGET, output_form, parse_budget
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.errors import FeedError
from onnxopt.test_models import digits


def halve_dequantize_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    inits = {t.name: t for t in broken.graph.initializer}
    for i, node in enumerate(broken.graph.node):
        if node.op_type == "DequantizeLinear" and node.input[1] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]]) * 0.5
            name = f"{node.input[1]}.halved{i}"
            broken.graph.initializer.append(numpy_helper.from_array(scale, name))
            node.input[1] = name
    return broken


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def digits_int8() -> tuple[onnx.ModelProto, onnx.ModelProto, ListFeeds, np.ndarray]:
    model = onnx.load(digits.DIGITS_CNN)
    x_train, _, x_test, _ = digits.load_digits_split()
    specs = model_inputs(model)
    calib = ListFeeds([{specs[0].name: x_train[i : i + 50]} for i in (0, 50)], specs)
    quantized = optimize(model, "simplify,quantize", PassContext(feeds=calib)).model
    test = ListFeeds([{specs[0].name: x_test[i : i + 128]} for i in range(0, 512, 128)], specs)
    return model, quantized, test, x_test[:512]


def test_good_int8_passes_the_default_budget_with_top1_from_numpy(digits_int8) -> None:
    model, quantized, test, x = digits_int8
    result = verify(model, quantized, test)
    assert result.lossy and result.why == "metadata: quantize"
    (out,) = result.outputs
    task = result.tasks[out.name]
    ref, cand = run(model, x), run(quantized, x)
    assert task.form == "classes"
    assert task.values()["top1"] == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))
    top5 = np.argsort(-cand, axis=1)[:, :5]
    assert task.values()["top5"] == pytest.approx(np.mean((top5 == ref.argmax(1)[:, None]).any(1)))
    assert task.values()["top1"] >= DEFAULT_BUDGET["top1"]
    assert result.passed, result.judge(out)
    assert "budget cosine >= 0.9," in result.rule
    # The element-wise rule, asked for, fails the same good model.
    assert not verify(model, quantized, test, lossy=False).passed


def test_every_scale_halved_fails_the_default_budget(digits_int8) -> None:
    model, quantized, test, _ = digits_int8
    result = verify(model, halve_dequantize_scales(quantized), test)
    assert result.lossy and not result.passed
    _, misses = result.judge(result.outputs[0])
    assert any(m.startswith("top1") for m in misses) and any(m.startswith("cosine") for m in misses)


def test_budget_overrides_and_quantized_ops_mark_a_model_lossy(digits_int8) -> None:
    model, quantized, test, _ = digits_int8
    foreign = onnx.ModelProto()
    foreign.CopyFrom(quantized)
    foreign.ClearField("metadata_props")  # as if another tool had quantized it
    detected = verify(model, foreign, test)
    assert detected.lossy and "DequantizeLinear" in detected.why
    top1 = detected.tasks["logits"].values()["top1"]
    cosine = detected.outputs[0].cosine
    assert cosine < 1.0
    strict = verify(model, foreign, test, budget={"cosine": (cosine + 1) / 2})
    loose = verify(model, foreign, test, budget=f"top1:{top1},cosine:{cosine - 1e-6}")
    assert not strict.passed and loose.passed
    assert loose.budget == {"top1": top1, "cosine": cosine - 1e-6}
    with pytest.raises(FeedError, match="apply to no output"):
        verify(model, foreign, test, budget="map:0.9")


@pytest.mark.parametrize(
    "text", ["cosine", "cosine:x", "cosine:nan", "top1:-1", "top1:1.5", "acc:0.9", ""]
)
def test_bad_budgets_are_one_line_errors(text: str) -> None:
    with pytest.raises(FeedError, match="budget"):
        parse_budget(text)


def sigmoid_model(bias: float, shape: list[int]) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["t"]),
        helper.make_node("Sigmoid", ["t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "map",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(bias, np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_probability_map_iou_equals_numpy() -> None:
    shape = [1, 1, 32, 32]
    ref, cand = sigmoid_model(0.0, shape), sigmoid_model(0.3, shape)
    rng = np.random.default_rng(0)
    xs = [rng.normal(-1.5, 1.5, shape).astype(np.float32) for _ in range(3)]
    feeds = ListFeeds([{"x": x} for x in xs], model_inputs(ref))
    result = verify(ref, cand, feeds, lossy=True, map_threshold=0.3)
    task = result.tasks["y"]
    a = np.concatenate([run(ref, x) for x in xs]) > 0.3
    b = np.concatenate([run(cand, x) for x in xs]) > 0.3
    assert task.form == "map"
    assert task.values()["map"] == pytest.approx(np.sum(a & b) / np.sum(a | b))
    assert task.values()["map_pixels"] == pytest.approx(np.mean(a == b))
    # Pixels agree mostly (background) while the foreground differs: IoU is the stricter one.
    assert task.values()["map"] < task.values()["map_pixels"]


def test_embedding_neighbour_agreement_equals_numpy() -> None:
    shape = [1, 12, 8]
    rng = np.random.default_rng(1)
    xs = [rng.normal(0, 2, shape).astype(np.float32) for _ in range(2)]
    ref, cand = sigmoid_model(0.0, shape), sigmoid_model(0.0, shape)
    # Not a map: Identity on values outside [0, 1]. The candidate adds noise.
    for m in (ref, cand):
        m.graph.node[1].op_type = "Identity"
    cand.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(rng.normal(0, 0.8, shape[1:]).astype(np.float32), "b")
    )
    feeds = ListFeeds([{"x": x} for x in xs], model_inputs(ref))
    task = verify(ref, cand, feeds, lossy=True).tasks["y"]
    assert task.form == "embedding"

    def nearest(rows: np.ndarray) -> np.ndarray:
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    r = np.concatenate([run(ref, x)[0] for x in xs])
    c = np.concatenate([run(cand, x)[0] for x in xs])
    expected = np.mean(nearest(r) == nearest(c))
    assert 0 < expected < 1 and task.values()["nn"] == pytest.approx(expected)


def test_output_forms() -> None:
    assert output_form(np.zeros((2, 10), np.float32)) == "classes"
    assert output_form(np.full((2, 5, 4), 0.25, np.float32)) == "classes"  # probability rows
    assert output_form(np.random.default_rng(0).random((1, 1, 4, 4))) == "map"
    assert output_form(np.random.default_rng(0).normal(size=(1, 5, 4))) == "embedding"
    assert output_form(np.zeros((3,), np.int64)) == "exact"
    assert output_form(np.zeros((4,), np.float32)) == "values"

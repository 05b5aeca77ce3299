"""Row-wise regions of a transformer run on 2-D tensors (passes/quantize/rows.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt.graph import to_graph, to_model
from onnxopt.model import check_model, inferred_shapes
from onnxopt.passes.quantize.qdq import Namer
from onnxopt.passes.quantize.rows import flatten_rows
from onnxopt.test_models.digits import load_digits_split

TRANSFORMER = Path(__file__).resolve().parents[1] / "test_models" / "digits_transformer.onnx"


def flattened(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph = to_graph(model)
    regions = flatten_rows(graph, Namer(graph), lambda node: False)
    out = to_model(graph, like=model)
    check_model(out)
    return out, regions


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_digits_transformer_linear_layers_read_rows_and_outputs_stay() -> None:
    model = onnx.load(str(TRANSFORMER))
    out, regions = flattened(model)
    assert regions == 2  # the embedding, and both blocks up to the final LayerNorm
    shapes = inferred_shapes(out)
    weights = {t.name for t in out.graph.initializer if len(t.dims) == 2}
    linear = [n for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(linear) == 9
    assert all(len(shapes[n.input[0]]) == 2 for n in linear)
    # The position embedding ([8, 48], not a row vector) is added in 3-D, outside.
    position = next(n for n in out.graph.node if "position" in n.input)
    assert len(shapes[position.output[0]]) == 3
    _, _, x_test, _ = load_digits_split()
    for batch in (1, 64):
        feed = {"image": x_test[:batch]}
        for got, want in zip(run(out, feed), run(model, feed), strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_region_without_a_bias_add_is_left_alone() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 4])
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    model = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    out, regions = flattened(model)
    assert regions == 0
    assert [n.op_type for n in out.graph.node] == ["MatMul"]


def test_different_symbolic_leads_do_not_share_a_region() -> None:
    # Add(a, b) where b's batch is another symbol: b might broadcast over a's batch in
    # 3-D, which rows would not. The Add stays 3-D; the MatMul + bias before it flattens.
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 8, 16])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m", 8, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 4])
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["m1"]),
        helper.make_node("Add", ["m1", "bias"], ["m2"]),
        helper.make_node("Add", ["m2", "b"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [a, b], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    out, regions = flattened(model)
    assert regions == 1
    last = next(n for n in out.graph.node if n.output[0] == "y")
    assert last.op_type == "Add" and "b" in last.input  # still the 3-D Add of b
    feed = {
        "a": rng.standard_normal((3, 8, 16)).astype(np.float32),
        "b": rng.standard_normal((1, 8, 4)).astype(np.float32),  # broadcasts over n
    }
    np.testing.assert_allclose(run(out, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-6)

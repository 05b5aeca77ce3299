"""inspect: MACs from shapes counted by hand, parameters, op histogram, opset."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import inspect
from onnxopt.errors import FeedError
from onnxopt.model import inferred_shapes
from onnxopt.summary import macs_per_sample


def hand_counted_model():
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "conv.b"),
        numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "mm.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w"], ["logits"], transB=1),
        helper.make_node("MatMul", ["logits", "mm.w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_macs_parameters_and_ops() -> None:
    summary = inspect(hand_counted_model())
    conv = 16 * 16 * 8 * 3 * 3 * 3
    assert summary.macs_by_op == {"Conv": conv, "Gemm": 8 * 10, "MatMul": 10 * 4}
    assert summary.macs == conv + 80 + 40 and summary.macs_unknown == 0
    assert summary.parameters == 8 * 27 + 8 + 80 + 40
    assert summary.parameter_bytes == summary.parameters * 4
    assert summary.ops["Conv"] == 1 and summary.nodes == 5 and summary.opset == 17
    assert summary.inputs == ["x: float32 [nx3x16x16]"]


def test_dynamic_batch_is_bound_by_shapes() -> None:
    summary = inspect(hand_counted_model(), {"x": (4, 3, 16, 16)})
    assert summary.macs == 4 * (16 * 16 * 8 * 27 + 80 + 40)


def test_constant_node_weights_count_as_parameters() -> None:
    # Paddle's exporter keeps weights in Constant nodes instead of initializers.
    model = hand_counted_model()
    inits = {t.name: t for t in model.graph.initializer}
    constants = [
        helper.make_node("Constant", [], [name], value=inits[name]) for name in ("conv.w", "fc.w")
    ]
    kept = [t for t in model.graph.initializer if t.name not in ("conv.w", "fc.w")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = [*constants, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    summary = inspect(model)
    assert summary.parameters == 8 * 27 + 8 + 80 + 40
    assert summary.parameter_bytes == summary.parameters * 4


def test_unbound_image_dims_leave_nodes_unknown_and_name_the_shape_to_pass() -> None:
    model = hand_counted_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "p2o.DynamicDimension.1"
    partial = inspect(model)
    # Short names stay, an exporter's long ones become ?.
    assert partial.inputs == ["x: float32 [nx3xhx?]"]
    # The Conv depends on h and w: unknown, not counted for a guessed 1x1 image. The
    # Gemm and MatMul after the global pool are counted.
    assert partial.macs_by_op == {"Gemm": 80, "MatMul": 40} and partial.macs_unknown == 1
    assert partial.unbound == ["x=1x3xNxN"]
    # Unknown, not a partial count that would read as the model's cost.
    assert partial.macs_text.startswith("unknown (1 node of unknown shape: pass --shape x=1x3xNxN")
    assert partial.macs_text.endswith("; 120 counted)")
    full = inspect(model, {"x": (1, 3, 16, 16)})
    assert full.unbound == [] and full.macs_unknown == 0
    assert full.macs == 16 * 16 * 8 * 27 + 80 + 40 and full.macs_text == f"{full.macs:,}"
    # A dynamic batch alone is bound to 1 without a word: that is the usual meaning.
    assert inspect(hand_counted_model()).unbound == []


def test_shapes_that_name_no_input_or_do_not_fit_are_refused() -> None:
    with pytest.raises(FeedError, match="--shape names y, .*its inputs: x"):
        inspect(hand_counted_model(), {"y": (1, 3, 16, 16)})
    with pytest.raises(FeedError, match="does not fit"):
        inspect(hand_counted_model(), {"x": (1, 4, 16, 16)})


def test_stored_minus_one_dims_do_not_stop_the_count() -> None:
    # Paddle's exporter stores -1 for dynamic dims in value_info and outputs; inference
    # with the bound input must not stop at the clash.
    model = hand_counted_model()
    model.graph.value_info.append(
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [-1, 8, 16, 16])
    )
    model.graph.value_info.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [-1, 8]))
    summary = inspect(model, {"x": (2, 3, 16, 16)})
    assert summary.macs_unknown == 0 and summary.macs == 2 * (16 * 16 * 8 * 27 + 80 + 40)


def test_macs_per_sample_from_inferred_shapes() -> None:
    model = hand_counted_model()
    # The dynamic batch counts as one sample; the hand count is the same as inspect's.
    assert macs_per_sample(model, inferred_shapes(model)) == 16 * 16 * 8 * 27 + 80 + 40
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    assert macs_per_sample(model, inferred_shapes(model)) is None  # the Conv cannot be sized

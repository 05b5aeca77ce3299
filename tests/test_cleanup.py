"""cleanup: dead and no-op nodes, Transpose/Reshape chains, deduplication, names kept."""

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
from onnxopt.test_models import builders

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _vi(name: str, shape, elem=T.FLOAT) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return create_session(model, optimization="disable").run(None, feed)


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    for x, y in zip(_run(a, feed), _run(b, feed), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _cleanup(model: onnx.ModelProto):
    result = optimize(model, "cleanup", strict=True)
    return result.model, result.records[0]


def test_cnn_clutter_is_removed_after_folding() -> None:
    model = builders.cnn(seed=0)
    result = optimize(model, "fold-constants,cleanup", strict=True)
    ops = op_histogram(result.model)
    assert ops["Identity"] == ops["Dropout"] == ops["Mul"] == ops["Reshape"] == 0
    # 28 nodes - 5 folded - Identity, Dropout, Mul by 1, Reshape to the same shape.
    assert len(result.model.graph.node) == 19
    stats = result.records[1].stats
    assert stats["removed_Identity"] == stats["removed_Dropout"] == 1
    assert stats["removed_Mul"] == stats["removed_Reshape"] == 1
    feed = {"image": RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)}
    _same_outputs(model, result.model, feed)


NO_OPS = [
    ("Cast", [], {"to": T.FLOAT}),
    ("Reshape", [np.array([2, 3, 4], np.int64)], {}),
    ("Reshape", [np.array([0, -1, 4], np.int64)], {}),
    ("Transpose", [], {"perm": [0, 1, 2]}),
    ("Expand", [np.array([3, 1], np.int64)], {}),
    ("Pad", [np.zeros(6, np.int64)], {}),
    (
        "Slice",
        [np.array([0], np.int64), np.array([2**63 - 1], np.int64), np.array([2], np.int64)],
        {},
    ),
    (
        "Slice",
        [np.array([0, -3], np.int64), np.array([5, 3], np.int64), np.array([0, 1], np.int64)],
        {},
    ),
    ("Tile", [np.ones(3, np.int64)], {}),
    ("Mul", [np.ones((1, 1, 4), np.float32)], {}),
    ("Add", [np.zeros(4, np.float32)], {}),
    ("Sub", [np.zeros((), np.float32)], {}),
    ("Div", [np.ones((3, 1), np.float32)], {}),
    ("Dropout", [], {}),
    ("Identity", [], {}),
]


@pytest.mark.parametrize(
    ("op", "consts", "attrs"), NO_OPS, ids=[f"{o[0]}{i}" for i, o in enumerate(NO_OPS)]
)
def test_no_op_is_bypassed(op: str, consts: list[np.ndarray], attrs: dict) -> None:
    names = [f"c{i}" for i in range(len(consts))]
    nodes = [
        h.make_node("Relu", ["x"], ["r"]),
        h.make_node(op, ["r", *names], ["n"], **attrs),
        h.make_node("Neg", ["n"], ["y"]),
    ]
    inits = [nh.from_array(c, n) for c, n in zip(consts, names, strict=True)]
    model = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [2, 3, 4])], inits)
    out, record = _cleanup(model)
    assert op_histogram(out) == {"Relu": 1, "Neg": 1}
    assert record.stats[f"removed_{op}"] == 1
    assert len(out.graph.initializer) == 0
    _same_outputs(model, out, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})


NOT_NO_OPS = [
    ("Cast", [], {"to": T.DOUBLE}, [2, 3, 4], T.DOUBLE),
    ("Reshape", [np.array([6, 4], np.int64)], {}, [6, 4], T.FLOAT),
    ("Transpose", [], {"perm": [0, 2, 1]}, [2, 4, 3], T.FLOAT),
    ("Expand", [np.array([5, 2, 3, 4], np.int64)], {}, [5, 2, 3, 4], T.FLOAT),
    (
        "Slice",
        [np.array([0], np.int64), np.array([3], np.int64), np.array([2], np.int64)],
        {},
        [2, 3, 3],
        T.FLOAT,
    ),
    ("Mul", [np.ones((5, 1, 1, 1), np.float32)], {}, [5, 2, 3, 4], T.FLOAT),
    ("Add", [np.full(4, 1e-3, np.float32)], {}, [2, 3, 4], T.FLOAT),
    ("Div", [np.ones(1, np.float32) * 2], {}, [2, 3, 4], T.FLOAT),
]


@pytest.mark.parametrize(
    ("op", "consts", "attrs", "shape", "elem"),
    NOT_NO_OPS,
    ids=[f"{o[0]}{i}" for i, o in enumerate(NOT_NO_OPS)],
)
def test_near_no_op_stays(op, consts, attrs, shape, elem) -> None:
    names = [f"c{i}" for i in range(len(consts))]
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node(op, ["r", *names], ["y"], **attrs)]
    inits = [nh.from_array(c, n) for c, n in zip(consts, names, strict=True)]
    model = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", shape, elem)], inits)
    out, record = _cleanup(model)
    assert op_histogram(out) == {"Relu": 1, op: 1}
    assert record.status == "unchanged"


def test_dropout_in_training_mode_or_with_read_mask_stays() -> None:
    nodes = [
        h.make_node("Dropout", ["x", "ratio", "train"], ["d"]),
        h.make_node("Dropout", ["d"], ["e", "mask"]),
        h.make_node("Cast", ["mask"], ["m"], to=T.FLOAT),
        h.make_node("Add", ["e", "m"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array(0.5, np.float32), "ratio"),
        nh.from_array(np.array(True), "train"),
    ]
    model = _model(nodes, [_vi("x", [4])], [_vi("y", [4])], inits)
    out, record = _cleanup(model)
    assert op_histogram(out)["Dropout"] == 2
    assert record.status == "unchanged"


def test_transposes_merge_and_cancel() -> None:
    nodes = [
        h.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
        h.make_node("Transpose", ["t1"], ["t2"], perm=[2, 0, 1]),
        h.make_node("Relu", ["t2"], ["y"]),
        h.make_node("Transpose", ["x"], ["u1"], perm=[1, 0, 2]),
        h.make_node("Transpose", ["u1"], ["u2"], perm=[1, 0, 2]),
        h.make_node("Neg", ["u2"], ["z"]),
    ]
    model = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [3, 2, 4]), _vi("z", [2, 3, 4])])
    out, record = _cleanup(model)
    assert op_histogram(out) == {"Transpose": 1, "Relu": 1, "Neg": 1}
    perm = next(n for n in out.graph.node if n.op_type == "Transpose").attribute[0].ints
    assert list(perm) == [1, 0, 2]
    _same_outputs(model, out, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})


def test_reshape_chain_reads_the_original_tensor() -> None:
    nodes = [
        h.make_node("Flatten", ["x"], ["f"], axis=1),
        h.make_node("Reshape", ["f", "s1"], ["r1"]),
        h.make_node("Reshape", ["r1", "s2"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array([4, 6], np.int64), "s1"),
        nh.from_array(np.array([3, 8], np.int64), "s2"),
    ]
    model = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [3, 8])], inits)
    out, _ = _cleanup(model)
    assert op_histogram(out) == {"Reshape": 1}
    assert out.graph.node[0].input[0] == "x"
    _same_outputs(model, out, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})


def test_duplicate_initializers_and_nodes_merge() -> None:
    w = RNG.standard_normal((4, 4)).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["a"]),
        h.make_node("MatMul", ["x", "w2"], ["b"]),  # same values as w1: merges after dedup
        h.make_node("Softmax", ["x"], ["s1"], axis=1),
        h.make_node("Softmax", ["x"], ["s2"], axis=1),
        h.make_node("Softmax", ["x"], ["s3"], axis=0),  # other attribute: stays
        h.make_node("Sum", ["a", "b", "s1", "s2", "s3"], ["y"]),
    ]
    inits = [nh.from_array(w, "w1"), nh.from_array(w.copy(), "w2")]
    model = _model(nodes, [_vi("x", [4, 4])], [_vi("y", [4, 4])], inits)
    out, record = _cleanup(model)
    assert op_histogram(out) == {"MatMul": 1, "Softmax": 2, "Sum": 1}
    assert len(out.graph.initializer) == 1
    assert record.stats["initializers_merged"] == 1
    assert record.stats["cse_merged"] == 2
    _same_outputs(model, out, {"x": RNG.standard_normal((4, 4)).astype(np.float32)})


def test_dead_nodes_and_unused_initializers_go_but_inputs_stay() -> None:
    nodes = [
        h.make_node("Relu", ["x"], ["y"]),
        h.make_node("Neg", ["x"], ["dead"]),
        h.make_node("Add", ["dead", "w"], ["dead2"]),
    ]
    inits = [
        nh.from_array(np.ones(3, np.float32), "w"),
        nh.from_array(np.ones(3, np.float32), "unused"),
    ]
    inputs = [_vi("x", [3]), _vi("extra", ["n", 2], T.INT64)]
    model = _model(nodes, inputs, [_vi("y", [3])], inits)
    out, record = _cleanup(model)
    assert op_histogram(out) == {"Relu": 1}
    assert len(out.graph.initializer) == 0
    assert [i.name for i in out.graph.input] == ["x", "extra"]
    assert out.graph.input[1] == model.graph.input[1]
    assert record.stats["nodes_removed"] == 2


def test_output_names_survive_and_input_to_output_identity_stays() -> None:
    nodes = [
        h.make_node("Relu", ["x"], ["r"]),
        h.make_node("Identity", ["r"], ["y"]),
        h.make_node("Identity", ["x"], ["z"]),
    ]
    model = _model(nodes, [_vi("x", [3])], [_vi("y", [3]), _vi("z", [3])])
    out, _ = _cleanup(model)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert op_histogram(out) == {"Relu": 1, "Identity": 1}
    assert out.graph.node[0].output[0] == "y" or out.graph.node[1].output[0] == "y"
    assert [o.type for o in out.graph.output] == [o.type for o in model.graph.output]


def test_if_branches_are_cleaned_recursively() -> None:
    then_g = h.make_graph(
        [h.make_node("Identity", ["x"], ["a"]), h.make_node("Mul", ["a", "one"], ["t"])],
        "then",
        [],
        [_vi("t", [3])],
        initializer=[nh.from_array(np.ones(3, np.float32), "one")],
    )
    else_g = h.make_graph(
        [h.make_node("Dropout", ["x"], ["b"]), h.make_node("Neg", ["b"], ["e"])],
        "else",
        [],
        [_vi("e", [3])],
    )
    nodes = [h.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = _model(nodes, [_vi("x", [3]), _vi("cond", [], T.BOOL)], [_vi("y", [3])])
    out, record = _cleanup(model)
    attrs = {a.name: a.g for a in out.graph.node[0].attribute}
    # The then-branch output must stay a value of that branch: x * 1 keeps one node there.
    assert [n.op_type for n in attrs["else_branch"].node] == ["Neg"]
    assert record.stats["removed_Identity"] == 1 and record.stats["removed_Dropout"] == 1
    x = RNG.standard_normal(3).astype(np.float32)
    for cond in (True, False):
        _same_outputs(model, out, {"x": x, "cond": np.array(cond)})


def test_dropout_whose_mask_is_a_graph_output_stays() -> None:
    """The user reads the mask: the Dropout computes it, so it is not a no-op (issue #16)."""
    node = h.make_node("Dropout", ["x"], ["y", "mask"])
    outputs = [_vi("y", [2, 3]), _vi("mask", [2, 3], T.BOOL)]
    model = _model([node], [_vi("x", [2, 3])], outputs)
    out, record = _cleanup(model)  # strict: a rollback would raise
    assert op_histogram(out)["Dropout"] == 1 and record.status == "unchanged"
    feed = {"x": RNG.standard_normal((2, 3)).astype(np.float32)}
    _same_outputs(model, out, feed)

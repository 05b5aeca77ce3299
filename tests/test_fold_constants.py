"""fold-constants: what folds, what the size guard keeps, control flow, domains it leaves alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import PassContext, optimize, verify
from onnxopt.graph import op_histogram, to_graph, to_model
from onnxopt.model import tensor_bytes
from onnxopt.passes.fold_constants import FoldConstants
from onnxopt.passes.simplify_rules import evaluate as evaluate_module
from onnxopt.runtime import create_session
from onnxopt.test_models import builders

OPSET = [h.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, inits=(), opsets=OPSET) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = h.make_model(graph, opset_imports=list(opsets), ir_version=8)
    return model


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return create_session(model, optimization="disable").run(None, feed)


def _fold_direct(model: onnx.ModelProto, **options):
    """Run the pass on the graph without the pipeline (for models ORT cannot load)."""
    graph = to_graph(model)
    result = FoldConstants(**options)(graph, PassContext())
    return result, to_model(graph, like=model)


def _signature(model: onnx.ModelProto) -> list:
    return [
        (
            vi.name,
            vi.type.tensor_type.elem_type,
            [(d.dim_value, d.dim_param) for d in vi.type.tensor_type.shape.dim],
        )
        for vi in model.graph.input
    ]


def test_cnn_shape_chain_and_constant_node_fold() -> None:
    model = builders.cnn(seed=0)
    result = optimize(model, "fold-constants", strict=True)
    ops = op_histogram(result.model)
    # Shape->Gather->Unsqueeze->Concat and the Constant node: 5 nodes gone, nothing else.
    assert len(result.model.graph.node) == 23
    for op in ("Shape", "Gather", "Unsqueeze", "Constant"):
        assert ops[op] == 0
    assert ops["Concat"] == 1  # the channel concat stays
    assert result.records[0].stats["shapes_folded"] == 1
    assert result.records[0].stats["constants_lowered"] == 1
    assert _signature(result.model) == _signature(model)
    assert [o.name for o in result.model.graph.output] == ["logits"]
    report = verify(model, result.model, rtol=1e-6, atol=1e-7, samples=2)
    assert report.passed


def test_partly_dynamic_shape_folds_only_known_dims() -> None:
    model = builders.cnn(seed=1, batch=None)
    result = optimize(model, "fold-constants", strict=True)
    assert op_histogram(result.model)["Shape"] == 0
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    report = verify(model, result.model, rtol=1e-6, atol=1e-7, shape={"image": (3, 3, 32, 32)})
    assert report.passed


def test_shape_of_dynamic_dim_is_not_folded() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, ["n", 4])
    y = h.make_tensor_value_info("y", T.INT64, [1])
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Gather", ["s", "zero"], ["y"], axis=0),
    ]
    zero = nh.from_array(np.array([0], np.int64), "zero")
    model = _model(nodes, [x], [y], [zero])
    result = optimize(model, "fold-constants", strict=True)
    assert op_histogram(result.model) == {"Shape": 1, "Gather": 1}
    out = _run(result.model, {"x": np.zeros((7, 4), np.float32)})[0]
    assert out.tolist() == [7]


def test_reshape_target_from_own_shape_becomes_constant() -> None:
    # Reshape(x, Concat(Shape(x)[0:1], [12])) == Reshape(x, [0, 12]) for x [n, 3, 4]:
    # the dim read at its own position becomes 0 (copy).
    x = h.make_tensor_value_info("x", T.FLOAT, ["n", 3, 4])
    y = h.make_tensor_value_info("y", T.FLOAT, ["n", 12])
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Slice", ["s", "st", "en"], ["b"]),
        h.make_node("Concat", ["b", "twelve"], ["target"], axis=0),
        h.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array([0], np.int64), "st"),
        nh.from_array(np.array([1], np.int64), "en"),
        nh.from_array(np.array([12], np.int64), "twelve"),
    ]
    model = _model(nodes, [x], [y], inits)
    result = optimize(model, "fold-constants", strict=True)
    assert op_histogram(result.model) == {"Reshape": 1}
    target = nh.to_array(next(t for t in result.model.graph.initializer))
    assert target.tolist() == [0, 12]
    feed = {"x": np.arange(5 * 12, dtype=np.float32).reshape(5, 3, 4)}
    assert np.array_equal(_run(result.model, feed)[0], feed["x"].reshape(5, 12))


def test_reshape_target_from_another_tensors_same_symbolic_dim_becomes_constant() -> None:
    # Attention-style: the batch dim is read from the MatMul's input x and used to
    # reshape the MatMul's output; shape inference names both dims "n", so the
    # target becomes [0, 8, 2, 3]. A dim of another symbol ("m") must not fold.
    x = h.make_tensor_value_info("x", T.FLOAT, ["n", 8, 4])
    other = h.make_tensor_value_info("other", T.FLOAT, ["m", 8])
    y = h.make_tensor_value_info("y", T.FLOAT, ["n", 8, 2, 3])
    z = h.make_tensor_value_info("z", T.FLOAT, ["m", 8, 2, 3])
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["proj"]),
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Gather", ["s", "zero"], ["batch"], axis=0),
        h.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        h.make_node("Concat", ["batch1", "rest"], ["target"], axis=0),
        h.make_node("Reshape", ["proj", "target"], ["y"]),
        h.make_node("Shape", ["other"], ["s2"]),
        h.make_node("Gather", ["s2", "zero"], ["m"], axis=0),
        h.make_node("Unsqueeze", ["m", "axes"], ["m1"]),
        h.make_node("Concat", ["m1", "rest"], ["target2"], axis=0),
        h.make_node("Reshape", ["proj", "target2"], ["z"]),
    ]
    inits = [
        nh.from_array(np.ones((4, 6), np.float32), "w"),
        nh.from_array(np.array(0, np.int64), "zero"),
        nh.from_array(np.array([0], np.int64), "axes"),
        nh.from_array(np.array([8, 2, 3], np.int64), "rest"),
    ]
    model = _model(nodes, [x, other], [y, z], inits)
    result = optimize(model, "fold-constants", strict=True)
    reshapes = [n for n in result.model.graph.node if n.op_type == "Reshape"]
    constants = {t.name: nh.to_array(t) for t in result.model.graph.initializer}
    assert constants[reshapes[0].input[1]].tolist() == [0, 8, 2, 3]
    assert reshapes[1].input[1] not in constants  # "m" is not "n": still computed
    feed = {
        "x": np.random.default_rng(0).standard_normal((5, 8, 4)).astype(np.float32),
        "other": np.zeros((5, 8), np.float32),
    }
    expected = _run(model, feed)
    for got, want in zip(_run(result.model, feed), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_independent_regions_are_computed_in_one_session(monkeypatch) -> None:
    calls: list[int] = []
    real = evaluate_module.run_all

    def counting(nodes, outputs, opsets, threads=None):
        calls.append(len(outputs))
        return real(nodes, outputs, opsets, threads)

    monkeypatch.setattr(evaluate_module, "run_all", counting)
    x = h.make_tensor_value_info("x", T.FLOAT, [4])
    outs, nodes, inits = [], [], []
    for i in range(6):
        inits += [nh.from_array(np.full(4, i + 1, np.float32), f"a{i}")]
        nodes += [
            h.make_node("Sqrt", [f"a{i}"], [f"r{i}"]),
            h.make_node("Neg", [f"r{i}"], [f"n{i}"]),
            h.make_node("Add", ["x", f"n{i}"], [f"y{i}"]),
        ]
        outs.append(h.make_tensor_value_info(f"y{i}", T.FLOAT, [4]))
    model = _model(nodes, [x], outs, inits)
    result = optimize(model, "fold-constants", strict=True)
    assert calls == [6]  # six frontier tensors, one session
    assert op_histogram(result.model) == {"Add": 6}
    feed = {"x": np.ones(4, np.float32)}
    got = _run(result.model, feed)
    for i, value in enumerate(got):
        np.testing.assert_allclose(value, 1 - np.sqrt(i + 1), rtol=1e-6)


def _generators_model() -> onnx.ModelProto:
    x = h.make_tensor_value_info("x", T.FLOAT, [1, 64, 32, 32])
    y = h.make_tensor_value_info("y", T.FLOAT, [1, 64, 32, 32])
    nodes = [
        h.make_node(
            "ConstantOfShape",
            ["shape"],
            ["filled"],
            value=nh.from_array(np.array([0.5], np.float32)),
        ),
        h.make_node("Expand", ["row", "shape"], ["expanded"]),
        h.make_node("Tile", ["one", "reps"], ["tiled"]),
        h.make_node("Add", ["x", "filled"], ["a"]),
        h.make_node("Mul", ["a", "expanded"], ["b"]),
        h.make_node("Sub", ["b", "tiled"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array([1, 64, 32, 32], np.int64), "shape"),
        nh.from_array(np.linspace(0.5, 1.5, 32, dtype=np.float32), "row"),
        nh.from_array(np.ones((1, 1, 1, 32), np.float32), "one"),
        nh.from_array(np.array([1, 64, 32, 1], np.int64), "reps"),
    ]
    return _model(nodes, [x], [y], inits)


def test_size_guard_keeps_large_generator_outputs() -> None:
    model = _generators_model()
    result = optimize(model, "fold-constants", strict=True)
    ops = op_histogram(result.model)
    assert ops["ConstantOfShape"] == ops["Expand"] == ops["Tile"] == 1
    assert result.records[0].stats["kept_growth"] == 3
    assert tensor_bytes(result.model) <= tensor_bytes(model)
    assert result.model.ByteSize() <= model.ByteSize() + 64
    assert any("grow the model" in note for note in result.records[0].notes)


def test_size_guard_can_be_relaxed_and_threshold_still_applies() -> None:
    model = _generators_model()
    loose = optimize(model, "fold-constants(growth_limit=10000000)", strict=True)
    assert op_histogram(loose.model) == {"Add": 1, "Mul": 1, "Sub": 1}
    assert tensor_bytes(loose.model) >= 3 * 64 * 32 * 32 * 4
    feed = {"x": np.random.default_rng(0).standard_normal((1, 64, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(_run(loose.model, feed)[0], _run(model, feed)[0], rtol=1e-6)
    # 256 KiB per folded tensor is over a 100 KB threshold, whatever the growth limit.
    capped = optimize(model, "fold-constants(growth_limit=10000000,size_threshold=100000)")
    assert op_histogram(capped.model)["ConstantOfShape"] == 1
    assert capped.records[0].stats["kept_large"] == 3


def test_small_generator_output_folds() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, [8])
    y = h.make_tensor_value_info("y", T.FLOAT, [8])
    nodes = [
        h.make_node("Range", ["start", "limit", "delta"], ["r"]),
        h.make_node("Cast", ["r"], ["rf"], to=T.FLOAT),
        h.make_node("Add", ["x", "rf"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array(v, np.int64), n)
        for v, n in ((0, "start"), (8, "limit"), (1, "delta"))
    ]
    model = _model(nodes, [x], [y], inits)
    result = optimize(model, "fold-constants", strict=True)
    assert op_histogram(result.model) == {"Add": 1}
    out = _run(result.model, {"x": np.zeros(8, np.float32)})[0]
    assert out.tolist() == list(range(8))


def _if_model() -> onnx.ModelProto:
    """y = Relu(If(sum([1, 2]) > 0, x + 2w, x - w)); a branch reuses the outer name 't'."""
    x = h.make_tensor_value_info("x", T.FLOAT, [2, 3])
    y = h.make_tensor_value_info("y", T.FLOAT, [2, 3])
    then_g = h.make_graph(
        [h.make_node("Mul", ["w", "two"], ["tw"]), h.make_node("Add", ["x", "tw"], ["t"])],
        "then",
        [],
        [h.make_tensor_value_info("t", T.FLOAT, [2, 3])],
        initializer=[nh.from_array(np.array(2.0, np.float32), "two")],
    )
    else_g = h.make_graph(
        [h.make_node("Sub", ["x", "w"], ["e"])],
        "else",
        [],
        [h.make_tensor_value_info("e", T.FLOAT, [2, 3])],
    )
    nodes = [
        h.make_node("Constant", [], ["c1"], value=nh.from_array(np.array([1, 2], np.int64))),
        h.make_node("ReduceSum", ["c1"], ["s"], keepdims=0),
        h.make_node("Greater", ["s", "zero"], ["cond"]),
        h.make_node("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g),
        h.make_node("Relu", ["r"], ["t"]),
        h.make_node("Neg", ["t"], ["y"]),
    ]
    inits = [
        nh.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) - 2, "w"),
        nh.from_array(np.array(0, np.int64), "zero"),
    ]
    return _model(nodes, [x], [y], inits)


def test_if_with_constant_condition_becomes_taken_branch() -> None:
    model = _if_model()
    result = optimize(model, "fold-constants", strict=True)
    stats = result.records[0].stats
    assert stats["ifs_inlined"] == 1
    # The condition chain and the If are gone; x + (2w folded) remains.
    assert op_histogram(result.model) == {"Add": 1, "Relu": 1, "Neg": 1}
    names = [o for n in result.model.graph.node for o in n.output]
    assert len(names) == len(set(names))
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    w = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    np.testing.assert_allclose(_run(result.model, {"x": x})[0], -np.maximum(x + 2 * w, 0))


def test_if_with_graph_output_keeps_name() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, [3])
    y = h.make_tensor_value_info("y", T.FLOAT, [3])
    branch = h.make_graph(
        [h.make_node("Abs", ["x"], ["b"])], "b", [], [h.make_tensor_value_info("b", T.FLOAT, [3])]
    )
    other = h.make_graph(
        [h.make_node("Neg", ["x"], ["c"])], "c", [], [h.make_tensor_value_info("c", T.FLOAT, [3])]
    )
    nodes = [h.make_node("If", ["cond"], ["y"], then_branch=other, else_branch=branch)]
    model = _model(nodes, [x], [y], [nh.from_array(np.array(False), "cond")])
    result = optimize(model, "fold-constants", strict=True)
    assert op_histogram(result.model) == {"Abs": 1}
    assert [o.name for o in result.model.graph.output] == ["y"]
    out = _run(result.model, {"x": np.array([-1, 2, -3], np.float32)})[0]
    assert out.tolist() == [1, 2, 3]


def test_loop_body_is_folded_and_nested_if_inlined() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, [3])
    y = h.make_tensor_value_info("y", T.FLOAT, [3])
    inner_then = h.make_graph(
        [h.make_node("Mul", ["kw", "half"], ["p"])],
        "then",
        [],
        [h.make_tensor_value_info("p", T.FLOAT, [3])],
    )
    inner_else = h.make_graph(
        [h.make_node("Neg", ["kw"], ["q"])],
        "else",
        [],
        [h.make_tensor_value_info("q", T.FLOAT, [3])],
    )
    body = h.make_graph(
        [
            h.make_node(
                "Constant", [], ["k"], value=nh.from_array(np.array([1, 2, 3], np.float32))
            ),
            h.make_node("Mul", ["k", "w"], ["kw"]),
            h.make_node("If", ["flag"], ["step"], then_branch=inner_then, else_branch=inner_else),
            h.make_node("Add", ["acc", "step"], ["acc_out"]),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("acc", T.FLOAT, [3]),
        ],
        [
            h.make_tensor_value_info("cond_out", T.BOOL, []),
            h.make_tensor_value_info("acc_out", T.FLOAT, [3]),
        ],
    )
    inits = [
        nh.from_array(np.array(4, np.int64), "n"),
        nh.from_array(np.array(True), "c"),
        nh.from_array(np.array(True), "flag"),
        nh.from_array(np.array([0.5, 0.25, 2.0], np.float32), "w"),
        nh.from_array(np.array(0.5, np.float32), "half"),
    ]
    model = _model([h.make_node("Loop", ["n", "c", "x"], ["y"], body=body)], [x], [y], inits)
    result = optimize(model, "fold-constants", strict=True)
    stats = result.records[0].stats
    assert stats["ifs_inlined"] == 1 and stats["subgraphs"] == 1
    loop = result.model.graph.node[0]
    assert sorted(n.op_type for n in loop.attribute[0].g.node) == ["Add", "Identity"]
    feed = {"x": np.array([1, 1, 1], np.float32)}
    expected = 1 + 4 * np.array([0.25, 0.25, 3.0], np.float32)
    np.testing.assert_allclose(_run(result.model, feed)[0], expected, rtol=1e-6)


def test_custom_domain_node_is_left_alone() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, [4])
    y = h.make_tensor_value_info("y", T.FLOAT, [4])
    nodes = [
        h.make_node("Add", ["a", "b"], ["ab"]),
        h.make_node("MyOp", ["ab"], ["c"], domain="com.example"),
        h.make_node("Mul", ["x", "c"], ["y"]),
    ]
    inits = [nh.from_array(np.ones(4, np.float32), "a"), nh.from_array(np.ones(4, np.float32), "b")]
    opsets = [*OPSET, h.make_opsetid("com.example", 1)]
    model = _model(nodes, [x], [y], inits, opsets)
    # ORT cannot run com.example, so the pass is tested on the graph, outside the pipeline.
    result, out = _fold_direct(model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["MyOp", "Mul"]
    assert result.stats["tensors_folded"] == 1
    folded = nh.to_array(next(t for t in out.graph.initializer if t.name == "ab"))
    assert folded.tolist() == [2, 2, 2, 2]


def test_contrib_ops_run_but_are_not_folded() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, [2, 4])
    y = h.make_tensor_value_info("y", T.FLOAT, [2, 4])
    nodes = [
        h.make_node("Add", ["a", "b"], ["ab"]),
        h.make_node("Gelu", ["ab"], ["g"], domain="com.microsoft"),
        h.make_node("Gelu", ["x"], ["gx"], domain="com.microsoft"),
        h.make_node("Add", ["gx", "g"], ["y"]),
    ]
    inits = [
        nh.from_array(np.full((2, 4), 0.5, np.float32), "a"),
        nh.from_array(np.full((2, 4), 0.25, np.float32), "b"),
    ]
    model = _model(nodes, [x], [y], inits, [*OPSET, h.make_opsetid("com.microsoft", 1)])
    result = optimize(model, "simplify", strict=True)
    ops = op_histogram(result.model)
    assert ops["Gelu"] == 2 and ops["Add"] == 1
    assert any(o.domain == "com.microsoft" for o in result.model.opset_import)
    report = verify(model, result.model, rtol=1e-6, atol=1e-7)
    assert report.passed


def test_random_and_qdq_nodes_stay() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, [4])
    y = h.make_tensor_value_info("y", T.FLOAT, [4])
    z = h.make_tensor_value_info("z", T.FLOAT, [4])
    nodes = [
        h.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
        h.make_node("Mul", ["x", "w"], ["y"]),
        h.make_node("RandomNormalLike", ["w"], ["noise"], seed=1.0),
        h.make_node("Add", ["x", "noise"], ["z"]),
    ]
    inits = [
        nh.from_array(np.array([1, 2, 3, 4], np.int8), "wq"),
        nh.from_array(np.array(0.5, np.float32), "scale"),
        nh.from_array(np.array(0, np.int8), "zp"),
    ]
    model = _model(nodes, [x], [y, z], inits)
    result = optimize(model, "fold-constants", strict=True)
    assert result.records[0].status == "unchanged"
    assert op_histogram(result.model)["DequantizeLinear"] == 1
    assert op_histogram(result.model)["RandomNormalLike"] == 1


def test_constant_graph_output_keeps_name_and_type() -> None:
    x = h.make_tensor_value_info("x", T.FLOAT, [2])
    y = h.make_tensor_value_info("y", T.FLOAT, [2])
    k = h.make_tensor_value_info("k", T.INT64, [2])
    nodes = [h.make_node("Relu", ["x"], ["y"]), h.make_node("Add", ["a", "a"], ["k"])]
    model = _model(nodes, [x], [y, k], [nh.from_array(np.array([3, 4], np.int64), "a")])
    result = optimize(model, "fold-constants", strict=True)
    assert [o.name for o in result.model.graph.output] == ["y", "k"]
    assert result.model.graph.output[1].type.tensor_type.elem_type == T.INT64
    assert _run(result.model, {"x": np.zeros(2, np.float32)})[1].tolist() == [6, 8]
    again = optimize(result.model, "fold-constants", strict=True)
    assert again.records[0].status == "unchanged"


def test_a_region_ort_cannot_compute_is_isolated() -> None:
    # Reshape of 6 elements to [4] fails in ORT; the other region still folds.
    x = h.make_tensor_value_info("x", T.FLOAT, [4])
    y = h.make_tensor_value_info("y", T.FLOAT, [4])
    z = h.make_tensor_value_info("z", T.FLOAT, [4])
    nodes = [
        h.make_node("Reshape", ["six", "four"], ["bad"]),
        h.make_node("Add", ["x", "bad"], ["y"]),
        h.make_node("Neg", ["good"], ["ng"]),
        h.make_node("Add", ["x", "ng"], ["z"]),
    ]
    inits = [
        nh.from_array(np.arange(6, dtype=np.float32), "six"),
        nh.from_array(np.array([4], np.int64), "four"),
        nh.from_array(np.ones(4, np.float32), "good"),
    ]
    model = _model(nodes, [x], [y, z], inits)
    result, out = _fold_direct(model)
    assert result.stats["eval_failures"] == 1
    assert result.stats["tensors_folded"] == 1
    assert [n.op_type for n in out.graph.node] == ["Reshape", "Add", "Add"]


@pytest.mark.parametrize("bad", ["size_threshold=big", "unknown=1"])
def test_bad_options_are_user_errors(bad: str) -> None:
    from onnxopt import PassError

    with pytest.raises(PassError):
        optimize(builders.cnn(), f"fold-constants({bad})")


def test_minus_one_dim_value_is_unknown_not_a_size() -> None:
    # Some exporters write dim_value -1 for a dynamic dim: Shape(x)[0] must not fold to -1.
    x = h.make_tensor_value_info("x", T.FLOAT, [-1, 4])
    y = h.make_tensor_value_info("y", T.INT64, [1])
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Gather", ["s", "zero"], ["y"], axis=0),
    ]
    model = _model(nodes, [x], [y], [nh.from_array(np.array([0], np.int64), "zero")])
    result, out = _fold_direct(model)
    assert result.stats.get("shapes_folded", 0) == 0
    assert [n.op_type for n in out.graph.node] == ["Shape", "Gather"]

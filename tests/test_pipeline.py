"""Pipeline: order, repeated groups, checks after each pass, rollback and --strict."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxopt import (
    ModelError,
    OutputError,
    PassContext,
    PassError,
    PassResult,
    Pipeline,
    optimize,
    register_pass,
)
from onnxopt.graph import bypass, tidy
from onnxopt.pass_api import unregister_pass


def identity_chain(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["t0"])]
    nodes += [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("Neg", [f"t{n}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def test_passes():
    @register_pass("t-drop-one-identity")
    def drop_one(graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Remove the first Identity only, so that a group needs several rounds."""
        for node in graph.nodes:
            if node.op == "Identity":
                bypass(graph, node)
                tidy(graph)
                return PassResult(True, {"removed": 1})
        return PassResult(False)

    @register_pass("t-dangling-input")
    def dangling(graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Wire a node to a tensor nobody produces: the checker must refuse it."""
        ghost = gs.Variable("ghost", dtype=np.float32, shape=[2, 3])
        out = graph.outputs[0]
        node = next(n for n in graph.nodes if out in n.outputs)
        node.inputs[0] = ghost
        return PassResult(True)

    @register_pass("t-custom-op")
    def custom(graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Insert an op of a domain ORT does not know: the checker passes, ORT does not."""
        out = graph.outputs[0]
        mid = gs.Variable("mid", dtype=np.float32, shape=[2, 3])
        node = next(n for n in graph.nodes if out in n.outputs)
        node.outputs[0] = mid
        graph.nodes.append(gs.Node("Mystery", domain="com.example", inputs=[mid], outputs=[out]))
        graph.import_domains = None
        return PassResult(True)

    @register_pass("t-raise")
    def explode(graph: gs.Graph, ctx: PassContext) -> PassResult:
        """A pass with a bug."""
        raise ZeroDivisionError("boom")

    yield
    for name in ("t-drop-one-identity", "t-dangling-input", "t-custom-op", "t-raise"):
        unregister_pass(name)


def run_model(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_group_repeats_until_nothing_changes(test_passes) -> None:
    result = optimize(identity_chain(3), "{t-drop-one-identity}")
    assert result.nodes_before == 5 and result.nodes_after == 2
    assert [(r.round, r.status) for r in result.records] == [
        (1, "changed"),
        (2, "changed"),
        (3, "changed"),
        (4, "unchanged"),
    ]
    assert [r.nodes_after for r in result.records] == [4, 3, 2, 2]
    assert all(r.seconds > 0 for r in result.records)
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_model(result.model, x), -np.maximum(x, 0))


def test_passes_outside_a_group_run_once_in_order(test_passes) -> None:
    result = optimize(identity_chain(3), "t-drop-one-identity,t-drop-one-identity")
    assert [r.nodes_after for r in result.records] == [4, 3]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [("t-dangling-input", "ghost"), ("t-custom-op", "ORT|Runtime"), ("t-raise", "ZeroDivision")],
)
def test_a_broken_pass_is_rolled_back(test_passes, spec: str, reason: str) -> None:
    model = identity_chain(2)
    result = optimize(model, f"t-drop-one-identity,{spec},t-drop-one-identity")
    statuses = [r.status for r in result.records]
    assert statuses == ["changed", "rolled back", "changed"]
    broken = result.rolled_back[0]
    assert broken.nodes_after == broken.nodes_before == 3
    assert broken.error and __import__("re").search(reason, broken.error)
    assert result.nodes_after == 2
    onnx.checker.check_model(result.model, full_check=True)


def test_strict_turns_a_rollback_into_an_error(test_passes) -> None:
    with pytest.raises(PassError, match="t-dangling-input.*--strict"):
        Pipeline("t-dangling-input", strict=True).run(identity_chain(1))


def test_pipeline_never_modifies_the_callers_model(test_passes) -> None:
    model = identity_chain(3)
    before = model.SerializeToString()
    optimize(model, "{t-drop-one-identity}")
    assert model.SerializeToString() == before


def test_graph_output_names_survive_bypassing_their_producer(test_passes) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = optimize(model, "t-drop-one-identity")
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert [n.op_type for n in result.model.graph.node] == ["Relu"]


def test_long_loops_report_progress(tmp_path) -> None:
    from onnxopt import optimize_file
    from onnxopt.test_models.digits import DIGITS_CNN, load_digits_split

    x_train = load_digits_split()[0]
    np.savez(tmp_path / "calib.npz", image=x_train[:12])
    events: list[tuple[str, int, int | None]] = []
    optimize_file(
        DIGITS_CNN,
        tmp_path / "q.onnx",
        passes="quantize",
        data=tmp_path / "calib.npz",
        progress=lambda label, done, total: events.append((label, done, total)),
    )
    assert events, "calibration reported nothing"
    label, done, total = events[-1]
    assert "calibrat" in label.lower() and done == 12
    assert [e[1] for e in events] == sorted(e[1] for e in events)


def test_a_model_ort_cannot_load_is_checked_with_the_onnx_checker_only(test_passes) -> None:
    # An op of a domain ORT does not know, before any pass: ORT's check would refuse
    # every pass's output, through no fault of the pass.
    model = identity_chain(2)
    model.graph.node[-1].op_type, model.graph.node[-1].domain = "Mystery", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(Exception, match="Mystery"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result = optimize(model, "t-drop-one-identity,t-dangling-input,t-drop-one-identity")
    assert [r.status for r in result.records] == ["changed", "rolled back", "changed"]
    first, broken, last = result.records
    assert any("onnx checker only" in note and "Mystery" in note for note in first.notes)
    assert not last.notes  # said once
    assert "ghost" in (broken.error or "")  # the checker still refuses a broken graph
    assert result.nodes_after == 2
    onnx.checker.check_model(result.model, full_check=True)


def test_an_input_ort_refuses_without_a_custom_op_is_refused_before_any_pass() -> None:
    # Relu of opset 1 passes the full onnx checker; ORT has no kernel for it, so
    # "optimizing" it would write a model nothing can load.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    ran: list[str] = []
    with pytest.raises(ModelError, match=r"does not load in ONNX Runtime \(.*Relu\(1\)") as caught:
        optimize(model, "simplify", PassContext(progress=lambda *a: ran.append(a[0])))
    assert "\n" not in str(caught.value) and ran == []


def test_a_pass_option_naming_the_model_given_by_path_is_refused(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(identity_chain(2), path)
    before = path.read_bytes()
    with pytest.raises(OutputError, match=r"option cache=.*m.onnx, a file this run reads"):
        optimize(str(path), f"quantize(cache={path})")
    assert path.read_bytes() == before


def test_an_op_ort_has_only_for_other_types_here_is_still_optimized() -> None:
    # Exp in bfloat16: ORT's CPU provider has no such kernel (a GPU has), ORT has Exp(13).
    graph = helper.make_graph(
        [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Identity", ["e"], ["y"])],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(Exception, match=r"NOT_IMPLEMENTED.*Exp\(13\)"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result = optimize(model, "simplify")
    assert [n.op_type for n in result.model.graph.node] == ["Exp"]


def test_a_rolled_back_pass_leaves_the_model_byte_for_byte(test_passes) -> None:
    """Weak oracle #23.11: node counts are what a rollback sets; the bytes are the proof."""
    model = identity_chain(2)
    alone = optimize(model, "t-drop-one-identity").model.SerializeToString()
    for spec in ("t-dangling-input", "t-custom-op", "t-raise"):
        result = optimize(model, f"t-drop-one-identity,{spec}")
        assert result.records[-1].status == "rolled back"
        assert result.model.SerializeToString() == alone, spec


def test_a_model_above_the_disk_check_size_is_checked_and_rolled_back(test_passes) -> None:
    """#23.9: at DISK_SESSION_BYTES and above the checks run on a saved copy with external
    data; a breaking pass on such a model must still be rolled back, the model unchanged."""
    from onnx import numpy_helper

    from onnxopt.runtime import DISK_SESSION_BYTES

    model = identity_chain(2)
    rng = np.random.default_rng(0)
    big = rng.standard_normal(DISK_SESSION_BYTES // 4 + 1024).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(big, "big"))
    model.graph.node.insert(0, helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0))
    model.graph.node[-1].CopyFrom(helper.make_node("Sub", ["t2", "total"], ["y"]))
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    for spec in ("t-dangling-input", "t-custom-op"):
        result = optimize(model, spec)
        assert result.records[-1].status == "rolled back", spec
        assert result.model.SerializeToString() == before, spec
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(run_model(result.model, x), x - big.sum(), rtol=1e-4)

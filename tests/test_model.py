"""Model I/O: load from path/bytes/proto, external data safety, atomic saves, opset helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import ExternalDataError, ModelError
from onnxopt.model import (
    check_model,
    default_opset,
    iter_tensors,
    load_model,
    save_model,
    tensor_bytes,
    upgrade_opset,
)


def small_model(opset: int = 13, size: int = 64) -> onnx.ModelProto:
    weight = numpy_helper.from_array(
        np.arange(size * size, dtype=np.float32).reshape(size, size), "w"
    )
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def save_external(model: onnx.ModelProto, folder: Path, location: str) -> Path:
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def test_load_from_path_bytes_and_proto_give_the_same_model(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    from_path = load_model(path)
    from_bytes = load_model(path.read_bytes())
    from_proto = load_model(model)
    assert from_path == from_bytes == from_proto == model
    from_proto.graph.node[0].name = "changed"
    assert model.graph.node[0].name == "", "loading a ModelProto must copy it"


def test_external_data_is_loaded(tmp_path: Path) -> None:
    path = save_external(small_model(), tmp_path, "weights.bin")
    assert (tmp_path / "weights.bin").stat().st_size == 64 * 64 * 4
    model = load_model(path)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    assert weight[3, 5] == 3 * 64 + 5


def test_external_data_outside_the_folder_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    path = save_external(small_model(), inner, "weights.bin")
    (tmp_path / "secret.bin").write_bytes((inner / "weights.bin").read_bytes())
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(model, path)
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        load_model(path)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = str(tmp_path / "secret.bin")
    onnx.save(model, path)
    with pytest.raises(ExternalDataError, match="absolute"):
        load_model(path)


def test_missing_external_file_is_reported(tmp_path: Path) -> None:
    path = save_external(small_model(), tmp_path, "weights.bin")
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ExternalDataError, match="weights.bin.*missing"):
        load_model(path)


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    model = small_model()
    data = model.SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated|not a valid"):
        load_model(truncated)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelError):
        load_model(text)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "absent.onnx")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    save_model(small_model(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert onnx.load(target).graph.node[0].op_type == "MatMul"


def test_save_refuses_the_input_path_and_missing_folders(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(small_model(), source)
    before = source.read_bytes()
    with pytest.raises(ModelError, match="is the input model"):
        save_model(small_model(size=8), source, input_path=source)
    with pytest.raises(ModelError, match="is the input model"):
        save_model(small_model(size=8), tmp_path / "." / "in.onnx", input_path=source)
    assert source.read_bytes() == before
    with pytest.raises(ModelError, match="does not exist"):
        save_model(small_model(), tmp_path / "missing" / "out.onnx")


def test_save_with_external_data_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "big.onnx"
    save_model(small_model(), target, external_data=True)
    assert (tmp_path / "big.onnx.data").is_file()
    assert target.stat().st_size < 1000
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), np.float32)
    expected = x @ np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected)


def test_models_over_2gb_are_saved_with_external_data(tmp_path: Path) -> None:
    big = small_model(size=8)
    chunk = int(0.7 * 2**30)
    for i in range(3):  # 2.1 GB in all: more than one protobuf can hold
        tensor = big.graph.initializer.add()
        tensor.name, tensor.data_type = f"blob{i}", TensorProto.FLOAT
        tensor.dims.append(chunk // 4)
        # Distinct, non-zero blobs: a writer that swaps, repeats or zero-fills one is seen.
        tensor.raw_data = (np.arange(chunk // 4, dtype=np.uint32) * (2 * i + 3) + i + 1).tobytes()
    assert tensor_bytes(big) > 2**31
    target = tmp_path / "huge.onnx"
    save_model(big, target)
    assert (tmp_path / "huge.onnx.data").stat().st_size >= 3 * chunk
    assert target.stat().st_size < 10_000
    stored = onnx.load(target, load_external_data=False)
    assert [t.name for t in stored.graph.initializer] == ["w", "blob0", "blob1", "blob2"]
    info = {e.key: e.value for e in stored.graph.initializer[3].external_data}
    assert info["location"] == "huge.onnx.data" and int(info["length"]) == chunk
    assert len(big.graph.initializer[3].raw_data) == chunk, "the caller's model keeps its data"
    with open(tmp_path / "huge.onnx.data", "rb") as data:  # every blob back, byte for byte
        for written, kept in zip(
            stored.graph.initializer[1:], big.graph.initializer[1:], strict=True
        ):
            entry = {e.key: e.value for e in written.external_data}
            data.seek(int(entry.get("offset", 0)))
            step = 64 * 2**20
            for start in range(0, int(entry["length"]), step):
                assert data.read(min(step, chunk - start)) == kept.raw_data[start : start + step]


def test_default_opset_and_upgrade() -> None:
    model = small_model(opset=11)
    assert default_opset(model) == 11
    upgraded = upgrade_opset(model, 13)
    assert default_opset(upgraded) == 13
    assert upgrade_opset(upgraded, 12) is upgraded
    check_model(upgraded)


def test_external_save_and_upgrade_leave_the_callers_model_as_it_was(tmp_path: Path) -> None:
    # Both work from a weightless copy; the caller's model (weights, an If branch with
    # its own large constant) must come out byte-identical, and the upgraded model
    # must carry every weight over exactly.
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    branch_value = rng.standard_normal((16, 64)).astype(np.float32)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(branch_value))],
        "then",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [16, 64])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [16, 64]),
        ],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    upgraded = upgrade_opset(model, 13)
    assert model.SerializeToString() == before
    assert default_opset(upgraded) == 13
    assert all(t.data_location == TensorProto.DEFAULT for t in iter_tensors(upgraded.graph))
    np.testing.assert_array_equal(numpy_helper.to_array(upgraded.graph.initializer[0]), weight)
    constant = upgraded.graph.node[1].attribute[0].g.node[0].attribute[0].t
    np.testing.assert_array_equal(numpy_helper.to_array(constant), branch_value)
    stored = onnx.load(tmp_path / "m.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(stored.graph.initializer[0]), weight)


def test_upgrade_converts_ops_whose_signature_changed() -> None:
    node = helper.make_node("Upsample", ["x", "s"], ["y"], mode="nearest")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=8)
    upgraded = upgrade_opset(model, 13)
    assert [n.op_type for n in upgraded.graph.node][-1] == "Resize"


def test_upgrade_failure_is_one_clear_line() -> None:
    node = helper.make_node("NoSuchOp", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=8)
    with pytest.raises(ModelError, match=r"could not upgrade the model from opset 9 to 13") as err:
        upgrade_opset(model, 13)
    assert "\n" not in str(err.value) and "re-export it at opset 13" in str(err.value)


def test_check_model_runs_the_full_check() -> None:
    model = small_model()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
    with pytest.raises(ModelError):
        check_model(model, full=True)
    check_model(model, full=False)


def test_input_file_is_never_modified_by_a_failed_save(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(small_model(), source)
    stamp = os.stat(source).st_mtime_ns
    with pytest.raises(ModelError):
        save_model(small_model(size=4), source, input_path=source)
    assert os.stat(source).st_mtime_ns == stamp

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
    (data,) = tmp_path.glob("big.onnx.*.data")  # a fresh name per write: see save_model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", data.name]
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
    (data,) = tmp_path.glob("huge.onnx.*.data")
    assert data.stat().st_size >= 3 * chunk
    assert target.stat().st_size < 10_000
    stored = onnx.load(target, load_external_data=False)
    assert [t.name for t in stored.graph.initializer] == ["w", "blob0", "blob1", "blob2"]
    info = {e.key: e.value for e in stored.graph.initializer[3].external_data}
    assert info["location"] == data.name and int(info["length"]) == chunk
    assert len(big.graph.initializer[3].raw_data) == chunk, "the caller's model keeps its data"
    with open(data, "rb") as stream:  # every blob back, byte for byte
        for written, kept in zip(
            stored.graph.initializer[1:], big.graph.initializer[1:], strict=True
        ):
            entry = {e.key: e.value for e in written.external_data}
            stream.seek(int(entry.get("offset", 0)))
            step = 64 * 2**20
            for start in range(0, int(entry["length"]), step):
                assert stream.read(min(step, chunk - start)) == kept.raw_data[start : start + step]


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


def _folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_model_and_data_are_switched_in_one_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.onnx"
    save_model(small_model(size=16), target, external_data=True)
    before = _folder(tmp_path)
    real_replace = os.replace

    def fail_on_the_model(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if Path(dst) == target:  # the data file is in place, the model not yet
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_model)
    with pytest.raises(KeyboardInterrupt):
        save_model(small_model(size=32), target, external_data=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _folder(tmp_path) == before, "the old pair changed or a new file was left"
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 16]
    # A write that completes replaces the pair and removes the data file it superseded.
    save_model(small_model(size=32), target, external_data=True)
    (old_data,) = set(before) - {"m.onnx"}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and "m.onnx" in names and old_data not in names
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 32]


def test_the_data_file_never_replaces_an_existing_file(tmp_path: Path) -> None:
    # The input's own data file carries the name the >1.8 GB path used to write.
    source = save_external(small_model(size=16), tmp_path, "m.onnx.data")
    other = tmp_path / "m.onnx.data"
    before = other.read_bytes()
    target = tmp_path / "out.onnx"
    (tmp_path / "out.onnx.data").write_bytes(b"someone else's file")
    save_model(load_model(source), target, external_data=True)
    assert other.read_bytes() == before
    assert (tmp_path / "out.onnx.data").read_bytes() == b"someone else's file"
    with pytest.raises(ModelError, match="this run reads|input model"):
        save_model(load_model(source), other, input_path=source)  # -o <input's data file>
    assert other.read_bytes() == before


def invalid_inputs() -> dict[str, onnx.ModelProto]:
    def model(node: onnx.NodeProto, opset: int = 17, inputs: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])] if inputs else [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    bigger = model(helper.make_node("Add", ["x", "w"], ["y"]))
    w = numpy_helper.from_array(np.ones(6, np.float32), "w")
    w.dims[:] = [3]  # 24 bytes of data for 3 floats
    bigger.graph.initializer.append(w)
    typed = model(helper.make_node("Add", ["x", "w"], ["y"]))
    typed.graph.initializer.append(helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0] * 3))
    typed.graph.initializer[0].float_data.extend([1.0] * 3)
    return {
        "perm out of range": model(helper.make_node("Transpose", ["x"], ["y"], perm=[0, 5])),
        "Constant without a value": model(helper.make_node("Constant", [], ["y"]), inputs=False),
        "raw initializer larger than its dims": bigger,
        "typed initializer larger than its dims": typed,
        "opset 99": model(helper.make_node("Relu", ["x"], ["y"]), opset=99),
    }


@pytest.mark.parametrize("case", list(invalid_inputs()))
def test_invalid_inputs_are_refused_on_load_in_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(invalid_inputs()[case], path)
    with pytest.raises(ModelError, match="is not a valid ONNX model .*re-export it") as caught:
        load_model(path)
    assert "\n" not in str(caught.value)


def test_sparse_initializers_pass_the_full_check() -> None:
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([1, 3], np.int64), "w_idx")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.shape_inference.InferenceError):  # onnx's checker alone cannot
        onnx.checker.check_model(model, full_check=True)
    check_model(model, full=True)
    assert len(model.graph.sparse_initializer) == 1, "the caller's model keeps its form"
    index = 7
    model.graph.sparse_initializer[0].indices.raw_data = np.array([1, index], np.int64).tobytes()
    with pytest.raises(ModelError, match="sparse initializer 'w' is inconsistent"):
        check_model(model, full=True)

"""External tensor data (onnxopt.external): every tensor is found, every byte range checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.api import optimize_file
from onnxopt.errors import ExternalDataError, ModelError
from onnxopt.external import model_tensors
from onnxopt.model import load_model


def externalize(tensor: onnx.TensorProto, folder: Path, location: str, **entries: str) -> None:
    """Move `tensor`'s raw bytes to `folder/location` (entries override offset/length)."""
    raw = tensor.raw_data
    (folder / location.split("\0")[0]).write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    values = {"location": location, "offset": "0", "length": str(len(raw)), **entries}
    for key, value in values.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def sparse_model() -> onnx.ModelProto:
    values = numpy_helper.from_array(np.array([1.5, -2.0, 3.25, 4.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([0, 2, 5, 7], np.int64), "w_idx")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2, 4]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add_model(size: int = 300) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(size, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sparse_initializer_with_external_values_survives_optimize(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    model = sparse_model()
    x = np.ones((2, 4), np.float32)
    expected = x + np.array([[1.5, 0, -2.0, 0], [0, 3.25, 0, 4.0]], np.float32)
    externalize(model.graph.sparse_initializer[0].values, src, "w.bin")
    onnx.save(model, src / "m.onnx")
    loaded = load_model(src / "m.onnx")
    assert all(t.data_location == TensorProto.DEFAULT for t in model_tensors(loaded))
    optimize_file(src / "m.onnx", out / "m.onnx")  # another folder: w.bin is not there
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]
    session = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)


def test_sparse_values_outside_the_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    model = sparse_model()
    externalize(model.graph.sparse_initializer[0].values, tmp_path / "m", "../w.bin")
    assert (tmp_path / "w.bin").is_file()
    onnx.save(model, tmp_path / "m" / "m.onnx")
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        load_model(tmp_path / "m" / "m.onnx")


BAD_ENTRIES = {
    "offset past the end": (
        {"offset": "4096"},
        r"reads bytes 4096\.\.5296 of 'w.bin', which has 1200",
    ),
    "length past the end": (
        {"length": "4000"},
        r"reads bytes 0\.\.4000 of 'w.bin', which has 1200",
    ),
    "negative offset": ({"offset": "-8"}, r"offset '-8', not a non-negative integer"),
    "non-numeric offset": ({"offset": "12abc"}, r"offset '12abc', not a non-negative integer"),
    "superscript length": ({"length": "\u00b9\u00b2"}, r"length .\u00b9\u00b2., not a non"),
    "short length": ({"length": "800"}, r"has 800 bytes .* its dims \[300\] need 1200"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_offsets_and_lengths_are_one_line(tmp_path: Path, case: str) -> None:
    entries, message = BAD_ENTRIES[case]
    model = add_model()
    externalize(model.graph.initializer[0], tmp_path, "w.bin", **entries)
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ExternalDataError, match=message) as caught:
        load_model(tmp_path / "m.onnx")
    assert "\n" not in str(caught.value)


def test_a_nul_byte_in_a_location_is_refused(tmp_path: Path) -> None:
    model = add_model()
    externalize(model.graph.initializer[0], tmp_path, "w.bin\0../../etc/passwd")
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ExternalDataError, match="NUL byte"):
        load_model(tmp_path / "m.onnx")


def function_model(folder: Path, location: str) -> Path:
    """A model-local function whose Constant node's tensor is external data."""
    value = numpy_helper.from_array(np.full(300, 2.0, np.float32), "c")
    externalize(value, folder, "c.bin")
    value.external_data[0].value = location
    function = helper.make_function(
        "my.fn",
        "AddConst",
        ["x"],
        ["y"],
        [
            helper.make_node("Constant", [], ["c"], value=value),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddConst", ["x"], ["y"], domain="my.fn")],
        "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.fn", 1)],
        functions=[function],
    )
    path = folder / "m.onnx"
    onnx.save(model, path)
    return path


def test_function_tensors_are_loaded_and_refused_outside_the_folder(tmp_path: Path) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    loaded = load_model(function_model(inside, "c.bin"))
    (tensor,) = [t for t in model_tensors(loaded) if t.name == "c"]
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), np.full(300, 2.0, np.float32))
    outside = tmp_path / "out" / "m"
    outside.mkdir(parents=True)
    (tmp_path / "out" / "c.bin").write_bytes(b"\0" * 1200)
    with pytest.raises(ModelError, match="'c' points to external data '../c.bin' outside"):
        load_model(function_model(outside, "../c.bin"))


def test_verify_reads_sparse_external_values_from_the_models_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxopt.verify import verify

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    dense = sparse_model()
    onnx.save(dense, src / "inline.onnx")
    externalize(dense.graph.sparse_initializer[0].values, src, "w.bin")
    onnx.save(dense, src / "ext.onnx")
    (elsewhere / "w.bin").write_bytes(np.zeros(4, np.float32).tobytes())  # a decoy in cwd
    monkeypatch.chdir(elsewhere)
    result = verify(src / "ext.onnx", src / "inline.onnx", samples=2, rtol=0, atol=0)
    assert result.passed

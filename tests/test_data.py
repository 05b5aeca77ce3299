"""Feeds: .npz files and folders, random feeds with bound dims, image folders, validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxopt.data import (
    NpzFeeds,
    RandomFeeds,
    load_feeds,
    model_inputs,
    parse_shape,
)
from onnxopt.errors import FeedError
from onnxopt.images import ImageFeeds
from onnxopt.test_models import builders


@pytest.fixture
def dynamic_cnn() -> onnx.ModelProto:
    return builders.cnn(batch=None, size=16)


def test_model_inputs_read_names_dtypes_and_dynamic_dims(dynamic_cnn) -> None:
    (spec,) = model_inputs(dynamic_cnn)
    assert (spec.name, spec.dtype, spec.shape) == ("image", np.float32, ("batch", 3, 16, 16))
    block = model_inputs(builders.transformer_block())
    assert [(s.name, s.dtype) for s in block] == [
        ("tokens", np.float32),
        ("attention_mask", np.int64),
    ]


def test_parse_shape() -> None:
    assert parse_shape("x=1x3x640x640") == ("x", (1, 3, 640, 640))
    assert parse_shape("input.1 = 2,3") == ("input.1", (2, 3))
    with pytest.raises(FeedError, match="NAME=DIMS"):
        parse_shape("x:1x3")


def test_random_feeds_are_seeded_and_bound(dynamic_cnn) -> None:
    specs = model_inputs(dynamic_cnn)
    feeds = list(RandomFeeds(specs, 3, seed=7, shapes={"image": (4, 3, 16, 16)}))
    again = list(RandomFeeds(specs, 3, seed=7, shapes={"image": (4, 3, 16, 16)}))
    assert len(feeds) == 3 and feeds[0]["image"].shape == (4, 3, 16, 16)
    np.testing.assert_array_equal(feeds[2]["image"], again[2]["image"])
    assert not np.array_equal(feeds[0]["image"], feeds[1]["image"])
    other = next(iter(RandomFeeds(specs, 1, seed=8)))
    assert other["image"].shape == (1, 3, 16, 16)
    assert abs(float(feeds[0]["image"].std()) - 1.0) < 0.1


def test_random_feeds_need_shapes_for_inner_dynamic_dims() -> None:
    specs = model_inputs(_dynamic_hw_model())
    with pytest.raises(FeedError, match=r"pass --shape image=1x3xNxN with N set"):
        RandomFeeds(specs, 1)
    with pytest.raises(FeedError, match="does not fit"):
        RandomFeeds(specs, 1, shapes={"image": (1, 4, 8, 8)})
    feed = next(iter(RandomFeeds(specs, 1, shapes={"image": (2, 3, 8, 12)})))
    assert feed["image"].shape == (2, 3, 8, 12)


def _dynamic_hw_model() -> onnx.ModelProto:
    model = builders.cnn(batch=None, size=16)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    return model


def test_integer_inputs_get_valid_values() -> None:
    specs = model_inputs(builders.transformer_block())
    feed = next(iter(RandomFeeds(specs, 1)))
    mask = feed["attention_mask"]
    assert mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}


def test_npz_file_is_split_into_model_batches(tmp_path: Path, dynamic_cnn) -> None:
    images = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", image=images)
    feeds = NpzFeeds(tmp_path / "data.npz", model_inputs(dynamic_cnn), batch=2)
    chunks = [f["image"] for f in feeds]
    assert [c.shape[0] for c in chunks] == [2, 2] and len(feeds) == 2
    np.testing.assert_array_equal(chunks[1], images[2:4])
    static = NpzFeeds(tmp_path / "data.npz", model_inputs(builders.cnn(batch=1, size=16)))
    assert len(list(static)) == 5


def test_npz_folder_is_read_in_name_order(tmp_path: Path, dynamic_cnn) -> None:
    for i in (2, 1):
        np.savez(tmp_path / f"part{i}.npz", image=np.full((1, 3, 16, 16), i, np.float32))
    values = [float(f["image"][0, 0, 0, 0]) for f in load_feeds(dynamic_cnn, tmp_path)]
    assert values == [1.0, 2.0]


def test_npz_length_is_read_from_array_headers(tmp_path: Path, dynamic_cnn) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", image=rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    np.savez_compressed(
        tmp_path / "b.npz", image=rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    )
    specs = model_inputs(dynamic_cnn)
    assert len(NpzFeeds(tmp_path, specs)) == len(list(NpzFeeds(tmp_path, specs))) == 5
    assert len(NpzFeeds(tmp_path, specs, limit=4)) == len(list(NpzFeeds(tmp_path, specs, limit=4)))
    assert len(NpzFeeds(tmp_path / "a.npz", specs, limit=4)) == 3
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    with pytest.raises(FeedError, match="not a readable .npz"):
        len(NpzFeeds(tmp_path / "bad.npz", specs))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((2, 3, 15, 16), np.float32)}, r"shape \[1, 3, 15, 16\].*expects"),
        (
            {"image": np.zeros((2, 3, 16, 16), np.float64)},
            r"is float64 but the model expects "
            "float32",
        ),
        ({"img": np.zeros((2, 3, 16, 16), np.float32)}, r"arrays \['img'\] but the model takes"),
        ({"image": np.zeros((2, 16, 16), np.float32)}, r"shape \[1, 16, 16\]"),
    ],
)
def test_wrong_feeds_are_refused(tmp_path: Path, dynamic_cnn, arrays, message) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FeedError, match=message):
        list(load_feeds(dynamic_cnn, tmp_path / "bad.npz"))


def test_missing_data_path_is_refused(tmp_path: Path, dynamic_cnn) -> None:
    with pytest.raises(FeedError, match="does not exist"):
        load_feeds(dynamic_cnn, tmp_path / "nothing.npz")


def test_image_folder_preprocessing(tmp_path: Path) -> None:
    model = builders.cnn(batch=1, size=16)
    pixels = np.zeros((8, 12, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 128, 0
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(255 - pixels).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = load_feeds(
        model, tmp_path, image_options={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    )
    assert isinstance(feeds, ImageFeeds) and len(feeds) == 2
    first = next(iter(feeds))["image"]
    assert first.shape == (1, 3, 16, 16) and first.dtype == np.float32
    np.testing.assert_allclose(first[0, :, 5, 5], [1.0, 128 / 255 * 2 - 1, -1.0], atol=1e-6)
    nhwc = ImageFeeds(
        tmp_path,
        [model_inputs(model)[0].__class__("image", np.dtype(np.float32), (1, 16, 16, 3))],
        layout="NHWC",
        scale=1.0,
    )
    assert next(iter(nhwc))["image"][0, 3, 3].tolist() == [255.0, 128.0, 0.0]


# --- Bad data: one line naming what is wrong, never a traceback (#16 items 8, 12, 13) ---


def _seq_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    opt = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    index = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["i"], value=index),
            helper.make_node("SequenceAt", ["s", "i"], ["a"]),
            helper.make_node("OptionalGetElement", ["o"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "g",
        [helper.make_value_info("s", seq), helper.make_value_info("o", opt)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_sequence_and_optional_inputs_are_described_and_refused_by_feeds() -> None:
    specs = model_inputs(_seq_model())
    assert [s.describe() for s in specs] == [
        "s: seq(tensor(float))",
        "o: optional(tensor(float))",
    ]
    with pytest.raises(FeedError, match=r"^input 's' is seq\(tensor\(float\)\): .*simplify"):
        load_feeds(_seq_model())


def test_undefined_element_type_and_non_utf8_name_are_refused_by_feeds() -> None:
    model = builders.cnn(batch=1, size=16)
    model.graph.input[0].type.tensor_type.elem_type = 999
    (spec,) = model_inputs(model)
    assert spec.unsupported == "tensor(element type 999, which ONNX does not define)"
    with pytest.raises(FeedError, match="element type 999"):
        RandomFeeds(model_inputs(model), 1)
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [value], [])
    # One-byte name "x" becomes the byte 0xff (field 1 of NodeProto/ValueInfoProto, length 1).
    data = helper.make_model(relu).SerializeToString()
    data = data.replace(b"\x0a\x01x", b"\x0a\x01\xff").replace(b"\x12\x01x", b"\x12\x01\xff")
    broken = onnx.load_from_string(data)
    (spec,) = model_inputs(broken)
    assert spec.name == "\\xff" and "not valid UTF-8" in spec.unsupported
    with pytest.raises(FeedError, match="not valid UTF-8"):
        load_feeds(broken)


@pytest.mark.parametrize(
    ("value", "found"), [(np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "-inf")]
)
def test_non_finite_data_names_input_sample_and_value(
    tmp_path: Path, dynamic_cnn, value: float, found: str
) -> None:
    images = np.zeros((6, 3, 16, 16), np.float32)
    images[4, 1, 2, 3] = value
    np.savez(tmp_path / "calib.npz", image=images)
    message = rf"calib.npz: input 'image' sample 4 holds {found} \(1 non-finite"
    with pytest.raises(FeedError, match=message):
        list(load_feeds(dynamic_cnn, tmp_path / "calib.npz"))
    from onnxopt.batching import batches

    with pytest.raises(FeedError, match=message):  # batched reads name the same sample
        list(batches(load_feeds(dynamic_cnn, tmp_path / "calib.npz"), 4))
    from onnxopt.data import ListFeeds, check_finite

    feeds = ListFeeds([{"image": images[i : i + 1]} for i in range(6)], model_inputs(dynamic_cnn))
    with pytest.raises(FeedError, match=rf"feeds: input 'image' sample 4 holds {found}"):
        [check_finite(f, "feeds", i) for i, f in enumerate(feeds)]


def test_zero_image_std_and_wrong_channel_count_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    model = builders.cnn(batch=1, size=16)
    with pytest.raises(FeedError, match="--image-std is 0 for channel 1"):
        load_feeds(model, tmp_path, image_options={"std": (0.5, 0.0, 0.5)})
    with pytest.raises(FeedError, match="--image-mean has 2 values but .* 3 channels"):
        load_feeds(model, tmp_path, image_options={"mean": (0.5, 0.5)})
    one = load_feeds(model, tmp_path, image_options={"mean": (0.5,), "std": (0.25,)})
    assert float(next(iter(one))["image"][0, 2, 0, 0]) == -2.0


def test_corrupt_and_truncated_images_are_named(tmp_path: Path) -> None:
    model = builders.cnn(batch=1, size=16)
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a_good.jpg", quality=90)
    whole = (tmp_path / "a_good.jpg").read_bytes()
    (tmp_path / "b_cut.jpg").write_bytes(whole[: len(whole) // 2])
    feeds = load_feeds(model, tmp_path)
    with pytest.raises(FeedError, match=r"image .*b_cut.jpg cannot be read"):
        list(feeds)
    (tmp_path / "b_cut.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(FeedError, match=r"image .*b_cut.jpg cannot be read"):
        list(load_feeds(model, tmp_path))


def test_empty_and_zero_sample_npz_and_npy_named_npz_are_refused(
    tmp_path: Path, dynamic_cnn
) -> None:
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(FeedError, match=r"has arrays \[\] but the model takes \['image'\]"):
        load_feeds(dynamic_cnn, tmp_path / "empty.npz")
    np.savez(tmp_path / "zero.npz", image=np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(FeedError, match="zero.npz holds no samples"):
        load_feeds(dynamic_cnn, tmp_path / "zero.npz")
    np.save(tmp_path / "array.npy", np.zeros((2, 3, 16, 16), np.float32))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    with pytest.raises(FeedError, match="array.npz is not a readable .npz file"):
        load_feeds(dynamic_cnn, tmp_path / "array.npz")


def _scalar_model() -> onnx.ModelProto:
    """y = x * float(sr): a batch-led input beside a rank-0 one, like silero's `sr`."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "srf"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_scalar_input_is_shared_by_every_sample_or_given_per_sample(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _scalar_model()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez(tmp_path / "shared.npz", x=x, sr=np.array(16000, np.int64))
    feeds = list(load_feeds(model, tmp_path / "shared.npz"))
    assert len(feeds) == 3 and all(f["sr"].shape == () and int(f["sr"]) == 16000 for f in feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds[2])[0], x[2:3] * 16000)
    np.savez(tmp_path / "each.npz", x=x, sr=np.array([8000, 16000, 8000], np.int64))
    assert [int(f["sr"]) for f in load_feeds(model, tmp_path / "each.npz")] == [8000, 16000, 8000]
    np.savez(tmp_path / "bad.npz", x=x, sr=np.zeros((3, 2), np.int64))
    with pytest.raises(FeedError, match="'sr' is a scalar in the model but the array has shape"):
        load_feeds(model, tmp_path / "bad.npz")


def test_random_feeds_bound_memory_before_allocating() -> None:
    specs = model_inputs(_dynamic_hw_model())
    with pytest.raises(FeedError, match=r"'image' \[100000x3x1000x1000\] would take 1.12e\+03 GiB"):
        RandomFeeds(specs, 1, shapes={"image": (100000, 3, 1000, 1000)})


def _onnxopt(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "onnxopt", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_simplifies_and_inspects_sequence_models_and_refuses_bad_data(tmp_path: Path) -> None:
    onnx.save(_seq_model(), tmp_path / "seq.onnx")
    assert _onnxopt("inspect", tmp_path / "seq.onnx").returncode == 0
    done = _onnxopt(
        "optimize", tmp_path / "seq.onnx", "-o", tmp_path / "s.onnx", "--passes", "simplify"
    )
    assert done.returncode == 0 and (tmp_path / "s.onnx").is_file()
    wide = builders.mlp()
    for value in (wide.graph.input[0], wide.graph.output[0]):
        batch = value.type.tensor_type.shape.dim[0]
        batch.Clear()
        batch.dim_value = 10**9  # a valid model whose random feeds would take terabytes
    onnx.save(wide, tmp_path / "wide.onnx")
    cnn = builders.cnn(batch=None, size=16)
    onnx.save(cnn, tmp_path / "cnn.onnx")
    images = np.zeros((4, 3, 16, 16), np.float32)
    images[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", image=images)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in [
        (("verify", tmp_path / "seq.onnx", tmp_path / "s.onnx"), "input 's' is seq(tensor(float))"),
        (("verify", tmp_path / "wide.onnx", tmp_path / "wide.onnx"), "GiB a sample"),
        (
            (
                "optimize",
                tmp_path / "cnn.onnx",
                "-o",
                tmp_path / "q.onnx",
                "--passes",
                "quantize",
                "--data",
                tmp_path / "nan.npz",
            ),
            "input 'image' sample 2 holds NaN",
        ),
    ]:
        done = _onnxopt(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before

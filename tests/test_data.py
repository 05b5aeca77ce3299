"""Feeds: .npz files and folders, random feeds with bound dims, image folders, validation."""

from __future__ import annotations

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

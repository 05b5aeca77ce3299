"""Reading .npz archives a slice at a time: rows equal numpy's, memory bounded, forged
headers and sizes refused in one line."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from onnxopt.data import NpzFeeds, model_inputs
from onnxopt.errors import FeedError
from onnxopt.npz import MAX_HEADER_BYTES, RowReader, read_members
from onnxopt.test_models import builders


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_rows_read_in_slices_equal_numpy(tmp_path: Path, save) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((7, 3, 5)).astype(np.float32),
        "b": rng.integers(0, 9, (7, 2)).astype(np.int64),
        "f": np.asfortranarray(rng.standard_normal((7, 4))).astype(np.float16),
        "s": np.array(3.5),
    }
    save(tmp_path / "x.npz", **arrays)
    members = read_members(tmp_path / "x.npz")
    assert {k: (m.shape, m.dtype, m.fortran_order) for k, m in members.items()} == {
        "a": ((7, 3, 5), np.float32, False),
        "b": ((7, 2), np.int64, False),
        "f": ((7, 4), np.float16, True),
        "s": ((), np.float64, False),
    }
    with RowReader(tmp_path / "x.npz", members) as reader:
        for start, rows in [(0, 2), (2, 1), (3, 4)]:
            for name in "abf":
                got = reader.read(name, rows)
                np.testing.assert_array_equal(got, arrays[name][start : start + rows])
                assert got.flags.c_contiguous and got.flags.writeable
            assert float(reader.read("s", 1)) == 3.5
        with pytest.raises(FeedError, match="array 'a' ends after row 7"):
            reader.read("a", 1)


def _write_member(archive: zipfile.ZipFile, name: str, header: bytes, body: bytes) -> None:
    with archive.open(name, "w", force_zip64=True) as stream:
        stream.write(header)
        stream.write(body)


def _npy_header(shape: tuple[int, ...], *, declared: int | None = None) -> bytes:
    text = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode() + b"\n"
    length = len(text) if declared is None else declared
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", length) + text


def test_forged_header_length_and_sizes_are_refused_without_reading(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        _write_member(archive, "image.npy", _npy_header((1,), declared=2**32 - 1), b"")
    with pytest.raises(FeedError, match=f"4294967295-byte header, over {MAX_HEADER_BYTES}"):
        read_members(tmp_path / "huge.npz")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        _write_member(archive, "image.npy", _npy_header((1000, 3, 16, 16)), b"\0" * 4096)
    with pytest.raises(FeedError, match=r"holds \d+ bytes but its header describes \d+"):
        read_members(tmp_path / "short.npz")
    np.savez(tmp_path / "objects.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FeedError, match="holds Python objects"):
        read_members(tmp_path / "objects.npz")


def test_memory_holds_one_slice_whatever_the_file_size(tmp_path: Path) -> None:
    """A 96 MB stored array and a zip bomb (a 256 MB array of zeros inflating from ~0.3 MB)
    are both read a sample at a time: Python's peak allocation stays near one sample."""
    model = builders.cnn(batch=None, size=64)
    sample = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "big.npz", image=np.repeat(sample, 2000, axis=0))
    rows = 2**28 // sample.nbytes
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("image.npy", "w", force_zip64=True) as stream:
            stream.write(_npy_header((rows, 3, 64, 64)))
            zeros = bytes(sample.nbytes * 64)
            for _ in range(rows // 64):
                stream.write(zeros)
            stream.write(bytes(sample.nbytes * (rows % 64)))
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20
    for name, count, first in [("big.npz", 2000, sample), ("bomb.npz", rows, 0 * sample)]:
        feeds = NpzFeeds(tmp_path / name, model_inputs(model), limit=50)
        assert len(NpzFeeds(tmp_path / name, model_inputs(model))) == count
        tracemalloc.start()
        seen = 0
        for feed in feeds:
            np.testing.assert_array_equal(feed["image"], first)
            seen += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seen == 50 and peak < 8 * sample.nbytes, (name, peak)

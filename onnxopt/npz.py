"""Reading an .npz archive a slice of rows at a time, in bounded memory.

An .npz file is a zip archive with one .npy member per array. Rules:

- Only headers are read up front: each member's magic, header length and header
  (at most `MAX_HEADER_BYTES`, numpy's own limit, checked before the header is read,
  so a forged length cannot ask for gigabytes), and its size in the zip directory
  must be exactly the header plus the bytes its shape and dtype describe.
- Rows are then read in order, a slice at a time, from each member opened as a
  stream: a stored member is read as it lies in the file, a compressed one is
  inflated as it is read. Memory holds one slice, never the whole array, whatever
  the number of samples or the size of the file (a zip bomb inflates only as far
  as the rows asked for).
- A sample (one row of the first axis, or a 0-d array) may hold at most
  `MAX_SAMPLE_BYTES`. Object arrays (pickles) are refused. A Fortran-ordered array
  has no contiguous rows: it is read whole, within the same bound on its size.
- Every failure is a `FeedError` naming the file and, where it applies, the array.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np

from .errors import FeedError

MAX_HEADER_BYTES = 10_000
MAX_SAMPLE_BYTES = 2**31
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, struct.error)


@dataclass(frozen=True)
class Member:
    """One array of an archive: its name, dtype, shape and where its data starts."""

    name: str
    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of the first axis (of the whole array for a 0-d array)."""
        return self.dtype.itemsize * math.prod(self.shape[1:] if self.shape else ())


def _unreadable(file: Path, why: object) -> FeedError:
    return FeedError(f"{file} is not a readable .npz file ({why}): re-save it with numpy.savez")


def _read_exactly(stream: IO[bytes], count: int, file: Path, what: str) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise _unreadable(file, f"{what} ends after {len(data)} of {count} bytes")
    return data


def _read_header(stream: IO[bytes], file: Path, name: str) -> tuple[np.dtype, tuple, bool, int]:
    """dtype, shape, Fortran order and the data offset of one .npy stream."""
    magic = _read_exactly(stream, 8, file, f"array '{name}'")
    if magic[:6] != b"\x93NUMPY":
        raise _unreadable(file, f"member '{name}.npy' is not a .npy array")
    major = magic[6]
    length_format = "<H" if major == 1 else "<I"
    if major not in (1, 2, 3):
        raise _unreadable(file, f"array '{name}' has .npy format version {major}")
    size = struct.calcsize(length_format)
    length_bytes = _read_exactly(stream, size, file, f"array '{name}'")
    (length,) = struct.unpack(length_format, length_bytes)
    if length > MAX_HEADER_BYTES:
        raise _unreadable(
            file, f"array '{name}' declares a {length}-byte header, over {MAX_HEADER_BYTES}"
        )
    header = _read_exactly(stream, length, file, f"array '{name}' header")
    buffer = io.BytesIO(magic + length_bytes + header)
    np.lib.format.read_magic(buffer)
    read = {
        1: np.lib.format.read_array_header_1_0,
        2: np.lib.format.read_array_header_2_0,
    }.get(major, np.lib.format.read_array_header_2_0)
    try:
        shape, fortran_order, dtype = read(buffer, max_header_size=MAX_HEADER_BYTES)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise _unreadable(file, f"array '{name}' has a bad header: {exc}") from None
    return np.dtype(dtype), tuple(int(d) for d in shape), bool(fortran_order), 8 + size + length


def read_members(file: Path) -> dict[str, Member]:
    """Every array of `file` by name, from headers only (see the module rules)."""
    members: dict[str, Member] = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as stream:
                    dtype, shape, fortran, offset = _read_header(stream, file, name)
                if dtype.hasobject:
                    raise FeedError(
                        f"{file}: array '{name}' holds Python objects ({dtype}), which onnxopt "
                        "does not unpickle: save numeric arrays"
                    )
                expected = offset + dtype.itemsize * math.prod(shape)
                if info.file_size != expected:
                    raise _unreadable(
                        file,
                        f"member '{info.filename}' holds {info.file_size} bytes but its header "
                        f"describes {expected}",
                    )
                sample = dtype.itemsize * math.prod(shape[1:] if shape else ())
                if (fortran and dtype.itemsize * math.prod(shape) > MAX_SAMPLE_BYTES) or (
                    sample > MAX_SAMPLE_BYTES
                ):
                    raise FeedError(
                        f"{file}: array '{name}' {list(shape)} {dtype} has samples over "
                        f"{MAX_SAMPLE_BYTES // 2**30} GiB each (or is Fortran-ordered and "
                        "larger than that): save it in C order with smaller samples"
                    )
                members[name] = Member(name, info, dtype, shape, fortran, offset)
    except FeedError:
        raise
    except _READ_ERRORS as exc:
        raise _unreadable(file, exc) from None
    return members


class RowReader:
    """Consecutive rows of some members of one archive, each member a forward-only stream."""

    def __init__(self, file: Path, members: dict[str, Member]):
        self.file = file
        self.members = members
        self._archive: zipfile.ZipFile | None = None
        self._streams: dict[str, IO[bytes]] = {}
        self._whole: dict[str, np.ndarray] = {}
        self._position: dict[str, int] = {}

    def __enter__(self) -> RowReader:
        try:
            self._archive = zipfile.ZipFile(self.file)
            for name, member in self.members.items():
                stream = self._archive.open(member.info)
                _read_exactly(stream, member.data_offset, self.file, f"array '{name}'")
                if member.fortran_order or not member.shape:
                    count = member.dtype.itemsize * math.prod(member.shape)
                    data = _read_exactly(stream, count, self.file, f"array '{name}'")
                    order = "F" if member.fortran_order else "C"
                    flat = np.frombuffer(data, member.dtype)
                    self._whole[name] = flat.reshape(member.shape, order=order)
                    stream.close()
                else:
                    self._streams[name] = stream
                self._position[name] = 0
        except FeedError:
            self.close()
            raise
        except _READ_ERRORS as exc:
            self.close()
            raise _unreadable(self.file, exc) from None
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def read(self, name: str, rows: int) -> np.ndarray:
        """The next `rows` rows of array `name` (a 0-d array: itself, every time)."""
        member = self.members[name]
        if name in self._whole:
            whole = self._whole[name]
            if not member.shape:
                return whole
            start = self._position[name]
            self._position[name] = start + rows
            return np.ascontiguousarray(whole[start : start + rows])
        stream = self._streams[name]
        array = np.empty((rows, *member.shape[1:]), member.dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        try:
            while done < len(view):
                got = stream.readinto(view[done:])
                if not got:
                    raise _unreadable(
                        self.file, f"array '{name}' ends after row {self._position[name]}"
                    )
                done += got
        except _READ_ERRORS as exc:
            raise _unreadable(self.file, f"array '{name}': {exc}") from None
        self._position[name] += rows
        return array

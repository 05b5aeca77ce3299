"""External tensor data: finding every tensor, checking where its bytes live, reading them.

Rules:
- Every tensor counts: initializers, sparse initializers (values and indices),
  tensor attributes (dense and sparse), in subgraphs and in model-local functions.
  A tensor the walk missed would be saved still pointing at a file that is not
  copied with it, and its values would be lost.
- A location is relative, has no NUL byte, and resolves (symlinks followed)
  inside the model's folder; the file exists.
- `offset` and `length` are non-negative integers; the bytes they name lie inside
  the file, and their count is what the tensor's dims and type need.
- Bytes are read by onnxopt itself (not by onnx's helper, which skips sparse
  tensors and trusts offsets), and the tensor then holds them inline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx

from .errors import ExternalDataError

# Message types that can hold a TensorProto somewhere below them; everything else is
# copied whole.
_HOLDERS = {
    "ModelProto",
    "GraphProto",
    "NodeProto",
    "AttributeProto",
    "FunctionProto",
    "SparseTensorProto",
    "TrainingInfoProto",
}


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:  # noqa: ANN001 - repeated NodeProto
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from iter_tensors(sub)


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers (sparse ones as values and indices) and
    tensor attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model: its graph's and those inside model-local functions."""
    yield from iter_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise ExternalDataError(
        f"tensor '{tensor.name}' is marked external but names no location: re-export the model"
    )


def _resolve(tensor: onnx.TensorProto, location: str, base: Path) -> Path:
    if "\0" in location:
        raise ExternalDataError(
            f"tensor '{tensor.name}' has an external-data location with a NUL byte: "
            "the model is corrupt, re-export it"
        )
    if os.path.isabs(location) or Path(location).is_absolute():
        raise ExternalDataError(
            f"tensor '{tensor.name}' uses an absolute external-data path '{location}': "
            f"move the file into {base} and store a relative location"
        )
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise ExternalDataError(
            f"tensor '{tensor.name}' points to external data '{location}' outside the "
            f"model's folder {base}: move the file next to the model"
        )
    if not target.is_file():
        raise ExternalDataError(
            f"external data file {target} for tensor '{tensor.name}' is missing: "
            "copy it next to the model"
        )
    return target


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Return the external files the model needs; refuse locations outside `base_dir`."""
    base = Path(base_dir).resolve()
    files: list[Path] = []
    for tensor in model_tensors(model):
        location = external_location(tensor)
        if location is None:
            continue
        target = _resolve(tensor, location, base)
        if target not in files:
            files.append(target)
    return files


def _number(tensor: onnx.TensorProto, info: dict[str, str], key: str) -> int | None:
    if key not in info:
        return None
    text = info[key].strip()
    if not re.fullmatch(r"[0-9]+", text):  # also refuses "-4", "1e3" and other digits
        raise ExternalDataError(
            f"tensor '{tensor.name}' has external-data {key} '{info[key][:40]}', not a "
            "non-negative integer: the model is corrupt, re-export it"
        )
    return int(text)


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's dims and type need, or None when that is not fixed (strings)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    return count * dtype.itemsize


_PACKED_4BIT = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}


def load_external_data(model: onnx.ModelProto, base_dir: str | os.PathLike) -> list[Path]:
    """Read every external tensor of `model` from inside `base_dir` into the model.

    Returns the files read. Raises ExternalDataError, in one line, for a location
    outside the folder, a missing file, a bad offset or length, or a length that
    does not match the tensor's dims.
    """
    base = Path(base_dir).resolve()
    files: list[Path] = []
    handles: dict[Path, BinaryIO] = {}
    try:
        for tensor in model_tensors(model):
            location = external_location(tensor)
            if location is None:
                continue
            path = _resolve(tensor, location, base)
            if path not in handles:
                handles[path] = open(path, "rb")  # noqa: SIM115 - closed below
                files.append(path)
            tensor.raw_data = _read(tensor, location, handles[path])
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    except OSError as exc:
        raise ExternalDataError(
            f"cannot read external data ({exc.strerror or exc}): check the files next to the model"
        ) from None
    finally:
        for handle in handles.values():
            handle.close()
    return files


def _read(tensor: onnx.TensorProto, location: str, handle: BinaryIO) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    offset = _number(tensor, info, "offset") or 0
    length = _number(tensor, info, "length")
    size = os.fstat(handle.fileno()).st_size
    end = size if length is None else offset + length
    if offset > size or end > size:
        raise ExternalDataError(
            f"tensor '{tensor.name}' reads bytes {offset}..{end} of '{location}', which has "
            f"{size}: the data file is truncated or belongs to another model"
        )
    need = expected_bytes(tensor)
    if need is not None and end - offset != need:
        raise ExternalDataError(
            f"tensor '{tensor.name}' has {end - offset} bytes of external data in "
            f"'{location}' but its dims {list(tensor.dims)} need {need}: re-export the model"
        )
    handle.seek(offset)
    return handle.read(end - offset)


def externalized(
    model: onnx.ModelProto, data: BinaryIO, location: str
) -> tuple[onnx.ModelProto, dict[int, onnx.TensorProto]]:
    """A copy of `model` whose raw tensors of 1 KiB or more are written to `data` and
    referenced as external data at `location`; also each offset's source tensor.

    The caller's model is never modified: on a large model, clearing and setting
    raw_data again would leave a second copy of every weight in its memory.
    """
    sources: dict[int, onnx.TensorProto] = {}

    def tensor(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
        size = expected_bytes(src)
        if not src.HasField("raw_data") or (size if size is not None else 0) < 1024:
            dst.CopyFrom(src)
            return
        # Field by field: ListFields would hand back one more copy of the raw bytes.
        for field in src.DESCRIPTOR.fields:
            if field.name != "raw_data" and (_repeated(field) or src.HasField(field.name)):
                _copy_field(dst, field, getattr(src, field.name))
        raw = src.raw_data
        offset = data.tell()
        data.write(raw)
        sources[offset] = src
        dst.data_location = onnx.TensorProto.EXTERNAL
        entries = (("location", location), ("offset", str(offset)), ("length", str(len(raw))))
        for key, value in entries:
            entry = dst.external_data.add()
            entry.key, entry.value = key, value

    def message(src, dst) -> None:  # noqa: ANN001 - any protobuf message
        for field, value in src.ListFields():
            kind = field.message_type.name if field.message_type is not None else None
            if kind == "TensorProto":
                items = value if _repeated(field) else [value]
                target = getattr(dst, field.name)
                for item in items:
                    tensor(item, target.add() if _repeated(field) else target)
            elif kind in _HOLDERS:
                items = value if _repeated(field) else [value]
                target = getattr(dst, field.name)
                for item in items:
                    sub = target.add() if _repeated(field) else target
                    sub.SetInParent()
                    message(item, sub)
            else:
                _copy_field(dst, field, value)

    skeleton = onnx.ModelProto()
    message(model, skeleton)
    return skeleton, sources


def _repeated(field) -> bool:  # noqa: ANN001 - a protobuf FieldDescriptor
    # protobuf 7 dropped `label`; 4.x has only `label`.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _copy_field(dst, field, value) -> None:  # noqa: ANN001 - any protobuf message and field
    if _repeated(field):
        getattr(dst, field.name).extend(value)
    elif field.message_type is not None:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)

"""Load and save ONNX models safely.

- Loading accepts a path, serialized bytes or a ModelProto. External data is
  resolved only inside the model's folder; anything else is refused.
- Saving is atomic (temporary file in the target folder, then rename), never
  overwrites the input model, and switches to external data when the model
  would not fit in one protobuf (2 GB).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from .errors import ExternalDataError, ModelError

ModelSource = str | os.PathLike | bytes | onnx.ModelProto

# protobuf refuses to serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from iter_tensors(sub)


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise ExternalDataError(
        f"tensor '{tensor.name}' is marked external but names no location: re-export the model"
    )


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Return the external files the model needs; refuse locations outside `base_dir`."""
    base = base_dir.resolve()
    files: list[Path] = []
    for tensor in iter_tensors(model.graph):
        location = _external_location(tensor)
        if location is None:
            continue
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
        if target not in files:
            files.append(target)
    return files


def load_model(
    source: ModelSource, *, base_dir: str | os.PathLike | None = None, check: bool = True
) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto (which is copied, never modified).

    External data is loaded from `base_dir` (default: the model file's folder) and
    must stay inside it. With `check`, the light onnx checker runs so that a
    truncated file is caught here rather than deep inside a pass.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = "model"
    elif isinstance(source, bytes | bytearray):
        model = _parse(bytes(source), "model bytes")
        label = "model bytes"
    else:
        path = Path(source)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist: check the path")
        if not path.is_file():
            raise ModelError(f"{path} is not a file: give the path of an .onnx file")
        model = _parse(path.read_bytes(), str(path))
        base_dir = base_dir if base_dir is not None else path.parent
        label = str(path)
    if any(_external_location(t) for t in iter_tensors(model.graph)):
        if base_dir is None:
            raise ExternalDataError(
                f"{label} uses external data but no folder was given: pass base_dir"
            )
        check_external_data(model, Path(base_dir))
        onnx.load_external_data_for_model(model, str(base_dir))
    if check:
        try:
            check_model(model, full=False)
        except ModelError as exc:
            raise ModelError(f"{label} is not a valid ONNX model ({exc}): re-export it") from None
    return model


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise ModelError(
            f"{label} is not an ONNX model or is truncated (protobuf parse failed): "
            "check that the file is complete"
        ) from None
    if not model.HasField("graph") or not data:
        raise ModelError(f"{label} has no graph: it is not an ONNX model or it is truncated")
    return model


def data_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of one tensor's data, from its dims and type (no copy of the data itself)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return tensor.ByteSize()
    count = 1
    for dim in tensor.dims:
        count *= dim
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the model (initializers and tensor attributes)."""
    return sum(data_bytes(tensor) for tensor in iter_tensors(model.graph))


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """The shape of every main-graph tensor onnx shape inference can tell (a dim is its
    size, its symbolic name or None).

    Runs on a copy without weight data (initializers over 1 KiB become typed
    inputs; small ones such as Reshape targets keep their values), so a large
    model is not copied for it.
    """
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    known = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name in known:
            continue
        if data_bytes(init) <= 1024:
            graph.initializer.append(init)
        else:
            graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    graph.output.extend(model.graph.output)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # shape inference is a help here, never a requirement
        inferred = light
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor_type.shape.dim
            )
    return shapes


def needs_external_data(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def check_model(model: onnx.ModelProto, *, full: bool = True) -> None:
    """onnx.checker (full: with strict shape inference); a model over 2 GB is checked from disk."""
    if needs_external_data(model):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            _write(model, path, external=True)
            check_file(path, full=full)
        return
    _checked(lambda: onnx.checker.check_model(model, full_check=full))


def check_file(path: str | os.PathLike, *, full: bool = True) -> None:
    """onnx.checker on a model file; the checker reads it (and its external data) itself."""
    _checked(lambda: onnx.checker.check_model(str(path), full_check=full))


def _checked(check: Callable[[], None]) -> None:
    try:
        check()
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(first) from None


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write `model` to `path` atomically.

    `input_path` is the file the model came from: writing over it is refused.
    `external_data=None` stores tensors in `<name>.data` only when the model
    would not fit in one protobuf.
    """
    target = check_output_path(path, input_path)
    external = needs_external_data(model) if external_data is None else external_data
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=target.parent))
    try:
        written = _write(model, tmp_dir / target.name, external=external)
        # Data first, then the model that refers to it: a reader never sees a
        # model whose data file is missing.
        for name in sorted(written, key=lambda n: n == target.name):
            os.replace(tmp_dir / name, target.parent / name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def check_output_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """Refuse an output path that cannot be written or that names the input model."""
    target = Path(path)
    if target.is_dir():
        raise ModelError(f"output {target} is a folder: give a file name such as model.opt.onnx")
    if not target.parent.is_dir():
        raise ModelError(
            f"output folder {target.parent} does not exist: create it or choose another -o path"
        )
    if input_path is not None and _same_file(target, Path(input_path)):
        raise ModelError(
            f"output {target} is the input model: choose another -o path, the input is never "
            "overwritten"
        )
    return target


def _write(model: onnx.ModelProto, path: Path, *, external: bool) -> list[str]:
    if not external:
        path.write_bytes(model.SerializeToString())
        return [path.name]
    location = path.name + ".data"
    with open(path.with_name(location), "wb") as data:
        skeleton, _ = _externalized(model, data, location)
    if skeleton.ByteSize() > PROTOBUF_LIMIT:
        raise ModelError(
            "the model is over 2 GB even without its raw tensor data (tensors stored in "
            "typed fields): re-export it with raw_data tensors"
        )
    path.write_bytes(skeleton.SerializeToString())
    return [location, path.name]


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


def _externalized(
    model: onnx.ModelProto, data: BinaryIO, location: str
) -> tuple[onnx.ModelProto, dict[int, onnx.TensorProto]]:
    """A copy of `model` whose raw tensors of 1 KiB or more are written to `data` and
    referenced as external data at `location`; also each offset's source tensor.

    The caller's model is never modified: on a large model, clearing and setting
    raw_data again would leave a second copy of every weight in its memory.
    """
    sources: dict[int, onnx.TensorProto] = {}

    def tensor(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
        if not src.HasField("raw_data") or data_bytes(src) < 1024:
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


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def default_opset(model: onnx.ModelProto) -> int:
    """The opset of the default ONNX domain ('' or 'ai.onnx')."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelError("model imports no default-domain opset: re-export it with an opset")


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert to opset `target` with onnx's version converter; no-op when already there.

    The converter copies the model several times over in C++ and never needs the
    bytes of large weights: it converts a copy that refers to them as external
    data, which is checked from disk, and the converted model then takes each
    weight from `model` (left as it was).
    """
    current = default_opset(model)
    if current >= target:
        return model
    with tempfile.TemporaryDirectory() as tmp:
        with open(Path(tmp) / "weights", "wb") as data:
            skeleton, sources = _externalized(model, data, "weights")
        try:
            converted = version_converter.convert_version(skeleton, target)
        except Exception as exc:  # the converter raises plain RuntimeErrors of many kinds
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"could not upgrade the model from opset {current} to {target} ({reason}): "
                f"re-export it at opset {target} or later"
            ) from None
        del skeleton
        (Path(tmp) / "model.onnx").write_bytes(converted.SerializeToString())
        check_file(Path(tmp) / "model.onnx", full=False)
    for tensor in iter_tensors(converted.graph):
        if _external_location(tensor) != "weights":
            continue
        offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = sources[offset].raw_data
    return converted

"""Load and save ONNX models safely.

- Loading accepts a path, serialized bytes or a ModelProto. External data is
  resolved only inside the model's folder (onnxopt.external); anything else is
  refused. An input the full checker refuses is refused on load.
- Saving is atomic, the model and its data file together (temporary folder in
  the target folder, then renames; see save_model), never overwrites a file the
  run reads (onnxopt.files), and switches to external data when the model would
  not fit in one protobuf (2 GB).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper, version_converter

from .errors import ExternalDataError, ModelError, OutputError
from .external import (
    check_external_data,
    expected_bytes,
    external_location,
    externalized,
    iter_tensors,
    load_external_data,
    model_tensors,
)
from .files import check_not_read, check_target, output_file, same_file, temp_folder, write_error

ModelSource = str | os.PathLike | bytes | onnx.ModelProto

# protobuf refuses to serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def load_model(
    source: ModelSource, *, base_dir: str | os.PathLike | None = None, check: bool = True
) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto (which is copied, never modified).

    External data (sparse tensors and function tensors included) is read from
    `base_dir` (default: the model file's folder) and must stay inside it. With
    `check`, the full onnx checker (strict shape inference), the opset range and
    the size of every tensor's data are checked, so that an invalid input is
    refused here in one line rather than written out as a model nothing can load.
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
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(
                f"cannot read {path} ({exc.strerror or exc}): check the path"
            ) from None
        model = _parse(data, str(path))
        base_dir = base_dir if base_dir is not None else path.parent
        label = str(path)
    if any(external_location(t) for t in model_tensors(model)):
        if base_dir is None:
            raise ExternalDataError(
                f"{label} uses external data but no folder was given: pass base_dir"
            )
        load_external_data(model, base_dir)
    if check:
        try:
            check_opsets(model)
            check_tensor_sizes(model)
            check_model(model, full=True)
        except ModelError as exc:
            raise ModelError(f"{label} is not a valid ONNX model ({exc}): re-export it") from None
    return model


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external-data files it names (the files a run reads from it)."""
    source = Path(path)
    model = _parse(source.read_bytes(), str(source))
    return [source, *check_external_data(model, source.parent)]


def check_opsets(model: onnx.ModelProto) -> None:
    """The default domain's opset must be one this onnx knows (ORT knows no later one)."""
    latest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not 1 <= entry.version <= latest:
            raise ModelError(
                f"it imports opset {entry.version} of the default domain; onnx here knows "
                f"1 to {latest}"
            )


def check_tensor_sizes(model: onnx.ModelProto) -> None:
    """Every tensor holds exactly the data its dims and type need."""
    for tensor in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        need = expected_bytes(tensor)
        if tensor.HasField("raw_data"):
            if need is not None and len(tensor.raw_data) != need:
                raise ModelError(
                    f"tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes but its dims "
                    f"{list(tensor.dims)} need {need}"
                )
            continue
        count = _typed_count(tensor)
        if count is None:
            continue
        elements = 1
        for dim in tensor.dims:
            elements *= dim
        if tensor.data_type in _COMPLEX:
            elements *= 2
        if count != elements:
            raise ModelError(
                f"tensor '{tensor.name}' holds {count} values but its dims "
                f"{list(tensor.dims)} need {elements}"
            )


_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


def _typed_count(tensor: onnx.TensorProto) -> int | None:
    """Values stored in the tensor's typed field, or None when they are packed (4-bit)."""
    if tensor.data_type not in _ONE_PER_VALUE | _COMPLEX | {onnx.TensorProto.STRING}:
        return None
    return len(getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type)))


_ONE_PER_VALUE = {
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "INT32",
        "INT64",
        "UINT64",
        "UINT32",
        "INT8",
        "UINT8",
        "INT16",
        "UINT16",
        "BOOL",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
    )
    if hasattr(onnx.TensorProto, name)
}


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
    """onnx.checker (full: with strict shape inference); a model over 2 GB is checked from disk.

    The checker's shape inference cannot type a sparse initializer (ORT makes it
    dense on load): the full check runs on a copy where such initializers are dense.
    """
    if full and model.graph.sparse_initializer:
        model = _densified(model)
    if needs_external_data(model):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            _write(model, path, location="model.onnx.data")
            check_file(path, full=full)
        return
    _checked(lambda: onnx.checker.check_model(model, full_check=full))


def _densified(model: onnx.ModelProto) -> onnx.ModelProto:
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    del dense.graph.sparse_initializer[:]
    for sparse in model.graph.sparse_initializer:
        try:
            values = numpy_helper.to_array(sparse.values)
            indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
            array = np.zeros(list(sparse.dims), dtype=values.dtype)
            if indices.ndim == 2:  # one row of coordinates per value
                array[tuple(indices.T)] = values
            else:
                array.reshape(-1)[indices] = values
        except (ValueError, IndexError, TypeError) as exc:
            raise ModelError(
                f"sparse initializer '{sparse.values.name}' is inconsistent ({exc})"
            ) from None
        dense.graph.initializer.append(numpy_helper.from_array(array, sparse.values.name))
    return dense


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
    """Write `model` to `path` atomically, and return where it went.

    `input_path` is the file the model came from: writing over it, or over one of
    its external-data files, is refused; a folder `path` means `<path>/<its name>`.
    `external_data=None` stores tensors in a data file only when the model would
    not fit in one protobuf. The data file's name is unique per write
    (`<name>.<8 hex>.data`) and the pair is switched in one step: both files are
    written into a temporary folder, the data file is moved next to the target
    under its fresh name (it replaces nothing), then the model is renamed over the
    target; the data file the old target used, if it was one of ours, is removed
    last. A failure or Ctrl-C at any point leaves the old model and its data as
    they were, and no new file behind. Any OSError becomes one ModelError line.
    """
    target = check_output_path(path, input_path, probe=False)
    external = needs_external_data(model) if external_data is None else external_data
    folder = target.parent
    try:
        with temp_folder(folder) as tmp:
            location = _fresh_data_name(folder, target.name) if external else None
            written = _write(model, tmp / target.name, location=location)
            superseded = _own_data_files(target)
            placed: list[Path] = []
            try:
                for name in written:
                    if name != target.name:
                        os.replace(tmp / name, folder / name)
                        placed.append(folder / name)
                os.replace(tmp / target.name, target)
            except BaseException:
                for file in placed:
                    file.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise write_error(target, exc) from None
    for old in superseded:
        if old.name not in written:
            with contextlib.suppress(OSError):
                check_not_read(old)
                old.unlink()
    return target


def _fresh_data_name(folder: Path, name: str) -> str:
    while True:
        location = f"{name}.{secrets.token_hex(4)}.data"
        if not (folder / location).exists():
            return location


def _own_data_files(target: Path) -> list[Path]:
    """The data files of ours (`<name>.<8 hex>.data`) that the model now at `target` uses."""
    try:
        if not target.is_file():
            return []
        stored = _parse(target.read_bytes(), str(target))
    except (OSError, ModelError):
        return []
    pattern = re.compile(re.escape(target.name) + r"\.[0-9a-f]{8}\.data")
    own = {
        location
        for t in model_tensors(stored)
        if (location := _location_or_none(t)) is not None and pattern.fullmatch(location)
    }
    return [target.parent / location for location in sorted(own)]


def _location_or_none(tensor: onnx.TensorProto) -> str | None:
    try:
        return external_location(tensor)
    except ExternalDataError:
        return None


def check_output_path(
    path: str | os.PathLike,
    input_path: str | os.PathLike | None = None,
    *,
    probe: bool = True,
    reads: Sequence[Path] | None = None,
) -> Path:
    """Where the model goes; refuse a path that cannot be written or that names an input.

    A folder (an existing one, or a path ending with a separator) means
    `<folder>/<input file name>`. Refused: the input model or one of its
    external-data files, any file the current run reads (`files.protected`), a
    non-regular file (device, FIFO), a missing folder, a name too long, and (with
    `probe`) a folder where no file can be created. `reads`: the input's files
    when the caller already knows them (saves parsing the input once more).
    """
    default = Path(input_path).name if input_path is not None else None
    target = output_file(path, default_name=default)
    if reads is None:
        reads = [Path(input_path)] if input_path is not None else []
        if input_path is not None:
            with contextlib.suppress(OSError, ModelError):
                reads = model_files(input_path)
    try:
        check_not_read(target, "output", reads)
    except ModelError:
        if input_path is not None and same_file(target, input_path):
            raise OutputError(
                f"output {target} is the input model: choose another -o path, the input is "
                "never overwritten"
            ) from None
        raise
    return check_target(target, probe=probe)


def _write(model: onnx.ModelProto, path: Path, *, location: str | None) -> list[str]:
    """Write `model` to `path`, its large tensors to `location` beside it when given;
    return the names written (the data file first)."""
    if location is None:
        path.write_bytes(model.SerializeToString())
        return [path.name]
    with open(path.with_name(location), "wb") as data:
        skeleton, _ = externalized(model, data, location)
    if skeleton.ByteSize() > PROTOBUF_LIMIT:
        raise ModelError(
            "the model is over 2 GB even without its raw tensor data (tensors stored in "
            "typed fields): re-export it with raw_data tensors"
        )
    path.write_bytes(skeleton.SerializeToString())
    return [location, path.name]


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
            skeleton, sources = externalized(model, data, "weights")
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
    for tensor in model_tensors(converted):
        if external_location(tensor) != "weights":
            continue
        offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = sources[offset].raw_data
    return converted

"""ONNX Runtime sessions: provider names, threads, and capture of intermediate tensors.

Intermediate tensors are captured one feed at a time: the caller gets each
feed's tensors, reduces them (a running statistic, an error metric) and lets
them go, so memory holds one feed's tensors however many feeds there are (a feed
may join a bounded batch of samples: `batching`). Calibration, per-layer
verification and pruning reconstruction all use `iter_tensors`, and min/max
calibration its base, `session_with_outputs`, with reductions added (`minmax`);
nothing else adds graph outputs to look inside a model.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import FeedError, ModelError, ProviderError, RuntimeLoadError
from .model import save_model, tensor_bytes

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Models with more tensor data than this get their sessions through a temporary file
# with external data, which ORT maps rather than copies.
DISK_SESSION_BYTES = 32 * 2**20

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@cache
def int8_pair_sums_saturate() -> bool:
    """Whether ORT's CPU integer kernels on this machine can saturate uint8 x int8 products.

    On x86-64 without VNNI, ORT multiplies uint8 activations by int8 weights with
    VPMADDUBSW, which adds two products into a saturating int16: 255 * 127 * 2 does
    not fit, and outputs come out wrong. VNNI instructions (AVX512-VNNI, AVX-VNNI)
    accumulate in int32, and so do ARM's dot products. Where the CPU's flags cannot be
    read (no /proc/cpuinfo), an x86 machine is taken to lack VNNI.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def trim_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS.

    Freed protobuf and numpy buffers stay resident in glibc's arenas; without a
    trim the calibration session's allocations pile on top of them and the peak
    grows by a model's worth of weights or more. A no-op off glibc.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@cache
def _kernel_versions() -> dict[str, list[tuple[int, int]]] | None:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        kernels = state.get_all_opkernel_def()
    except (ImportError, AttributeError, RuntimeError):
        return None
    versions: dict[str, list[tuple[int, int]]] = {}
    for kernel in kernels:
        versions.setdefault(kernel.op_name, []).append(tuple(kernel.version_range))
    return versions


def has_kernel(op: str, version: int) -> bool | None:
    """Whether this ORT build runs `op` of schema `version` on some provider for some
    element type (None when ORT cannot say). False means no model with that op at that
    version loads here, whatever its types: Relu of opset 1, whose kernels start at 6.
    """
    versions = _kernel_versions()
    if versions is None:
        return None
    return any(low <= version <= high for low, high in versions.get(op, []))


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers."""
    by_long = {v: k for k, v in PROVIDERS.items()}
    return [by_long[p] for p in ort.get_available_providers() if p in by_long]


def resolve_providers(names: str | Sequence[str]) -> list[str]:
    """Map short names (`cuda,cpu`) to ORT provider names, refusing unavailable ones."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    available = available_providers()
    resolved = []
    for raw in names:
        name = raw.strip().lower()
        if name not in PROVIDERS:
            raise ProviderError(
                f"unknown execution provider '{raw}'; known: {', '.join(PROVIDERS)}"
            )
        if name not in available:
            hint = (
                " (install onnxruntime-gpu for cuda/tensorrt)"
                if name in ("cuda", "tensorrt")
                else ""
            )
            raise ProviderError(
                f"execution provider '{name}' is not available here; available: "
                f"{', '.join(available)}{hint}"
            )
        resolved.append(PROVIDERS[name])
    if not resolved:
        raise ProviderError(f"no execution provider given; available: {', '.join(available)}")
    return resolved


def session_options(
    threads: int | None = None, optimization: str = "all", memory_pattern: bool = True
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPT_LEVELS[optimization]
    # FATAL only: ORT logs a failed load or run at ERROR level, in colour, over several
    # lines, and then raises; the user gets that exception as one line of ours instead.
    options.log_severity_level = 4
    options.enable_mem_pattern = memory_pattern
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def create_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    providers: str | Sequence[str] = ("cpu",),
    *,
    threads: int | None = None,
    optimization: str = "all",
    memory_pattern: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession on the given providers (short names); large models go through disk."""
    options = session_options(threads, optimization, memory_pattern)
    resolved = resolve_providers(providers)
    try:
        if isinstance(model, onnx.ModelProto):
            if tensor_bytes(model) >= DISK_SESSION_BYTES:
                return _session_from_disk(model, options, resolved)
            model = model.SerializeToString()
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, sess_options=options, providers=resolved)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeLoadError(f"ONNX Runtime cannot load the model: {first}") from None


def _session_from_disk(
    model: onnx.ModelProto, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    # ORT maps an external-data file instead of copying it: for ResNet-50 the session
    # costs +44 MB this way against +234 MB from serialized bytes. The mapping
    # outlives the file's removal (POSIX); elsewhere the folder may linger.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def run(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run one feed; ORT's shape and type complaints become FeedErrors."""
    wanted = list(names) if names is not None else [o.name for o in session.get_outputs()]
    try:
        values = session.run(wanted, feed)
    except (
        ort.capi.onnxruntime_pybind11_state.InvalidArgument,
        ort.capi.onnxruntime_pybind11_state.Fail,
    ) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FeedError(f"ONNX Runtime rejected the feeds: {first}") from None
    return dict(zip(wanted, values, strict=True))


def float_tensor_names(model: onnx.ModelProto) -> list[str]:
    """Names of node outputs in the main graph whose type is (or may be) floating point."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    types: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        types[vi.name] = vi.type.tensor_type.elem_type
    names: list[str] = []
    for node in model.graph.node:
        for out in node.output:
            if out and types.get(out, onnx.TensorProto.FLOAT) in FLOAT_TYPES:
                names.append(out)
    return names


def session_with_outputs(
    model: onnx.ModelProto,
    names: Iterable[str],
    providers: str | Sequence[str] = ("cpu",),
    *,
    threads: int | None = None,
    optimization: str = "basic",
    extra_nodes: Sequence[onnx.NodeProto] = (),
) -> ort.InferenceSession:
    """A session that also returns the named intermediate tensors.

    The names (and `extra_nodes`, such as reductions of them) are added to the
    model only while it is serialized, so the caller's model is left as it was
    and no second copy of its weights is kept alive beside the one ORT holds.
    """
    graph_outputs = model.graph.output
    present = {o.name for o in graph_outputs}
    added = 0
    model.graph.node.extend(extra_nodes)
    for name in names:
        if name not in present:
            graph_outputs.append(onnx.ValueInfoProto(name=name))
            present.add(name)
            added += 1
    # A capture session returns hundreds of tensors or reductions; without ORT's
    # precomputed memory pattern, PP-OCRv4 min/max calibration ran 8-10 % faster.
    kwargs = {"threads": threads, "optimization": optimization, "memory_pattern": False}
    try:
        if tensor_bytes(model) >= DISK_SESSION_BYTES:
            return create_session(model, providers, **kwargs)
        data = model.SerializeToString()
    finally:
        del graph_outputs[len(graph_outputs) - added :]
        del model.graph.node[len(model.graph.node) - len(extra_nodes) :]
    return create_session(data, providers, **kwargs)


def iter_tensors(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    names: Sequence[str] | None = None,
    *,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the named tensors (default: every float node output) of that feed.

    The session is built once with the tensors as extra outputs and with graph
    optimizations limited to what keeps every named tensor.
    """
    wanted = list(names) if names is not None else float_tensor_names(model)
    session = session_with_outputs(model, wanted, providers, threads=threads)
    missing = [n for n in wanted if n not in {o.name for o in session.get_outputs()}]
    if missing:
        raise ModelError(f"tensors not found in the model: {', '.join(missing[:5])}")
    for feed in feeds:
        yield run(session, feed, wanted)

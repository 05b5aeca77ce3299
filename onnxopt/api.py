"""The Python API: the same operations as the CLI, returning result objects.

Arguments have the CLI's names: `data` (a .npz file, a folder of them or of images,
or a FeedSource) is `--data`, `shape` (`{"x": (1, 3, 640, 640)}` or the CLI's
`"x=1x3x640x640"`) is `--shape`, and errors name them as `data=` and `shape=`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from .bench import BenchResult
from .bench import bench as _bench
from .data import FeedSource, check_shapes, load_feeds, model_inputs, parse_shapes
from .errors import OnnxoptError
from .files import check_outputs, expand_reads, protected
from .model import check_output_path, load_model, model_files, save_model
from .pass_api import (
    PassContext,
    available_groups,
    available_passes,
    describe_pass,
    get_pass,
)
from .pipeline import DEFAULT_PIPELINE, PipelineResult, check_pass_paths, optimize
from .summary import ModelSummary, summarize
from .verify import VerifyResult
from .verify import verify as _verify

Shape = Mapping[str, Sequence[int]] | str | Sequence[str] | None

__all__ = [
    "DEFAULT_PIPELINE",
    "BenchResult",
    "PipelineResult",
    "VerifyResult",
    "bench",
    "inspect",
    "list_passes",
    "load_feeds",
    "load_model",
    "optimize",
    "optimize_file",
    "quiet_libraries",
    "save_model",
    "verify",
]


def optimize_file(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    passes: str = DEFAULT_PIPELINE,
    data: str | os.PathLike | FeedSource | None = None,
    shape: Shape = None,
    providers: str | Sequence[str] = ("cpu",),
    threads: int | None = None,
    seed: int = 0,
    strict: bool = False,
    samples: int = 8,
    progress: Callable[[str, int, int | None], None] | None = None,
    reports: Mapping[str, str | os.PathLike | None] | Sequence[str | os.PathLike] = (),
) -> PipelineResult:
    """Optimize a model file into `output_path`; the input file is never touched.

    Every check that can fail (output path, pass spec, feeds) runs before any
    pass, so a bad argument costs no time and writes nothing. `output_path` may
    be a folder: the model is then written there under the input's file name.
    No output (the model, its data file, a path option of a pass such as
    quantize's `cache`, or the `reports` the caller will write afterwards) may be
    a file the run reads: the model, its external data or the `data` files.
    """
    shapes = _shapes(shape)
    try:
        reads = model_files(model_path)
    except (OSError, OnnxoptError):
        reads = [Path(model_path)]  # load_model says what is wrong with it
    if data is not None and not isinstance(data, FeedSource):
        reads += expand_reads([data])
    with protected(reads):
        target = check_output_path(output_path, model_path, reads=reads)
        if not isinstance(reports, Mapping):
            reports = {f"report {path}": path for path in reports}
        check_outputs({"output": target, **reports}, reads)
    model = load_model(model_path)
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    from .pass_api import parse_spec
    from .runtime import resolve_providers

    resolve_providers(providers)
    steps = parse_spec(passes)
    check_pass_paths(steps, reads)
    check_shapes(shapes or {}, model_inputs(model))
    feeds: FeedSource | None = None
    if data is not None:
        feeds = (
            data
            if isinstance(data, FeedSource)
            else load_feeds(model, data, shapes=shapes, count=samples, seed=seed)
        )
        next(iter(feeds))  # a wrong shape or dtype fails here, before any pass runs
    ctx = PassContext(
        progress=progress,
        feeds=feeds,
        providers=tuple(providers),
        threads=threads,
        seed=seed,
        shapes=dict(shapes or {}),
        model_dir=os.path.dirname(os.path.abspath(model_path)) or None,
    )
    with protected(reads):
        result = optimize(model, steps, ctx, strict=strict)
        save_model(result.model, target)
    return result


def inspect(model: Any, shape: Shape = None) -> ModelSummary:
    """Ops, parameters, MACs, size, opset, inputs and outputs of a model."""
    loaded = model if isinstance(model, onnx.ModelProto) else load_model(model)
    return summarize(loaded, _shapes(shape))


def verify(
    reference: Any,
    candidate: Any,
    data: str | os.PathLike | FeedSource | None = None,
    *,
    shape: Shape = None,
    **options: Any,
) -> VerifyResult:
    """Compare `candidate` with `reference` in ORT on `data` (random feeds from the
    reference's inputs without it); `options` are onnxopt.verify.verify's (rtol,
    atol, budget, samples, per_layer, providers, ...)."""
    _refuse_core_names("verify", options)
    source = os.fspath(data) if isinstance(data, os.PathLike) else data
    return _verify(reference, candidate, source, shapes=_shapes(shape), **options)


def bench(
    models: Sequence[Any],
    providers: str | Sequence[str] = ("cpu",),
    *,
    data: str | os.PathLike | FeedSource | None = None,
    shape: Shape = None,
    **options: Any,
) -> BenchResult:
    """Time `models` interleaved on each provider on `data` (random feeds without it);
    `options` are onnxopt.bench.bench's (runs, warmup, threads, labels, ...)."""
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    _refuse_core_names("bench", options)
    source = os.fspath(data) if isinstance(data, os.PathLike) else data
    return _bench(models, providers, feeds=source, shapes=_shapes(shape), **options)


def _refuse_core_names(function: str, options: Mapping[str, Any]) -> None:
    """The API speaks the CLI's words: `feeds=` and `shapes=` are `data=` and `shape=`."""
    for old, new in (("feeds", "data"), ("shapes", "shape")):
        if old in options:
            raise TypeError(f"onnxopt.{function}() takes {new}= (as --{new}), not {old}=")


def _shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """`shape` as {input: dims}: a mapping as it is, or the CLI's `x=1x3x640x640` text."""
    if shape is None:
        return {}
    if isinstance(shape, str):
        return parse_shapes([shape])
    if isinstance(shape, Mapping):
        return {name: tuple(int(d) for d in dims) for name, dims in shape.items()}
    return parse_shapes(list(shape))


def describe(name: str) -> dict[str, Any]:
    """One pass in full: its summary, its docstring (the rules) and each option's help."""
    return describe_pass(get_pass(name))


def list_passes() -> list[dict[str, Any]]:
    """Every pass with its one-line summary and typed options, then the named groups."""
    listing = [describe_pass(cls) for cls in available_passes().values()]
    listing += [
        {"name": name, "summary": f"{summary} Runs {spec}.", "options": []}
        for name, (spec, summary) in available_groups().items()
    ]
    return sorted(listing, key=lambda item: item["name"])


def quiet_libraries() -> None:
    """Keep library chatter (GraphSurgeon, ORT) out of the user's terminal."""
    import onnxruntime as ort
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(4)
    logging.getLogger("onnxopt").setLevel(logging.WARNING)

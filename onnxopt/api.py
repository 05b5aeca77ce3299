"""The Python API: the same operations as the CLI, returning result objects."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from .bench import BenchResult, bench
from .data import FeedSource, check_shapes, load_feeds, model_inputs
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
from .verify import VerifyResult, verify

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
    shapes: dict[str, tuple[int, ...]] | None = None,
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


def inspect(model: Any, shapes: dict[str, tuple[int, ...]] | None = None) -> ModelSummary:
    """Ops, parameters, MACs, size, opset, inputs and outputs of a model."""
    loaded = model if isinstance(model, onnx.ModelProto) else load_model(model)
    return summarize(loaded, shapes)


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

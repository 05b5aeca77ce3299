"""Run passes in order, check the model after each one, roll back a pass that breaks it.

After every pass the model must pass the full onnx checker and load in an ORT
session. A pass that fails either check, or raises, is rolled back: the model
is what it was before the pass, and the record says why. With `strict=True`
the pipeline stops with a PassError instead.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from . import graph as G
from .errors import ModelError, OnnxoptError, OutputError, PassError, RuntimeLoadError
from .files import protected, same_file
from .model import check_file, check_model, load_model, model_files, save_model, tensor_bytes
from .pass_api import Group, Pass, PassContext, Step, parse_spec
from .runtime import DISK_SESSION_BYTES, create_session, has_kernel

DEFAULT_PIPELINE = "simplify"


@dataclass
class PassRecord:
    """One pass run: what it changed, how long it took, and whether it was kept."""

    name: str
    spec: str
    status: str  # "changed", "unchanged" or "rolled back"
    seconds: float
    nodes_before: int
    nodes_after: int
    round: int = 1
    stats: dict[str, int | float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    records: list[PassRecord]
    seconds: float
    nodes_before: int
    nodes_after: int

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.status == "rolled back"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "passes": [asdict(r) for r in self.records],
        }


def verify_loadable(model: onnx.ModelProto, *, ort: bool = True) -> None:
    """The post-pass check: full onnx checker, then (with `ort`) an ORT session on CPU.

    A large model is written once, with external data, and both checks read that
    file: neither then needs a serialized copy of the weights in memory.
    """
    if tensor_bytes(model) < DISK_SESSION_BYTES:
        check_model(model, full=True)
        if ort:
            create_session(model, providers=["cpu"], optimization="disable")
        return
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        path = save_model(model, Path(tmp) / "candidate.onnx", external_data=True)
        check_file(path, full=True)
        if ort:
            create_session(path, providers=["cpu"], optimization="disable")


# Domains whose ops ORT implements itself; an op of any other domain needs a library.
ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def _custom_domains(model: onnx.ModelProto) -> set[str]:
    nodes = _all_nodes(model.graph) + [n for f in model.functions for n in f.node]
    # A call of a model-local function is expanded by ORT: its domain needs no library.
    return {n.domain for n in nodes} - ORT_DOMAINS - {f.domain for f in model.functions}


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                nodes += _all_nodes(sub)
    return nodes


def check_input_loads(model: onnx.ModelProto) -> None:
    """Refuse an input ORT cannot load, unless an op of a custom domain explains it.

    The onnx checker accepts some models no runtime runs (Relu of opset 1, whose
    kernel ORT dropped): optimizing them would write a model nothing can load.
    A custom-domain op (its library is not loaded here) is the user's business, and
    so is an op ORT has, but not for these types on the CPU (a bfloat16 model).
    """
    refused = _ort_refuses(model)
    if refused is None or _custom_domains(model):
        return
    missing = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", refused)
    if missing and (
        not onnx.defs.has(missing[1]) or has_kernel(missing[1], int(missing[2])) is not False
    ):
        # ORT runs this op, only not for these element types on the CPU (bfloat16 for a
        # GPU), or it is a contrib op of a provider this build lacks: the passes are
        # checked with the onnx checker alone, as for a custom op.
        return
    raise ModelError(f"the input model does not load in ONNX Runtime ({refused}): re-export it")


def _ort_refuses(model: onnx.ModelProto) -> str | None:
    """Why ORT cannot load `model` (its one-line error), or None when it can."""
    try:
        create_session(model, providers=["cpu"], optimization="disable")
    except RuntimeLoadError as exc:
        return str(exc)
    return None


class Pipeline:
    """A list of steps (passes and repeated groups) with the checks between them."""

    def __init__(self, steps: str | Sequence[Step], *, strict: bool = False, check: bool = True):
        self.steps = parse_spec(steps) if isinstance(steps, str) else list(steps)
        self.strict = strict
        self.check = check
        self._ort_checks = True

    def run(self, model: Any, ctx: PassContext | None = None) -> PipelineResult:
        ctx = ctx or PassContext()
        current = load_model(model)
        # A model given by path: no pass may write over it or its data (a cache option).
        reads = model_files(model) if isinstance(model, str | os.PathLike) else []
        check_pass_paths(self.steps, reads)
        if self.check:
            check_input_loads(current)
        # Cleared when ORT cannot load a pass's input: it cannot judge that pass's output.
        self._ort_checks = True
        start = time.perf_counter()
        before = G.node_count(current)
        records: list[PassRecord] = []
        with protected(reads):
            current = self._run_steps(self.steps, current, ctx, records, round_no=1)
        return PipelineResult(
            model=current,
            records=records,
            seconds=time.perf_counter() - start,
            nodes_before=before,
            nodes_after=G.node_count(current),
        )

    def _run_steps(
        self,
        steps: Sequence[Step],
        model: onnx.ModelProto,
        ctx: PassContext,
        records: list[PassRecord],
        round_no: int,
    ) -> onnx.ModelProto:
        for step in steps:
            if isinstance(step, Group):
                model = self._run_group(step, model, ctx, records)
            else:
                model, _ = self._run_pass(step, model, ctx, records, round_no)
        return model

    def _run_group(
        self, group: Group, model: onnx.ModelProto, ctx: PassContext, records: list[PassRecord]
    ) -> onnx.ModelProto:
        for round_no in range(1, group.max_rounds + 1):
            changed = False
            for step in group.steps:
                if isinstance(step, Group):
                    before = model.SerializeToString(deterministic=True)
                    model = self._run_group(step, model, ctx, records)
                    changed |= model.SerializeToString(deterministic=True) != before
                else:
                    model, did = self._run_pass(step, model, ctx, records, round_no)
                    changed |= did
            if not changed:
                break
        return model

    def _verify(self, candidate: onnx.ModelProto, model: onnx.ModelProto) -> str | None:
        """The post-pass check; ORT's part only while ORT loads what the pass was given.

        A model with an op ORT does not know (a custom domain without its library)
        fails ORT's check before and after every pass: the pass is not to blame, so
        the run goes on with the onnx checker alone, and the note returned says so.
        """
        try:
            verify_loadable(candidate, ort=self._ort_checks)
        except RuntimeLoadError:  # the checker passed; ORT refused
            refused = _ort_refuses(model)
            if refused is None:
                raise
            self._ort_checks = False
            return (
                f"the model before this pass does not load in ONNX Runtime either ({refused}): "
                "passes are checked with the onnx checker only from here on"
            )
        return None

    def _run_pass(
        self,
        step: Pass,
        model: onnx.ModelProto,
        ctx: PassContext,
        records: list[PassRecord],
        round_no: int,
    ) -> tuple[onnx.ModelProto, bool]:
        nodes_before = G.node_count(model)
        start = time.perf_counter()
        error: str | None = None
        result = None
        candidate = model
        try:
            graph = G.to_graph(model)
            result = step.run(graph, ctx)
            if result.changed:
                candidate = G.to_model(result.graph or graph, like=model)
                note = self._verify(candidate, model) if self.check else None
                if note:
                    ctx.logger.warning("pass %s: %s", step.name, note)
                    result.notes.append(note)
        except OnnxoptError as exc:
            if not isinstance(exc, ModelError) or isinstance(exc, OutputError):
                raise
            error = str(exc)
        except Exception as exc:  # a pass bug must not cost the user their model
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        seconds = time.perf_counter() - start
        if error is not None:
            if self.strict:
                raise PassError(f"pass '{step.name}' broke the model and --strict is set: {error}")
            _rollback_logger(ctx.logger).warning(
                "pass %s rolled back: %s", step.name, " ".join(error.split())
            )
            records.append(
                PassRecord(
                    step.name,
                    repr(step),
                    "rolled back",
                    seconds,
                    nodes_before,
                    nodes_before,
                    round_no,
                    error=error,
                )
            )
            return model, False
        assert result is not None
        records.append(
            PassRecord(
                step.name,
                repr(step),
                "changed" if result.changed else "unchanged",
                seconds,
                nodes_before,
                G.node_count(candidate),
                round_no,
                dict(result.stats),
                list(result.notes),
            )
        )
        return candidate, result.changed


def _rollback_logger(logger: logging.Logger) -> logging.Logger:
    """The logger a rollback goes to: a child with its own level, so that it is always said.

    `-q` (or any caller) quiets the `onnxopt` logger to errors; a rolled-back pass
    is not an error (`--strict` makes it one) but the user must still learn that
    the output lacks that pass, so its child logger keeps warnings: one line each.
    """
    child = logger.getChild("rollback")
    if child.level == logging.NOTSET:
        child.setLevel(logging.WARNING)
    return child


def check_pass_paths(steps: Sequence[Step], reads: Sequence[Path]) -> None:
    """Refuse a pass option that names a file the run reads (the model, its external data,
    the feeds), before any pass runs.

    A pass receives the model and the feeds through its graph and context, never
    by path: an option naming one of those files is a mistake that would let the
    pass overwrite it (quantize's `cache=model.onnx`).
    """
    for step in steps:
        if isinstance(step, Group):
            check_pass_paths(step.steps, reads)
            continue
        for option, value in step.option_values().items():
            if not isinstance(value, str | os.PathLike) or not str(value):
                continue
            for source in reads:
                if same_file(value, source):
                    raise OutputError(
                        f"pass '{step.name}' option {option}={value} names {source}, a file "
                        "this run reads: choose another path, inputs are never overwritten"
                    )


def optimize(
    model: Any,
    passes: str | Sequence[Step] = DEFAULT_PIPELINE,
    ctx: PassContext | None = None,
    *,
    strict: bool = False,
) -> PipelineResult:
    """Run a pass spec (default: `simplify`) on a model path, bytes or ModelProto."""
    return Pipeline(passes, strict=strict).run(model, ctx)

"""The proof of an optimization in one HTML page: what ran, what changed, what it costs.

`build_report(reference, candidate, feeds)` measures, on the same feeds:
- pipeline: the passes that made the candidate (a `PipelineResult`, or the record
  `optimize` wrote into the candidate's metadata);
- model diff: op histogram, parameters, file size, MACs, opset, inputs and outputs;
- verify: the verdict (tolerances or budget, with the task metric);
- per-layer error: `analyze` for a QDQ candidate (isolated and accumulated SQNR per
  quantized node), else verify's per-layer comparison of tensors sharing a name;
- per-op-type latency before and after, from ORT's profiler (`opprofile`);
- latency: an interleaved bench of both models.
and renders them with `html.render_page`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from .bench import bench
from .data import FeedSource
from .errors import OnnxoptError
from .graph import QUANTIZED_OPS
from .html import Section, bar_chart, render_page
from .model import load_model
from .opprofile import op_latency
from .pass_api import parse_spec
from .pipeline import META_PASSES
from .report import Table, bench_tables, pipeline_tables, verify_tables
from .summary import summarize
from .verify import verify

SECTIONS = ("pipeline", "model-diff", "verify", "per-layer", "op-latency", "latency")


def _size(source: Any, model: onnx.ModelProto) -> int:
    if isinstance(source, str | os.PathLike) and Path(source).is_file():
        return Path(source).stat().st_size
    return model.ByteSize()


def pipeline_section(candidate: onnx.ModelProto, pipeline: Any | None) -> Section:
    section = Section("pipeline", "Pipeline")
    if pipeline is not None:
        tables = pipeline_tables(pipeline)
        table = tables[0]
        table.columns = [*table.columns, "notes"]
        for row, record in zip(table.rows, pipeline.records, strict=True):
            notes = list(record.notes) + ([f"rolled back: {record.error}"] if record.error else [])
            row.append("; ".join(notes) or "-")
        table.notes = [n for n in table.notes if "rolled back" in n]
        section.tables = tables
        return section
    props = {p.key: p.value for p in candidate.metadata_props}
    table = Table("Passes recorded in the candidate's metadata", ["#", "pass"])
    recorded = props.get(META_PASSES, "")
    try:
        passes = [repr(step) for step in parse_spec(recorded)] if recorded else []
    except OnnxoptError:
        passes = [recorded]
    table.rows = [[i + 1, p] for i, p in enumerate(passes)]
    if not passes:
        table.notes.append("the candidate carries no onnxopt metadata: made by another tool")
    section.tables = [table]
    return section


def diff_section(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, sizes: tuple[int, int], shapes: Any
) -> Section:
    before, after = summarize(reference, shapes), summarize(candidate, shapes)
    facts = Table("Model", ["", "reference", "candidate"])
    facts.rows = [
        ["nodes", before.nodes, after.nodes],
        ["parameters", f"{before.parameters:,}", f"{after.parameters:,}"],
        ["parameter bytes", f"{before.parameter_bytes:,}", f"{after.parameter_bytes:,}"],
        ["file bytes", f"{sizes[0]:,}", f"{sizes[1]:,}"],
        ["MACs", before.macs_text, after.macs_text],
        ["opset", before.opset, after.opset],
        ["inputs", "; ".join(before.inputs), "; ".join(after.inputs)],
        ["outputs", "; ".join(before.outputs), "; ".join(after.outputs)],
    ]
    ops = sorted(set(before.ops) | set(after.ops), key=lambda o: -(before.ops[o] + after.ops[o]))
    histogram = Table("Op histogram", ["op", "reference", "candidate", "change"])
    histogram.rows = [[o, before.ops[o], after.ops[o], after.ops[o] - before.ops[o]] for o in ops]
    chart = bar_chart(
        ops,
        {"reference": [before.ops[o] for o in ops], "candidate": [after.ops[o] for o in ops]},
        title="Nodes per op type",
    )
    return Section("model-diff", "Model diff", [facts, histogram], [chart])


def layer_section(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: FeedSource, **run: Any
) -> Section:
    section = Section("per-layer", "Per-layer error")
    if {n.op_type for n in candidate.graph.node} & QUANTIZED_OPS:
        from .analyze import analyze

        result = analyze(reference, candidate, feeds, **run)
        section.tables = result.tables()
        worst = result.layers
        section.charts = [
            bar_chart(
                [e.node for e in worst],
                {
                    "isolated SQNR": [e.isolated_sqnr_db for e in worst],
                    "accumulated SQNR": [e.accumulated_sqnr_db for e in worst],
                },
                title=f"SQNR per quantized node, worst first ({len(worst)} nodes; higher is "
                "better)",
                unit=" dB",
            )
        ]
        return section
    result = verify(reference, candidate, feeds, per_layer=True, lossy=True, **run)
    table = Table(
        f"Tensors that share a name, worst SQNR first ({len(result.layers)})",
        ["tensor", "SQNR dB", "cosine", "max rel"],
    )
    table.rows = [[x.name, x.sqnr_db, x.cosine, x.max_rel] for x in result.layers]
    section.tables = [table]
    if not result.layers:
        table.notes.append("no intermediate tensor has the same name in both models")
    return section


def latency_sections(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: FeedSource,
    *,
    runs: int,
    threads: int | None,
    providers: Sequence[str],
) -> list[Section]:
    feed = next(iter(feeds))
    before = op_latency(reference, feed, runs=max(3, runs // 4), threads=threads)
    after = op_latency(candidate, feed, runs=max(3, runs // 4), threads=threads)
    ops = sorted(set(before) | set(after), key=lambda o: -(before.get(o, 0) + after.get(o, 0)))
    table = Table(
        "Kernel time per op type (ORT profiler, ms per run)",
        ["op (as ORT runs it)", "reference ms", "candidate ms"],
    )
    table.rows = [[o, before.get(o, 0.0), after.get(o, 0.0)] for o in ops]
    table.notes.append(
        f"totals: reference {sum(before.values()):.3f} ms, candidate {sum(after.values()):.3f} ms"
    )
    chart = bar_chart(
        ops,
        {"reference": [before.get(o, 0) for o in ops], "candidate": [after.get(o, 0) for o in ops]},
        title="Kernel time per op type, ms per run",
        unit=" ms",
    )
    timing = bench(
        [reference, candidate],
        list(providers),
        labels=["reference", "candidate"],
        feeds=feeds,
        threads=threads,
        runs=runs,
        warmup=max(2, runs // 10),
    )
    return [
        Section("op-latency", "Per-op-type latency", [table], [chart]),
        Section("latency", "Latency", bench_tables(timing)),
    ]


def build_report(
    reference: Any,
    candidate: Any,
    feeds: FeedSource,
    *,
    pipeline: Any | None = None,
    title: str = "onnxopt report",
    runs: int = 30,
    threads: int | None = None,
    providers: Sequence[str] = ("cpu",),
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> str:
    """The report page (HTML text) of `candidate` against `reference` on `feeds`."""
    ref_model, cand_model = load_model(reference), load_model(candidate)
    sizes = (_size(reference, ref_model), _size(candidate, cand_model))
    run = {"providers": list(providers), "threads": threads}
    checked = verify(ref_model, cand_model, feeds, **run)
    verdict = Section("verify", "Verify", verify_tables(checked), verdict=checked.passed)
    verdict.lead = checked.rule
    sections = [
        pipeline_section(cand_model, pipeline),
        diff_section(ref_model, cand_model, sizes, shapes),
        verdict,
        layer_section(ref_model, cand_model, feeds, **run),
        *latency_sections(
            ref_model, cand_model, feeds, runs=runs, threads=threads, providers=providers
        ),
    ]
    names = [
        str(x) if isinstance(x, str | os.PathLike) else "model" for x in (reference, candidate)
    ]
    subtitle = f"{names[1]} against {names[0]}, on {checked.samples} samples"
    return render_page(title, sections, subtitle)

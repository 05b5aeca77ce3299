"""Render results as terminal tables, Markdown, JSON or HTML.

Each result type (pipeline, verify, bench, inspect) becomes a list of `Table`s;
the renderers know nothing about where a table came from.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt(value: Any) -> str:
    """A cell for people: counts and large values with thousands separators (12,345),
    4 significant digits in between, scientific notation only for tiny values (an
    error of 1.2e-07 is a real figure)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def fmt_duration(seconds: float) -> str:
    """A time in one unit a person reads at a glance: 0.62 ms, 45.1 ms, 1.23 s, 95 s."""
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:,.0f} s"


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def render_terminal(tables: Sequence[Table], console: Console | None = None) -> None:
    console = console or Console()
    for table in tables:
        # Text, not markup: a cell such as "x: float32 [Nx3x640x640]" is shown as written.
        rich_table = RichTable(title=Text(table.title), title_justify="left")
        for i, column in enumerate(table.columns):
            # Text folds to fit the terminal; numbers never break across lines.
            numbers = bool(table.rows) and all(_numeric(row[i]) for row in table.rows)
            rich_table.add_column(Text(column), overflow="fold", no_wrap=numbers)
        for row in table.rows:
            rich_table.add_row(*(Text(fmt(v)) for v in row))
        console.print(rich_table)
        for note in table.notes:
            console.print(f"  {note}", markup=False, highlight=False)


def render_markdown(tables: Sequence[Table]) -> str:
    parts = []
    for table in tables:
        lines = [
            f"### {table.title}",
            "",
            "| " + " | ".join(table.columns) + " |",
            "|" + "---|" * len(table.columns),
        ]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.rows]
        lines += [""] + [f"- {note}" for note in table.notes]
        parts.append("\n".join(lines).rstrip() + "\n")
    return "\n".join(parts)


def render_html(
    tables: Sequence[Table], title: str = "onnxopt report", images: Sequence[str] = ()
) -> str:
    body = []
    for table in tables:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
            for row in table.rows
        )
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
        body.append(
            f"<h2>{html.escape(table.title)}</h2><table><tr>{head}</tr>{rows}</table>"
            + (f"<ul>{notes}</ul>" if notes else "")
        )
    body += [f'<img src="data:image/png;base64,{img}"/>' for img in images]
    style = "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a report file atomically (a half-written report is worse than none)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(to_jsonable(data), indent=2) + "\n")


# ---- tables for each result type ---------------------------------------------------------


def pipeline_tables(result: Any) -> list[Table]:
    table = Table(
        f"Passes ({result.nodes_before:,} -> {result.nodes_after:,} nodes, "
        f"{fmt_duration(result.seconds)})",
        ["pass", "round", "status", "nodes", "time", "stats"],
    )
    for r in result.records:
        stats = ", ".join(
            f"{k}={fmt_duration(v) if k.endswith('seconds') else fmt(v)}"
            for k, v in r.stats.items()
            if v
        )
        table.rows.append(
            [
                r.spec,
                r.round,
                r.status,
                f"{r.nodes_before:,}->{r.nodes_after:,}",
                fmt_duration(r.seconds),
                stats or "-",
            ]
        )
        table.notes += [f"{r.name}: {n}" for n in r.notes]
        if r.error:
            table.notes.append(f"{r.name} rolled back: {r.error}")
    return [table]


def verify_tables(result: Any, max_layers: int = 20) -> list[Table]:
    verdict = "PASS" if result.passed else "FAIL"
    title = f"Verify: {verdict} on {result.samples} samples, {result.rule}"
    if result.lossy:
        cols = ["output", "form", "cosine", "SQNR dB", "max rel", "task metric", "result"]
    else:
        cols = ["output", "max abs", "mean abs", "max rel", "cosine", "SQNR dB", "PSNR dB"]
        cols += ["argmax agree", "violations", "result"]
    table = Table(title, cols)
    for o in result.outputs:
        ok, misses = result.judge(o)
        verdict_cell = "pass" if ok else "FAIL: " + "; ".join(misses)
        if result.lossy:
            task = result.tasks[o.name]
            table.rows.append(
                [o.name, task.form, o.cosine, o.sqnr_db, o.max_rel, task.describe(), verdict_cell]
            )
        else:
            table.rows.append(
                [
                    o.name,
                    o.max_abs,
                    o.mean_abs,
                    o.max_rel,
                    o.cosine,
                    o.sqnr_db,
                    o.psnr_db,
                    o.argmax_agreement,
                    o.violations,
                    verdict_cell,
                ]
            )
    table.notes.append("max rel = max |cand - ref| / max |ref| over the output")
    if any(o.exact for o in result.outputs):
        table.notes.append("integer and bool outputs are compared exactly")
    tables = [table]
    if result.layers:
        layers = Table(
            f"Per layer, worst SQNR first ({len(result.layers)} tensors)",
            ["tensor", "max abs", "max rel", "cosine", "SQNR dB"],
        )
        for layer in result.layers[:max_layers]:
            layers.rows.append(
                [layer.name, layer.max_abs, layer.max_rel, layer.cosine, layer.sqnr_db]
            )
        if len(result.layers) > max_layers:
            layers.notes.append(f"{len(result.layers) - max_layers} more in the JSON report")
        tables.append(layers)
    return tables


def bench_tables(result: Any) -> list[Table]:
    table = Table(
        f"Latency, {result.runs} interleaved runs after {result.warmup} warm-up"
        + (
            f", {result.threads} thread{'s' if result.threads != 1 else ''}"
            if result.threads
            else ""
        ),
        ["model", "provider", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s", "speed-up"],
    )
    for t in result.timings:
        table.rows.append(
            [
                t.label,
                t.provider,
                t.p50,
                t.p90,
                t.p99,
                t.mean,
                t.throughput,
                t.speedup_text,
            ]
        )
    table.notes.append(
        "samples/s and speed-up from the median; ≈1.0x: within the run-to-run spread "
        "(the 95 % interval of the per-round ratio holds 1)"
    )
    return [table]

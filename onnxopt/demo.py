"""`onnxopt demo`: the main job end to end on an embedded model.

Builds the test CNN (BatchNorm, residual Add, Concat, depthwise conv, and the
clutter an exporter leaves), optimizes it with the default pipeline, verifies
the result against the original on random feeds, and benches both.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .api import bench, inspect, optimize_file, save_model, verify
from .report import Table, bench_tables, pipeline_tables, verify_tables


def run_demo(out_dir: str | None = None, runs: int = 50) -> tuple[list[Table], bool]:
    from .test_models import builders

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        original = save_model(builders.cnn(seed=0, batch=1, size=32), folder / "demo_cnn.onnx")
        optimized = folder / "demo_cnn.opt.onnx"
        result = optimize_file(original, optimized)
        check = verify(original, optimized, samples=16, rtol=1e-4, atol=1e-5)
        timing = bench([original, optimized], runs=runs, warmup=5)
        before, after = inspect(original), inspect(optimized)
    summary = Table("Demo: embedded CNN", ["", "original", "optimized"])
    summary.rows += [
        ["nodes", before.nodes, after.nodes],
        ["model bytes", f"{before.model_bytes:,}", f"{after.model_bytes:,}"],
        ["MACs", before.macs_text, after.macs_text],
        ["outputs agree", "-", check.passed],
    ]
    if out_dir:
        summary.notes.append(f"models kept in {folder}")
    tables = [*pipeline_tables(result), *verify_tables(check), *bench_tables(timing), summary]
    return tables, check.passed

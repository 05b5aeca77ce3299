"""Latency per op type, from ONNX Runtime's own profiler, on the given feeds.

The session is built like bench's (full graph optimizations), so the op types are
those ORT runs: a fused Conv+Relu shows as FusedConv, a quantized Conv as QLinearConv.
Each kernel's time is summed per op type and divided by the number of timed runs;
warm-up runs are not profiled.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .model import load_model
from .runtime import resolve_providers, session_options


def op_latency(
    model: Any,
    feed: dict[str, Any],
    *,
    runs: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    providers: Sequence[str] = ("cpu",),
) -> dict[str, float]:
    """Milliseconds per run spent in each op type's kernels, largest first."""
    loaded = load_model(model)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        options = session_options(threads)
        session = ort.InferenceSession(
            loaded.SerializeToString(), options, providers=resolve_providers(providers)
        )
        for _ in range(warmup):
            session.run(None, feed)
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            loaded.SerializeToString(), options, providers=resolve_providers(providers)
        )
        session.run(None, feed)  # the first profiled run pays for allocations: dropped below
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: Counter[str] = Counter()
    runs_seen = 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs_seen += 1
            if runs_seen == 1:
                first_end = event["ts"] + event["dur"]
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if runs_seen > 1 and event["ts"] < first_end:
            continue
        totals[event.get("args", {}).get("op_name", "?")] += event["dur"]
    timed = max(1, runs_seen - 1)
    return {op: us / 1000.0 / timed for op, us in totals.most_common()}

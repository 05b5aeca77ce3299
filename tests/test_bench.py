"""bench: interleaved runs, percentiles, throughput, and speed-up against the first model."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt import bench
from onnxopt.report import bench_tables, render_markdown


def matmul_stack(depth: int, size: int = 256) -> onnx.ModelProto:
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((size, size)).astype(np.float32) / 16, "w"
    )
    nodes, current = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"h{i}"]))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, size])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_bench_reports_percentiles_and_speedups() -> None:
    result = bench(
        [matmul_stack(1), matmul_stack(24)], labels=["light", "heavy"], runs=15, warmup=2, threads=1
    )
    light, heavy = result.timing("light"), result.timing("heavy")
    assert len(light.latencies_ms) == len(heavy.latencies_ms) == 15
    assert light.speedup == 1.0
    # 24 times the work: whatever the machine is doing, it cannot come out faster.
    assert heavy.speedup < 0.5 and heavy.p50 > 4 * light.p50
    assert light.p50 <= light.p90 <= light.p99
    assert light.throughput == 64 * 1000 / light.mean
    assert heavy.speedup == light.p50 / heavy.p50
    table = render_markdown(bench_tables(result))
    assert "| light | cpu |" in table and f"{heavy.speedup:.2f}x" in table


def test_progress_is_reported_each_round() -> None:
    seen: list[tuple[int, int]] = []
    bench([matmul_stack(1)], runs=4, warmup=0, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_each_round_starts_one_model_later() -> None:
    """Planted bug #23.8: bench's rounds rotate their start (round r begins with model
    r mod n), so no model always runs right after another. The order is read from real
    ORT sessions' `run` calls (each model has its own output name), not from a mock."""
    import sys

    from onnxopt.bench import bench

    def relu(name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], [name])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    calls: list[str] = []

    def profile(frame, event, arg) -> None:  # noqa: ANN001
        if event == "call" and frame.f_code.co_name == "run":
            session = frame.f_locals.get("self")
            if type(session).__name__ == "InferenceSession":
                calls.append(session.get_outputs()[0].name)

    sys.setprofile(profile)
    try:
        result = bench([relu("y0"), relu("y1"), relu("y2")], runs=6, warmup=0)
    finally:
        sys.setprofile(None)
    timed = calls[-18:]
    rounds = [timed[i : i + 3] for i in range(0, 18, 3)]
    assert [r[0] for r in rounds] == ["y0", "y1", "y2", "y0", "y1", "y2"]
    assert all(sorted(r) == ["y0", "y1", "y2"] for r in rounds)
    assert [len(t.latencies_ms) for t in result.timings] == [6, 6, 6]

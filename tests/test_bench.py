"""bench: interleaved runs, percentiles, throughput, and speed-up against the first model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
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
    assert light.throughput == 64 * 1000 / light.p50
    assert heavy.speedup == light.p50 / heavy.p50
    table = render_markdown(bench_tables(result))
    assert "| light | cpu |" in table and f"{heavy.speedup:.2f}x" in table


def test_progress_is_reported_each_round() -> None:
    seen: list[tuple[int, int]] = []
    bench([matmul_stack(1)], runs=4, warmup=0, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_throughput_and_speedup_use_the_median_and_noise_reads_approximately_one() -> None:
    model = matmul_stack(4)
    result = bench([model, model], labels=["a", "b"], runs=31, threads=1)
    a, b = result.timing("a"), result.timing("b")
    for t in (a, b):
        assert t.throughput == 64 * 1000 / float(np.median(t.latencies_ms))
    assert b.speedup == a.p50 / b.p50 == pytest.approx(b.throughput / a.throughput, rel=1e-12)
    ratios = np.sort(np.asarray(a.latencies_ms) / np.asarray(b.latencies_ms))
    assert b.speedup_interval == (ratios[10], ratios[20])  # n = 31: ranks 15.5 -+ 5.5
    assert a.speedup_text == "1.00x" and b.speedup_text in ("≈1.0x", f"{b.speedup:.2f}x")
    table = render_markdown(bench_tables(result))
    assert "| b | cpu |" in table and b.speedup_text in table
    assert "1 thread" in table and "1 threads" not in table


def test_noise_is_an_interval_holding_one_or_a_ratio_within_the_floor() -> None:
    from onnxopt.bench import NOISE_FLOOR, Timing

    def timing(speedup: float, low: float, high: float) -> Timing:
        return Timing("m", "cpu", 1, [1.0], speedup=speedup, speedup_interval=(low, high))

    assert timing(1.3, 0.98, 1.4).noise  # the interval holds 1
    assert timing(1.04, 1.01, 1.06).noise  # within the floor
    assert not timing(NOISE_FLOOR * 1.01, 1.02, 1.2).noise
    assert timing(1.3, 0.98, 1.4).speedup_text == "≈1.0x"
    assert timing(1.5, 1.4, 1.6).speedup_text == "1.50x"
    assert timing(0.5, 0.4, 0.6).speedup_text == "0.50x"


def test_a_real_difference_is_not_called_noise() -> None:
    result = bench([matmul_stack(2), matmul_stack(24)], labels=["x", "y"], runs=25, threads=1)
    y = result.timing("y")
    assert y.speedup is not None and y.speedup < 0.5
    assert not y.noise and y.speedup_text == f"{y.speedup:.2f}x"


def test_median_interval_is_the_order_statistic_interval() -> None:
    from onnxopt.bench import median_interval

    values = np.arange(1.0, 101.0)  # n = 100: ranks 50 -+ 9.8 -> 41st and 60th values
    assert median_interval(values) == (41.0, 60.0)
    assert median_interval(np.array([2.0])) == (2.0, 2.0)


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

"""The quantize pass's other modes (dynamic, int4 weights) and its command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxopt.data import RandomFeeds, model_inputs
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import optimize
from onnxopt.test_models import builders


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def outputs(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x, y = np.concatenate([v.ravel() for v in a]), np.concatenate([v.ravel() for v in b])
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


@pytest.fixture(scope="module")
def transformer() -> onnx.ModelProto:
    return builders.transformer_block(seed=0, d_model=64, ff=128)


@pytest.fixture(scope="module")
def token_feeds(transformer) -> RandomFeeds:
    return RandomFeeds(model_inputs(transformer), 4, seed=5)


def test_dynamic_mode_needs_no_data_and_ort_fuses_it(transformer, token_feeds, tmp_path) -> None:
    result = optimize(transformer, "quantize(mode=dynamic)", PassContext(), strict=True)
    record = result.records[0]
    assert record.stats["dynamic_matmuls"] == 6
    qmodel = result.model
    ops = [n.op_type for n in qmodel.graph.node]
    assert ops.count("MatMulInteger") == 6
    # Q, K and V read the same LayerNorm output: one run-time quantization for the three.
    assert ops.count("DynamicQuantizeLinear") == 4
    fused = optimized_ops(qmodel, tmp_path)
    assert "MatMulInteger" not in fused
    assert fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat") == 6
    assert cosine(outputs(transformer, token_feeds), outputs(qmodel, token_feeds)) > 0.9995


@pytest.mark.parametrize("reduce_range,qmax", [("false", 127), ("true", 63)])
def test_dynamic_weights_match_numpy_per_column_int8(transformer, reduce_range, qmax) -> None:
    spec = f"quantize(mode=dynamic,reduce_range={reduce_range})"
    qmodel = optimize(transformer, spec, PassContext(), strict=True).model
    floats = {t.name: numpy_helper.to_array(t) for t in transformer.graph.initializer}
    init = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    for node in qmodel.graph.node:
        if node.op_type == "MatMulInteger":
            q = init[node.input[1]]
            assert q.dtype == np.int8 and q.ndim == 2 and np.abs(q).max() == qmax
    # Per column: the scale of the first projection equals max |w| / qmax per output column.
    w = floats["attn.q.weight"]
    scales = [v for k, v in init.items() if k.endswith("_weight_scale") and "attn.q" in k]
    assert len(scales) == 1
    np.testing.assert_allclose(scales[0], np.abs(w).max(axis=0) / qmax, rtol=1e-6)


def test_dynamic_mode_rewrites_gemm_as_matmul() -> None:
    model = builders.mlp(seed=0)
    result = optimize(model, "quantize(mode=dynamic,per_channel=false)", PassContext(), strict=True)
    stats = result.records[0].stats
    assert stats["gemm_to_matmul"] == 1 and stats["dynamic_matmuls"] == 3
    assert not any(n.op_type == "Gemm" for n in result.model.graph.node)
    feeds = RandomFeeds(model_inputs(model), 4, seed=1)
    assert cosine(outputs(model, feeds), outputs(result.model, feeds)) > 0.999


def np_blockwise(w: np.ndarray, block: int) -> np.ndarray:
    """int4 quantize/dequantize of a [K, N] weight in blocks of `block` rows, in numpy."""
    out = np.empty_like(w)
    for start in range(0, w.shape[0], block):
        part = w[start : start + block]
        scale = np.abs(part).max(axis=0) / 7
        scale = np.where(scale > 0, scale, 1.0)
        out[start : start + block] = np.clip(np.rint(part / scale), -8, 7) * scale
    return out


@pytest.mark.parametrize("block", [32, 64])
def test_int4_blockwise_weights_match_numpy_and_fuse(transformer, token_feeds, block, tmp_path):
    result = optimize(transformer, f"quantize(weights=int4,block_size={block})", strict=True)
    record = result.records[0]
    assert record.stats["int4_matmuls"] == 6
    assert any("opset from 17 to 21" in n for n in record.notes)
    qmodel = result.model
    assert qmodel.opset_import[0].version == 21
    stored = {t.name: t for t in qmodel.graph.initializer}
    floats = {t.name: numpy_helper.to_array(t) for t in transformer.graph.initializer}
    checked = 0
    for node in qmodel.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": block}
        assert stored[node.input[0]].data_type == onnx.TensorProto.INT4
        name = node.input[0].removesuffix("_int4")
        q = numpy_helper.to_array(stored[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(stored[node.input[1]])
        assert scale.shape == (-(-floats[name].shape[0] // block), floats[name].shape[1])
        dequantized = q * np.repeat(scale, block, axis=0)[: q.shape[0]]
        np.testing.assert_allclose(dequantized, np_blockwise(floats[name], block), rtol=1e-6)
        checked += 1
    assert checked == 6
    assert optimized_ops(qmodel, tmp_path).count("MatMulNBits") == 6
    assert cosine(outputs(transformer, token_feeds), outputs(qmodel, token_feeds)) > 0.99
    # Two int4 values per byte: the weights take an eighth of their float32 size plus scales.
    assert len(qmodel.SerializeToString()) < 0.25 * len(transformer.SerializeToString())


def test_int4_leaves_weights_shorter_than_a_block() -> None:
    model = builders.mlp(seed=0, in_features=16, hidden=(64,))
    result = optimize(model, "quantize(weights=int4,block_size=32)", strict=True)
    record = result.records[0]
    # fc0.weight has 16 rows (< 32): float; the head (64 rows) and nothing else: int4.
    assert record.stats["int4_matmuls"] == 1
    assert any("fewer rows than block_size" in n for n in record.notes)


def onnxopt(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxopt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_quantizes_with_data_end_to_end(tmp_path: Path) -> None:
    model = builders.cnn(seed=0, batch=1, size=16)
    source = tmp_path / "cnn.onnx"
    onnx.save(model, source)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", image=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "cnn.int8.onnx"
    done = onnxopt(
        "optimize",
        source,
        "-o",
        out,
        "--passes",
        "simplify,quantize(calibrate=entropy)",
        "--data",
        tmp_path / "calib.npz",
        "-q",
    )
    assert done.returncode == 0, done.stderr
    written = onnx.load(out)
    ops = [n.op_type for n in written.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "Conv" in ops
    feeds = [{"image": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    assert cosine(outputs(model, feeds), outputs(written, feeds)) > 0.99


def test_cli_without_data_fails_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "cnn.onnx"
    onnx.save(builders.cnn(seed=0, size=16), source)
    out = tmp_path / "out.onnx"
    done = onnxopt("optimize", source, "-o", out, "--passes", "quantize")
    assert done.returncode != 0
    assert "quantize needs calibration data: pass --data" in done.stderr
    # In the user's words: what --data takes, no API internals.
    assert "a folder of images" in done.stderr and "ctx.feeds" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("opset", [17, 9])
def test_dynamic_mode_on_a_conv_model_reports_nothing_quantized(opset) -> None:
    # Dynamic mode covers MatMul/Gemm only. At opset 9 the upgrade to 11 that it needs
    # must not count as a change either.
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["x", "w"], ["c"], "conv"),
            onnx.helper.make_node("Relu", ["c"], ["y"], "relu"),
        ],
        "convs",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    before = model.SerializeToString()
    result = optimize(model, "quantize(mode=dynamic)", PassContext(), strict=True)
    record = result.records[0]
    assert record.status == "unchanged"
    assert any(n.startswith("nothing was quantized") for n in record.notes)
    assert any("1 convolution(s) in float" in n for n in record.notes)
    assert record.stats["dynamic_matmuls"] == 0
    assert result.model.SerializeToString() == before

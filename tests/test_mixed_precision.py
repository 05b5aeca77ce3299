"""The quantize pass's precision: per-node and per-op overrides, automatic mixed precision."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.analyze import analyze
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.errors import PassError
from onnxopt.pass_api import PassContext, get_pass
from onnxopt.pipeline import optimize
from onnxopt.test_models import builders

SEQ, D_MODEL = 16, 64  # the builder block's defaults


def block_feeds(model: onnx.ModelProto, count: int, seed: int) -> ListFeeds:
    """Normal tokens and a padding mask that keeps a random prefix of 4 to 16 tokens."""
    return ListFeeds(builders.transformer_block_feeds(count, seed), model_inputs(model))


def quantized_inputs(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Node name -> data types of the DequantizeLinear outputs it reads (its quantized inputs)."""
    dq_type = {}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            source = node.input[0]
            if source in inits:
                dq_type[node.output[0]] = inits[source].data_type
            else:
                q = next(n for n in model.graph.node if source in n.output)
                dq_type[node.output[0]] = inits[q.input[2]].data_type
    # An int32 bias (a Gemm's C) is not a precision choice: it follows the other two.
    return {
        n.name: [dq_type[i] for i in n.input if i in dq_type and dq_type[i] != TensorProto.INT32]
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
    }


def linear(stats: dict) -> int:
    """Quantized linear layers: MatMul, or Gemm once they run on rows with their bias."""
    return stats.get("quantized_MatMul", 0) + stats.get("quantized_Gemm", 0)


def int8_model(block: onnx.ModelProto, calib: ListFeeds) -> onnx.ModelProto:
    """The all-int8 model a target run starts from: calibrated on the first 75% of samples."""
    return run(block, "quantize", ListFeeds(calib.feeds[:24], calib.specs))[0]


def run(model, spec, feeds):
    result = optimize(model, spec, PassContext(feeds=feeds), strict=True)
    record = result.records[-1]
    assert record.status == "changed", record
    return result.model, record


@pytest.fixture(scope="module")
def block() -> onnx.ModelProto:
    return builders.transformer_block(seed=0)


@pytest.fixture(scope="module")
def calib(block) -> ListFeeds:
    return block_feeds(block, 32, seed=1)


@pytest.fixture(scope="module")
def test_feeds(block) -> ListFeeds:
    return block_feeds(block, 16, seed=9)


WEIGHTED = ["attn.q.matmul", "attn.k.matmul", "attn.v.matmul", "attn.out.matmul"]
WEIGHTED += ["ff1.matmul", "ff2.matmul"]


# ---- overrides ------------------------------------------------------------------------------


def test_float_nodes_by_pattern_leave_exactly_those_nodes_float(block, calib) -> None:
    qmodel, record = run(block, "quantize(float_nodes=attn.*)", calib)
    inputs = quantized_inputs(qmodel)
    int8 = TensorProto.UINT8
    # The four attention projections read no DQ at all; the feed-forward ones read a
    # uint8 activation and an int8 weight.
    assert all(inputs[n] == [] for n in WEIGHTED[:4])
    assert all(sorted(inputs[n]) == sorted([int8, TensorProto.INT8]) for n in WEIGHTED[4:])
    assert linear(record.stats) == 2
    assert sum(n.op_type == "QuantizeLinear" for n in qmodel.graph.node) == 2
    # Every attention node of the float model is named in the note (with the Reshape
    # that hands its output to the feed-forward rows, named after that tensor).
    attention = {n.name for n in block.graph.node if n.name.startswith("attn.")}
    note = next(n for n in record.notes if "in float by float_nodes/float_ops: " in n)
    assert attention <= set(note.split(": ", 1)[1].split(", "))


def test_int16_nodes_get_16_bit_activations_and_int8_weights(block, calib, cosine) -> None:
    qmodel, record = run(block, "quantize(int16_nodes=ff2.matmul)", calib)
    inputs = quantized_inputs(qmodel)
    assert sorted(inputs["ff2.matmul"]) == sorted([TensorProto.INT16, TensorProto.INT8])
    for name in WEIGHTED[:5]:  # the others keep uint8 activations
        assert sorted(inputs[name]) == sorted([TensorProto.UINT8, TensorProto.INT8]), name
    assert {o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx")} == {21}
    assert record.stats["int16_nodes"] == 1
    assert cosine(block, qmodel, block_feeds(block, 4, 3)) > 0.999


def test_op_overrides_and_float_winning_over_int16(block, calib) -> None:
    qmodel, _ = run(block, "quantize(int16_ops=MatMul,float_nodes=ff1.matmul)", calib)
    inputs = quantized_inputs(qmodel)
    assert inputs["ff1.matmul"] == []
    for name in [*WEIGHTED[:4], "ff2.matmul"]:
        assert TensorProto.INT16 in inputs[name], name
    qmodel, _ = run(block, "quantize(float_ops=MatMul)", calib)
    assert not any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)


def test_a_pattern_that_matches_nothing_is_reported(block, calib) -> None:
    _, record = run(block, "quantize(float_nodes=no_such_node*)", calib)
    assert "float_nodes: no node matches no_such_node*" in record.notes


# ---- automatic mixed precision ------------------------------------------------------------


def test_target_met_by_int8_moves_nothing(block, calib, test_feeds, cosine) -> None:
    qmodel, record = run(block, "quantize(target=cosine:0.999)", calib)
    assert record.stats["target_met"] == 1 and record.stats["mixed_steps"] == 0
    assert linear(record.stats) == 6
    # 32 samples: the last 8 are held out and never calibrate.
    assert record.stats["holdout_samples"] == 8 and record.stats["calibration_samples"] == 24
    assert cosine(block, qmodel, test_feeds) >= 0.999
    # No int16 node in the result: the opset stays (a higher one can cost ORT fusions).
    assert {o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx")} == {17}


def test_tight_target_moves_the_most_sensitive_nodes_first(
    block, calib, test_feeds, cosine
) -> None:
    qmodel, record = run(block, "quantize(target=cosine:0.99995)", calib)
    stats = record.stats
    assert stats["target_met"] == 1 and stats["target_value"] >= 0.99995
    assert stats["target_int8_value"] < 0.99995
    moved = stats["moved_to_int16"] + stats["moved_to_float"]
    assert 1 <= moved <= 4  # of the 6 quantized MatMuls (4 with 7-bit weights)
    assert cosine(block, qmodel, test_feeds) > cosine(block, int8_model(block, calib), test_feeds)
    assert cosine(block, qmodel, test_feeds) >= 0.9999
    # The first node moved is the one onnxopt.analyze ranks most sensitive on the same
    # calibration samples in the all-int8 model.
    ranked = analyze(block, int8_model(block, calib), calib.feeds[:8]).layers
    first = next(layer.node for layer in ranked if layer.op in ("MatMul", "Gemm"))
    steps = [n for n in record.notes if n.startswith("step ")]
    assert steps[0].startswith(f"step 1: {first} -> int16")
    assert any(n.startswith("latency (median of") for n in record.notes)
    assert stats["latency_int8_ms"] > 0 and stats["latency_mixed_ms"] > 0
    # One calibration for every step.
    assert not any("calibrated" in n and "more tensor" in n for n in record.notes)


def test_unreachable_target_moves_everything_and_says_so(block, calib) -> None:
    def never(ref: dict, cand: dict) -> bool:
        return False

    def quantize(**options):
        step = get_pass("quantize")(target=never, **options)
        record = optimize(block, [step], PassContext(feeds=calib), strict=True).records[-1]
        return record

    record = quantize(fallback=["float"])
    assert record.stats["target_met"] == 0
    assert record.stats["moved_to_float"] == 6 and record.stats["mixed_steps"] == 6
    assert record.stats["quantized_nodes"] == 0
    assert "target never() not met: 6 step(s) tried every one of the 6 ranked node(s) it could" in (
        record.notes
    )
    capped = quantize(fallback=["float"], max_moves=2)
    assert capped.stats["mixed_steps"] == 2 and linear(capped.stats) == 4
    both = quantize(max_moves=1)  # int16 then float for the most sensitive node
    assert both.stats["mixed_steps"] == 2 and linear(both.stats) == 5


def test_a_callable_target_sees_the_held_out_outputs(block, calib) -> None:
    seen: list[tuple[int, ...]] = []

    def third_time_lucky(ref: dict, cand: dict) -> bool:
        seen.append(ref["hidden"].shape)
        assert cand["hidden"].shape == ref["hidden"].shape
        return len(seen) == 3

    quantize = get_pass("quantize")(target=third_time_lucky, fallback=["float"])
    result = optimize(block, [quantize], PassContext(feeds=calib), strict=True)
    record = result.records[-1]
    assert seen == [(8, SEQ, D_MODEL)] * 3  # 8 held-out samples stacked, 3 evaluations
    assert record.stats["mixed_steps"] == 2 and record.stats["moved_to_float"] == 2
    assert linear(record.stats) == 4


def test_bad_targets_are_one_line_errors(block, calib) -> None:
    for spec, message in [
        ("quantize(target=psnr:30)", "target must be metric:threshold"),
        ("quantize(target=cosine)", "target must be metric:threshold"),
        ("quantize(target=cosine:1.5)", "cosine and top1 thresholds lie in"),
        ("quantize(target=cosine:0.99,holdout=1.5)", "holdout must be a share"),
        ("quantize(target=cosine:0.99,mode=dynamic)", "static quantization only"),
    ]:
        with pytest.raises(PassError, match=message) as info:
            optimize(block, spec, PassContext(feeds=calib))
        assert "\n" not in str(info.value)
    with pytest.raises(PassError, match="at least 2 samples"):
        optimize(block, "quantize(target=cosine:0.99)", PassContext(feeds=block_feeds(block, 1, 0)))


def test_top1_target_on_a_classifier() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], "fc"),
            helper.make_node("Add", ["y", "b"], ["logits"], "bias"),
        ],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [8, 10])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = ListFeeds(
        [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(8)],
        model_inputs(model),
    )
    # min_weights=0: a lone 32x10 layer would otherwise stay float (too small to pay).
    _, record = run(model, "quantize(target=top1:1.0,min_weights=0)", feeds)
    # Argmax agreement over the 2 held-out batches of 8 rows each.
    assert record.stats["target_met"] == 1 and record.stats["target_value"] == 1.0
    assert record.stats["holdout_samples"] == 2

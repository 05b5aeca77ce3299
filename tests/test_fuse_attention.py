"""fuse-attention: unmasked self-attention becomes ONNX Attention or ORT's contrib ops."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import PassContext, optimize
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.model import default_opset
from onnxopt.pass_api import get_pass
from onnxopt.test_models.digits import load_digits_split

TRANSFORMER = Path(__file__).resolve().parents[1] / "test_models" / "digits_transformer.onnx"


def outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def calibration(model: onnx.ModelProto) -> ListFeeds:
    x_train = load_digits_split()[0]
    return ListFeeds(
        [{"image": x_train[i : i + 32]} for i in range(0, 256, 32)], model_inputs(model)
    )


def test_digits_transformer_fuses_into_onnx_attention_on_cpu() -> None:
    # The default on the CPU provider: the standard Attention op (opset 23), q, k and
    # v split from the packed projection; after quantize that projection stays a
    # QGemm. Outputs equal the unfused models'.
    model = onnx.load(str(TRANSFORMER))
    _, _, x_test, y_test = load_digits_split()
    feed = {"image": x_test}
    simplified = optimize(model, "simplify", strict=True).model
    assert default_opset(simplified) == 17
    fused = optimize(simplified, "fuse-attention", strict=True)
    record = fused.records[-1]
    ops = Counter(n.op_type for n in fused.model.graph.node)
    assert record.stats == {"fused": 2, "quantized": 0} and ops["Attention"] == 2
    assert default_opset(fused.model) == 23
    assert not {"MultiHeadAttention", "QAttention", "Softmax"} & set(ops)
    assert all(n.domain in ("", "ai.onnx") for n in fused.model.graph.node)
    assert any("from 17 to 23" in note for note in record.notes)
    np.testing.assert_allclose(outputs(fused.model, feed), outputs(model, feed), atol=1e-5)

    int8 = optimize(model, "simplify,quantize", PassContext(feeds=calibration(model))).model
    quantized = optimize(int8, "fuse-attention", strict=True)
    ops = Counter(n.op_type for n in quantized.model.graph.node)
    assert (
        ops["Attention"] == 2 and ops["Gemm"] == Counter(n.op_type for n in int8.graph.node)["Gemm"]
    )
    # ORT's fused kernel sums in another order: a value on a rounding boundary of its
    # requantization can land one level away (10 of 5390 logits, 1.2e-3, on an AVX2 CPU).
    fused_out, int8_out = outputs(quantized.model, feed), outputs(int8, feed)
    assert np.mean(np.abs(fused_out - int8_out) > 1e-5) < 0.01
    assert float(np.abs(fused_out - int8_out).max()) < 0.01
    top1 = float(np.mean(outputs(quantized.model, feed).argmax(axis=1) == y_test))
    assert top1 >= float(np.mean(outputs(model, feed).argmax(axis=1) == y_test)) - 0.005


def test_auto_picks_ort_contrib_ops_for_a_gpu_provider() -> None:
    fuse = get_pass("fuse-attention")()
    assert fuse._form(PassContext(providers=("cpu",)))[0] == "onnx"
    form, notes = fuse._form(PassContext(providers=("cuda", "cpu")))
    assert form == "ort" and "GPU" in notes[0]
    assert (
        get_pass("fuse-attention")(op="onnx")._form(PassContext(providers=("cuda",)))[0] == "onnx"
    )


def test_digits_transformer_attention_fuses_into_ort_ops_in_float_and_after_quantize() -> None:
    model = onnx.load(str(TRANSFORMER))
    _, _, x_test, y_test = load_digits_split()
    feeds = calibration(model)
    simplified = optimize(model, "simplify", strict=True).model
    fused = optimize(simplified, "fuse-attention(op=ort)", strict=True)
    ops = Counter(n.op_type for n in fused.model.graph.node)
    assert fused.records[-1].stats["fused"] == 2 and ops["MultiHeadAttention"] == 2
    assert "Softmax" not in ops and "Split" in ops  # one Split of q/k/v per block remains
    # 12 nodes per block (Reshape, Transpose, Split, 3 Squeeze, Transpose, 2 MatMul, Mul,
    # Softmax, Transpose) became Reshape, Split and MultiHeadAttention.
    assert len(simplified.graph.node) - len(fused.model.graph.node) == 2 * (12 - 3)
    feed = {"image": x_test}
    np.testing.assert_allclose(outputs(fused.model, feed), outputs(model, feed), atol=1e-5)
    # After quantize (its row-wise layers on 2-D), each block's quantized q/k/v
    # projection joins its attention in one QAttention, with the same outputs as the
    # unfused int8 model, and the top-1 holds.
    int8 = optimize(model, "simplify,quantize", PassContext(feeds=feeds)).model
    quantized = optimize(int8, "fuse-attention(op=ort)", strict=True)
    assert quantized.records[-1].stats == {"fused": 2, "quantized": 2}
    ops = Counter(n.op_type for n in quantized.model.graph.node)
    assert ops["QAttention"] == 2 and not ops["MultiHeadAttention"] and not ops["Split"]
    # ORT's fused kernel sums in another order: a value on a rounding boundary of its
    # requantization can land one level away (10 of 5390 logits, 1.2e-3, on an AVX2 CPU).
    fused_out, int8_out = outputs(quantized.model, feed), outputs(int8, feed)
    assert np.mean(np.abs(fused_out - int8_out) > 1e-5) < 0.01
    assert float(np.abs(fused_out - int8_out).max()) < 0.01
    top1 = float(np.mean(outputs(quantized.model, feed).argmax(axis=1) == y_test))
    assert top1 >= float(np.mean(outputs(model, feed).argmax(axis=1) == y_test)) - 0.005


def test_quantized_projection_with_another_scale_keeps_multi_head_attention() -> None:
    # QAttention scales by 1/sqrt(head size) only: with any other factor the quantized
    # projection stays a Gemm and the attention core becomes MultiHeadAttention.
    model = optimize(onnx.load(str(TRANSFORMER)), "simplify", strict=True).model
    graph = model.graph
    produced = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Softmax":
            scaling = produced[node.input[0]]
            constant = next(i for i in graph.initializer if i.name == scaling.input[1])
            value = onnx.numpy_helper.to_array(constant) * 0.5
            constant.CopyFrom(onnx.numpy_helper.from_array(value, constant.name))
    x_train, _, x_test, _ = load_digits_split()
    feeds = ListFeeds(
        [{"image": x_train[i : i + 32]} for i in range(0, 128, 32)], model_inputs(model)
    )
    int8 = optimize(model, "quantize", PassContext(feeds=feeds)).model
    fused = optimize(int8, "fuse-attention(op=ort)", strict=True)
    assert fused.records[-1].stats == {"fused": 2, "quantized": 0}
    ops = Counter(n.op_type for n in fused.model.graph.node)
    assert ops["MultiHeadAttention"] == 2 and not ops["QAttention"]
    feed = {"image": x_test}
    np.testing.assert_allclose(outputs(fused.model, feed), outputs(int8, feed), atol=1e-4)


def test_attention_with_a_mask_before_softmax_is_left_alone() -> None:
    # The same blocks with an additive mask between the scaling and the Softmax: the
    # fused op would drop it, so neither block may fuse.
    model = optimize(onnx.load(str(TRANSFORMER)), "simplify", strict=True).model
    graph = model.graph
    mask = onnx.numpy_helper.from_array(np.zeros((1, 1, 8, 8), np.float32), "mask")
    graph.initializer.append(mask)
    nodes = []
    for node in graph.node:
        if node.op_type == "Softmax":
            masked = node.input[0] + "_masked"
            nodes.append(onnx.helper.make_node("Add", [node.input[0], "mask"], [masked]))
            node.input[0] = masked
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    result = optimize(model, "fuse-attention", strict=True)
    assert result.records[-1].status == "unchanged"
    assert not {"Attention", "MultiHeadAttention"} & {n.op_type for n in result.model.graph.node}
    assert default_opset(result.model) == 17  # no upgrade without a match

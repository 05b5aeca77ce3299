"""fuse-attention: unmasked self-attention becomes ORT's MultiHeadAttention."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import PassContext, optimize
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.test_models.digits import load_digits_split

TRANSFORMER = Path(__file__).resolve().parents[1] / "test_models" / "digits_transformer.onnx"


def outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_digits_transformer_attention_fuses_in_float_and_after_quantize() -> None:
    model = onnx.load(str(TRANSFORMER))
    x_train, _, x_test, y_test = load_digits_split()
    feeds = ListFeeds(
        [{"image": x_train[i : i + 32]} for i in range(0, 256, 32)], model_inputs(model)
    )
    simplified = optimize(model, "simplify", strict=True).model
    fused = optimize(simplified, "fuse-attention", strict=True)
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
    quantized = optimize(int8, "fuse-attention", strict=True)
    assert quantized.records[-1].stats == {"fused": 2, "quantized": 2}
    ops = Counter(n.op_type for n in quantized.model.graph.node)
    assert ops["QAttention"] == 2 and not ops["MultiHeadAttention"] and not ops["Split"]
    np.testing.assert_allclose(outputs(quantized.model, feed), outputs(int8, feed), atol=1e-5)
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
    fused = optimize(int8, "fuse-attention", strict=True)
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
    assert not any(n.op_type == "MultiHeadAttention" for n in result.model.graph.node)

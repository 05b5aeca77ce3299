"""The quantize pass's transformer defaults: masks, norms, softmax and embeddings stay float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import ListFeeds, model_inputs
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import optimize
from onnxopt.test_models import builders
from onnxopt.test_models.digits import load_digits_split, top1

DIGITS_TRANSFORMER = Path(__file__).resolve().parents[1] / "test_models" / "digits_transformer.onnx"
MASK_REASON = "attention mask (large negative values added before Softmax)"


def make_model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def quantize(model, spec, feeds):
    result = optimize(model, spec, PassContext(feeds=feeds), strict=True)
    assert result.records[-1].status == "changed", result.records[-1]
    return result.model, result.records[-1]


def readers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def writer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


# ---- attention masks --------------------------------------------------------------------------


def masked_conv_model(computed_mask: bool) -> onnx.ModelProto:
    """Conv scores + a mask on the last axis, then a 1x1 Conv.

    Conv writes integers, so without the defaults the masked Add (and what follows it
    up to the second Conv) would run on 8 bits, the Add's range set by the mask's -10000.
    With `computed_mask` the mask comes from an int64 input as (1 - mask) * -10000 and a
    Softmax follows the Add; otherwise the mask is a float input that already holds 0 or
    -10000 and the masked scores go straight into the second Conv.
    """
    rng = np.random.default_rng(0)
    inits = [
        const("w1", rng.standard_normal((4, 4, 3, 3)) * 0.3),
        const("b1", rng.standard_normal(4) * 0.1),
        const("w2", rng.standard_normal((4, 4, 1, 1)) * 0.5),
        const("b2", rng.standard_normal(4) * 0.1),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["scores"], "conv1", pads=[1] * 4)]
    if computed_mask:
        inits += [const("one", 1.0), const("neg", -10000.0)]
        nodes += [
            helper.make_node("Cast", ["mask"], ["mask_f"], "mask_cast", to=TensorProto.FLOAT),
            helper.make_node("Sub", ["one", "mask_f"], ["mask_inv"], "mask_invert"),
            helper.make_node("Mul", ["mask_inv", "neg"], ["mask_bias"], "mask_scale"),
        ]
        mask = helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 1, 1, 8])
    else:
        mask = helper.make_tensor_value_info("mask_bias", TensorProto.FLOAT, [1, 1, 1, 8])
    nodes += [
        helper.make_node("Add", ["scores", "mask_bias"], ["masked"], "masked_add"),
    ]
    if computed_mask:
        nodes.append(helper.make_node("Softmax", ["masked"], ["probs"], "softmax", axis=-1))
    nodes.append(
        helper.make_node(
            "Conv", ["probs" if computed_mask else "masked", "w2", "b2"], ["y"], "conv2"
        )
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    return make_model(nodes, [x, mask], [y], inits)


def mask_feeds(model: onnx.ModelProto, count: int, seed: int, computed: bool) -> ListFeeds:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        keep = np.zeros((1, 1, 1, 8), np.int64)
        keep[..., : int(rng.integers(3, 9))] = 1
        mask = keep if computed else ((1 - keep) * -10000.0).astype(np.float32)
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        feeds.append({"x": x, "mask" if computed else "mask_bias": mask})
    return ListFeeds(feeds, model_inputs(model))


def test_a_computed_attention_mask_stays_float(cosine) -> None:
    model = masked_conv_model(computed_mask=True)
    calib, test = mask_feeds(model, 16, 1, True), mask_feeds(model, 8, 2, True)
    qmodel, record = quantize(model, "quantize", calib)
    assert writer(qmodel, "probs").op_type == "Softmax"
    assert writer(qmodel, "masked").op_type == "Add"
    assert all(r.op_type != "QuantizeLinear" for r in readers(qmodel, "masked"))
    assert writer(qmodel, writer(qmodel, "masked").input[1]).op_type == "Mul"  # mask: float
    assert (
        f"transformer defaults left 4 node(s) in float ({MASK_REASON}): "
        "masked_add, mask_scale, mask_invert, mask_cast" in record.notes
    )
    # What the default prevents: the Add on 8 bits, its range set by the mask.
    plain, _ = quantize(model, "quantize(transformer_defaults=false)", calib)
    assert writer(plain, "masked").op_type == "DequantizeLinear"  # Add -> Q -> DQ
    assert cosine(model, qmodel, test) > 0.999
    assert cosine(model, plain, test) < 0.9


def test_a_range_dominated_by_a_mask_stays_float() -> None:
    # A float mask input: nothing in the graph says "mask", the calibrated range does.
    model = masked_conv_model(computed_mask=False)
    calib, test = mask_feeds(model, 16, 1, False), mask_feeds(model, 8, 2, False)
    qmodel, record = quantize(model, "quantize", calib)
    assert writer(qmodel, "masked").op_type == "Add"
    assert all(r.op_type != "QuantizeLinear" for r in readers(qmodel, "masked"))
    conv2 = next(n for n in qmodel.graph.node if n.name == "conv2")
    assert all(writer(qmodel, i).op_type != "DequantizeLinear" for i in conv2.input[:1])
    notes = [n for n in record.notes if "range dominated by a masking constant" in n]
    assert len(notes) == 1 and notes[0].startswith("then left 2 node(s) in float")
    assert set(notes[0].split(": ")[-1].split(", ")) == {"masked_add", "conv2"}
    plain, _ = quantize(model, "quantize(transformer_defaults=false)", calib)
    assert writer(plain, "masked").op_type == "DequantizeLinear"
    # Compared where the mask keeps the scores (elsewhere the output is about -10000 * w).
    assert kept_error(model, qmodel, test) < 0.06  # measured 0.038; without: 1.0
    assert kept_error(model, plain, test) > 0.5


def kept_error(a: onnx.ModelProto, b: onnx.ModelProto, feeds: ListFeeds) -> float:
    """Relative L2 error of b's output against a's where the mask keeps the scores."""
    ref = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(b.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = [], []
    for feed in feeds:
        kept = np.broadcast_to(feed["mask_bias"] == 0, (1, 4, 8, 8))
        x.append(ref.run(None, feed)[0][kept])
        y.append(cand.run(None, feed)[0][kept])
    u, v = np.concatenate(x).astype(np.float64), np.concatenate(y).astype(np.float64)
    return float(np.linalg.norm(v - u) / np.linalg.norm(u))


def test_the_user_can_ask_for_int16_on_a_default_float_node() -> None:
    model = masked_conv_model(computed_mask=True)
    feeds = mask_feeds(model, 8, 1, True)
    qmodel, record = quantize(model, "quantize(int16_nodes=masked_add|softmax)", feeds)
    for tensor in ("masked", "probs"):  # each written as Add/Softmax -> Q int16 -> DQ
        q = writer(qmodel, writer(qmodel, tensor).input[0])
        assert q.op_type == "QuantizeLinear"
        zero_point = next(t for t in qmodel.graph.initializer if t.name == q.input[2])
        assert zero_point.data_type == TensorProto.INT16, tensor
    assert (
        f"transformer defaults left 3 node(s) in float ({MASK_REASON}): "
        "mask_scale, mask_invert, mask_cast" in record.notes
    )
    assert not any("(Softmax and its internals)" in n for n in record.notes)


def test_builder_block_mask_add_and_its_inputs_are_named() -> None:
    model = builders.transformer_block(seed=0)
    rng = np.random.default_rng(0)
    feeds = ListFeeds(
        [
            {
                "tokens": rng.standard_normal((1, 16, 64)).astype(np.float32),
                "attention_mask": (np.arange(16) < 9).astype(np.int64)[None],
            }
            for _ in range(4)
        ],
        model_inputs(model),
    )
    qmodel, record = quantize(model, "quantize", feeds)
    assert (
        f"transformer defaults left 5 node(s) in float ({MASK_REASON}): attn.masked, "
        "mask.unsqueeze, mask.bias, mask.invert, mask.cast" in record.notes
    )
    add = next(n for n in qmodel.graph.node if n.name == "attn.masked")
    assert all(writer(qmodel, i).op_type != "DequantizeLinear" for i in add.input)
    assert all(r.op_type != "QuantizeLinear" for r in readers(qmodel, add.output[0]))


# ---- norms, softmax, embeddings ---------------------------------------------------------------


def decomposed_model() -> onnx.ModelProto:
    """MatMul, decomposed LayerNorm, MatMul, decomposed Softmax, MatMul; and an embedding."""
    rng = np.random.default_rng(0)
    d = 16
    inits = [const(f"w{i}", rng.standard_normal((d, d)) * 0.25) for i in (1, 2, 3)]
    inits += [
        const("two", 2.0),
        const("eps", 1e-5),
        const("gamma", rng.uniform(0.5, 1.5, d)),
        const("beta", rng.standard_normal(d) * 0.1),
        const("table", rng.standard_normal((20, d))),
    ]
    mean = {"axes": [-1], "keepdims": 1}
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], "embed", axis=0),
        helper.make_node("Add", ["x", "embedded"], ["h"], "add_embed"),
        helper.make_node("MatMul", ["h", "w1"], ["a"], "mm1"),
        helper.make_node("ReduceMean", ["a"], ["mu"], "ln_mean", **mean),
        helper.make_node("Sub", ["a", "mu"], ["centered"], "ln_sub"),
        helper.make_node("Pow", ["centered", "two"], ["sq"], "ln_pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], "ln_var", **mean),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], "ln_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], "ln_sqrt"),
        helper.make_node("Div", ["centered", "std"], ["normed"], "ln_div"),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"], "ln_gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["ln"], "ln_beta"),
        helper.make_node("MatMul", ["ln", "w2"], ["s"], "mm2"),
        helper.make_node("ReduceMax", ["s"], ["peak"], "sm_max", **mean),
        helper.make_node("Sub", ["s", "peak"], ["shifted"], "sm_sub"),
        helper.make_node("Exp", ["shifted"], ["e"], "sm_exp"),
        helper.make_node("ReduceSum", ["e", "axes"], ["total"], "sm_sum", keepdims=1),
        helper.make_node("Div", ["e", "total"], ["p"], "sm_div"),
        helper.make_node("MatMul", ["p", "w3"], ["y"], "mm3"),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, d]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, d])]
    return make_model(nodes, inputs, outputs, inits)


def test_decomposed_norm_softmax_and_embedding_are_detected() -> None:
    model = decomposed_model()
    rng = np.random.default_rng(1)
    feeds = ListFeeds(
        [
            {
                "x": rng.standard_normal((1, 6, 16)).astype(np.float32),
                "ids": rng.integers(0, 20, (1, 6)).astype(np.int64),
            }
            for _ in range(8)
        ],
        model_inputs(model),
    )
    qmodel, record = quantize(model, "quantize(min_weights=0)", feeds)  # small layers too
    assert (
        "transformer defaults left 9 node(s) in float (LayerNormalization and its internals): "
        "ln_sqrt, ln_eps, ln_var, ln_pow, ln_sub, ln_mean, ln_div, ln_gamma, ln_beta"
    ) in record.notes
    assert (
        "transformer defaults left 5 node(s) in float (Softmax and its internals): "
        "sm_exp, sm_sum, sm_div, sm_sub, sm_max"
    ) in record.notes
    assert (
        "transformer defaults left 1 node(s) in float (embedding lookup (Gather from a "
        "constant table)): embed"
    ) in record.notes
    # The table stays a float initializer; the three MatMuls read DQ'd activations.
    assert writer(qmodel, "embedded").input[0] == "table"
    for name in ("mm1", "mm2", "mm3"):
        node = next(n for n in qmodel.graph.node if n.name == name)
        assert writer(qmodel, node.input[0]).op_type == "DequantizeLinear", name


def test_digits_transformer_keeps_its_top1_with_defaults() -> None:
    x_train, _, x_test, y_test = load_digits_split()
    model = onnx.load(str(DIGITS_TRANSFORMER))
    feeds = ListFeeds(
        [{"image": x_train[i : i + 16]} for i in range(0, 256, 16)], model_inputs(model)
    )
    qmodel, record = quantize(model, "quantize", feeds)
    float_top1 = top1(model, x_test, y_test)
    quant_top1 = top1(qmodel, x_test, y_test)
    assert quant_top1 >= float_top1 - 0.5  # measured: equal (99.63 both)
    # Every linear layer of the blocks runs on [rows, features] with its bias: 8 MatMul +
    # Add become 8 quantized Gemms. The 8x48 embedding (reading the image) and the 48x10
    # head (reading the ReduceMean) are lone layers under min_weights: they stay float.
    assert record.stats["quantized_Gemm"] == 8 and "quantized_MatMul" not in record.stats
    small = next(n for n in record.notes if "fewer than 1024 weights" in n)
    assert small.startswith("left 2 node(s) in float") and small.endswith(
        ": /embed/MatMul, /head/Gemm"
    )
    assert record.stats["row_regions_flattened"] == 2
    norms = next(n for n in record.notes if "(LayerNormalization and its internals)" in n)
    assert norms.startswith("transformer defaults left 5 node(s)")
    # GELU's division by sqrt(2) stays a Div, which ORT fuses with the Erf into Gelu.
    assert sum(n.op_type == "Div" for n in qmodel.graph.node) == 2


def test_defaults_change_nothing_on_a_cnn() -> None:
    model = builders.cnn(seed=0)
    feeds = ListFeeds(
        [
            {"image": np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)}
            for i in range(4)
        ],
        model_inputs(model),
    )
    with_defaults, record = quantize(model, "quantize", feeds)
    without, _ = quantize(model, "quantize(transformer_defaults=false)", feeds)
    assert not any("transformer defaults" in n for n in record.notes)
    # The graphs are identical; only the metadata differs (it records each run's spec).
    assert with_defaults.graph.SerializeToString() == without.graph.SerializeToString()

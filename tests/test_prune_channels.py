"""The prune-channels pass: graph rewriting, selection options, and real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import PassContext, PassError, inspect, optimize, verify
from onnxopt.data import RandomFeeds, model_inputs
from onnxopt.graph import constant_value, to_model
from onnxopt.passes.prune_channels import analyze, build_pruned
from onnxopt.passes.prune_channels.analysis import analysis_of
from onnxopt.passes.prune_channels.selection import choose, group_targets
from onnxopt.runtime import create_session
from onnxopt.test_models import builders, digits

RNG = np.random.default_rng(1)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_of(model: onnx.ModelProto, node_name: str, slot: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return weights(model)[node.input[slot]]


def kept_rows(original: np.ndarray, pruned: np.ndarray) -> list[int]:
    """Which rows of `original` survive in `pruned` (rows are distinct random vectors).

    The layer's input channels must not have been pruned (protect their producer).
    """
    flat = original.reshape(original.shape[0], -1)
    return [
        int(np.argmin(np.abs(flat - row).sum(axis=1))) for row in pruned.reshape(len(pruned), -1)
    ]


def folded(build) -> onnx.ModelProto:
    return optimize(build(), "fold-constants").model


def hand_model() -> onnx.ModelProto:
    """Concat, Split, depthwise and grouped Convs, an SE gate, a shuffle and Flatten->Gemm."""

    def w(*shape):
        return RNG.standard_normal(shape).astype(np.float32) * 0.5

    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="cb"),
        helper.make_node("Concat", ["ar", "b"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "dw"], ["d"], name="dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["d"], ["gap"]),
        helper.make_node("Conv", ["gap", "se1"], ["s1"], name="se1"),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "se2"], ["s2"], name="se2"),
        helper.make_node("HardSigmoid", ["s2"], ["gate"]),
        helper.make_node("Mul", ["d", "gate"], ["se"]),
        helper.make_node("Conv", ["se", "wg"], ["g"], name="grouped", group=4),
        helper.make_node("Reshape", ["g", "shape1"], ["g5"]),
        helper.make_node("Transpose", ["g5"], ["g5t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["g5t", "shape2"], ["shuffled"]),
        helper.make_node("Split", ["shuffled", "sizes"], ["p", "q"], axis=1),
        helper.make_node("Conv", ["p", "wp"], ["pp"], name="cp"),
        helper.make_node("Add", ["pp", "q"], ["res"]),
        helper.make_node("MaxPool", ["res"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    inits = {
        "wa": w(10, 3, 3, 3),
        "wb": w(6, 3, 1, 1),
        "bb": w(6),
        "dw": w(16, 1, 3, 3),
        "se1": w(4, 16, 1, 1),
        "se2": w(16, 4, 1, 1),
        "wg": w(16, 4, 1, 1),
        "shape1": np.array([1, 4, 4, 4, 4], np.int64),
        "shape2": np.array([1, 16, 4, 4], np.int64),
        "sizes": np.array([8, 8], np.int64),
        "wp": w(8, 8, 1, 1),
        "fw": w(5, 32),
        "fb": w(5),
    }
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def hand_model_2() -> onnx.ModelProto:
    """InstanceNorm, Pad, Resize, ConvTranspose (plain and depthwise), Slice, ReduceMean gate."""

    def w(*shape):
        return RNG.standard_normal(shape).astype(np.float32) * 0.5

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
        helper.make_node("InstanceNormalization", ["a", "in_s", "in_b"], ["n"]),
        helper.make_node("Pad", ["n", "pads"], ["p"], mode="reflect"),
        helper.make_node("Resize", ["p", "", "scales"], ["r"], mode="nearest"),
        helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["t"], name="ct", strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["tr"]),
        helper.make_node("ConvTranspose", ["tr", "wdt"], ["d"], name="dct", group=6),
        helper.make_node("ReduceMean", ["d", "axes"], ["m"], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["g"]),
        helper.make_node("Mul", ["d", "g"], ["gated"]),
        helper.make_node("Slice", ["gated", "starts", "ends", "sl_axes"], ["s"]),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="c2"),
    ]
    inits = {
        "w1": w(8, 3, 3, 3),
        "b1": w(8),
        "in_s": w(8),
        "in_b": w(8),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "scales": np.array([1, 1, 2, 2], np.float32),
        "wt": w(8, 6, 2, 2),
        "bt": w(6),
        "wdt": w(6, 1, 3, 3),
        "axes": np.array([2, 3], np.int64),
        "starts": np.array([1], np.int64),
        "ends": np.array([5], np.int64),
        "sl_axes": np.array([1], np.int64),
        "w2": w(3, 4, 1, 1),
    }
    graph = helper.make_graph(
        nodes,
        "hand2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 26, 26])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def masked(an, keep_class: np.ndarray) -> onnx.ModelProto:
    """The original with the removed channels' consumer weights set to zero."""
    keep_elem = an.keep_elements(keep_class)
    graph = an.graph.copy()
    for absorber in an.absorbers:
        removed = np.nonzero(~keep_elem[an.layouts[absorber.tensor].elems])[0]
        node = graph.nodes[absorber.node]
        value = constant_value(node.inputs[absorber.weight_slot]).copy()
        moved = np.moveaxis(value, absorber.weight_axis, 0)
        moved[np.unique(removed % absorber.period) if absorber.period else removed] = 0
        node.inputs[absorber.weight_slot] = gs.Constant(f"{absorber.node}.masked", value)
    return to_model(graph)


MODELS = {
    "cnn": lambda: folded(builders.cnn),
    "mlp": lambda: folded(builders.mlp),
    "transformer_block": lambda: folded(builders.transformer_block),
    "digits": lambda: onnx.load(digits.DIGITS_CNN),
    "hand": hand_model,
    "hand_2": hand_model_2,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_model_equals_the_original_with_removed_channels_masked(name):
    """Slicing every weight, Split, Reshape and group must equal zeroing the consumers' inputs."""
    model = MODELS[name]()
    an = analysis_of(model)
    scores = np.random.default_rng(7).random(an.n_classes)
    exact = np.zeros(an.n_classes, dtype=bool)
    targets = group_targets(
        an, scores, exact, mode="uniform", ratio=0.4, threshold=0, round_to=1, min_channels=1
    )
    keep = choose(an, scores, exact, targets, 1)
    assert all((~keep[g.classes]).any() for g in an.groups if g.prunable)
    pruned, _ = build_pruned(an, keep)
    pruned_model = to_model(pruned)
    onnx.checker.check_model(pruned_model, full_check=True)
    result = verify(masked(an, keep), pruned_model, samples=3, atol=1e-5, rtol=1e-4)
    assert result.passed, result.outputs[0].max_abs


def test_hand_model_rewrites_split_reshape_and_group_attributes():
    model = hand_model()
    result = optimize(model, "prune-channels(round_to=1,ratio=0.5)", strict=True)
    assert result.records[-1].status == "changed"
    out = result.model
    nodes = {n.name: n for n in out.graph.node}
    values = weights(out)
    # The depthwise conv keeps one group per remaining channel of the concat.
    dw = nodes["dw"]
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == values[dw.input[1]].shape[0] == 8
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert values[split.input[1]].tolist() == [4, 4]
    reshapes = [n for n in out.graph.node if n.op_type == "Reshape"]
    assert [values[n.input[1]].tolist() for n in reshapes] == [[1, 4, 2, 4, 4], [1, 8, 4, 4]]
    # Flatten -> Gemm: each of the 4 kept channels owns 2x2 features.
    assert values[nodes["fc"].input[1]].shape == (5, 16)


def test_residual_add_keeps_the_same_channels_on_both_sides():
    model = folded(builders.cnn)
    spec = "prune-channels(round_to=1,ratio=0.5,protect=block1.a.conv)"
    out = optimize(model, spec, strict=True).model
    stem = kept_rows(weight_of(model, "stem.conv"), weight_of(out, "stem.conv"))
    block = kept_rows(weight_of(model, "block1.b.conv"), weight_of(out, "block1.b.conv"))
    assert len(stem) == 8 and stem == block
    # The depthwise branch and every consumer of the stream follow the same channels.
    assert kept_rows(weight_of(model, "branch_dw.conv"), weight_of(out, "branch_dw.conv")) == stem
    assert weight_of(out, "branch_pw.conv").shape == (8, 8, 1, 1)
    assert weight_of(out, "block1.a.conv").shape == (16, 8, 3, 3)


def test_concat_offsets_select_the_consumer_columns():
    w_a = RNG.standard_normal((8, 3, 1, 1)).astype(np.float32)
    w_b = RNG.standard_normal((8, 3, 1, 1)).astype(np.float32)
    w_c = RNG.standard_normal((4, 16, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb"),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["y"], name="cc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])],
        initializer=[
            numpy_helper.from_array(v, k) for k, v in {"wa": w_a, "wb": w_b, "wc": w_c}.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = optimize(model, "prune-channels(round_to=1,ratio=0.25)", strict=True).model
    kept_a = kept_rows(w_a, weight_of(out, "ca"))
    kept_b = kept_rows(w_b, weight_of(out, "cb"))
    assert len(kept_a) == len(kept_b) == 6
    columns = kept_a + [8 + i for i in kept_b]
    assert np.array_equal(weight_of(out, "cc"), w_c[:, columns])


def test_flatten_gemm_keeps_the_blocks_of_kept_channels():
    model = onnx.load(digits.DIGITS_CNN)
    spec = "prune-channels(round_to=1,ratio=0.25,protect=/3/Conv|/12/Gemm)"
    out = optimize(model, spec, strict=True).model
    kept = kept_rows(weight_of(model, "/7/Conv"), weight_of(out, "/7/Conv"))
    assert len(kept) == 48
    assert np.array_equal(weight_of(out, "/12/Gemm"), weight_of(model, "/12/Gemm")[:, kept])


def test_uniform_ratio_round_to_and_min_channels():
    model = folded(builders.mlp)

    def hidden(spec: str) -> list[int]:
        out = optimize(model, f"prune-channels({spec})", strict=True).model
        return [weight_of(out, f"fc{i}.matmul").shape[1] for i in range(2)]

    assert hidden("ratio=0.25,round_to=1") == [96, 48]
    assert hidden("ratio=0.3,round_to=1") == [90, 45]
    assert hidden("ratio=0.3") == [88, 48]  # round_to=8 by default
    assert hidden("ratio=0.3,round_to=16") == [96, 48]
    assert hidden("ratio=0.9,min_channels=40,round_to=1") == [40, 40]


def test_global_ratio_removes_that_share_of_all_prunable_channels():
    model = folded(builders.mlp)
    result = optimize(model, "prune-channels(round_to=1,ratio=0.3,mode=global)", strict=True)
    assert result.records[-1].stats["channels_removed"] == int(0.3 * 192)


def test_threshold_removes_channels_whose_filters_are_small():
    model = folded(builders.mlp)
    for init in model.graph.initializer:
        if init.name == "fc0.weight":
            value = numpy_helper.to_array(init).copy()
            value[:, 10:20] *= 1e-4
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    spec = "prune-channels(round_to=1,mode=threshold,threshold=0.01,aggregate=none)"
    out = optimize(model, spec, strict=True).model
    assert weight_of(out, "fc0.matmul").shape[1] == 118
    original = weight_of(model, "fc0.matmul")
    kept = kept_rows(original.T, weight_of(out, "fc0.matmul").T)
    assert not set(kept) & set(range(10, 20))


def test_options_that_need_data_or_make_no_sense_are_refused():
    model = folded(builders.mlp)
    for spec, text in (
        ("prune-channels(round_to=1,reconstruct=true)", "pass --data"),
        ("prune-channels(round_to=1,greedy_metric=cosine:0.99)", "pass --data"),
        ("prune-channels(round_to=1,ratio=1.5)", "ratio must be in [0, 1)"),
        ("prune-channels(round_to=1,greedy_metric=speed:2)", "cosine:0.99 or rel_error:0.05"),
    ):
        with pytest.raises(PassError, match=text.replace("[", r"\[").replace(")", r"\)")):
            optimize(model, spec)


def test_pruning_is_deterministic():
    model = folded(builders.cnn)
    first = optimize(model, "prune-channels(round_to=1,ratio=0.4)").model
    second = optimize(model, "prune-channels(round_to=1,ratio=0.4)").model
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(
        deterministic=True
    )


def test_ppocr_classifier_prunes_and_keeps_its_output_shape(ppocr_cls: Path):
    model = onnx.load(ppocr_cls)
    shapes = {"x": (1, 3, 48, 192)}
    ctx = PassContext(shapes=shapes)
    base = optimize(model, "fold-constants", ctx).model
    result = optimize(base, "prune-channels(round_to=1,ratio=0.3)", ctx, strict=True)
    stats = result.records[-1].stats
    assert stats["groups_prunable"] >= 20 and stats["channels_removed"] > 500
    before, after = inspect(base, shapes), inspect(result.model, shapes)
    assert after.parameters < 0.6 * before.parameters and after.macs < 0.65 * before.macs
    feed = next(iter(RandomFeeds(model_inputs(base), 1, shapes=shapes)))
    original = create_session(base).run(None, feed)
    pruned = create_session(result.model).run(None, feed)
    assert [o.shape for o in pruned] == [o.shape for o in original] == [(1, 2)]
    # The raw export adds each bias as Reshape(constant): frozen, with the way out.
    hints = [g for g in analyze(model, shapes) if "run fold-constants" in " ".join(g.frozen)]
    assert len(hints) == 19 and "computed from constants" in hints[0].frozen[0]

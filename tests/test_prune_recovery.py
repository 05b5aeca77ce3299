"""Exact removal of dead channels, bias compensation, reconstruction and the greedy mode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt import PassContext, inspect, optimize, verify
from onnxopt.data import ListFeeds, RandomFeeds, model_inputs
from onnxopt.test_models import builders, digits


def edited(model: onnx.ModelProto, edits: dict[str, tuple[int, list[int], float]]):
    """A copy with entries of named initializers set: name -> (axis, indices, value)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in edits:
            axis, indices, value = edits[init.name]
            array = numpy_helper.to_array(init).copy()
            np.moveaxis(array, axis, 0)[indices] = value
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    return out


# Filters set to zero so that whole classes are dead or constant. In the CNN the residual
# class needs its two producers and the depthwise branch zeroed; branch_pw keeps its bias,
# so its channel 2 is a nonzero constant after Relu.
DEAD = {
    "cnn": (
        builders.cnn,
        {
            "stem.weight": (0, [3, 9], 0.0),
            "block1.b.weight": (0, [3, 9], 0.0),
            "branch_dw.weight": (0, [3, 9], 0.0),
            "block1.a.weight": (0, [5], 0.0),
            "branch_pw.weight": (0, [2], 0.0),
            "branch_pw.bias": (0, [2], 0.7),
        },
        4,
    ),
    "mlp": (builders.mlp, {"fc0.weight": (1, [7, 8], 0.0), "fc1.weight": (1, [1], 0.0)}, 3),
    "transformer_block": (
        builders.transformer_block,
        {"ff1.weight": (1, [5, 6, 100], 0.0)},
        3,
    ),
    "digits": (
        lambda: onnx.load(digits.DIGITS_CNN),
        {"0.weight": (0, [1], 0.0), "7.weight": (0, [0, 63], 0.0), "12.weight": (0, [4], 0.0)},
        4,
    ),
}


@pytest.mark.parametrize("name", sorted(DEAD))
def test_dead_channels_are_removed_with_identical_outputs(name):
    build, edits, classes = DEAD[name]
    model = optimize(edited(build(), edits), "fold-constants").model
    result = optimize(model, "prune-channels(ratio=0)", strict=True)
    stats = result.records[-1].stats
    assert stats["classes_removed"] == stats["classes_removed_exactly"] == classes
    # Identical up to float32 summation order, which a smaller Conv changes (1.1e-5 on
    # the digits logits on an AVX2 CPU): 1e-6 relative, 1e-5 absolute.
    check = verify(model, result.model, samples=4, atol=1e-5, rtol=1e-6)
    assert check.passed, check.outputs[0].max_abs


def test_a_constant_channel_before_a_padded_conv_is_folded_as_a_map():
    # block1.a channel 5 becomes Relu(BN(0)) = 3 + ..., a positive constant; block1.b is a
    # padded 3x3 conv, so the constant adds less at the borders: the offset is a map.
    edits = {"block1.a.weight": (0, [5], 0.0), "block1.a.bn.bias": (0, [5], 3.0)}
    model = optimize(edited(builders.cnn(), edits), "fold-constants").model
    result = optimize(model, "prune-channels(ratio=0)", strict=True)
    adds = [n for n in result.model.graph.node if n.op_type == "Add"]
    assert len(adds) == 2
    (offset,) = [n for n in adds if n.output[0] == "block1.b.conv"]
    value = next(t for t in result.model.graph.initializer if t.name == offset.input[1])
    assert list(value.dims) == [1, 16, 32, 32]
    assert verify(model, result.model, samples=4, atol=1e-5, rtol=0.0).passed


def test_recovery_reduces_the_error_on_held_out_feeds():
    model = optimize(builders.cnn(), "fold-constants").model
    specs = model_inputs(model)
    ctx = PassContext(feeds=RandomFeeds(specs, 16, seed=0))
    held_out = RandomFeeds(specs, 8, seed=1)
    errors = {}
    for label, options in (
        ("none", ""),
        ("bias", ",bias_compensation=true"),
        ("reconstruct", ",reconstruct=true"),
    ):
        pruned = optimize(model, f"prune-channels(round_to=1,ratio=0.3{options})", ctx, strict=True)
        out = verify(model, pruned.model, held_out).outputs[0]
        errors[label] = (np.sqrt(out.err_sq / out.ref_sq), out.cosine)
        stats = pruned.records[-1].stats
        if options:
            assert stats["rel_error"] < stats["rel_error_before_recovery"]
    assert errors["reconstruct"][0] < errors["bias"][0] < errors["none"][0]
    assert errors["reconstruct"][1] > 0.99 > errors["none"][1]


def test_data_aware_importance_removes_channels_that_never_fire():
    model = optimize(builders.mlp(), "fold-constants").model
    model = edited(model, {"fc0.bias": (0, list(range(20, 32)), -100.0)})
    feeds = RandomFeeds(model_inputs(model), 8, seed=0)
    spec = "prune-channels(round_to=1,ratio=0.15,data_aware=true,protect=fc1.matmul)"
    out = optimize(model, spec, PassContext(feeds=feeds), strict=True).model
    before = numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "fc0.weight")
    )
    after = numpy_helper.to_array(
        next(t for t in out.graph.initializer if t.name.startswith("fc0.weight"))
    )
    assert after.shape == (64, 128 - 19)
    kept = [int(np.argmin(np.abs(before.T - col).sum(axis=1))) for col in after.T]
    assert not set(kept) & set(range(20, 32))


def test_greedy_stops_at_the_output_budget():
    model = optimize(builders.mlp(), "fold-constants").model
    feeds = RandomFeeds(model_inputs(model), 8, seed=0)
    ctx = PassContext(feeds=feeds)

    def cosine(spec: str) -> float:
        return verify(model, optimize(model, spec, ctx).model, feeds).outputs[0].cosine

    both = cosine("prune-channels(round_to=1,ratio=0.5)")
    each = [cosine(f"prune-channels(round_to=1,ratio=0.5,protect=fc{i}.matmul)") for i in (1, 0)]
    assert max(each) > both
    # A budget that one group fits in and the two together break.
    budget = (max(each) + both) / 2
    spec = f"prune-channels(round_to=1,ratio=0.5,greedy_metric=cosine:{budget})"
    result = optimize(model, spec, ctx)
    stats = result.records[-1].stats
    assert stats["greedy_groups_tried"] == 2 and stats["greedy_groups_accepted"] == 1
    assert verify(model, result.model, feeds).outputs[0].cosine >= budget


def test_digits_cnn_at_1_5x_fewer_macs_loses_at_most_one_point_with_reconstruction():
    x_train, _, x_test, y_test = digits.load_digits_split()
    model = onnx.load(digits.DIGITS_CNN)
    feeds = ListFeeds(
        [{"image": x_train[i : i + 32]} for i in range(0, 512, 32)], model_inputs(model)
    )
    ctx = PassContext(feeds=feeds)
    base = digits.top1(model, x_test, y_test)
    plain = optimize(model, "prune-channels(round_to=1,ratio=0.19)").model
    rebuilt = optimize(model, "prune-channels(round_to=1,ratio=0.19,reconstruct=true)", ctx).model
    assert inspect(model).macs / inspect(rebuilt).macs >= 1.5
    assert base - digits.top1(rebuilt, x_test, y_test) <= 1.0
    assert base - digits.top1(plain, x_test, y_test) > 10.0

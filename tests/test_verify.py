"""verify: streaming metrics equal numpy over all samples; tolerances decide; per-layer view."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxopt import verify
from onnxopt.data import RandomFeeds, model_inputs
from onnxopt.errors import FeedError
from onnxopt.test_models import builders


def perturbed(model: onnx.ModelProto, name: str, scale: float) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, tensor in enumerate(copy.graph.initializer):
        if tensor.name == name:
            value = numpy_helper.to_array(tensor)
            noise = np.random.default_rng(0).standard_normal(value.shape).astype(value.dtype)
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(value + scale * noise, name))
    return copy


def outputs(model: onnx.ModelProto, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def test_identical_models_agree_exactly() -> None:
    model = builders.mlp()
    result = verify(model, model, samples=4)
    (out,) = result.outputs
    assert result.passed and result.samples == 4
    assert out.max_abs == 0 and out.cosine == 1.0 and math.isinf(out.sqnr_db)
    assert out.argmax_agreement == 1.0


def test_metrics_equal_numpy_over_all_samples() -> None:
    model = builders.mlp(seed=1)
    candidate = perturbed(model, "fc1.weight", 0.05)
    feeds = RandomFeeds(model_inputs(model), 6, seed=2)
    ref, cand = outputs(model, feeds), outputs(candidate, feeds)
    result = verify(model, candidate, feeds, rtol=1e-3, atol=1e-4)
    out = result.outputs[0]
    diff = np.abs(cand.astype(np.float64) - ref)
    assert out.max_abs == pytest.approx(diff.max(), rel=1e-9)
    assert out.mean_abs == pytest.approx(diff.mean(), rel=1e-9)
    cosine = (ref.ravel() @ cand.ravel()) / np.linalg.norm(ref) / np.linalg.norm(cand)
    assert out.cosine == pytest.approx(cosine, rel=1e-9)
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(diff**2))
    assert out.sqnr_db == pytest.approx(sqnr, rel=1e-9)
    psnr = 10 * np.log10(np.abs(ref.astype(np.float64)).max() ** 2 / np.mean(diff**2))
    assert out.psnr_db == pytest.approx(psnr, rel=1e-9)
    agree = np.mean(ref.argmax(1) == cand.argmax(1))
    assert out.argmax_agreement == pytest.approx(agree)
    assert out.max_rel == pytest.approx((diff / np.abs(ref)).max(), rel=1e-6)
    assert not result.passed and out.violations == int(np.sum(diff > 1e-4 + 1e-3 * np.abs(ref)))


def test_tolerances_decide_pass_or_fail() -> None:
    model = builders.mlp(seed=1)
    candidate = perturbed(model, "fc1.weight", 1e-4)
    loose = verify(model, candidate, samples=4, rtol=0.5, atol=0.05)
    strict = verify(model, candidate, samples=4, rtol=0, atol=1e-9)
    assert loose.passed and not strict.passed
    assert not verify(
        model, candidate, samples=4, rtol=0.5, atol=0.05, min_cosine=1.0 + 1e-12
    ).passed


def test_per_layer_finds_where_the_difference_starts() -> None:
    model = builders.mlp(seed=1)
    candidate = perturbed(model, "fc1.weight", 0.05)
    result = verify(model, candidate, samples=3, per_layer=True)
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name["fc0.relu"].max_abs == 0
    assert by_name["fc1.matmul"].max_abs > 0
    worst = result.layers[0]
    assert worst.sqnr_db == min(layer.sqnr_db for layer in result.layers)
    assert "logits" not in by_name


def test_models_with_different_inputs_are_refused() -> None:
    with pytest.raises(FeedError, match="different inputs"):
        verify(builders.mlp(), builders.cnn(), samples=1)


def test_min_cosine_passes_a_good_candidate_and_fails_a_broken_one() -> None:
    """Weak oracle #23.11: min_cosine was tried only with an impossible threshold. Here
    tolerances wide enough to pass both candidates leave the decision to min_cosine."""
    model = builders.mlp(seed=1)
    good = perturbed(model, "fc1.weight", 1e-3)
    broken = perturbed(model, "fc1.weight", 0.3)
    cosines = {}
    for name, candidate in (("good", good), ("broken", broken)):
        loose = verify(model, candidate, samples=8, rtol=1e3, atol=1e3)
        assert loose.passed, name  # tolerances alone accept both
        cosines[name] = loose.outputs[0].cosine
        judged = verify(model, candidate, samples=8, rtol=1e3, atol=1e3, min_cosine=0.999)
        assert judged.passed is (name == "good"), (name, cosines[name])
    assert cosines["good"] > 0.999 > cosines["broken"]

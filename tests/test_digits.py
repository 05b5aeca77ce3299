"""The digits split and the committed digits CNN, which later measure accuracy losses."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.test_models import digits
from onnxopt.test_models.digits import DIGITS_CNN, load_digits_split, load_meta, top1

N_DIGITS = 1797  # images in scikit-learn's digits set


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return load_digits_split()


def test_split_sizes_follow_the_formula(split) -> None:
    x_train, y_train, x_test, y_test = split
    n_test = N_DIGITS * digits.TEST_PERCENT // 100
    assert (len(x_test), len(y_test)) == (n_test, n_test) == (539, 539)
    assert (len(x_train), len(y_train)) == (N_DIGITS - n_test,) * 2 == (1258, 1258)


def test_split_indices_are_disjoint_and_cover_everything() -> None:
    train, test = digits.split_indices(N_DIGITS)
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(N_DIGITS))
    # The fixed RandomState(0) permutation, independent of scikit-learn's splitters.
    assert test[:5].tolist() == np.random.RandomState(0).permutation(N_DIGITS)[:5].tolist()


def test_split_is_deterministic(split) -> None:
    again = load_digits_split()
    for a, b in zip(split, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_images_and_labels_are_in_the_documented_form(split) -> None:
    x_train, y_train, x_test, y_test = split
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
        assert x.min() == 0.0 and x.max() == 1.0
        assert y.dtype == np.int64
        assert sorted(set(y.tolist())) == list(range(10))  # every class on both sides


def test_committed_model_reaches_its_recorded_top1(split) -> None:
    _, _, x_test, y_test = split
    meta = load_meta()
    accuracy = top1(DIGITS_CNN, x_test, y_test)
    assert accuracy == pytest.approx(meta["top1_test"], abs=1e-9)
    assert accuracy >= 97.0
    assert meta["n_test"] == len(y_test)
    assert meta["torch"] == "2.13.0"
    assert {"epochs", "seed"} <= meta.keys()


def test_committed_model_is_small_with_batchnorm_kept_and_dynamic_batch() -> None:
    assert DIGITS_CNN.stat().st_size < 500_000
    model = onnx.load(str(DIGITS_CNN), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 3 == load_meta()["batchnorm_nodes"]
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}


def test_top1_counts_correctly_for_protos_batches_and_fixed_batch_models(split) -> None:
    _, _, x_test, y_test = split
    model = onnx.load(str(DIGITS_CNN))
    session = ort.InferenceSession(str(DIGITS_CNN), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"image": x_test})[0].argmax(axis=1)

    # Labels shifted on the tail: the score is exactly the share of matching predictions.
    labels = y_test.copy()
    labels[100:] = (labels[100:] + 1) % 10
    expected = 100.0 * int((predicted == labels).sum()) / len(labels)
    assert expected < 30.0
    assert top1(model, x_test, labels) == pytest.approx(expected, abs=1e-12)
    assert top1(model, x_test, labels, batch_size=7) == pytest.approx(expected, abs=1e-12)

    fixed = onnx.load(str(DIGITS_CNN))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32
    assert top1(fixed, x_test, labels) == pytest.approx(expected, abs=1e-12)  # last batch padded


def test_the_shipped_digits_are_scikit_learns() -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    with np.load(digits.DIGITS_DATA) as shipped:
        np.testing.assert_array_equal(shipped["images"], reference.images)
        np.testing.assert_array_equal(shipped["target"], reference.target)

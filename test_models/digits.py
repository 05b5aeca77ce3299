"""The 8x8 handwritten digits set and a small CNN trained on it, to measure accuracy.

Quantization and pruning are judged by what they cost in top-1 accuracy, so they need a
trained model and held-out data. The digits set (1797 images from UCI's Optical
Recognition of Handwritten Digits, as scikit-learn ships it) is stored beside this file
(`digits.npz`, 45 kB, pixel values 0-16), so that `onnxopt demo` needs no test extra and
nothing is downloaded; a test checks it against scikit-learn's copy. The split is made
here with a seeded numpy permutation rather than scikit-learn's splitter, so that it
stays the same across scikit-learn releases.

`DIGITS_CNN` is trained by `dev/train_digits_cnn.py`; `digits_cnn.json` beside it records
its ONNX Runtime top-1 on the test split, measured with `top1`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

DIGITS_CNN = Path(__file__).with_name("digits_cnn.onnx")
DIGITS_CNN_META = Path(__file__).with_name("digits_cnn.json")
DIGITS_DATA = Path(__file__).with_name("digits.npz")
TEST_PERCENT = 30
SPLIT_SEED = 0


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: the first n * 30 // 100 of a RandomState(0) permutation test."""
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_test = n * TEST_PERCENT // 100
    return order[n_test:], order[:n_test]


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images float32 [N, 1, 8, 8] in [0, 1], labels int64."""
    with np.load(DIGITS_DATA) as digits:
        x = (digits["images"].astype(np.float32) / 16.0)[:, None, :, :]
        y = digits["target"].astype(np.int64)
    train, test = split_indices(len(y))
    return x[train], y[train], x[test], y[test]


def load_meta() -> dict[str, Any]:
    """The training record written beside DIGITS_CNN (top1_test, n_test, epochs, seed...)."""
    return json.loads(DIGITS_CNN_META.read_text())


def top1(
    model: str | Path | onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    providers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in percent of `model` in ONNX Runtime on images `x` with labels `y`.

    Runs in batches of `batch_size`, or of the model's batch dimension when it is fixed.
    The first input gets the images; the first output is read as the class scores.
    """
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as images, and some: {len(x)} vs {len(y)}")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=list(providers or ["CPUExecutionProvider"]))
    first = session.get_inputs()[0]
    fixed_batch = isinstance(first.shape[0], int) and first.shape[0] > 0
    if fixed_batch:
        batch_size = first.shape[0]
    correct = 0
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        labels = y[start : start + batch_size]
        if fixed_batch and len(batch) < batch_size:
            # A fixed batch dimension: pad the last batch and score only the real images.
            pad = np.zeros((batch_size - len(batch), *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, pad])
        scores = session.run(None, {first.name: batch})[0][: len(labels)]
        correct += int((scores.argmax(axis=1) == labels).sum())
    return 100.0 * correct / len(y)

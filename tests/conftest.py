"""Shared fixtures: models on disk and the real models fetched once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.test_models import builders, fetch


@pytest.fixture
def cnn_model() -> onnx.ModelProto:
    return builders.cnn(seed=0)


@pytest.fixture
def cnn_path(tmp_path: Path, cnn_model: onnx.ModelProto) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model, path)
    return path


@pytest.fixture(scope="session")
def ppocr_det() -> Path:
    return fetch.fetch("ppocr_det")


@pytest.fixture(scope="session")
def ppocr_cls() -> Path:
    return fetch.fetch("ppocr_cls")


@pytest.fixture
def cosine():
    """Cosine similarity of two models' first outputs over feeds, in float64 numpy."""

    def measure(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> float:
        ref = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"])
        cand = ort.InferenceSession(b.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.concatenate([ref.run(None, f)[0].ravel() for f in feeds]).astype(np.float64)
        y = np.concatenate([cand.run(None, f)[0].ravel() for f in feeds]).astype(np.float64)
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    return measure

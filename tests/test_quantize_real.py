"""The quantize pass on real models, scored on their tasks (issue #23 item 10).

Each test has a floor today's code meets and a broken scale does not: the same
quantized model with every DequantizeLinear scale halved must fall below it.
- the PP-OCR text-direction classifier on 400 labelled lines (fp32: 98.0 %);
- PP-OCRv4 detection on synthetic 320x320 pages, its DB boxes (test_models/textpages)
  scored against the fp32 model's boxes at IoU 0.5.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.data import ListFeeds, model_inputs
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import optimize
from onnxopt.test_models.broken import halved_scales
from onnxopt.test_models.fetch import fetch
from onnxopt.test_models.textlines import direction_accuracy, labelled_feeds
from onnxopt.test_models.textpages import box_scores, text_page

DIRECTION_FLOOR = 96.0
BOX_FLOOR = 90.0


def quantize(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    context = PassContext(feeds=ListFeeds(feeds, model_inputs(model)))
    result = optimize(model, "quantize", context, strict=True)
    assert result.records[-1].status == "changed"
    return result.model


def outputs(model: onnx.ModelProto, xs: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x})[0] for x in xs])


@pytest.fixture(scope="module")
def classifier() -> onnx.ModelProto:
    return onnx.load(fetch("ppocr_cls"))


def test_text_direction_classifier_keeps_its_accuracy(classifier) -> None:
    calib, _ = labelled_feeds(64, 1)
    x, y = labelled_feeds(400, 0)
    q = quantize(classifier, [{"x": calib[i : i + 8]} for i in range(0, 64, 8)])
    assert direction_accuracy(classifier, x, y) == 98.0
    accuracy = direction_accuracy(q, x, y)
    assert accuracy >= DIRECTION_FLOOR
    assert direction_accuracy(halved_scales(q), x, y) < DIRECTION_FLOOR


def test_ppocr_det_boxes_match_fp32_boxes() -> None:
    det = onnx.load(fetch("ppocr_det"))
    q = quantize(det, [{"x": text_page(1000 + i, 320)} for i in range(8)])
    pages = [text_page(5000 + i, 320) for i in range(4)]
    reference = outputs(det, pages)
    scores = box_scores(outputs(q, pages), reference)
    assert scores["reference_boxes"] >= 15
    assert scores["recall"] >= BOX_FLOOR and scores["precision"] >= BOX_FLOOR, scores
    broken = box_scores(outputs(halved_scales(q), pages), reference)
    assert min(broken["recall"], broken["precision"]) < BOX_FLOOR, broken

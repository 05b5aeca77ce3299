"""DB post-processing in numpy: components equal scipy's, boxes and their scores."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.test_models.textpages import (
    UNCLIP_RATIO,
    box_scores,
    components,
    db_boxes,
    iou,
    match_boxes,
    text_page,
)


@pytest.mark.parametrize("seed", range(5))
def test_components_partition_the_mask_as_scipy_does(seed: int) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    mask = np.random.default_rng(seed).random((60, 80)) > 0.45
    labels = components(mask)
    reference, count = ndimage.label(mask)
    assert labels.max() == count and ((labels > 0) == mask).all()
    pairs = set(zip(labels[mask].tolist(), reference[mask].tolist(), strict=True))
    assert len(pairs) == count  # one to one


def test_db_boxes_are_the_grown_bounding_boxes_of_confident_regions() -> None:
    probability = np.zeros((50, 100), np.float32)
    probability[10:20, 5:45] = 0.9  # a 40x10 text region
    probability[30:40, 60:90] = 0.5  # above the threshold, below the box threshold
    probability[45:47, 0:30] = 0.9  # two rows high: under the minimum size
    ((x0, y0, x1, y1),) = db_boxes(probability)
    grow = 40 * 10 * UNCLIP_RATIO / (2 * 50)
    assert (x0, y0, x1, y1) == pytest.approx((5 - grow, 10 - grow, 45 + grow, 20 + grow))


def test_matching_is_one_to_one_at_iou_one_half() -> None:
    reference = [(0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 30.0, 10.0)]
    predicted = [(0.0, 0.0, 10.0, 12.0), (1.0, 0.0, 11.0, 10.0), (40.0, 0.0, 50.0, 10.0)]
    assert iou(predicted[0], reference[0]) == pytest.approx(100 / 120)
    assert match_boxes(predicted, reference) == 1
    maps = np.zeros((1, 1, 20, 40), np.float32)
    maps[0, 0, 5:10, 2:20] = 0.9
    same = box_scores(maps, maps)
    assert same == {"recall": 100.0, "precision": 100.0, "boxes": 1.0, "reference_boxes": 1.0}
    assert box_scores(np.zeros_like(maps), maps)["recall"] == 0.0


def test_text_pages_are_seeded_and_normalised() -> None:
    page = text_page(3, 256)
    assert page.shape == (1, 3, 256, 256) and page.dtype == np.float32
    np.testing.assert_array_equal(page, text_page(3, 256))
    assert -2.2 < float(page.min()) and float(page.max()) < 2.7

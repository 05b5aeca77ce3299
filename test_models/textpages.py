"""Synthetic text pages for PP-OCRv4 detection, and its DB post-processing in numpy.

Pages: dark words (Pillow's bundled font, 16-56 px) and a few bars on a light noisy
background, normalised with ImageNet's mean and std as PP-OCR does; everything is
drawn from the seed.

DB post-processing, following PaddleOCR's DBPostProcess in its simplest form:
- the probability map is thresholded at `THRESHOLD` (0.3);
- connected components of the binary map (4-connectivity) are found from its row
  runs: numpy finds the runs, a union-find joins runs of adjacent rows that overlap;
- each component gives an axis-aligned box (DBPostProcess fits a rotated rectangle;
  the synthetic text is upright, so the two agree), kept when its short side is at
  least `MIN_SIZE` pixels and its mean probability at least `BOX_THRESHOLD` (0.6);
- the box is grown by DB's unclip offset, area * `UNCLIP_RATIO` / perimeter.

Boxes of a quantized model are scored against the fp32 model's boxes: a box matches
when its IoU with a not yet matched reference box is at least 0.5 (greedy, best IoU
first); recall is matched / reference boxes, precision matched / predicted boxes.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.3
BOX_THRESHOLD = 0.6
MIN_SIZE = 3
UNCLIP_RATIO = 1.5
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (x1, y1 exclusive)


def text_page(seed: int, size: int = 640) -> np.ndarray:
    """A synthetic page [1, 3, size, size]: text lines and bars on a light noisy background."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    background = rng.integers(170, 256, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    letters = list("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789")
    for _ in range(int(rng.integers(6, 16))):
        font = ImageFont.load_default(size=int(rng.integers(16, 56)))
        text = "".join(rng.choice(letters, int(rng.integers(4, 14))))
        x, y = int(rng.integers(0, size - 200)), int(rng.integers(0, size - 40))
        draw.text((x, y), text, fill=tuple(int(c) for c in rng.integers(0, 90, 3)), font=font)
    for _ in range(int(rng.integers(0, 4))):
        x, y = (int(v) for v in rng.integers(0, size - 100, 2))
        w, h = int(rng.integers(20, 200)), int(rng.integers(4, 30))
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 90, 3)))
    pixels = (np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


def components(mask: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected components of a 2-D bool mask: 0 background, 1..n."""
    height, width = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    start_rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major order: the i-th end closes the i-th start
    parent = list(range(len(starts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(start_rows, np.arange(height + 1))
    for row in range(height - 1):
        i, i_end = int(first[row]), int(first[row + 1])
        j, j_end = i_end, int(first[row + 2])
        while i < i_end and j < j_end:  # runs of two rows, overlapping columns join
            if starts[i] < ends[j] and starts[j] < ends[i]:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = [root(i) for i in range(len(starts))]
    dense = {r: k + 1 for k, r in enumerate(sorted(set(roots)))}
    labels = np.zeros((height, width), np.int64)
    for row, begin, end, r in zip(start_rows, starts, ends, roots, strict=True):
        labels[row, begin:end] = dense[r]
    return labels


def db_boxes(probability: np.ndarray) -> list[Box]:
    """DB boxes of one probability map [H, W] (see the module rules)."""
    mask = probability > THRESHOLD
    if not mask.any():
        return []
    labels = components(mask)
    count = int(labels.max())
    ys, xs = np.nonzero(labels)
    which = labels[ys, xs] - 1
    boxes: list[Box] = []
    x0 = np.full(count, np.inf)
    y0 = np.full(count, np.inf)
    x1 = np.full(count, -np.inf)
    y1 = np.full(count, -np.inf)
    np.minimum.at(x0, which, xs)
    np.minimum.at(y0, which, ys)
    np.maximum.at(x1, which, xs + 1)
    np.maximum.at(y1, which, ys + 1)
    total = np.bincount(which, weights=probability[ys, xs], minlength=count)
    pixels = np.bincount(which, minlength=count)
    for i in range(count):
        w, h = x1[i] - x0[i], y1[i] - y0[i]
        if min(w, h) < MIN_SIZE or total[i] / pixels[i] < BOX_THRESHOLD:
            continue
        grow = w * h * UNCLIP_RATIO / (2 * (w + h))
        boxes.append((x0[i] - grow, y0[i] - grow, x1[i] + grow, y1[i] + grow))
    return boxes


def iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(predicted: list[Box], reference: list[Box], threshold: float = 0.5) -> int:
    """How many predicted boxes match a reference box at IoU >= threshold (greedy, 1:1)."""
    pairs = sorted(
        ((iou(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)),
        reverse=True,
    )
    used_p: set[int] = set()
    used_r: set[int] = set()
    for value, i, j in pairs:
        if value < threshold:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
    return len(used_p)


def box_scores(maps: np.ndarray, reference_maps: np.ndarray) -> dict[str, float]:
    """Box recall and precision (%) of `maps` [N, 1, H, W] against `reference_maps`' boxes,
    pooled over the N pages, with the box counts."""
    matched = predicted = expected = 0
    for got, want in zip(maps, reference_maps, strict=True):
        boxes, reference = db_boxes(got[0]), db_boxes(want[0])
        matched += match_boxes(boxes, reference)
        predicted += len(boxes)
        expected += len(reference)
    return {
        "recall": 100.0 * matched / expected if expected else 100.0,
        "precision": 100.0 * matched / predicted if predicted else 100.0,
        "boxes": float(predicted),
        "reference_boxes": float(expected),
    }

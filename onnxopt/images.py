"""Feeds from a folder of images (extra `images`: Pillow).

Preprocessing, in this order: open and convert to RGB (or L for one channel),
resize to the model's H×W with bilinear filtering, scale to float32 by `scale`
(default 1/255), subtract `mean` and divide by `std` per channel, lay out as
NCHW (default) or NHWC, and add a batch axis of 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .data import Feed, FeedSource, InputSpec, bind_shape, check_feed, tensor_specs
from .errors import FeedError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class ImageFeeds(FeedSource):
    def __init__(
        self,
        folder: str | Path,
        specs: Sequence[InputSpec],
        *,
        shapes: dict[str, tuple[int, ...]] | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        scale: float = 1 / 255,
        layout: str = "NCHW",
    ):
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise FeedError("image folders need Pillow: pip install 'onnxopt[images]'") from None
        if len(specs) != 1:
            raise FeedError("image folders feed models with exactly one input: use .npz files")
        if layout not in ("NCHW", "NHWC"):
            raise FeedError(f"layout must be NCHW or NHWC, not {layout}")
        self.specs = tensor_specs(specs)
        self.folder = Path(folder)
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FeedError(f"folder {self.folder} holds no images or .npz files: check --data")
        spec = self.specs[0]
        self.shape = bind_shape(spec, shapes or {}, batch=1)
        if len(self.shape) != 4:
            raise FeedError(f"input {spec.describe()} is not an image batch (rank 4)")
        if layout == "NCHW":
            _, self.channels, self.height, self.width = self.shape
        else:
            _, self.height, self.width, self.channels = self.shape
        self.mean = _per_channel("--image-mean", mean, self.channels)
        self.std = _per_channel("--image-std", std, self.channels)
        if not (self.std != 0).all():
            channel = int(np.flatnonzero(self.std == 0)[0])
            raise FeedError(
                f"--image-std is 0 for channel {channel}: pixels are divided by it; "
                "give a non-zero std for every channel"
            )
        if not np.isfinite(scale) or scale == 0:
            raise FeedError(f"image scale must be finite and non-zero, not {scale}")
        self.scale = scale
        self.layout = layout

    def load(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32).reshape(self.height, self.width, -1)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise FeedError(
                f"image {path} cannot be read ({exc}): replace or remove the file"
            ) from None
        pixels = (pixels * self.scale - self.mean) / self.std
        if self.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels[None]).astype(self.specs[0].dtype)

    def __iter__(self) -> Iterator[Feed]:
        for path in self.files:
            yield check_feed({self.specs[0].name: self.load(path)}, self.specs, str(path))

    def __len__(self) -> int:
        return len(self.files)


def _per_channel(option: str, values: Sequence[float], channels: int) -> np.ndarray:
    """One value for every channel, or one for each (a finite number each)."""
    array = np.asarray(values, np.float64).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, channels)
    if array.size < channels:
        raise FeedError(
            f"{option} has {array.size} values but the model's images have {channels} "
            "channels: give one value or one a channel"
        )
    if not np.isfinite(array).all():
        raise FeedError(f"{option} must be finite numbers, not {values}")
    return array[:channels].astype(np.float32)

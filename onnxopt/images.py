"""Feeds from a folder of images (extra `images`: Pillow).

Preprocessing, in this order: open and convert to RGB (or L for one channel),
resize to the model's H×W with bilinear filtering, scale to float32 by `scale`
(default 1/255), subtract `mean` and divide by `std` per channel, lay out as
NCHW (default) or NHWC, and add a batch axis of 1.

A model whose image height and width are dynamic takes them from the images when
every image in the folder has the same size (and says so); otherwise `--shape`
names the size to resize them to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .data import (
    Feed,
    FeedSource,
    InputSpec,
    bind_shape,
    check_feed,
    shape_arg,
    tensor_specs,
)
from .errors import FeedError, arg

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
PILLOW_HINT = (
    "image folders need Pillow: pip install 'onnxopt[images]' "
    "(in a checkout of onnxopt: pip install -e '.[images]')"
)
log = logging.getLogger("onnxopt")


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
            raise FeedError(PILLOW_HINT) from None
        if len(specs) != 1:
            raise FeedError("image folders feed models with exactly one input: use .npz files")
        if layout not in ("NCHW", "NHWC"):
            raise FeedError(f"layout must be NCHW or NHWC, not {layout}")
        self.specs = tensor_specs(specs)
        self.folder = Path(folder)
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FeedError(
                f"folder {self.folder} holds no images or .npz files: check {arg('data')}"
            )
        spec = self.specs[0]
        shapes = dict(shapes or {})
        if spec.name not in shapes and len(spec.shape) == 4:
            size = self._image_size(spec, layout)
            if size is not None:
                shapes[spec.name] = size
        self.shape = bind_shape(spec, shapes, batch=1)
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

    def _image_size(self, spec: InputSpec, layout: str) -> tuple[int, ...] | None:
        """The input's shape with H and W from the images, when they are dynamic in the
        model and every image has the same size; None when they are static."""
        h_axis, c_axis = (2, 1) if layout == "NCHW" else (1, 3)
        if all(isinstance(spec.shape[i], int) for i in (h_axis, h_axis + 1)):
            return None
        from PIL import Image

        sizes: dict[tuple[int, int], Path] = {}
        for path in self.files:
            try:
                with Image.open(path) as img:
                    sizes.setdefault((img.height, img.width), path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise FeedError(
                    f"image {path} cannot be read ({exc}): replace or remove the file"
                ) from None
        if len(sizes) > 1:
            (a, first), (b, second) = list(sizes.items())[:2]
            raise FeedError(
                f"input {spec.describe()} takes any image size, and the images differ "
                f"({first.name} is {a[0]}x{a[1]}, {second.name} {b[0]}x{b[1]}): pass "
                f"{spec.shape_hint()} with the size to resize them to"
            )
        (height, width), _ = next(iter(sizes.items()))
        channels = spec.shape[c_axis] if isinstance(spec.shape[c_axis], int) else 3
        shape = [1, channels, height, width] if layout == "NCHW" else [1, height, width, channels]
        if isinstance(spec.shape[0], int):
            shape[0] = spec.shape[0]
        log.warning(
            "input %s: %dx%d (height x width) from the images, which all have that size; "
            "%s resizes them to another",
            spec.name,
            height,
            width,
            shape_arg(spec.name, shape),
        )
        return tuple(shape)

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

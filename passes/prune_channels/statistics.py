"""Calibration statistics that pruning needs, accumulated one sample at a time.

All of them come from one walk over the feeds (`onnxopt.calibration.collect` on top
of `runtime.iter_tensors`):
- mean |x| per channel (`onnxopt.statistics.ChannelStats`), for data-aware importance;
- mean x per channel, for bias compensation;
- for the least-squares reconstruction, the Gram matrix of [features, 1] of each
  consumer: a Conv's features are its input patches (channel x kernel tap, the
  im2col rows), any other consumer's are the channels at each position. It is
  (features + 1)^2 floats, never the samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxopt.calibration import ChannelStats, collect

MAX_GRAM_FEATURES = 4096
FLUSH_ELEMENTS = 1 << 20


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    """The tensor as [positions of the other axes, channels] in float64."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)


@dataclass
class ChannelMean:
    """Running mean of x per position of `axis`."""

    axis: int
    total: np.ndarray | None = None
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        rows = _rows(x, self.axis)
        sums = rows.sum(axis=0)
        self.total = sums if self.total is None else self.total + sums
        self.count += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


@dataclass(frozen=True)
class PatchSpec:
    """What a Conv reads of its input: kernel, strides, dilations and begin/end pads."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]

    @property
    def taps(self) -> int:
        return int(np.prod(self.kernel))

    @classmethod
    def of(cls, attrs: dict, kernel: tuple[int, ...], spatial: tuple[int, ...]) -> PatchSpec:
        nd = len(kernel)
        strides = tuple(int(s) for s in attrs.get("strides", [1] * nd))
        dilations = tuple(int(d) for d in attrs.get("dilations", [1] * nd))
        pads = tuple(int(p) for p in attrs.get("pads", [0] * 2 * nd))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad.startswith("SAME"):
            begin, end = [], []
            for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
                out = -(-size // s)
                total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
                small = total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else total - small)
                end.append(total - begin[-1])
            pads = (*begin, *end)
        elif auto_pad == "VALID":
            pads = (0,) * 2 * nd
        return cls(tuple(int(k) for k in kernel), strides, dilations, pads)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """im2col: [output positions, channels x taps], taps in the weight's order."""
        nd = len(self.kernel)
        widths = [(0, 0), (0, 0)] + [(self.pads[i], self.pads[i + nd]) for i in range(nd)]
        padded = np.pad(x.astype(np.float64), widths)
        span = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        windows = np.lib.stride_tricks.sliding_window_view(
            padded, span, axis=tuple(range(2, 2 + nd))
        )
        windows = windows[(Ellipsis, *[slice(None, None, d) for d in self.dilations])]
        windows = windows[(slice(None), slice(None), *[slice(None, None, s) for s in self.strides])]
        moved = np.moveaxis(windows, 1, 1 + nd)
        return moved.reshape(-1, x.shape[1] * self.taps)


@dataclass
class Gram:
    """Running [f, 1]^T [f, 1] over the consumer's feature rows (channels or patches).

    Rows are buffered up to FLUSH_ELEMENTS values (8 MB) before each product: one
    large matrix product costs far less than many thin ones (64 rows per digit image),
    and the buffer of every consumer stays small.
    """

    axis: int
    patch: PatchSpec | None = None
    total: np.ndarray | None = None
    count: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0

    def update(self, x: np.ndarray) -> None:
        rows = self.patch.rows(x) if self.patch is not None else _rows(x, self.axis)
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        self.count += rows.shape[0]
        if self.pending_rows * rows.shape[1] >= FLUSH_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        rows = np.concatenate(self.pending)
        augmented = np.hstack([rows, np.ones((rows.shape[0], 1))])
        product = augmented.T @ augmented
        self.total = product if self.total is None else self.total + product
        self.pending, self.pending_rows = [], 0

    @property
    def matrix(self) -> np.ndarray | None:
        self._flush()
        return self.total


@dataclass
class CalibrationStats:
    """Per tensor mean |x| and mean x; per consumer node the Gram matrix and its patches."""

    mean_abs: dict[str, np.ndarray] = field(default_factory=dict)
    mean: dict[str, np.ndarray] = field(default_factory=dict)
    gram: dict[int, tuple[np.ndarray, PatchSpec | None]] = field(default_factory=dict)
    samples: int = 0
    memo: dict = field(default_factory=dict)  # recovery results, reused across a search


def gather(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    axes: dict[str, int],
    *,
    mean_abs: bool,
    mean: bool,
    grams: Sequence[tuple[int, str, PatchSpec | None]] = (),
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
) -> CalibrationStats:
    """One walk over `feeds` collecting the requested statistics.

    `axes` maps tensors to their channel axis; `grams` lists (consumer node, input
    tensor, patches or None) for the reconstruction.
    """
    stats: dict[str, list] = {name: [] for name in axes}
    owners: dict[int, int] = {}
    for name, axis in axes.items():
        if mean_abs:
            stats[name].append(ChannelStats(name, axis))
        if mean:
            stats[name].append(ChannelMean(axis))
    for node, name, patch in grams:
        gram = Gram(axes[name], patch)
        owners[id(gram)] = node
        stats[name].append(gram)
    stats = {k: v for k, v in stats.items() if v}
    result = CalibrationStats()
    if not stats:
        return result
    result.samples = collect(model, feeds, stats, providers=providers, threads=threads)
    for name, items in stats.items():
        for item in items:
            if isinstance(item, ChannelStats):
                result.mean_abs[name] = item.mean_abs
            elif isinstance(item, ChannelMean):
                result.mean[name] = item.mean
            elif isinstance(item, Gram):
                result.gram[owners[id(item)]] = (item.matrix, item.patch)
    return result

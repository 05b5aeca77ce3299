"""Input feeds: .npz files or folders, image folders, and random feeds from the model's signature.

A feed is a dict {input name: array} shaped exactly as the model takes it. A
`FeedSource` is re-iterable (calibration and verification walk it more than
once) and loads lazily: one file at a time.

.npz layout: one array per model input, keyed by the input's name, with the
samples stacked on the first axis. Files are split along that axis into
feeds of the model's batch size (its static first dim, else `batch`).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import FeedError

Dim = int | str | None
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints, or names/None for dynamic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        dims = "x".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"

    def shape_hint(self) -> str:
        """The `--shape` a user would pass, the one spelling every message uses: a
        dynamic batch as 1, other dynamic dims as N (`x=1x3xNxN`)."""
        dims = [
            str(d) if isinstance(d, int) else "1" if i == 0 else "N"
            for i, d in enumerate(self.shape)
        ]
        return f"{self.name}={'x'.join(dims)}"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tensor_type = vi.type.tensor_type
        dims: list[Dim] = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(d.dim_param or None)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs


_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*$")


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`x=1x3x640x640` -> ("x", (1, 3, 640, 640))."""
    match = _SHAPE_RE.match(text)
    if not match:
        raise FeedError(f"bad --shape '{text}': write NAME=DIMS such as x=1x3x640x640")
    dims = tuple(int(d) for d in re.split(r"\s*[x,]\s*", match.group(2)))
    return match.group(1), dims


def parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    return dict(parse_shape(item) for item in items or [])


def check_shapes(shapes: dict[str, tuple[int, ...]], specs: Sequence[InputSpec]) -> None:
    """Refuse --shape entries that name no input of the model or do not fit their input."""
    names = [s.name for s in specs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise FeedError(
            f"--shape names {', '.join(unknown)}, which the model does not take as input; "
            f"its inputs: {', '.join(names)}"
        )
    for spec in specs:
        if spec.name in shapes:
            bind_shape(spec, shapes)


def bind_shape(spec: InputSpec, shapes: dict[str, tuple[int, ...]], batch: int = 1) -> tuple:
    """A concrete shape for `spec`: from `shapes`, else static dims with a dynamic batch of 1."""
    if spec.name in shapes:
        bound = shapes[spec.name]
        if len(bound) != len(spec.shape) or any(
            isinstance(d, int) and d != b for d, b in zip(spec.shape, bound, strict=False)
        ):
            raise FeedError(
                f"--shape {spec.name}={'x'.join(map(str, bound))} does not fit the model's "
                f"input {spec.describe()}"
            )
        return tuple(bound)
    dynamic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int)]
    if any(i != 0 for i in dynamic):
        raise FeedError(
            f"input {spec.describe()} has dynamic dims: pass --shape {spec.shape_hint()} "
            "with N set to your size"
        )
    return tuple(d if isinstance(d, int) else batch for d in spec.shape)


def check_feed(feed: Feed, specs: Sequence[InputSpec], source: str = "feeds") -> Feed:
    """Refuse missing or extra names, a wrong dtype, a wrong rank or a wrong static dim."""
    names = {s.name for s in specs}
    missing = names - feed.keys()
    extra = feed.keys() - names
    if missing or extra:
        raise FeedError(
            f"{source} has inputs {sorted(feed)} but the model takes {sorted(names)}: "
            "key each array by the model's input name"
        )
    for spec in specs:
        value = feed[spec.name]
        if value.dtype != spec.dtype:
            raise FeedError(
                f"{source}: input '{spec.name}' is {value.dtype} but the model expects "
                f"{spec.dtype}: convert it with astype"
            )
        bad_rank = value.ndim != len(spec.shape)
        bad_dim = not bad_rank and any(
            isinstance(d, int) and d != v for d, v in zip(spec.shape, value.shape, strict=True)
        )
        if bad_rank or bad_dim:
            raise FeedError(
                f"{source}: input '{spec.name}' has shape {list(value.shape)} but the model "
                f"expects {spec.describe().split(': ', 1)[1]}: fix the data or the --shape"
            )
    return feed


class FeedSource:
    """A re-iterable, lazily loaded sequence of feeds."""

    specs: list[InputSpec]

    def __iter__(self) -> Iterator[Feed]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, n: int) -> list[Feed]:
        out = []
        for feed in self:
            if len(out) >= n:
                break
            out.append(feed)
        return out


class ListFeeds(FeedSource):
    """Feeds already in memory (checked against the model once)."""

    def __init__(self, feeds: Sequence[Feed], specs: Sequence[InputSpec]):
        self.specs = list(specs)
        self.feeds = [check_feed(f, self.specs) for f in feeds]

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


class RandomFeeds(FeedSource):
    """Seeded random feeds from the model's signature.

    Floats are standard normal, integers uniform in [0, int_high), booleans fair
    coins. Sample i is the same array whenever it is generated.
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        count: int = 8,
        *,
        seed: int = 0,
        shapes: dict[str, tuple[int, ...]] | None = None,
        batch: int = 1,
        int_high: int = 2,
    ):
        self.specs = list(specs)
        self.count = count
        self.seed = seed
        self.int_high = int_high
        self.shapes = {s.name: bind_shape(s, shapes or {}, batch) for s in self.specs}

    def __iter__(self) -> Iterator[Feed]:
        for i in range(self.count):
            rng = np.random.default_rng([self.seed, i])
            feed = {}
            for spec in self.specs:
                shape = self.shapes[spec.name]
                if spec.dtype.kind == "f":
                    value = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype.kind in "iu":
                    value = rng.integers(0, self.int_high, shape).astype(spec.dtype)
                elif spec.dtype.kind == "b":
                    value = rng.integers(0, 2, shape).astype(bool)
                else:
                    raise FeedError(
                        f"cannot make random data for input {spec.describe()}: pass --data"
                    )
                feed[spec.name] = value
            yield feed

    def __len__(self) -> int:
        return self.count


class NpzFeeds(FeedSource):
    """Feeds from one .npz file or a folder of them, split on the first axis."""

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[InputSpec],
        *,
        batch: int = 1,
        limit: int | None = None,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        self.batch = batch
        self.limit = limit
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise FeedError(f"folder {self.path} holds no .npz files: add some or pass a file")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise FeedError(f"data path {self.path} does not exist: check --data")
        self._count: int | None = None

    def _step(self, spec: InputSpec) -> int:
        first = spec.shape[0] if spec.shape else None
        return first if isinstance(first, int) else self.batch

    def _load(self, file: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(file, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise FeedError(
                f"{file} is not a readable .npz file ({exc}): re-save it with numpy.savez"
            ) from None

    def __iter__(self) -> Iterator[Feed]:
        for feed, _ in self.row_slices(1):
            yield feed

    def row_slices(self, rows: int) -> Iterator[tuple[Feed, int]]:
        """Consecutive samples of one file as one feed of at most `rows` rows, each with
        its number of samples: the data iterating gives, cut and checked once a slice
        instead of once a sample (one sample a slice when an input's first dim is fixed)."""
        produced = 0
        for file in self.files:
            arrays = self._load(file)
            count = self._samples(file, {k: v.shape for k, v in arrays.items()})
            if self.limit is not None:
                count = min(count, self.limit - produced)
            steps = {spec.name: self._step(spec) for spec in self.specs}
            fixed = any(spec.shape and isinstance(spec.shape[0], int) for spec in self.specs)
            per = 1 if fixed else max(1, rows // max(steps.values(), default=1))
            for start in range(0, count, per):
                end = min(count, start + per)
                feed = {
                    name: np.ascontiguousarray(arrays[name][start * step : end * step])
                    for name, step in steps.items()
                }
                yield check_feed(feed, self.specs, source=str(file)), end - start
            produced += count
            if self.limit is not None and produced >= self.limit:
                return

    def _samples(self, file: Path, shapes: dict[str, tuple[int, ...]]) -> int:
        names = {s.name for s in self.specs}
        if set(shapes) != names:
            raise FeedError(
                f"{file} has arrays {sorted(shapes)} but the model takes {sorted(names)}: "
                "key each array by the model's input name"
            )
        lengths = {shapes[s.name][0] // self._step(s) for s in self.specs if shapes[s.name]}
        if len(lengths) != 1:
            raise FeedError(f"{file}: inputs hold different numbers of samples")
        return lengths.pop()

    def _header_shapes(self, file: Path) -> dict[str, tuple[int, ...]]:
        """Each array's shape from its .npy header, without reading the array."""
        shapes = {}
        try:
            with zipfile.ZipFile(file) as archive:
                for info in archive.infolist():
                    with archive.open(info) as stream:
                        version = np.lib.format.read_magic(stream)
                        read = (
                            np.lib.format.read_array_header_1_0
                            if version == (1, 0)
                            else np.lib.format.read_array_header_2_0
                        )
                        shapes[info.filename.removesuffix(".npy")] = read(stream)[0]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise FeedError(
                f"{file} is not a readable .npz file ({exc}): re-save it with numpy.savez"
            ) from None
        return shapes

    def __len__(self) -> int:
        if self._count is None:
            total = sum(self._samples(f, self._header_shapes(f)) for f in self.files)
            self._count = total if self.limit is None else min(total, self.limit)
        return self._count


def load_feeds(
    model: onnx.ModelProto,
    data: str | Path | None = None,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    count: int = 8,
    seed: int = 0,
    batch: int = 1,
    image_options: dict[str, Any] | None = None,
) -> FeedSource:
    """Feeds for `model`: from `data` (.npz file, folder of .npz or of images), else random."""
    specs = model_inputs(model)
    check_shapes(shapes or {}, specs)
    if data is None:
        return RandomFeeds(specs, count, seed=seed, shapes=shapes, batch=batch)
    path = Path(data)
    if path.is_dir() and not any(path.glob("*.npz")):
        from .images import ImageFeeds

        return ImageFeeds(path, specs, shapes=shapes or {}, **(image_options or {}))
    return NpzFeeds(path, specs, batch=batch)

"""Input feeds: .npz files or folders, image folders, and random feeds from the model's signature.

A feed is a dict {input name: array} shaped exactly as the model takes it. A
`FeedSource` is re-iterable (calibration and verification walk it more than
once) and loads lazily: one file at a time.

.npz layout: one array per model input, keyed by the input's name, with the
samples stacked on the first axis. Files are split along that axis into
feeds of the model's batch size (its static first dim, else `batch`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import FeedError, arg, on_command_line
from .npz import Member, RowReader, read_members

Dim = int | str | None
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints, or names/None for dynamic dims).

    `unsupported` is set for an input no feed can be made for (a sequence, map or
    optional, or an element type ONNX does not define): its ONNX type in words. Such
    a model is still valid for simplify and inspect; feeds refuse it (`tensor_specs`).
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    unsupported: str = ""

    def describe(self) -> str:
        if self.unsupported:
            return f"{self.name}: {self.unsupported}"
        dims = "x".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"

    def shape_hint(self) -> str:
        """The shape a user would pass, the one spelling every message uses: a dynamic
        batch as 1, other dynamic dims as N; `--shape x=1x3xNxN` on the command line,
        `shape={'x': (1, 3, N, N)}` in Python."""
        dims = [
            str(d) if isinstance(d, int) else "1" if i == 0 else "N"
            for i, d in enumerate(self.shape)
        ]
        return shape_arg(self.name, dims)


def shape_arg(name: str, dims: Sequence[int | str]) -> str:
    """A shape as the user passes it: `--shape x=1x3x8x8`, or `shape={'x': (1, 3, 8, 8)}`."""
    if on_command_line():
        return f"--shape {name}={'x'.join(map(str, dims))}"
    return f"shape={{{name!r}: ({', '.join(map(str, dims))})}}"


def type_text(tp: onnx.TypeProto) -> str:
    """An ONNX type in the spec's words: tensor(float), seq(tensor(int64)), optional(...)."""
    which = tp.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(tp, which).elem_type
        try:
            elem_name = onnx.TensorProto.DataType.Name(elem).lower()
        except ValueError:
            elem_name = f"element type {elem}, which ONNX does not define"
        return f"{'tensor' if which == 'tensor_type' else 'sparse_tensor'}({elem_name})"
    if which == "sequence_type":
        return f"seq({type_text(tp.sequence_type.elem_type)})"
    if which == "optional_type":
        return f"optional({type_text(tp.optional_type.elem_type)})"
    if which == "map_type":
        key = onnx.TensorProto.DataType.Name(tp.map_type.key_type).lower()
        return f"map({key}, {type_text(tp.map_type.value_type)})"
    return "no type"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        if isinstance(vi.name, bytes):  # protobuf hands a name that is not UTF-8 as bytes
            name = vi.name.decode("utf-8", "backslashreplace")
            why = f"a tensor whose name is not valid UTF-8 ({vi.name!r})"
            specs.append(InputSpec(name, np.dtype(object), (), why))
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            specs.append(InputSpec(vi.name, np.dtype(object), (), type_text(vi.type)))
            continue
        tensor_type = vi.type.tensor_type
        dims: list[Dim] = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(d.dim_param or None)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            specs.append(InputSpec(vi.name, np.dtype(object), tuple(dims), type_text(vi.type)))
            continue
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs


def tensor_specs(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """`specs`, refusing an input no feed can be made for (one line naming it)."""
    for spec in specs:
        if spec.unsupported:
            raise FeedError(
                f"input '{spec.name}' is {spec.unsupported}: commands that run the model on "
                "data (verify, bench, analyze, calibration) take tensor inputs of a defined "
                "element type only; simplify and inspect work on this model"
            )
    return list(specs)


# A random feed (one sample of every input) may take at most this many bytes.
MAX_RANDOM_FEED_BYTES = 2**31


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
            f"{arg('shape')} names {', '.join(unknown)}, which the model does not take as input; "
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
                f"{shape_arg(spec.name, bound)} does not fit the model's input {spec.describe()}"
            )
        return tuple(bound)
    dynamic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int)]
    if any(i != 0 for i in dynamic):
        raise FeedError(
            f"input {spec.describe()} has dynamic dims: pass {spec.shape_hint()} "
            "with N set to your size"
        )
    return tuple(d if isinstance(d, int) else batch for d in spec.shape)


def feed_shapes(feed: Feed, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """The input shapes a feed binds, a dynamic batch counted as 1 (as inspect counts it)."""
    return {
        s.name: tuple(
            1 if i == 0 and not isinstance(d, int) else v
            for i, (d, v) in enumerate(zip(s.shape, feed[s.name].shape, strict=True))
        )
        for s in specs
        if s.name in feed and np.ndim(feed[s.name]) == len(s.shape)
    }


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
                f"expects {spec.describe().split(': ', 1)[1]}: {_shape_fix(value.shape, spec)}"
            )
    return feed


def _shape_fix(shape: tuple[int, ...], spec: InputSpec) -> str:
    """What to do about a misshapen array: the transpose when it is the model's image laid
    out channels-last (NHWC for NCHW), else fix the data or the --shape."""
    expected = spec.shape
    if len(shape) == 4 == len(expected):
        nchw = (shape[0], shape[3], shape[1], shape[2])
        if all(not isinstance(d, int) or d == v for d, v in zip(expected, nchw, strict=True)):
            return (
                "it looks channels-last (NHWC): store array.transpose(0, 3, 1, 2), "
                f"shape {list(nchw)}"
            )
    return f"fix the data or the {arg('shape')}"


def check_finite(feed: Feed, source: str, first: int = 0, samples: int = 1) -> Feed:
    """Refuse NaN or infinity in float inputs, naming the input, the sample (`first` is
    the index of the feed's first sample, `samples` how many it holds) and the value."""
    for name, value in feed.items():
        if value.dtype.kind not in "fc" or value.size == 0:
            continue
        bad = np.flatnonzero(~np.isfinite(value))
        if not len(bad):
            continue
        found = value.reshape(-1)[bad[0]]
        what = "NaN" if np.isnan(found) else ("+inf" if found.real > 0 else "-inf")
        per_sample = value.size // samples if value.ndim and samples > 1 else value.size
        sample = first + int(bad[0]) // per_sample
        raise FeedError(
            f"{source}: input '{name}' sample {sample} holds {what} ({len(bad)} non-finite "
            f"value(s) in samples {first}-{first + samples - 1}): data must be finite; fix or "
            "drop that sample"
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
    """Feeds already in memory (checked against the model once).

    Unlike data read from files, arrays handed over in memory may hold NaN or infinity
    (a caller testing how calibration sets such samples aside, for example): use
    `check_finite` to refuse them."""

    def __init__(self, feeds: Sequence[Feed], specs: Sequence[InputSpec]):
        self.specs = tensor_specs(specs)
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
        self.specs = tensor_specs(specs)
        self.count = count
        self.seed = seed
        self.int_high = int_high
        self.shapes = {s.name: bind_shape(s, shapes or {}, batch) for s in self.specs}
        sizes = {s.name: math.prod(self.shapes[s.name]) * s.dtype.itemsize for s in self.specs}
        if sum(sizes.values()) > MAX_RANDOM_FEED_BYTES:
            name = max(sizes, key=lambda k: sizes[k])
            dims = "x".join(map(str, self.shapes[name]))
            raise FeedError(
                f"random data for input '{name}' [{dims}] would take {sizes[name] / 2**30:.3g} "
                f"GiB a sample, over the {MAX_RANDOM_FEED_BYTES // 2**30} GiB bound: pass "
                f"{arg('shape')} with smaller dims, or {arg('data')}"
            )

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
                        f"cannot make random data for input {spec.describe()}: pass {arg('data')}"
                    )
                feed[spec.name] = value
            yield feed

    def __len__(self) -> int:
        return self.count


class NpzFeeds(FeedSource):
    """Feeds from one .npz file or a folder of them, split on the first axis.

    Each file's arrays are checked from their headers when the source is made (names,
    sample counts, at least one sample), and read a slice at a time when iterated
    (`onnxopt.npz`): memory holds one slice, whatever the number of samples. An input
    the model takes as a scalar (rank 0) may be one 0-d array, used for every sample,
    or one value a sample (shape [N]).
    """

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[InputSpec],
        *,
        batch: int = 1,
        limit: int | None = None,
    ):
        self.path = Path(path)
        self.specs = tensor_specs(specs)
        self.batch = batch
        self.limit = limit
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise FeedError(f"folder {self.path} holds no .npz files: add some or pass a file")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise FeedError(f"data path {self.path} does not exist: check {arg('data')}")
        self._layout = {file: self._read_layout(file) for file in self.files}
        total = sum(count for _, count in self._layout.values())
        self._count = total if limit is None else min(total, limit)

    def _step(self, spec: InputSpec) -> int:
        """Rows of the file's array that make one sample of `spec` (0: a shared 0-d array)."""
        first = spec.shape[0] if spec.shape else None
        return first if isinstance(first, int) else self.batch

    def _read_layout(self, file: Path) -> tuple[dict[str, Member], int]:
        members = read_members(file)
        names = {s.name for s in self.specs}
        if set(members) != names:
            raise FeedError(
                f"{file} has arrays {sorted(members)} but the model takes {sorted(names)}: "
                "key each array by the model's input name"
            )
        counts: dict[str, int] = {}
        for spec in self.specs:
            shape = members[spec.name].shape
            if not spec.shape and len(shape) == 0:
                continue  # one scalar for every sample
            if not spec.shape:
                if len(shape) != 1:
                    raise FeedError(
                        f"{file}: input '{spec.name}' is a scalar in the model but the array "
                        f"has shape {list(shape)}: save one 0-d array, or one value a sample"
                    )
                counts[spec.name] = shape[0]
            elif not shape:
                raise FeedError(
                    f"{file}: array '{spec.name}' is a scalar but the model expects "
                    f"{spec.describe().split(': ', 1)[1]}: stack the samples on the first axis"
                )
            else:
                counts[spec.name] = shape[0] // self._step(spec)
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise FeedError(f"{file}: inputs hold different numbers of samples ({listed})")
        count = next(iter(counts.values())) if counts else 1
        if count == 0:
            raise FeedError(f"{file} holds no samples (zero rows): add samples or drop the file")
        return members, count

    def __iter__(self) -> Iterator[Feed]:
        for feed, _ in self.row_slices(1):
            yield feed

    def row_slices(self, rows: int) -> Iterator[tuple[Feed, int]]:
        """Consecutive samples of one file as one feed of at most `rows` rows, each with
        its number of samples: the data iterating gives, read, cut and checked once a
        slice instead of once a sample (one sample a slice when an input's first dim is
        fixed or an input is a scalar)."""
        produced = 0
        steps = {spec.name: self._step(spec) for spec in self.specs}
        fixed = any(not spec.shape or isinstance(spec.shape[0], int) for spec in self.specs)
        per = 1 if fixed else max(1, rows // max(steps.values(), default=1))
        for file in self.files:
            members, count = self._layout[file]
            if self.limit is not None:
                count = min(count, self.limit - produced)
            with RowReader(file, members) as reader:
                for start in range(0, count, per):
                    end = min(count, start + per)
                    feed = {}
                    for spec in self.specs:
                        if not spec.shape:
                            value = reader.read(spec.name, 1)
                            feed[spec.name] = value.reshape(()) if value.ndim else value
                        else:
                            feed[spec.name] = reader.read(
                                spec.name, (end - start) * steps[spec.name]
                            )
                    check_feed(feed, self.specs, source=str(file))
                    yield check_finite(feed, str(file), start, end - start), end - start
            produced += count
            if self.limit is not None and produced >= self.limit:
                return

    def __len__(self) -> int:
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

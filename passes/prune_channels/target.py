"""Held-out feeds and the accuracy target of prune-channels.

The target is `quantize(target=...)`'s, parsed by the same function: `cosine:X`,
`rel_error:X`, `top1:X` (argmax agreement with the original model on every 2-D
output), or a callable `f(ref, cand) -> bool` through the API. The last `holdout`
share of the feeds is held out: reconstruction and data-aware importance never see
it, and the target, the reported cosine and relative error, and the per-layer
recovery check are measured on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.errors import PassError
from onnxopt.model import inferred_shapes
from onnxopt.passes.quantize.mixed import Target, float_output_stats, outputs_of, parse_target
from onnxopt.summary import macs_per_sample

from .search import Measure

__all__ = ["HeldOut", "Target", "macs_of", "target_of"]

BATCH = 64  # held-out samples per ORT run, where the batch dim allows it


def target_of(value: Any) -> Target | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return parse_target(value)
    except PassError as error:
        raise PassError(str(error).replace("quantize:", "prune-channels:", 1)) from None


def macs_of(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None) -> int | None:
    """MACs of one sample; dynamic input dims are bound to `feed`'s (the model is edited)."""
    if feed:
        for value in model.graph.input:
            if value.name in feed:
                dims = value.type.tensor_type.shape.dim
                for i, size in enumerate(feed[value.name].shape[: len(dims)]):
                    if dims[i].dim_value <= 0:  # a name, or -1 as some exporters write
                        dims[i].dim_value = 1 if i == 0 else int(size)
    try:
        return macs_per_sample(model, inferred_shapes(model))
    except Exception:  # noqa: BLE001 - a count is a report, never a reason to fail
        return None


class HeldOut:
    """The target and output error of a candidate on the held-out feeds."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        feeds: Any,
        target: Target | None,
        providers: Sequence[str],
        threads: int | None,
    ):
        self.feeds = list(feeds)
        self.samples = len(self.feeds)
        half = self.samples // 2 if self.samples > 1 else self.samples
        self.target = target
        self.providers, self.threads = providers, threads
        self.parts = {
            "search": _batched(reference, self.feeds[:half]),
            "confirm": _batched(reference, self.feeds[half:] or self.feeds),
        }
        self.parts["all"] = self.parts["search"] + self.parts["confirm"]
        self.reference = {
            part: outputs_of(reference, batches, providers, threads)
            for part, batches in self.parts.items()
            if part != "all"
        }
        self.reference["all"] = self.reference["search"] + self.reference["confirm"]

    def __len__(self) -> int:
        return self.samples

    def __call__(
        self, candidate: onnx.ModelProto, count_macs: bool = True, part: str = "all"
    ) -> Measure:
        """The measure on the first half ("search"), the second ("confirm") or all."""
        outputs = outputs_of(candidate, self.parts[part], self.providers, self.threads)
        reference = self.reference[part]
        cosine, rel = 1.0, 0.0
        per_output = float_output_stats(reference, outputs)
        for stats in per_output:
            cosine = min(cosine, stats.cosine)
            if stats.ref_sq:
                rel = max(rel, math.sqrt(stats.err_sq / stats.ref_sq))
        met, value = True, None
        if self.target is not None and self.target.check is not None:
            met, value = self.target.evaluate(reference, outputs)
        elif self.target is not None:
            met, value = self.target.evaluate_stats(per_output)
        macs = macs_of(candidate, self.feeds[0]) if count_macs else None
        return Measure(bool(met), value, float(np.float64(cosine)), rel, macs)


def _batched(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """Feeds joined into runs of up to BATCH samples where every input's first dim is free."""
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return feeds
    out: list[dict[str, np.ndarray]] = []
    for start in range(0, len(feeds), BATCH):
        chunk = feeds[start : start + BATCH]
        try:
            out.append({k: np.concatenate([f[k] for f in chunk]) for k in chunk[0]})
        except ValueError:  # shapes differ past the first axis: one sample per run
            return feeds
    return out

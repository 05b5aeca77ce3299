"""The CLI's argument checks: value types argparse applies, and the up-front check of
report paths, so that a bad value or path is one line with exit 2 before any work.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import parse_shape
from .errors import FeedError, OnnxoptError
from .files import check_outputs, expand_reads
from .model import model_files


def count(minimum: int) -> Any:
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def channels(text: str) -> str:
    """An argparse type: three numbers (one per RGB channel), or one for all three."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers such as 0.5,0.5,0.5, got '{text}'"
        ) from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(
            f"expected 3 numbers (one per RGB channel) or 1 for all, got {len(values)}"
        )
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got '{text}'")
    return ",".join(str(v) for v in (values * 3 if len(values) == 1 else values))


# Dims must fit the int64 of ONNX and numpy, and so must their product.
_MAX_DIM = 2**63 - 1


def shape(text: str) -> str:
    """An argparse type: NAME=DIMS as data.parse_shape reads it, with dims that fit int64."""
    try:
        _, dims = parse_shape(text)
    except FeedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if any(d < 1 or d > _MAX_DIM for d in dims) or math.prod(dims) > _MAX_DIM:
        raise argparse.ArgumentTypeError(
            f"'{text}': each dim must be a positive integer and their product below 2**63"
        )
    return text


def reads(models: Sequence[str], data: str | None = None) -> list[Path]:
    """The files a command reads: each model, its external data, and the --data files."""
    files: list[Path] = []
    for model in models:
        try:
            files += model_files(model)
        except (OSError, OnnxoptError):
            files.append(Path(model))  # loading it will say what is wrong
    return files + expand_reads([data] if data else [])


def check_reports(args: argparse.Namespace, models: Sequence[str]) -> None:
    """Before any work: every report path can be written and is no file the command reads."""
    outputs = {f"--{k}": getattr(args, k, None) for k in ("json", "markdown", "html")}
    if any(outputs.values()):
        check_outputs(outputs, reads(models, getattr(args, "data", None)))

"""Held-out error of one consumer's recovery candidates, from a Gram matrix of held-out feeds.

Each candidate (plain removal, bias compensation, reconstruction) changes a consumer's
output by a linear function of its input features f (channels, or im2col patches) and
the constant 1. Writing that change as a matrix D over [f, 1], its mean squared size
on the held-out feeds is sum(D G * D) with G = E[[f, 1][f, 1]^T], the held-out Gram
matrix: no sample is kept, and every candidate is compared on data it was not fitted
on. The error is relative to the consumer's own output, sum(W G * W).

Where the Gram holds channels at each pixel of a larger kernel (the per-pixel
regression fold), the residual of the removed channels r = x_removed - (A x_kept + b)
is measured instead, weighted by the removed filters: sum(M * R G R^T), with
M[i, j] = sum over outputs and taps of W[o, i, t] W[o, j, t].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerCheck:
    """One consumer's held-out relative output error per candidate, and the one kept."""

    node: str
    rows: int  # calibration rows the fit saw
    features: int
    errors: dict[str, float]
    kept: str


def normalized(gram: np.ndarray) -> np.ndarray:
    """The Gram as second moments (its last diagonal entry counts the rows)."""
    return gram / max(float(gram[-1, -1]), 1.0)


def output_error(moments: np.ndarray, delta: np.ndarray) -> float:
    """Mean squared change of the outputs, sum over outputs of d G d^T."""
    return float(np.sum((delta @ moments) * delta))


def output_delta(
    matrix: np.ndarray,
    f_removed: np.ndarray,
    f_kept: np.ndarray | None = None,
    fitted: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """D over [features, 1]: removed features lose their weights, kept ones may be refitted."""
    delta = np.zeros((matrix.shape[0], matrix.shape[1] + 1))
    delta[:, f_removed] = -matrix[:, f_removed]
    if f_kept is not None and fitted is not None:
        delta[:, f_kept] = fitted - matrix[:, f_kept]
    if offset is not None:
        delta[:, -1] = offset
    return delta


def residual_error(
    moments: np.ndarray, weights: np.ndarray, removed: np.ndarray, residual: np.ndarray
) -> float:
    """sum(M * R G R^T) for the rows R of the removed channels' residual over [channels, 1].

    `weights` is the consumer's weight with its input channels on axis 0.
    """
    w = weights[removed].reshape(removed.size, -1)
    metric = w @ w.T
    cov = residual @ moments @ residual.T
    return float(np.sum(metric * cov))


def residual_rows(
    channels: int,
    removed: np.ndarray,
    kept: np.ndarray | None = None,
    coef: np.ndarray | None = None,
    intercept: np.ndarray | None = None,
) -> np.ndarray:
    """R over [channels, 1]: x_removed - coef x_kept - intercept."""
    rows = np.zeros((removed.size, channels + 1))
    rows[np.arange(removed.size), removed] = 1.0
    if kept is not None and coef is not None:
        rows[:, kept] = -coef
    if intercept is not None:
        rows[:, -1] = -intercept
    return rows

"""Deliberately broken copies of quantized models, for tests whose bounds must refuse them.

A test that accepts a quantized model should also reject the same model with a wrong
scale; otherwise its bound accepts anything of the right shape. Cosine alone is blind
to a uniform scale error, so a bound on the relative error goes with it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def halved_scales(model: onnx.ModelProto, only: str | None = None) -> onnx.ModelProto:
    """A copy of `model` with every DequantizeLinear scale halved (or only the DQ nodes
    whose output name contains `only`)."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    tensors = {t.name: t for t in broken.graph.initializer}
    scales = {
        n.input[1]
        for n in broken.graph.node
        if n.op_type == "DequantizeLinear" and (only is None or only in n.output[0])
    }
    if not scales or not scales <= tensors.keys():
        raise ValueError("no DequantizeLinear scale initializers to halve")
    for name in scales:
        halved = numpy_helper.to_array(tensors[name]) / 2
        tensors[name].CopyFrom(numpy_helper.from_array(halved, name))
    return broken


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||candidate - reference|| / ||reference|| over all elements (float64)."""
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(candidate, np.float64).ravel()
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))

"""sparsify: unstructured magnitude pruning of weights.

Rules:
- Matches the constant weight input (slot 1) of Conv, ConvTranspose, Gemm and MatMul,
  whether an initializer or a Constant node, with at least `min_size` elements and
  not matched by a `protect` pattern (fnmatch on node or weight name).
- `scope=layer` zeroes the round(sparsity x n) smallest |w| of each weight;
  `scope=global` ranks all matched weights together and zeroes the round(sparsity x N)
  smallest. Ties go by position, so the count is exact and the result deterministic.
  Weights that are already zero are counted as zeroed first.
- Produces the same graph with zeros in the weights, and reports the sparsity reached.
- Gives no speed in ONNX Runtime: its CPU and GPU kernels are dense and multiply the
  zeros like any other number. The zeros pay off only with a sparse-aware runtime or
  with compression of the model file.
- Leaves alone biases, normalization parameters and weights computed at run time.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PassError
from onnxopt.graph import DEFAULT_DOMAINS, constant_value, name_matches, unique_name
from onnxopt.pass_api import Pass, PassContext, PassResult, register_pass

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _targets(
    graph: gs.Graph, min_size: int, protect: list[str]
) -> dict[str, tuple[list[gs.Node], np.ndarray]]:
    """Weight name -> (nodes that read it, value); a shared weight is sparsified once."""
    out: dict[str, tuple[list[gs.Node], np.ndarray]] = {}
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS or (node.domain or "") not in DEFAULT_DOMAINS:
            continue
        if len(node.inputs) < 2 or not node.inputs[1].name:
            continue
        name = node.inputs[1].name
        if name in out:
            out[name][0].append(node)
            continue
        weight = constant_value(node.inputs[1])
        if weight is None or weight.size < min_size or weight.dtype.kind != "f":
            continue
        if name_matches(node.name, protect) or name_matches(name, protect):
            continue
        out[name] = ([node], weight)
    return out


def _zero_smallest(weights: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Zero exactly `count` entries of smallest magnitude across `weights`."""
    flat = np.concatenate([np.abs(w.astype(np.float64)).ravel() for w in weights])
    order = np.argsort(flat, kind="stable")[:count]
    mask = np.ones(flat.size, dtype=bool)
    mask[order] = False
    out, start = [], 0
    for w in weights:
        part = mask[start : start + w.size].reshape(w.shape)
        out.append(np.where(part, w, np.zeros((), dtype=w.dtype)).astype(w.dtype))
        start += w.size
    return out


@register_pass
class Sparsify(Pass):
    """Zero the smallest weights of Conv/Gemm/MatMul layers (unstructured; no ORT speed-up)."""

    name = "sparsify"
    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    min_size: int = 64
    protect: list[str] = []  # read only, never mutated

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not 0.0 <= self.sparsity <= 1.0:
            raise PassError(f"sparsify sparsity must be in [0, 1], got {self.sparsity}")
        targets = _targets(graph, self.min_size, list(self.protect))
        weights = [w for _, w in targets.values()]
        total = sum(w.size for w in weights)
        if not targets:
            return PassResult(False, {"weights": 0}, ["no Conv/Gemm/MatMul weight to sparsify"])
        zeros_before = sum(int(np.count_nonzero(w == 0)) for w in weights)
        if self.scope == "global":
            new = _zero_smallest(weights, int(round(self.sparsity * total)))
        else:
            new = [_zero_smallest([w], int(round(self.sparsity * w.size)))[0] for w in weights]
        taken = set(graph.tensors())
        for (name, (nodes, _)), value in zip(targets.items(), new, strict=True):
            constant = gs.Constant(unique_name(f"{name}.sparse", taken), value)
            for node in nodes:
                node.inputs[1] = constant
        zeros = sum(int(np.count_nonzero(w == 0)) for w in new)
        stats = {
            "weights": len(targets),
            "elements": total,
            "zeros_before": zeros_before,
            "zeros": zeros,
            "sparsity": zeros / total,
        }
        notes = ["zeros give no speed-up in ONNX Runtime, whose kernels are dense"]
        return PassResult(zeros != zeros_before, stats, notes)

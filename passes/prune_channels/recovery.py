"""What a removed channel contributed, put back into the consumer that read it.

Three levels, from exact to approximate:
- exact: a channel whose value is a known constant (zero filter, or a constant
  pushed through BN/activations/pooling) adds a fixed offset to each consumer. It is
  computed by running the consumer on an input that holds only those constants
  (padding included), and folded into the bias when it is uniform, otherwise added
  as a constant map after the consumer. Outputs stay the same up to float rounding.
- bias compensation: a removed channel's mean on the calibration feeds, pushed
  through the consumer's weights, goes into the bias.
- reconstruction: ridge least squares x_removed ~ A x_kept + b on the calibration
  feeds. Folding A into the kept weights (W_kept += W_removed A) and b into the bias
  is the least-squares fit of the consumer's original output for Gemm, MatMul and
  1x1 Conv; for larger kernels it fits each pixel's channels, which is the same
  linear map applied at every kernel tap. Grouped consumers get bias compensation only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxopt.graph import constant_value
from onnxopt.runtime import create_session

from . import heldout
from .dependency import Absorber, Analysis
from .statistics import CalibrationStats, PatchSpec


@dataclass
class Offset:
    """A change of a node's output before its own channels are sliced: [M] or a map."""

    node: int
    value: np.ndarray
    is_map: bool


@dataclass
class Recovery:
    weights: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    offsets: list[Offset] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    notes: list[str] = field(default_factory=list)
    checks: list[heldout.LayerCheck] = field(default_factory=list)


def _padded(node: gs.Node) -> bool:
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return any(int(p) != 0 for p in node.attrs.get("pads", [])) or auto_pad.startswith("SAME")


def _input_shape(an: Analysis, tensor: str) -> list[int] | None:
    shape = an.shapes.get(tensor)
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return [1, *shape[1:]]


def _weight(an: Analysis, absorber: Absorber) -> np.ndarray:
    return constant_value(an.graph.nodes[absorber.node].inputs[absorber.weight_slot])


def exact_capable(an: Analysis, absorber: Absorber) -> bool:
    """Whether a constant input channel's effect on this consumer can be computed exactly."""
    node = an.graph.nodes[absorber.node]
    if absorber.op == "Gemm":
        return True
    if absorber.op == "MatMul":
        return _weight(an, absorber).ndim == 2
    if absorber.op == "Conv" and not _padded(node):
        return True
    return _input_shape(an, absorber.tensor) is not None


def exact_classes(an: Analysis) -> np.ndarray:
    """Per class: removable with no change of the outputs (known constants everywhere read)."""
    ok = np.ones(an.n_classes, dtype=bool)
    for absorber in an.absorbers:
        lay = an.layouts[absorber.tensor]
        values = an.values.get(absorber.tensor, np.full(lay.length, np.nan))
        capable = exact_capable(an, absorber)
        good = np.isfinite(values) & ((values == 0) | capable)
        bad = an.elem_class[lay.elems[~good]]
        ok[bad[bad >= 0]] = False
    return ok


def _run_node(an: Analysis, node: gs.Node, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    attrs = {k: v for k, v in node.attrs.items() if v is not None}
    proto = helper.make_node(node.op, ["x", "w"], ["y"], **attrs)
    dtype = helper.np_dtype_to_tensor_dtype(weight.dtype)
    graph = helper.make_graph(
        [proto],
        "contribution",
        [helper.make_tensor_value_info("x", dtype, list(x.shape))],
        [helper.make_tensor_value_info("y", dtype, None)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", an.opset)])
    model.ir_version = min(model.ir_version, 8 if an.opset <= 17 else onnx.IR_VERSION)
    session = create_session(model, optimization="disable")
    return session.run(None, {"x": x.astype(weight.dtype)})[0].astype(np.float64)


def contribution(
    an: Analysis,
    absorber: Absorber,
    positions: np.ndarray,
    values: np.ndarray,
    approximate: bool = False,
) -> tuple[np.ndarray, bool] | None:
    """Offset on the consumer's output when `positions` of its input hold `values`.

    Returns (vector over output channels, False) when the offset is the same at every
    output position, (map, True) when padding makes it vary, None when it cannot be
    computed. `approximate` averages a map into a vector.
    """
    node = an.graph.nodes[absorber.node]
    weight = _weight(an, absorber)
    length = an.layouts[absorber.tensor].length
    x = np.zeros(length)
    x[positions] = values
    w64 = weight.astype(np.float64)
    if absorber.op == "Gemm":
        product = w64 @ x if node.attrs.get("transB", 0) else x @ w64
        return float(node.attrs.get("alpha", 1.0)) * product, False
    if absorber.op == "MatMul":
        return (x @ w64, False) if weight.ndim == 2 else None
    groups = int(node.attrs.get("group", 1))
    if absorber.op == "Conv" and (approximate or not _padded(node)):
        m, width = weight.shape[:2]
        sums = w64.reshape(groups, m // groups, width, -1).sum(axis=-1)
        return np.einsum("gmc,gc->gm", sums, x.reshape(groups, width)).reshape(m), False
    if absorber.op == "ConvTranspose" and approximate:
        c_in, per_group = weight.shape[:2]
        width = c_in // groups
        sums = w64.reshape(groups, width, per_group, -1).sum(axis=-1)
        strides = float(np.prod(node.attrs.get("strides", [1])))
        vec = np.einsum("gcm,gc->gm", sums, x.reshape(groups, width)).reshape(-1) / strides
        return vec, False
    shape = _input_shape(an, absorber.tensor)
    if shape is None:
        return None
    full = np.zeros(shape)
    full[0] = x.reshape(length, *([1] * (len(shape) - 2)))
    result = _run_node(an, node, full, weight)[0]
    flat = result.reshape(result.shape[0], -1)
    vec = flat.mean(axis=1)
    spread = np.abs(flat - vec[:, None]).max() if flat.size else 0.0
    if approximate or spread <= 1e-6 * max(1.0, float(np.abs(flat).max())):
        return vec, False
    return result[None], True


def _solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """X with X @ lhs = rhs (lhs symmetric)."""
    try:
        return np.linalg.solve(lhs, rhs.T).T
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs.T, rcond=None)[0].T


def _ridge(gram: np.ndarray, cols: np.ndarray, ridge: float) -> np.ndarray:
    """gram[cols, cols] plus ridge x mean diagonal on every column but the last (the 1s)."""
    block = gram[np.ix_(cols, cols)]
    scale = float(np.trace(block[:-1, :-1])) / max(cols.size - 1, 1)
    return block + np.diag(np.append(np.full(cols.size - 1, ridge * scale), 0.0))


def _features(positions: np.ndarray, taps: int) -> np.ndarray:
    return (positions[:, None] * taps + np.arange(taps)[None, :]).reshape(-1)


def _as_matrix(node: gs.Node, op: str, weight: np.ndarray) -> np.ndarray:
    """The weight as [outputs, input features] (a Conv's features are channel x tap)."""
    w = weight.astype(np.float64)
    if op == "Conv":
        return w.reshape(w.shape[0], -1)
    if op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        return alpha * (w if node.attrs.get("transB", 0) else w.T)
    return w.T


def _from_matrix(node: gs.Node, op: str, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
    if op == "Conv":
        return matrix.reshape(like.shape).astype(like.dtype)
    if op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        matrix = matrix / alpha
        return (matrix if node.attrs.get("transB", 0) else matrix.T).astype(like.dtype)
    return matrix.T.astype(like.dtype)


def _output_fit(
    an: Analysis,
    absorber: Absorber,
    gram: np.ndarray,
    taps: int,
    kept: np.ndarray,
    matched: np.ndarray,
    ridge: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of the consumer's output from the `matched` inputs on the kept ones.

    Returns the new full-size weight (removed inputs' weights unchanged: they are sliced
    away) and the offset for its bias.
    """
    node = an.graph.nodes[absorber.node]
    weight = _weight(an, absorber)
    matrix = _as_matrix(node, absorber.op, weight)
    ones = gram.shape[0] - 1
    f_kept = np.append(_features(kept, taps), ones)
    f_matched = _features(matched, taps)
    target = matrix[:, f_matched] @ gram[np.ix_(f_matched, f_kept)]
    fitted = _solve(_ridge(gram, f_kept, ridge), target)
    matrix = matrix.copy()
    matrix[:, f_kept[:-1]] = fitted[:, :-1]
    return _from_matrix(node, absorber.op, matrix, weight), fitted[:, -1]


def _output_errors(
    an: Analysis,
    absorber: Absorber,
    held: np.ndarray,
    taps: int,
    kept: np.ndarray,
    unknown: np.ndarray,
    candidates: dict[str, tuple[np.ndarray | None, np.ndarray | None]],
) -> dict[str, float]:
    """Held-out relative output error of each candidate (new full weight or None, offset)."""
    node = an.graph.nodes[absorber.node]
    weight = _weight(an, absorber)
    matrix = _as_matrix(node, absorber.op, weight)
    moments = heldout.normalized(held)
    f_kept, f_removed = _features(kept, taps), _features(unknown, taps)
    scale = heldout.output_error(moments, heldout.output_delta(matrix, np.arange(matrix.shape[1])))
    errors = {}
    for label, (updated, offset) in candidates.items():
        fitted = None
        if updated is not None:
            fitted = _as_matrix(node, absorber.op, updated)[:, f_kept]
        delta = heldout.output_delta(matrix, f_removed, f_kept, fitted, offset)
        errors[label] = heldout.output_error(moments, delta) / max(scale, 1e-30)
    return errors


def _regression_fold(
    an: Analysis,
    absorber: Absorber,
    gram: np.ndarray,
    kept: np.ndarray,
    removed: np.ndarray,
    ridge: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel fit x_removed ~ A x_kept + b folded into the kept weights (W_kept += W_r A).

    Used where the patch Gram would be too large; returns the new weight and the fit
    [A, b] over [kept, 1].
    """
    cols = np.append(kept, gram.shape[0] - 1)
    coef = _solve(_ridge(gram, cols, ridge), gram[np.ix_(removed, cols)])
    weight = _weight(an, absorber)
    moved = np.moveaxis(weight.astype(np.float64), absorber.weight_axis, 0).copy()
    flat = moved.reshape(moved.shape[0], -1)
    flat[kept] += coef[:, :-1].T @ flat[removed]
    updated = np.moveaxis(flat.reshape(moved.shape), 0, absorber.weight_axis)
    return updated.astype(weight.dtype), coef


def _residual_errors(
    an: Analysis,
    absorber: Absorber,
    held: np.ndarray,
    kept: np.ndarray,
    unknown: np.ndarray,
    candidates: dict[str, tuple[np.ndarray | None, np.ndarray | None]],
) -> dict[str, float]:
    """Held-out error of the removed channels' residual per candidate ((A, b) or Nones)."""
    weight = np.moveaxis(_weight(an, absorber).astype(np.float64), absorber.weight_axis, 0)
    moments = heldout.normalized(held)
    channels = held.shape[0] - 1
    everything = np.arange(channels)
    scale = heldout.residual_error(
        moments, weight, everything, heldout.residual_rows(channels, everything)
    )
    errors = {}
    for label, (coef, intercept) in candidates.items():
        rows = heldout.residual_rows(channels, unknown, kept, coef, intercept)
        errors[label] = heldout.residual_error(moments, weight, unknown, rows) / max(scale, 1e-30)
    return errors


def _fits_output(an: Analysis, absorber: Absorber, patch: PatchSpec | None) -> bool:
    """Whether the Gram holds the consumer's own input features (patches, or 1x1 kernels)."""
    if absorber.op in ("Gemm", "MatMul"):
        return True
    return absorber.op == "Conv" and (patch is not None or _weight(an, absorber)[0, 0].size == 1)


def _reconstructable(an: Analysis, absorber: Absorber) -> bool:
    node = an.graph.nodes[absorber.node]
    if absorber.period or int(node.attrs.get("group", 1)) != 1:
        return False
    return absorber.op != "MatMul" or _weight(an, absorber).ndim == 2


def plan_recovery(
    an: Analysis,
    keep_elem: np.ndarray,
    stats: CalibrationStats | None = None,
    *,
    bias_compensation: bool = False,
    reconstruct: bool = False,
    ridge: float = 1e-3,
    held: CalibrationStats | None = None,
) -> Recovery:
    """Weight updates and output offsets for every consumer that lost input channels.

    With `held` (statistics of held-out feeds), each consumer keeps whichever of plain
    removal, bias compensation and reconstruction has the smallest held-out error.
    """
    rec = Recovery()
    for absorber in an.absorbers:
        lay = an.layouts[absorber.tensor]
        keep = keep_elem[lay.elems]
        removed = np.nonzero(~keep)[0]
        if removed.size == 0:
            continue
        kept = np.nonzero(keep)[0]
        values = an.values.get(absorber.tensor, np.full(lay.length, np.nan))
        known = removed[np.isfinite(values[removed])]
        unknown = removed[~np.isfinite(values[removed])]
        folded = known[values[known] != 0]
        if folded.size:
            result = contribution(an, absorber, folded, values[folded])
            if result is None:
                rec.counts["offsets_skipped"] += 1
            else:
                rec.offsets.append(Offset(absorber.node, *result))
                rec.counts["exact_offsets"] += 1
        if unknown.size == 0 or stats is None:
            continue
        # A search builds many models in which most consumers lose the same channels.
        key = (absorber.node, kept.tobytes(), bias_compensation, reconstruct, ridge, id(held))
        if key not in stats.memo:
            checks = Recovery()
            args = (bias_compensation, reconstruct, ridge, checks)
            stats.memo[key] = (
                _recover_one(an, absorber, stats, held, kept, unknown, *args),
                checks.checks,
            )
        choice, checks = stats.memo[key]
        rec.checks.extend(checks)
        if choice is None:
            continue
        label, updated, offset = choice
        rec.counts[_COUNTS[label]] += 1
        if updated is not None:
            rec.weights[absorber.node] = (absorber.weight_slot, updated)
        if offset is not None:
            rec.offsets.append(Offset(absorber.node, offset, False))
    return rec


_COUNTS = {
    "reconstruct": "reconstructed",
    "bias": "bias_compensated",
    "plain": "recovery_rejected",
}


def _recover_one(
    an: Analysis,
    absorber: Absorber,
    stats: CalibrationStats,
    held: CalibrationStats | None,
    kept: np.ndarray,
    unknown: np.ndarray,
    bias_compensation: bool,
    reconstruct: bool,
    ridge: float,
    rec: Recovery,
) -> tuple[str, np.ndarray | None, np.ndarray | None] | None:
    """(label, new full weight or None, output offset or None) chosen for one consumer."""
    means = stats.mean.get(absorber.tensor)
    bias = None
    if (bias_compensation or reconstruct) and means is not None:
        result = contribution(an, absorber, unknown, means[unknown], approximate=True)
        bias = None if result is None else result[0]
    entry = stats.gram.get(absorber.node)
    held_gram = held.gram.get(absorber.node) if held is not None else None
    name = an.graph.nodes[absorber.node].name
    if reconstruct and entry is not None and _reconstructable(an, absorber):
        gram, patch = entry
        taps = patch.taps if patch is not None else 1
        if _fits_output(an, absorber, patch):
            matched = np.union1d(kept, unknown)
            updated, offset = _output_fit(an, absorber, gram, taps, kept, matched, ridge)
            if held_gram is None:
                return "reconstruct", updated, offset
            options = {"plain": (None, None), "reconstruct": (updated, offset)}
            if bias is not None:
                options["bias"] = (None, bias)
            errors = _output_errors(an, absorber, held_gram[0], taps, kept, unknown, options)
        else:
            updated, coef = _regression_fold(an, absorber, gram, kept, unknown, ridge)
            result = contribution(an, absorber, unknown, coef[:, -1], approximate=True)
            offset = None if result is None else result[0]
            if held_gram is None:
                return "reconstruct", updated, offset
            options = {"plain": (None, None), "reconstruct": (coef[:, :-1], coef[:, -1])}
            if bias is not None:
                options["bias"] = (None, means[unknown])
            errors = _residual_errors(an, absorber, held_gram[0], kept, unknown, options)
        label = min(errors, key=lambda k: (errors[k], k != "reconstruct"))
        rec.checks.append(
            heldout.LayerCheck(name, int(gram[-1, -1]), gram.shape[0] - 1, errors, label)
        )
        choices = {"plain": (None, None), "bias": (None, bias), "reconstruct": (updated, offset)}
        return (label, *choices[label])
    if bias is None:
        return None
    held_means = held.mean.get(absorber.tensor) if held is not None else None
    if held_means is not None:
        # E||d + c||^2 - E||d||^2 = 2 c.E[d] + ||c||^2 with d = -(removed contribution)
        result = contribution(an, absorber, unknown, held_means[unknown], approximate=True)
        if result is not None:
            gain = 2.0 * float(bias @ result[0]) - float(bias @ bias)
            scale = max(float(result[0] @ result[0]), 1e-30)
            errors = {"plain": 1.0, "bias": 1.0 - gain / scale}
            label = "bias" if gain > 0 else "plain"
            rec.checks.append(heldout.LayerCheck(name, 0, unknown.size, errors, label))
            return (label, None, bias if label == "bias" else None)
    return "bias", None, bias

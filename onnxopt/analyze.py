"""Per-layer error of a QDQ model against its float reference: isolated and accumulated.

For every quantized node N (see `shadow.quantized_nodes`) two errors of N's
dequantized output are measured against the float model's value of the same tensor:
- accumulated: N's output in the quantized model, where everything before N is
  quantized too;
- isolated: N's output when only N is quantized (its inputs, weights, bias and the
  Q->DQ after it), computed by N's copy in the shadow model (`shadow.py`).

One ORT session runs the float model, every isolated copy and the quantized model
together, and reduces each error to three sums in the graph; only those scalars
are read, samples share a run where the model's batch allows (`batching`), and memory
holds one run's tensors. Nodes are ranked most sensitive first: lowest isolated SQNR,
then lowest accumulated SQNR.

The reference must be the float model the quantize pass was given (after any float
rewrite such as smooth-quant): activations are matched by tensor name. A quantized
node writes float; where the quantize pass puts a Q on its output it renames the
node's output (`x_float`) and the DQ after the Q takes the float name, so N's output
is matched to the float tensor of its own name or of that DQ's output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .batching import batches, plan_batches
from .data import FeedSource, load_feeds, model_inputs
from .errors import FeedError, ModelError
from .model import load_model
from .report import Table
from .runtime import run, session_with_outputs
from .shadow import error_model, quantized_nodes
from .verify import ErrorStats

QDQ = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
SHADOW = "onnxopt_shadow"
METRICS = ("SQNR dB", "rel err", "cosine")


@dataclass
class LayerError:
    """The error of one quantized node's output, alone and with everything before it."""

    node: str  # node name in the quantized model
    op: str
    output: str  # the node's output tensor name in the float model
    isolated_sqnr_db: float
    isolated_rel_error: float
    isolated_cosine: float
    accumulated_sqnr_db: float
    accumulated_rel_error: float
    accumulated_cosine: float


@dataclass
class AnalysisResult:
    """Per-node errors ranked most sensitive first, with the graph order for plotting."""

    layers: list[LayerError]
    samples: int
    order: list[str] = field(default_factory=list)  # node names in graph order
    notes: list[str] = field(default_factory=list)

    def layer(self, node: str) -> LayerError:
        found = next((layer for layer in self.layers if layer.node == node), None)
        if found is None:
            raise KeyError(f"node '{node}' is not among the analysed nodes")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "layers": [asdict(layer) for layer in self.layers],
            "order": list(self.order),
            "notes": list(self.notes),
        }

    def tables(self, max_rows: int | None = None) -> list[Table]:
        """One ranked table, most sensitive node first (`max_rows` of them, default all)."""
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        table = Table(
            f"Per-layer quantization error, most sensitive first ({len(self.layers)} "
            f"quantized nodes, {self.samples} samples)",
            ["rank", "node", "op"]
            + [f"{kind} {metric}" for kind in ("isolated", "accumulated") for metric in METRICS],
        )
        for rank, e in enumerate(shown, 1):
            table.rows.append(
                [rank, e.node, e.op]
                + [e.isolated_sqnr_db, e.isolated_rel_error, _cosine_text(e.isolated_cosine)]
                + [e.accumulated_sqnr_db, e.accumulated_rel_error]
                + [_cosine_text(e.accumulated_cosine)]
            )
        table.notes.append(
            "isolated: only this node quantized (its inputs, weights and bias); "
            "accumulated: everything up to it quantized, as the quantized model runs"
        )
        if len(shown) < len(self.layers):
            table.notes.append(f"{len(self.layers) - len(shown)} more nodes in the JSON report")
        table.notes += self.notes
        return [table]

    def plot_png(self) -> bytes | None:
        """Isolated and accumulated SQNR per node in graph order; None without matplotlib."""
        from .plot import sqnr_chart

        by_node = {layer.node: layer for layer in self.layers}
        ordered = [by_node[n] for n in self.order if n in by_node] or self.layers
        return sqnr_chart(
            [e.node for e in ordered],
            [e.isolated_sqnr_db for e in ordered],
            [e.accumulated_sqnr_db for e in ordered],
            title=f"Per-layer SQNR over {self.samples} samples (higher is better)",
        )


def _cosine_text(value: float) -> str:
    # Quantization cosines sit at 0.999...: four significant digits would all read "1".
    return f"{value:.6f}"


def rel_error(stats: ErrorStats) -> float:
    """||cand - ref|| / ||ref|| over every element seen."""
    if stats.err_sq == 0.0:
        return 0.0
    if stats.ref_sq == 0.0:
        return math.inf
    return math.sqrt(stats.err_sq / stats.ref_sq)


def _length(feeds: Any) -> int | None:
    try:
        return len(feeds)
    except TypeError:
        return None


def _like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    # A row-wise layer's rows hold the float tensor's elements in the same order.
    if value.shape != reference.shape and value.size == reference.size:
        return value.reshape(reference.shape)
    return value


def analyze(
    reference: Any,
    quantized: Any,
    feeds: FeedSource | str | Iterable[dict[str, np.ndarray]] | None = None,
    *,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 8,
    seed: int = 0,
    progress: Callable[[int, int | None], None] | None = None,
) -> AnalysisResult:
    """Isolated and accumulated error of every quantized node of `quantized` against `reference`.

    `feeds` is a .npz path or folder, a FeedSource or any iterable of input dicts
    (walked once); without it, `samples` random feeds come from the reference's
    signature (with `shapes` binding dynamic dims). Nodes that cannot be isolated
    are left out and named in `notes`.
    """
    ref_model = load_model(reference)
    q_model = load_model(quantized)
    if feeds is None or isinstance(feeds, str | os.PathLike):
        feeds = load_feeds(ref_model, feeds, shapes=shapes, count=samples, seed=seed)
    ref_inputs = sorted(s.name for s in model_inputs(ref_model))
    q_inputs = sorted(s.name for s in model_inputs(q_model))
    if ref_inputs != q_inputs:
        raise FeedError(
            f"the models take different inputs (reference {ref_inputs}, quantized "
            f"{q_inputs}): analyse a model against the float model it was made from"
        )
    try:
        built = error_model(ref_model, q_model)
    except ValueError as exc:
        raise ModelError(f"analyze cannot run this quantized model: it holds {exc}") from None
    probes, notes = built.probes, built.notes
    if not probes:
        raise ModelError(
            "the quantized model has no node that reads a DequantizeLinear output: analyse a "
            "QDQ model (quantize in static mode or with weights=int4, not mode=dynamic)"
        )
    iso = [ErrorStats(p.label) for p in probes]
    acc = [ErrorStats(p.label) for p in probes]
    names = built.outputs
    total = _length(feeds)
    # Only scalar sums leave ORT: samples share a run as far as the float model's batch
    # allows (`batching`), and a sum over a run is the sum over its samples.
    rows = plan_batches(ref_model, list(dict.fromkeys(r for p in probes for r in p.reference))).rows
    session = session_with_outputs(
        built.model, names, providers, threads=threads, optimization="basic"
    )
    count = 0
    if progress is not None:
        progress(0, total)  # the bar shows its total before the first, slowest run
    for batch in batches(feeds, rows):
        values = run(session, batch.feed, names)
        for stats, sums in ((iso, built.isolated), (acc, built.accumulated)):
            for stat, probe_sums in zip(stats, sums, strict=True):
                for pair in probe_sums:
                    rr, cc, ee = (float(values[pair[k]]) for k in ("ref_sq", "cand_sq", "err_sq"))
                    stat.ref_sq += rr
                    stat.cand_sq += cc
                    stat.err_sq += ee
                    stat.dot += (rr + cc - ee) / 2
        count += batch.samples
        if progress is not None:
            progress(count, total)
    if count == 0:
        raise FeedError("no feeds to analyse on: the data holds no samples")
    layers = [
        LayerError(
            node=p.label,
            op=p.node.op_type,
            output=p.reference[0],
            isolated_sqnr_db=i.sqnr_db,
            isolated_rel_error=rel_error(i),
            isolated_cosine=i.cosine,
            accumulated_sqnr_db=a.sqnr_db,
            accumulated_rel_error=rel_error(a),
            accumulated_cosine=a.cosine,
        )
        for p, i, a in zip(probes, iso, acc, strict=True)
    ]
    ranked = sorted(layers, key=lambda e: (e.isolated_sqnr_db, e.accumulated_sqnr_db))
    return AnalysisResult(ranked, count, [p.label for p in probes], notes)


__all__ = [
    "AnalysisResult",
    "LayerError",
    "analyze",
    "quantized_nodes",
    "rel_error",
]

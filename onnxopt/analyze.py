"""Per-layer error of a QDQ model against its float reference: isolated and accumulated.

For every quantized node N (see `quantized_nodes`) two errors of N's output are
measured against the float model's value of the same tensor:
- accumulated: N's output in the quantized model, where everything before N is
  quantized too;
- isolated: N's output when only N is quantized. One "shadow" model computes it for
  every node at once: the float model plus, for each N, a copy N' that reads
  Q->DQ'd copies of N's float activation inputs (with the scale and zero point the
  quantized model uses for them) and the quantized model's own DQ'd weights and bias.

Both models run once per sample through `runtime.iter_tensors`, side by side, and
each node's errors go at once into running sums (`verify.ErrorStats`), so memory
holds one sample's tensors. Nodes are ranked most sensitive first: lowest isolated
SQNR, then lowest accumulated SQNR.

The reference must be the float model the quantize pass was given (after any float
rewrite such as smooth-quant): activations are matched by tensor name. A quantized
node writes float; where the quantize pass puts a Q on its output it renames the
node's output (`x_float`) and the DQ after the Q takes the float name, so N's output
is matched to the float tensor of its own name or of that DQ's output.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from .data import FeedSource, load_feeds, model_inputs
from .errors import FeedError, ModelError
from .graph import unique_name
from .model import default_opset, inferred_shapes, load_model, upgrade_opset
from .report import Table
from .runtime import FLOAT_TYPES, float_tensor_names, iter_tensors
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


def quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of the main graph that the QDQ model runs on integers, in graph order.

    Such a node (not Q/DQ itself) reads a DequantizeLinear output, and either reads a
    dequantized constant (weight, bias, constant operand) or has a QuantizeLinear
    reading its output. A Conv, ConvTranspose, MatMul or Gemm that reads a float
    constant directly runs in float even when its activation input is dequantized
    (a node excluded from quantization behind a quantized one).
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    constants = {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            is_float = attr.name.startswith("value_float") or (
                attr.name == "value" and attr.t.data_type in FLOAT_TYPES
            )
            constants[node.output[0]] = onnx.TensorProto.FLOAT if is_float else 0
    requantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    found = []
    for node in graph.node:
        if node.op_type in QDQ or not any(dequantized(i) for i in node.input):
            continue
        if node.op_type in WEIGHTED and any(constants.get(i) in FLOAT_TYPES for i in node.input):
            continue
        reads_constant = any(
            dequantized(i) and producer[i].input[0] in constants for i in node.input
        )
        if reads_constant or any(o in requantized for o in node.output):
            found.append(node)
    return found


@dataclass
class _Probe:
    node: onnx.NodeProto
    label: str  # the node's name, or op and position when it has none
    actual: list[str]  # output names in the quantized model
    reference: list[str]  # the same outputs' names in the float model
    shadow: list[str]  # the outputs of the node's copy in the shadow model


class _Shadow:
    """Builds the shadow model: the float model plus an isolated copy of each quantized node."""

    def __init__(self, reference: onnx.ModelProto, quantized: onnx.ModelProto):
        self.model = reference
        self.quantized = quantized
        graph = quantized.graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        ref = reference.graph
        self.float_values = {o for n in ref.node for o in n.output if o} | {
            i.name for i in ref.input
        }
        self.float_outputs = set(float_tensor_names(reference))
        self.taken = (
            self.float_values
            | {t.name for t in ref.initializer}
            | {n.name for n in ref.node}
            | set(self.producer)
            | set(self.initializers)
        )
        self.made: dict[str, str] = {}  # quantized-model tensor -> its shadow copy
        # The quantize pass may run row-wise layers on [rows, features] where the float
        # model has [batch, tokens, features]: shapes tell where a float value needs a
        # Reshape before a copied node can read it.
        self.q_shapes = inferred_shapes(quantized)
        self.f_shapes = inferred_shapes(reference)

    def fresh(self, base: str) -> str:
        return unique_name(f"{SHADOW}/{base}", self.taken)

    def is_constant(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.initializers or (node is not None and node.op_type == "Constant")

    def copy_constant(self, name: str) -> str:
        if name in self.made:
            return self.made[name]
        new = self.fresh(name)
        if name in self.initializers:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(self.initializers[name])
            tensor.name = new
            self.model.graph.initializer.append(tensor)
        else:
            self.copy_node(self.producer[name], [], [new])
        self.made[name] = new
        return new

    def copy_node(self, node: onnx.NodeProto, inputs: list[str], outputs: list[str]) -> None:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = self.fresh(node.name or node.op_type)
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        copy.output.extend(outputs)
        self.model.graph.node.append(copy)

    def float_name(self, name: str) -> str | None:
        """The float-model tensor that quantized-model tensor `name` stands for (its values,
        perhaps in another shape)."""
        if name in self.float_values:
            return name
        # Rows made from a float tensor, or rows a Reshape turns back into one.
        source = self.producer.get(name)
        if (
            source is not None
            and source.op_type == "Reshape"
            and source.input[0] in self.float_values
        ):
            return source.input[0]
        for reader in self.readers.get(name, []):
            if reader.op_type == "Reshape" and reader.output[0] in self.float_values:
                return reader.output[0]
        # A quantized output renamed by the quantize pass: follow its Q to the DQ.
        for q in self.readers.get(name, []):
            if q.op_type != "QuantizeLinear":
                continue
            for dq in self.readers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear" and dq.output[0] in self.float_values:
                    return dq.output[0]
        return None

    def in_layout(self, float_name: str, name: str) -> str:
        """`float_name` in the shape the quantized model gives `name` (a Reshape if needed)."""
        want, have = self.q_shapes.get(name), self.f_shapes.get(float_name)
        if want is None or have is None or len(want) == len(have):
            return float_name
        target = [d if isinstance(d, int) else -1 for d in want]
        if target.count(-1) > 1:
            raise _Skip(f"input '{name}' has another layout than in the float model")
        shape = self.fresh(f"{name}_shape")
        self.model.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array(target, np.int64), shape)
        )
        out = self.fresh(name)
        self.model.graph.node.append(
            onnx.helper.make_node("Reshape", [float_name, shape], [out], self.fresh("Reshape"))
        )
        return out

    def shadow_input(self, name: str) -> str:
        """The shadow-model tensor that feeds the copy in place of input `name`."""
        if not name:
            return name
        if name in self.made:
            return self.made[name]
        dq = self.producer.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            if not all(self.is_constant(p) for p in dq.input[1:] if p):
                raise _Skip("its DequantizeLinear has a computed scale or zero point")
            params = [self.copy_constant(p) if p else p for p in dq.input[1:]]
            source = dq.input[0]
            if self.is_constant(source):
                stored = self.copy_constant(source)
            else:
                q = self.producer.get(source)
                origin = name if name in self.float_values else None
                if origin is None and q is not None and q.op_type == "QuantizeLinear":
                    found = self.float_name(q.input[0])
                    origin = self.in_layout(found, q.input[0]) if found is not None else None
                if q is None or q.op_type != "QuantizeLinear" or origin is None:
                    raise _Skip(f"input '{name}' is not a Q/DQ of a tensor of the float model")
                # The DQ's own scale and zero point: a DQ that absorbed a Mul by a scalar
                # scales differently from its Q, and quantizing the Mul's float output
                # with the DQ's parameters gives the integers the quantized model holds.
                stored = self.fresh(f"{origin}_quantized")
                self.copy_node(q, [origin, *params], [stored])
            out = self.fresh(name)
            self.copy_node(dq, [stored, *params], [out])
        elif self.is_constant(name):
            out = self.copy_constant(name)
        elif self.float_name(name) is not None:
            out = self.in_layout(self.float_name(name), name)  # type: ignore[arg-type]
        else:
            raise _Skip(f"input '{name}' has no counterpart in the float model")
        self.made[name] = out
        return out

    def add(self, node: onnx.NodeProto, label: str) -> _Probe:
        reference = [self.float_name(o) if o else None for o in node.output]
        if not reference or reference[0] is None:
            raise _Skip("its output has no counterpart in the float model")
        if reference[0] not in self.float_outputs:
            raise _Skip("its output is not floating point")
        inputs = [self.shadow_input(i) for i in node.input]
        outputs = [self.fresh(o) if o else "" for o in node.output]
        self.copy_node(node, inputs, outputs)
        pairs = [
            (a, r, s)
            for a, r, s in zip(node.output, reference, outputs, strict=True)
            if a and r is not None and r in self.float_outputs
        ]
        return _Probe(
            node, label, [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
        )


class _Skip(Exception):
    """A node the analysis cannot isolate; the message says why."""


def _shadow_model(
    reference: onnx.ModelProto, quantized: onnx.ModelProto
) -> tuple[onnx.ModelProto, list[_Probe], list[str]]:
    """The float model plus an isolated copy of every quantized node, and notes on skips."""
    target = default_opset(quantized)
    base = upgrade_opset(reference, target) if default_opset(reference) < target else reference
    model = onnx.ModelProto()
    model.CopyFrom(base)
    model.ir_version = max(model.ir_version, quantized.ir_version)
    domains = {o.domain: o for o in model.opset_import}
    for entry in quantized.opset_import:
        if entry.domain not in domains:
            model.opset_import.append(entry)
        elif domains[entry.domain].version < entry.version:
            domains[entry.domain].version = entry.version
    shadow = _Shadow(model, quantized)
    probes: list[_Probe] = []
    skipped: dict[str, list[str]] = {}
    for index, node in enumerate(quantized_nodes(quantized)):
        label = node.name or f"{node.op_type}_{index}"
        kept_nodes = len(model.graph.node)
        kept_inits = len(model.graph.initializer)
        made = dict(shadow.made)
        try:
            probes.append(shadow.add(node, label))
        except _Skip as why:
            # Undo the half-built copy so the shadow model holds only whole probes.
            del model.graph.node[kept_nodes:]
            del model.graph.initializer[kept_inits:]
            shadow.made = made
            skipped.setdefault(str(why), []).append(label)
    notes = [
        f"not analysed, {reason}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
        for reason, names in skipped.items()
    ]
    return model, probes, notes


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
    shadow, probes, notes = _shadow_model(ref_model, q_model)
    if not probes:
        raise ModelError(
            "the quantized model has no node that reads a DequantizeLinear output: analyse a "
            "QDQ model (quantize in static mode or with weights=int4, not mode=dynamic)"
        )
    iso = [ErrorStats(p.label) for p in probes]
    acc = [ErrorStats(p.label) for p in probes]
    shadow_names = list(dict.fromkeys(n for p in probes for n in (*p.reference, *p.shadow)))
    actual_names = list(dict.fromkeys(n for p in probes for n in p.actual))
    # tee keeps the two runs on the same sample, even when `feeds` can be walked only once.
    shadow_feeds, quant_feeds = itertools.tee(feeds)
    shadow_iter = iter_tensors(
        shadow, shadow_feeds, shadow_names, providers=providers, threads=threads
    )
    quant_iter = iter_tensors(
        q_model, quant_feeds, actual_names, providers=providers, threads=threads
    )
    count = 0
    for floats, quants in zip(shadow_iter, quant_iter, strict=True):
        for p, isolated, accumulated in zip(probes, iso, acc, strict=True):
            for actual, ref, copy in zip(p.actual, p.reference, p.shadow, strict=True):
                expected = floats[ref]
                isolated.update(expected, _like(floats[copy], expected))
                accumulated.update(expected, _like(quants[actual], expected))
        count += 1
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

"""The shadow model that `analyze` runs: every quantized node isolated, and its errors in-graph.

For every quantized node N (see `quantized_nodes`) the shadow model holds:
- the float model (the reference value of every tensor);
- a copy N' of N that reads Q->DQ'd copies of N's float activation inputs (with the
  scale and zero point the quantized model uses for them) and the quantized model's own
  DQ'd weights and bias: N quantized alone (isolated);
- the whole quantized model, its tensors renamed (accumulated: everything before N
  quantized too).
A node's error is measured on its dequantized output: where the quantized model puts a
Q->DQ after N, N' gets the same Q->DQ (the Q's and the DQ's own parameters), and both
are compared with the float tensor the DQ stands for. A DQ whose scale absorbed a
scalar Mul (quantize's `merged_scalar_muls`) then compares with the Mul's float output,
which it computes; N's raw output would differ from it by the Mul's factor.

The errors are reduced inside the graph (`error_sums`): per compared pair the sums of
ref^2, cand^2 and (cand - ref)^2 over every element of the run. Only those scalars leave
ORT, so a run may hold as many samples as memory allows, and one session runs
everything. The nodes are ordered so that each tensor is reduced soon after it is made
(`_schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import unique_name
from .model import default_opset, inferred_shapes, upgrade_opset
from .runtime import FLOAT_TYPES, float_tensor_names

QDQ = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
SHADOW = "onnxopt_shadow"
QUANTIZED = "onnxopt_quantized/"
SUMS = ("ref_sq", "cand_sq", "err_sq")


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
class Probe:
    node: onnx.NodeProto
    label: str  # the node's name, or op and position when it has none
    actual: list[str]  # output names in the quantized model
    reference: list[str]  # the same outputs' names in the float model
    shadow: list[str]  # the outputs of the node's copy in the shadow model


class Shadow:
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
            raise Skip(f"input '{name}' has another layout than in the float model")
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
                raise Skip("its DequantizeLinear has a computed scale or zero point")
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
                    raise Skip(f"input '{name}' is not a Q/DQ of a tensor of the float model")
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
            raise Skip(f"input '{name}' has no counterpart in the float model")
        self.made[name] = out
        return out

    def output_pair(
        self, name: str
    ) -> tuple[str, str, onnx.NodeProto | None, onnx.NodeProto | None]:
        """(quantized-model tensor, float tensor, Q, DQ) to compare for node output `name`.

        Where a Q->DQ follows the output and the DQ's output is a float-model tensor, the
        DQ's output is compared (with the Q and DQ to repeat on the copy); otherwise the
        output itself, matched by name or through a row-wise Reshape.
        """
        if name in self.float_values:
            return name, name, None, None
        for q in self.readers.get(name, []):
            if q.op_type != "QuantizeLinear":
                continue
            for dq in self.readers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear" and dq.output[0] in self.float_values:
                    if not all(self.is_constant(p) for p in [*q.input[1:], *dq.input[1:]] if p):
                        raise Skip("its output's Q/DQ has a computed scale or zero point")
                    return dq.output[0], dq.output[0], q, dq
        found = self.float_name(name)
        if found is None:
            raise Skip("its output has no counterpart in the float model")
        return name, found, None, None

    def add(self, node: onnx.NodeProto, label: str) -> Probe:
        if not node.output or not node.output[0]:
            raise Skip("it has no output")
        pairs = [self.output_pair(o) for o in node.output if o]
        if pairs[0][1] not in self.float_outputs:
            raise Skip("its output is not floating point")
        inputs = [self.shadow_input(i) for i in node.input]
        outputs = [self.fresh(o) if o else "" for o in node.output]
        self.copy_node(node, inputs, outputs)
        probe = Probe(node, label, [], [], [])
        for (actual, reference, q, dq), copy in zip(pairs, [o for o in outputs if o], strict=True):
            if reference not in self.float_outputs:
                continue
            if q is not None and dq is not None:
                stored = self.fresh(f"{reference}_requantized")
                self.copy_node(
                    q, [copy, *[self.copy_constant(p) if p else p for p in q.input[1:]]], [stored]
                )
                copy = self.fresh(reference)
                self.copy_node(
                    dq, [stored, *[self.copy_constant(p) if p else p for p in dq.input[1:]]], [copy]
                )
            probe.actual.append(actual)
            probe.reference.append(reference)
            probe.shadow.append(copy)
        return probe


class Skip(Exception):
    """A node the analysis cannot isolate; the message says why."""


@dataclass
class ErrorModel:
    """The shadow model with its error sums: per probe and compared output, the output
    names of the isolated and the accumulated sums (keys `SUMS`)."""

    model: onnx.ModelProto
    probes: list[Probe]
    notes: list[str]
    isolated: list[list[dict[str, str]]]
    accumulated: list[list[dict[str, str]]]

    @property
    def outputs(self) -> list[str]:
        names = [
            name
            for kind in (self.isolated, self.accumulated)
            for probe in kind
            for sums in probe
            for name in sums.values()
        ]
        return list(dict.fromkeys(names))


def error_model(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> ErrorModel:
    """The shadow model, the quantized model beside it, and the nodes that sum the errors."""
    model, probes, notes, shadow = shadow_model(reference, quantized)
    taken = shadow.taken | {QUANTIZED + n for n in shadow.producer}
    float_nodes = len(reference.graph.node)
    renames = add_quantized(model, quantized)

    def reshape(actual: str, ref: str) -> bool:
        want, have = shadow.q_shapes.get(actual), shadow.f_shapes.get(ref)
        return want is None or have is None or len(want) != len(have)

    pairs = [
        pair
        for p in probes
        for actual, ref, copy in zip(p.actual, p.reference, p.shadow, strict=True)
        for pair in (
            (ref, copy, reshape(actual, ref)),
            (ref, renames.get(actual, actual), reshape(actual, ref)),
        )
    ]
    nodes, sums = error_sums(pairs, taken)
    model.graph.node.extend(nodes)
    _schedule(model, float_nodes, len(quantized.graph.node))
    fold_constant_dequantize(model)
    isolated = [[sums[(r, c)] for r, c in zip(p.reference, p.shadow, strict=True)] for p in probes]
    accumulated = [
        [sums[(r, renames.get(a, a))] for r, a in zip(p.reference, p.actual, strict=True)]
        for p in probes
    ]
    return ErrorModel(model, probes, notes, isolated, accumulated)


def shadow_model(
    reference: onnx.ModelProto, quantized: onnx.ModelProto
) -> tuple[onnx.ModelProto, list[Probe], list[str], Shadow]:
    """The float model plus an isolated copy of every quantized node, notes on skips, and
    the builder (its names and shapes)."""
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
    shadow = Shadow(model, quantized)
    probes: list[Probe] = []
    skipped: dict[str, list[str]] = {}
    for index, node in enumerate(quantized_nodes(quantized)):
        label = node.name or f"{node.op_type}_{index}"
        kept_nodes = len(model.graph.node)
        kept_inits = len(model.graph.initializer)
        made = dict(shadow.made)
        try:
            probes.append(shadow.add(node, label))
        except Skip as why:
            # Undo the half-built copy so the shadow model holds only whole probes.
            del model.graph.node[kept_nodes:]
            del model.graph.initializer[kept_inits:]
            shadow.made = made
            skipped.setdefault(str(why), []).append(label)
    notes = [
        f"not analysed, {reason}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
        for reason, names in skipped.items()
    ]
    return model, probes, notes, shadow


def add_quantized(model: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, str]:
    """Append the whole quantized graph to `model`, its tensors and nodes renamed (graph
    inputs kept, so one feed drives both); returns the renaming of its tensors."""
    keep = {i.name for i in quantized.graph.input}
    names: dict[str, str] = {"": ""}

    def renamed(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = QUANTIZED + name
        return names[name]

    for tensor in quantized.graph.initializer:
        if tensor.name in keep:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = renamed(tensor.name)
        model.graph.initializer.append(copy)
    for node in quantized.graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ValueError("a subgraph")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = QUANTIZED + (node.name or node.op_type)
        copy.input[:] = [renamed(i) for i in node.input]
        copy.output[:] = [renamed(o) for o in node.output]
        model.graph.node.append(copy)
    return names


def error_sums(
    pairs: list[tuple[str, str, bool]], taken: set[str]
) -> tuple[list[onnx.NodeProto], dict[tuple[str, str], dict[str, str]]]:
    """Nodes that reduce each (reference, candidate, reshape) to the sums in `SUMS`.

    Per pair: cand - ref, and the sums of squares of that difference and of cand; the
    reference's own sum of squares is shared by every pair that reads it. The dot
    product follows from those three (ref.cand = (ref^2 + cand^2 - diff^2) / 2), which
    saves a Mul and a pass over both tensors. A candidate with another layout (a
    row-wise layer's rows) is reshaped to the reference's shape first: its elements are
    in the same order. The sums are float32 reductions over every element of the run
    (ORT's vectorized sum: a relative error near 1e-6, far below what an SQNR figure
    shows); casting every tensor to double cost more than the three models' own compute.
    Returns the nodes and, per pair, the output name of each sum (`dot` is computed by
    the caller from the other three).
    """
    nodes: list[onnx.NodeProto] = []
    ref_sq: dict[str, str] = {}
    shapes: dict[str, str] = {}

    def fresh(base: str) -> str:
        return unique_name(f"{SHADOW}/sum/{base}", taken)

    def reduce(op: str, value: str, base: str) -> str:
        out = fresh(base)
        nodes.append(onnx.helper.make_node(op, [value], [out], keepdims=0))
        return out

    sums: dict[tuple[str, str], dict[str, str]] = {}
    for reference, candidate, reshape in pairs:
        if (reference, candidate) in sums:
            continue
        if reference not in ref_sq:
            ref_sq[reference] = reduce("ReduceSumSquare", reference, f"{reference}/ref_sq")
        value = candidate
        if reshape:
            if reference not in shapes:
                shapes[reference] = fresh(f"{reference}/shape")
                nodes.append(onnx.helper.make_node("Shape", [reference], [shapes[reference]]))
            value = fresh(f"{candidate}/like")
            nodes.append(onnx.helper.make_node("Reshape", [candidate, shapes[reference]], [value]))
        diff = fresh(f"{candidate}/diff")
        nodes.append(onnx.helper.make_node("Sub", [value, reference], [diff]))
        sums[(reference, candidate)] = {
            "ref_sq": ref_sq[reference],
            "cand_sq": reduce("ReduceSumSquare", value, f"{candidate}/cand_sq"),
            "err_sq": reduce("ReduceSumSquare", diff, f"{candidate}/err_sq"),
        }
    return nodes, sums


def _schedule(model: onnx.ModelProto, float_nodes: int, quantized_nodes: int) -> None:
    """Order the nodes so that every tensor dies soon after it is made.

    The float model and the quantized model advance side by side (each node keyed by
    its position within its own model), and a copy, Q/DQ or reduction runs as soon as
    its inputs exist: the two tensors of a pair are then made close together and
    reduced at once. Appended after both models, the reductions kept every activation
    of three models alive until the end, and ran 4x slower than the models themselves.
    """
    nodes = list(model.graph.node)
    count = len(nodes)
    quantized_start = count - quantized_nodes - _tail(nodes)
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = index

    def key(index: int) -> float:
        if index < float_nodes:
            return index / max(1, float_nodes)
        if quantized_start <= index < quantized_start + quantized_nodes:
            return (index - quantized_start) / max(1, quantized_nodes)
        return -1.0  # copies and reductions: as soon as they can

    waiting = [0] * count
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        deps = {producer[i] for i in node.input if i in producer}
        waiting[index] = len(deps)
        for dep in deps:
            readers.setdefault(dep, []).append(index)
    import heapq

    ready = [(key(i), i) for i in range(count) if waiting[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, (key(reader), reader))
    if len(order) != count:  # a cycle cannot happen in valid models; keep their order
        return
    model.graph.ClearField("node")
    model.graph.node.extend(nodes[i] for i in order)


def _tail(nodes: list[onnx.NodeProto]) -> int:
    """How many nodes at the end are error sums (they come after the quantized model)."""
    tail = 0
    for node in reversed(nodes):
        if not node.name.startswith(SHADOW + "/sum") and not any(
            o.startswith(SHADOW + "/sum") for o in node.output
        ):
            break
        tail += 1
    return tail


def fold_constant_dequantize(model: onnx.ModelProto) -> int:
    """Replace each DequantizeLinear of constant integers by its float values.

    ORT leaves such DQs in the graph (for its own QDQ fusion) and, at the level the
    analysis runs, dequantizes every weight on every run: a third of the quantized
    model's time on PP-OCRv4 det. The values are the same: (q - zero_point) * scale is
    computed in float32 by numpy as by ORT. A blocked DQ (block_size) stays.
    """
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    folded = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "DequantizeLinear"
            or not all(i in inits for i in node.input if i)
            or attrs.get("block_size")
        ):
            keep.append(node)
            continue
        q = onnx.numpy_helper.to_array(inits[node.input[0]])
        scale = onnx.numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = (
            onnx.numpy_helper.to_array(inits[node.input[2]])
            if len(node.input) > 2 and node.input[2]
            else np.zeros_like(scale, dtype=np.int32)
        )
        if scale.ndim == 1 and q.ndim > 1:
            axis = int(attrs.get("axis", 1)) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.asarray(zero).reshape(shape)
        values = (q.astype(np.int32) - np.asarray(zero).astype(np.int32)).astype(np.float32) * scale
        model.graph.initializer.append(onnx.numpy_helper.from_array(values, node.output[0]))
        folded += 1
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return folded

"""Putting a plan into the graph: activation parameters, Q/DQ pairs, integer constants.

Also the two touches that keep ORT's fusions working on the result: a division
that stayed float turns back into a Div, and the bias Add after a quantized N-D
MatMul gets a bias of the output's rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.calibration import Calibration
from onnxopt.graph import constant_value

from .placement import Bias, Plan
from .qdq import (
    INT16,
    INT32,
    Namer,
    QParams,
    QType,
    activation_params,
    bias_params,
    dequantize_node,
    quantize_activation,
    quantized_constant,
    weight_params,
)


class ActivationConfig(Protocol):
    """What the activation parameters depend on (StaticConfig has these fields)."""

    activation_type: QType
    symmetric: bool
    method: str
    percentile: float
    moving_average: bool
    weight_type: QType
    notes: list[str]


def activation_params_of(
    plan: Plan, calibration: Calibration, config: ActivationConfig
) -> dict[str, QParams]:
    params: dict[str, QParams] = {}

    def resolve(name: str) -> QParams:
        if name in params:
            return params[name]
        source = plan.same_as.get(name)
        if name in plan.aliases:
            origin, factor = plan.aliases[name]
            base = resolve(origin)
            scale = np.asarray(base.scale * np.float32(factor), np.float32)
            result = QParams(scale, base.zero_point, base.qtype, base.axis)
        elif source is not None and (source in plan.points or source in plan.aliases):
            result = resolve(source)
        else:
            qtype, symmetric = (
                (INT16, True) if name in plan.wide else (config.activation_type, config.symmetric)
            )
            low, high = calibration.range(
                name,
                config.method,
                symmetric=symmetric,
                percentile=config.percentile,
                bits=qtype.bits,
                moving_average=config.moving_average,
            )
            result = activation_params(low, high, qtype, symmetric)
        params[name] = result
        return result

    for name in [*plan.points, *plan.aliases]:
        resolve(name)
    return params


def insert(
    graph: gs.Graph,
    namer: Namer,
    plan: Plan,
    params: dict[str, QParams],
    config: ActivationConfig,
) -> None:
    # Weight parameters first: a bias whose int32 value would overflow widens its
    # channel's weight scale (rare: a channel with near-zero weights and a real bias).
    weight_params_of: dict[tuple[int, int], QParams] = {}
    for weight in plan.weights:
        values = constant_value(weight.node.inputs[weight.index])
        weight_params_of[(id(weight.node), weight.index)] = weight_params(
            values, weight.axis, config.weight_type
        )
    biases: list[tuple[Bias, np.ndarray, QParams]] = []
    widened = 0
    for bias in plan.biases:
        values = constant_value(bias.node.inputs[bias.index]).astype(np.float32).reshape(-1)
        input_scale = np.float64(params[bias.activation.name].scale)
        wparams = weight_params_of[(id(bias.node), bias.weight_index)]
        needed = np.abs(values) / (input_scale * (INT32.qmax // 2))
        wider = np.maximum(wparams.scale, needed.astype(np.float32))
        if np.any(wider > wparams.scale):
            widened += int(np.count_nonzero(wider > wparams.scale))
            scale = wider if wparams.scale.ndim else np.asarray(wider.max(), np.float32)
            wparams = QParams(
                scale.astype(np.float32), wparams.zero_point, wparams.qtype, wparams.axis
            )
            weight_params_of[(id(bias.node), bias.weight_index)] = wparams
        biases.append(
            (bias, values, bias_params(params[bias.activation.name].scale, wparams.scale))
        )
    if widened:
        config.notes.append(f"widened {widened} weight scale(s) so that int32 biases fit")
    shared: dict[tuple[int, int, bytes], gs.Variable] = {}
    for weight in plan.weights:
        tensor = weight.node.inputs[weight.index]
        wparams = weight_params_of[(id(weight.node), weight.index)]
        key = (id(tensor), -1 if weight.axis is None else weight.axis, wparams.scale.tobytes())
        if key not in shared:
            values = constant_value(tensor)
            shared[key] = quantized_constant(graph, namer, tensor.name, values, wparams)
        weight.node.inputs[weight.index] = shared[key]
    for bias, values, bparams in biases:
        name = bias.node.inputs[bias.index].name
        bias.node.inputs[bias.index] = quantized_constant(graph, namer, name, values, bparams)
    for node, index in plan.constants:
        tensor = node.inputs[index]
        values = constant_value(tensor).astype(np.float32)
        qtype, symmetric = (
            (INT16, True)
            if node.name in plan.wide_nodes
            else (config.activation_type, config.symmetric)
        )
        cparams = activation_params(float(values.min()), float(values.max()), qtype, symmetric)
        node.inputs[index] = quantized_constant(graph, namer, tensor.name, values, cparams)
    quantized: dict[str, gs.Variable] = {}
    for name, tensor in plan.points.items():
        quantized[name] = quantize_activation(
            graph,
            namer,
            tensor,
            params[name],
            produced_by_quantized=name in plan.produced,
            readers=plan.readers.get(name, []),
        )
    for node in plan.alias_nodes:
        output = node.outputs[0]
        origin = plan.aliases[output.name][0]
        while origin in plan.aliases:
            origin = plan.aliases[origin][0]
        node.inputs.clear()
        node.outputs.clear()
        dequantize_node(graph, namer, quantized[origin], params[output.name], output.name, output)


def restore_divisions(
    graph: gs.Graph,
    plan: Plan,
    namer: Namer,
    divisions: Mapping[str, tuple[str, np.ndarray]],
) -> int:
    """Turn back into Div the multiplications by a reciprocal that stayed float; return how many.

    The Mul only helps where ORT runs it on integers; a float Div is what ORT's own
    fusions (GELU among them) look for.
    """
    if not divisions:
        return 0
    quantized = {id(node) for node in plan.nodes}
    restored = 0
    for node in graph.nodes:
        entry = divisions.get(node.name or "")
        if entry is None or node.op != "Mul" or id(node) in quantized or len(node.inputs) != 2:
            continue
        reciprocal, divisor = entry
        if node.inputs[1].name != reciprocal:
            continue  # merged with another multiplication since: not a plain reciprocal
        node.op = "Div"
        node.inputs[1] = gs.Constant(namer(f"{node.name}_divisor"), divisor)
        restored += 1
    return restored


def keep_bias_adds_apart(plan: Plan, namer: Namer, ranks: Mapping[str, int]) -> None:
    """Give the bias Add after a quantized N-D MatMul a bias of the output's rank.

    With static shapes, ORT's MatMulAddFusion (which runs before its QDQ fusions)
    turns MatMul + Add with an [N] bias into Reshape-Gemm-Reshape and leaves the
    weight's DequantizeLinear running in float at every call: slower than fp32. It
    only takes an [N] bias there, so a [1, ..., 1, N] one (same values, same
    broadcast) keeps the MatMul for the integer kernel.
    """
    for node in plan.nodes:
        if node.op != "MatMul" or len(node.outputs) != 1:
            continue
        rank = ranks.get(node.inputs[0].name, 0)
        readers = node.outputs[0].outputs
        if rank < 3 or len(readers) != 1 or readers[0].op != "Add":
            continue
        add = readers[0]
        index = 1 if add.inputs[0] is node.outputs[0] else 0
        value = constant_value(add.inputs[index])
        if value is None or value.ndim != 1 or add.inputs[1 - index] is not node.outputs[0]:
            continue
        add.inputs[index] = gs.Constant(
            namer(f"{add.inputs[index].name}_{rank}d"), value.reshape((1,) * (rank - 1) + (-1,))
        )

"""Writing a recovery into the sliced graph: reconstructed weights, then output offsets.

Weights are set at full size before the edits slice them. An offset is added to a
node's output after its own channels were sliced: folded into a Conv, ConvTranspose
or Gemm bias (or the constant of a bias Add that follows a MatMul), otherwise added
by a new Add node; an offset that varies over positions (a padded Conv) is always an
Add of a constant map.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value

from .apply import Slicer
from .recovery import Recovery


def apply_weights(slicer: Slicer, rec: Recovery) -> None:
    """Reconstructed full-size weights, set before the edits slice them."""
    for index, (slot, weight) in sorted(rec.weights.items()):
        slicer.set_input(slicer.nodes[index], slot, weight)


def apply_offsets(slicer: Slicer, rec: Recovery) -> None:
    """Add every offset to its node's output, after the node's own channels were sliced."""
    vectors: dict[int, np.ndarray] = {}
    maps: dict[int, np.ndarray] = {}
    for off in rec.offsets:
        target = maps if off.is_map else vectors
        target[off.node] = target[off.node] + off.value if off.node in target else off.value
    for index in sorted(set(vectors) | set(maps)):
        node = slicer.nodes[index]
        out = node.outputs[0].name
        kept = slicer.kept(out) if out in slicer.analysis.layouts else None
        dtype = constant_value(node.inputs[1]).dtype
        vec, amap = vectors.get(index), maps.get(index)
        if kept is not None:
            vec = None if vec is None else vec[kept]
            amap = None if amap is None else np.take(amap, kept, axis=1)
        if amap is not None:
            if vec is not None:
                amap = amap + vec.reshape(1, -1, *([1] * (amap.ndim - 2)))
            _insert_add(slicer, node, amap.astype(dtype))
        elif vec is not None:
            _fold_vector(slicer, node, vec.astype(dtype))


def _fold_vector(slicer: Slicer, node: gs.Node, vec: np.ndarray) -> None:
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    if node.op in ("Conv", "ConvTranspose"):
        if has_bias:
            slicer.set_input(node, 2, constant_value(node.inputs[2]) + vec)
        else:
            node.inputs.append(slicer.constant(f"{node.name}.bias", vec))
        return
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if beta == 0.0:
            _insert_add(slicer, node, vec)
        elif has_bias:
            slicer.set_input(
                node, 2, (constant_value(node.inputs[2]) + vec / beta).astype(vec.dtype)
            )
        else:
            node.inputs.append(slicer.constant(f"{node.name}.bias", vec / beta))
        return
    out = node.outputs[0]
    readers = list(out.outputs)
    is_output = any(o is out for o in slicer.graph.outputs)
    if len(readers) == 1 and readers[0].op == "Add" and not is_output:
        add = readers[0]
        slot = 1 if add.inputs[0] is out else 0
        bias = constant_value(add.inputs[slot])
        if bias is not None and bias.ndim <= 2 and bias.shape[-1:] in ((vec.size,), (1,), ()):
            if bias.ndim < 2 or bias.shape[0] == 1:
                slicer.set_input(add, slot, (bias + vec).astype(vec.dtype))
                return
    _insert_add(slicer, node, vec)


def _insert_add(slicer: Slicer, node: gs.Node, value: np.ndarray) -> None:
    out = node.outputs[0]
    raw = gs.Variable(slicer.unique_name(out.name), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = raw
    const = slicer.constant(f"{out.name}.offset", value)
    slicer.graph.nodes.append(
        gs.Node("Add", name=f"{raw.name}.add", inputs=[raw, const], outputs=[out])
    )

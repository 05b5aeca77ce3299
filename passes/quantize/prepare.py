"""Float rewrites that put a graph in the shape quantization wants, before any range is measured.

- BatchNormalization, or Mul/Div by a constant that is a scalar or one value per
  output channel, right after a Conv or ConvTranspose is folded into its weights
  and bias. A Q/DQ pair between them would stop ORT from fusing the convolution,
  and folding is exact up to rounding. Add/Sub of a constant is not folded: the
  integer grid must hold 0, and a shift can move the range away from 0 and waste
  levels (on PP-OCRv4 it cost 0.3 points of map agreement); ORT adds it on integers.
- Division by a constant becomes multiplication by its reciprocal, which ORT
  can run on integers (there is no integer Div).
- A chain of multiplications by scalar constants becomes one multiplication.
- Gemm's alpha and beta are folded into constant B and C.
- Sum of two inputs becomes Add, which ORT runs on integers.
- A MatMul of a 2-D input by a constant 2-D weight, followed by the Add of a
  bias, becomes one Gemm: ORT fuses that pair into a float Gemm before its QDQ
  rules run, which would leave the weight dequantized at every call; as a Gemm
  it becomes QGemm with an int32 bias.

Each rewrite changes results by float rounding only (a few ulps). Before the
MatMul + Add rewrite, `rows.flatten_rows` gives a transformer's 3-D row-wise
layers the 2-D input it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value, consumers, is_graph_output
from onnxopt.model import inferred_shapes

from .qdq import Namer

AFFINE_OPS = {"BatchNormalization", "Mul", "Div"}


def lift_constant_nodes(graph: gs.Graph) -> int:
    """Replace Constant nodes holding a tensor by initializers; return how many.

    Exporters (paddle2onnx among them) store weights in Constant nodes; as
    initializers they are plainly weights to every later step.
    """
    lifted = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or node.domain not in (None, "", "ai.onnx"):
            continue
        value = node.attrs.get("value")
        out = node.outputs[0] if node.outputs else None
        if not isinstance(value, gs.Constant) or out is None or is_graph_output(graph, out):
            continue
        constant = gs.Constant(out.name, np.asarray(value.values))
        for reader in list(out.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is out:
                    reader.inputs[index] = constant
        node.outputs.clear()
        graph.nodes.remove(node)
        lifted += 1
    return lifted


def _float_const(tensor: gs.Tensor | None) -> np.ndarray | None:
    value = constant_value(tensor)
    return value if value is not None and value.dtype == np.float32 else None


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`value` as one number per channel (axis 1 of a rank-`rank` tensor), if it is one."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    if shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def _affine(node: gs.Node, x: gs.Tensor, rank: int, channels: int):
    """(scale, shift) per channel when `node` computes scale * x + shift, else None."""
    if node.op == "BatchNormalization":
        if len(node.outputs) != 1 or node.attrs.get("training_mode", 0) or node.inputs[0] is not x:
            return None
        params = [_float_const(t) for t in node.inputs[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (_per_channel(p, 2, channels) for p in params)
        if any(p is None for p in (gamma, beta, mean, var)):
            return None
        scale = gamma / np.sqrt(var + np.float32(node.attrs.get("epsilon", 1e-5)))
        return scale, beta - mean * scale
    if len(node.inputs) != 2:
        return None
    other_index = 1 if node.inputs[0] is x else 0
    if node.inputs[1 - other_index] is not x or node.inputs[other_index] is x:
        return None
    value = _float_const(node.inputs[other_index])
    if value is None:
        return None
    per = _per_channel(value, rank, channels)
    if per is None:
        return None
    zeros, ones = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    if node.op == "Mul":
        return per, zeros
    if node.op == "Add":
        return ones, per
    if other_index == 1 and node.op == "Div" and np.all(per != 0):
        return (ones / per).astype(np.float32), zeros
    if other_index == 1 and node.op == "Sub":
        return ones, -per
    return None


def fold_into_conv(graph: gs.Graph, namer: Namer, skip: Callable[[gs.Node], bool]) -> int:
    """Fold per-channel affine ops that follow a Conv/ConvTranspose into it; return how many."""
    folded = 0
    for node in list(graph.nodes):
        if node.op not in ("Conv", "ConvTranspose") or skip(node) or len(node.inputs) < 2:
            continue
        first = consumers(node.outputs[0])
        if len(first) != 1 or first[0].op not in AFFINE_OPS:
            continue  # nothing to fold: leave the weights unloaded
        weight = _float_const(node.inputs[1])
        if weight is None or weight.ndim < 3:
            continue
        transposed = node.op == "ConvTranspose"
        if transposed and node.attrs.get("group", 1) != 1:
            continue
        channels = weight.shape[1] if transposed else weight.shape[0]
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name
        bias = _float_const(node.inputs[2]) if has_bias else np.zeros(channels, np.float32)
        if bias is None:
            continue
        changed = False
        while True:
            out = node.outputs[0]
            readers = consumers(out)
            if len(readers) != 1 or is_graph_output(graph, out) or skip(readers[0]):
                break
            after = readers[0]
            if after.op not in AFFINE_OPS or after.outputs[0].dtype not in (None, np.float32):
                break
            affine = _affine(after, out, weight.ndim, channels)
            if affine is None:
                break
            scale, shift = affine
            shape = [1] * weight.ndim
            shape[1 if transposed else 0] = channels
            weight = (weight * scale.reshape(shape)).astype(np.float32)
            bias = (bias * scale + shift).astype(np.float32)
            result = after.outputs[0]
            after.inputs.clear()
            after.outputs.clear()
            node.outputs = [result]
            folded += 1
            changed = True
        if changed:
            base = node.name or node.outputs[0].name
            node.inputs = [
                node.inputs[0],
                gs.Constant(namer(f"{base}_folded_weight"), weight),
                gs.Constant(namer(f"{base}_folded_bias"), bias),
            ]
    return folded


def div_to_mul(
    graph: gs.Graph,
    namer: Namer,
    skip: Callable[[gs.Node], bool],
    divisions: dict[str, tuple[str, np.ndarray]] | None = None,
) -> int:
    """Turn Div by a nonzero float constant into Mul by its reciprocal; return how many.

    `divisions` receives node name -> (reciprocal constant name, divisor) so that a
    Mul that ends up float can be turned back into the Div it was.
    """
    count = 0
    for node in graph.nodes:
        if node.op != "Div" or skip(node) or len(node.inputs) != 2:
            continue
        divisor = _float_const(node.inputs[1])
        if (
            divisor is None
            or not np.all(divisor != 0)
            or constant_value(node.inputs[0]) is not None
        ):
            continue
        node.op = "Mul"
        reciprocal = np.asarray(np.float32(1) / divisor, dtype=np.float32)
        node.inputs[1] = gs.Constant(namer(f"{node.inputs[1].name}_reciprocal"), reciprocal)
        if divisions is not None and node.name:
            divisions[node.name] = (node.inputs[1].name, divisor)
        count += 1
    return count


def merge_scalar_muls(graph: gs.Graph, namer: Namer, skip: Callable[[gs.Node], bool]) -> int:
    """Merge Mul(Mul(x, a), b) with scalar constants a, b into Mul(x, a*b); return how many."""
    merged = 0
    for node in list(graph.nodes):
        if node.op != "Mul" or skip(node) or not node.outputs:
            continue
        x, first = _scalar_operand(node)
        if first is None:
            continue
        out = node.outputs[0]
        readers = consumers(out)
        if len(readers) != 1 or is_graph_output(graph, out) or skip(readers[0]):
            continue
        after = readers[0]
        if after.op != "Mul":
            continue
        y, second = _scalar_operand(after)
        if second is None or y is not out:
            continue
        product = (
            (first * second)
            .astype(np.float32)
            .reshape(np.broadcast_shapes(first.shape, second.shape))
        )
        after.inputs = [x, gs.Constant(namer(f"{after.name or out.name}_scale"), product)]
        node.inputs.clear()
        node.outputs.clear()
        merged += 1
    return merged


def _scalar_operand(node: gs.Node) -> tuple[gs.Tensor | None, np.ndarray | None]:
    if len(node.inputs) != 2:
        return None, None
    for index in (1, 0):
        value = _float_const(node.inputs[index])
        if value is not None and value.size == 1 and constant_value(node.inputs[1 - index]) is None:
            return node.inputs[1 - index], value
    return None, None


def fold_gemm_scalars(graph: gs.Graph, namer: Namer, skip: Callable[[gs.Node], bool]) -> int:
    """Fold Gemm's alpha into a constant B and beta into a constant C; return how many."""
    count = 0
    for node in graph.nodes:
        if node.op != "Gemm" or skip(node):
            continue
        alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
        if alpha == 1.0 and beta == 1.0:
            continue
        b = _float_const(node.inputs[1])
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name
        c = _float_const(node.inputs[2]) if has_c else None
        if b is None or (has_c and c is None):
            continue
        base = node.name or node.outputs[0].name
        node.inputs[1] = gs.Constant(namer(f"{base}_B"), (b * np.float32(alpha)).astype(np.float32))
        if has_c:
            node.inputs[2] = gs.Constant(
                namer(f"{base}_C"), (c * np.float32(beta)).astype(np.float32)
            )
        node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
        count += 1
    return count


def sum_to_add(graph: gs.Graph, skip: Callable[[gs.Node], bool]) -> int:
    """Turn two-input Sum nodes into Add; return how many."""
    count = 0
    for node in graph.nodes:
        if node.op == "Sum" and len(node.inputs) == 2 and not skip(node):
            node.op = "Add"
            count += 1
    return count


def gemm_to_matmul(graph: gs.Graph, node: gs.Node, namer: Namer) -> bool:
    """Rewrite Gemm(A, B, C) with constant 2-D B as MatMul(A, B') [+ Add C]; return success.

    Only for transA=0, alpha=beta=1 and a 2-D A; B' is B transposed when transB=1.
    ORT's weight-only and dynamic integer MatMul kernels exist for MatMul only.
    """
    if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
        return False
    weight = _float_const(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return False
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name
    if has_c and node.attrs.get("beta", 1.0) != 1.0:
        return False
    if node.attrs.get("transB", 0):
        weight = np.ascontiguousarray(weight.T)
    base = node.name or node.outputs[0].name
    output = node.outputs[0]
    a = node.inputs[0]
    c = node.inputs[2] if has_c else None
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    product: gs.Tensor = output
    if c is not None:
        product = gs.Variable(namer(f"{base}_matmul"), dtype=output.dtype)
        graph.nodes.append(
            gs.Node("Add", namer(f"{base}_bias"), inputs=[product, c], outputs=[output])
        )
    weight_const = gs.Constant(namer(f"{base}_weight"), weight)
    graph.nodes.append(gs.Node("MatMul", namer(base), inputs=[a, weight_const], outputs=[product]))
    return True


def name_nodes(graph: gs.Graph, namer: Namer) -> int:
    """Give every unnamed node, and every node whose name is taken, a unique name.

    Precision settings, sensitivity ranking and bias corrections refer to nodes by
    name from one build of the graph to the next.
    """
    seen: set[str] = set()
    renamed = 0
    for node in graph.nodes:
        if not node.name or node.name in seen:
            node.name = namer(f"{node.op}_{len(seen)}")
            renamed += 1
        seen.add(node.name)
    return renamed


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor of the main graph that shape inference can tell."""
    return {name: len(shape) for name, shape in inferred_shapes(model).items()}


def matmul_add_to_gemm(
    graph: gs.Graph, ranks: dict[str, int], namer: Namer, skip: Callable[[gs.Node], bool]
) -> int:
    """Turn 2-D MatMul(A, W) + Add(bias [N] or [1, N]) into Gemm(A, W, bias); return how many.

    The Gemm keeps the MatMul's name, so precision settings by name still find it.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2 or len(node.outputs) != 1 or skip(node):
            continue
        a, out = node.inputs[0], node.outputs[0]
        weight = _float_const(node.inputs[1])
        readers = consumers(out)
        if ranks.get(a.name) != 2 or weight is None or weight.ndim != 2 or len(readers) != 1:
            continue
        add = readers[0]
        if add.op != "Add" or is_graph_output(graph, out) or len(add.inputs) != 2:
            continue
        index = 1 if add.inputs[0] is out else 0
        bias = _float_const(add.inputs[index])
        if add.inputs[1 - index] is not out or bias is None:
            continue
        if bias.size != weight.shape[1] or bias.ndim not in (1, 2) or bias.shape[-1] != bias.size:
            continue
        result = add.outputs[0]
        add.inputs.clear()
        add.outputs.clear()
        node.op = "Gemm"
        node.inputs = [
            a,
            node.inputs[1],
            gs.Constant(namer(f"{node.name}_bias"), bias.reshape(-1).astype(np.float32)),
        ]
        node.outputs = [result]
        count += 1
    return count

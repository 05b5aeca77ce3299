"""Deterministic, seeded ONNX models built with onnx.helper and numpy only.

Every builder returns an `onnx.ModelProto` at opset 17 and IR version 8 (so that older
ONNX Runtime releases load it) that passes `onnx.checker.check_model(m, full_check=True)`.
The same arguments always give byte-identical models; a different seed gives different
weights. Weights are random but shaped like a trained network's (He-normal convolutions,
BatchNorm statistics away from the identity), so that a pass that folds or drops them
changes the numbers when it is wrong.

The CNN also carries the clutter an exporter leaves behind (Identity, inference Dropout,
a Shape->Gather->Unsqueeze->Concat->Reshape chain over a static dimension, a Constant
node, a multiplication by 1.0), so that a simplifier has real work to do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "onnxopt.test_models"

Dim = int | str | None


class _GraphBuilder:
    """Collects nodes and initializers with unique, predictable names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    def _unique(self, stem: str) -> str:
        n = self._counts.get(stem, 0)
        self._counts[stem] = n + 1
        return stem if n == 0 else f"{stem}_{n}"

    def const(self, name: str, value: np.ndarray) -> str:
        """Add an initializer and return its name."""
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        name: str,
        n_outputs: int = 1,
        **attrs: object,
    ) -> str:
        """Add a node; return its first output (named after the node)."""
        name = self._unique(name)
        outputs = [name] if n_outputs == 1 else [f"{name}:{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    def he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, shape).astype(np.float32)

    def model(
        self,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        doc: str,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, list(inputs), list(outputs), initializer=self.initializers
        )
        graph.doc_string = doc.strip().splitlines()[0] if doc.strip() else ""
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def _dims(batch: int | None, *rest: int) -> list[Dim]:
    """Shape with a leading batch dimension; `None` makes it dynamic, named "batch"."""
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be a positive int or None, got {batch}")
    return ["batch" if batch is None else batch, *rest]


def _conv_bn(
    b: _GraphBuilder,
    x: str,
    name: str,
    c_in: int,
    c_out: int,
    kernel: int = 3,
    group: int = 1,
) -> str:
    """Conv without bias followed by BatchNormalization, as exporters emit them."""
    w = b.const(
        f"{name}.weight",
        b.he_normal((c_out, c_in // group, kernel, kernel), fan_in=c_in // group * kernel * kernel),
    )
    pad = kernel // 2
    y = b.node(
        "Conv",
        [x, w],
        f"{name}.conv",
        kernel_shape=[kernel, kernel],
        pads=[pad] * 4,
        strides=[1, 1],
        group=group,
    )
    bn = [
        b.const(f"{name}.bn.scale", b.uniform((c_out,), 0.5, 1.5)),
        b.const(f"{name}.bn.bias", b.normal((c_out,), 0.1)),
        b.const(f"{name}.bn.mean", b.normal((c_out,), 0.1)),
        b.const(f"{name}.bn.var", b.uniform((c_out,), 0.5, 1.5)),
    ]
    return b.node("BatchNormalization", [y, *bn], f"{name}.bn", epsilon=1e-5)


def cnn(seed: int = 0, batch: int | None = 1, size: int = 32) -> onnx.ModelProto:
    """A small image classifier with the structures and clutter real exports have.

    Input "image" float32 [batch, 3, size, size]; output "logits" float32 [batch, 10].
    `batch=None` makes the batch dimension dynamic, named "batch".

    Layers: Conv-BN-Relu stem (16 channels) -> Identity -> residual block
    (Conv-BN-Relu-Conv-BN, Add skip, Relu) -> inference Dropout -> two branches
    (depthwise Conv with group=16 + BN; 1x1 Conv with bias + Relu) concatenated on the
    channel axis (32 channels) -> MaxPool 2x2 -> Mul by a Constant 1.0 ->
    GlobalAveragePool -> Flatten -> Reshape to [-1, C] where the shape is computed by
    Shape->Gather(1)->Unsqueeze->Concat (all static, so foldable) -> Gemm to 10 classes.
    """
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    b = _GraphBuilder(seed)
    c = 16

    x = b.node("Relu", [_conv_bn(b, "image", "stem", 3, c)], "stem.relu")
    x = b.node("Identity", [x], "stem.identity")

    skip = x
    y = b.node("Relu", [_conv_bn(b, x, "block1.a", c, c)], "block1.a.relu")
    y = _conv_bn(b, y, "block1.b", c, c)
    x = b.node("Relu", [b.node("Add", [y, skip], "block1.add")], "block1.relu")

    ratio = b.const("dropout.ratio", np.array(0.1, dtype=np.float32))
    x = b.node("Dropout", [x, ratio], "dropout")

    depthwise = _conv_bn(b, x, "branch_dw", c, c, kernel=3, group=c)
    pw_w = b.const("branch_pw.weight", b.he_normal((c, c, 1, 1), fan_in=c))
    pw_b = b.const("branch_pw.bias", b.normal((c,), 0.1))
    pointwise = b.node("Conv", [x, pw_w, pw_b], "branch_pw.conv", kernel_shape=[1, 1])
    pointwise = b.node("Relu", [pointwise], "branch_pw.relu")
    x = b.node("Concat", [depthwise, pointwise], "concat", axis=1)

    x = b.node("MaxPool", [x], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    one = b.node(
        "Constant",
        [],
        "one",
        value=numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    )
    x = b.node("Mul", [x, one], "mul_one")
    x = b.node("GlobalAveragePool", [x], "gap")
    x = b.node("Flatten", [x], "flatten", axis=1)

    shape = b.node("Shape", [x], "flat_shape")
    channels = b.node(
        "Gather", [shape, b.const("index1", np.array(1, np.int64))], "gather_c", axis=0
    )
    channels = b.node(
        "Unsqueeze", [channels, b.const("axes0", np.array([0], np.int64))], "unsqueeze_c"
    )
    target = b.node(
        "Concat", [b.const("minus_one", np.array([-1], np.int64)), channels], "target_shape", axis=0
    )
    x = b.node("Reshape", [x, target], "reshape")

    fc_w = b.const("fc.weight", b.he_normal((10, 2 * c), fan_in=2 * c))
    fc_b = b.const("fc.bias", b.normal((10,), 0.1))
    b.nodes.append(helper.make_node("Gemm", [x, fc_w, fc_b], ["logits"], name="fc", transB=1))

    return b.model(
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, _dims(batch, 3, size, size))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, _dims(batch, 10))],
        cnn.__doc__ or "",
    )


def mlp(
    seed: int = 0,
    batch: int | None = 1,
    in_features: int = 64,
    hidden: Sequence[int] = (128, 64),
    classes: int = 10,
) -> onnx.ModelProto:
    """A multilayer perceptron: MatMul+Add+Relu per hidden layer, then a Gemm head.

    Input "features" float32 [batch, in_features]; output "logits" float32
    [batch, classes]. Hidden layer i has initializers "fc{i}.weight" [in, out] and
    "fc{i}.bias" [out]; the head has "head.weight" [classes, in] (used with transB=1)
    and "head.bias" [classes].
    """
    b = _GraphBuilder(seed)
    x, width = "features", in_features
    for i, out in enumerate(hidden):
        w = b.const(f"fc{i}.weight", b.he_normal((width, out), fan_in=width))
        bias = b.const(f"fc{i}.bias", b.normal((out,), 0.1))
        x = b.node("MatMul", [x, w], f"fc{i}.matmul")
        x = b.node("Add", [x, bias], f"fc{i}.add")
        x = b.node("Relu", [x], f"fc{i}.relu")
        width = out
    w = b.const("head.weight", b.he_normal((classes, width), fan_in=width))
    bias = b.const("head.bias", b.normal((classes,), 0.1))
    b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["logits"], name="head", transB=1))
    return b.model(
        "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, _dims(batch, in_features))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, _dims(batch, classes))],
        mlp.__doc__ or "",
    )


def scaled_relu(shape: Sequence[int | str], opset: int = 17) -> onnx.ModelProto:
    """scaled = x * 3, y = Relu(scaled), z = scaled - 1: three tensors whose ranges differ
    and follow the input's, for calibration tests. Input "x" and outputs "y" and "z" are
    float32 of `shape`."""
    nodes = [
        helper.make_node("Mul", ["x", "three"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["y"]),
        helper.make_node("Sub", ["scaled", "one"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("y", "z")],
        [
            helper.make_tensor("three", TensorProto.FLOAT, [], [3.0]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _linear(b: _GraphBuilder, x: str, name: str, d_in: int, d_out: int) -> str:
    w = b.const(f"{name}.weight", b.normal((d_in, d_out), 1.0 / math.sqrt(d_in)))
    bias = b.const(f"{name}.bias", b.normal((d_out,), 0.1))
    return b.node("Add", [b.node("MatMul", [x, w], f"{name}.matmul"), bias], f"{name}.add")


def _layer_norm(b: _GraphBuilder, x: str, name: str, d: int) -> str:
    scale = b.const(f"{name}.scale", b.uniform((d,), 0.5, 1.5))
    bias = b.const(f"{name}.bias", b.normal((d,), 0.1))
    return b.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-5)


def transformer_block(
    seed: int = 0,
    batch: int | None = 1,
    seq: int = 16,
    d_model: int = 64,
    heads: int = 4,
    ff: int = 128,
) -> onnx.ModelProto:
    """One pre-norm transformer encoder block, written out op by op as exporters do.

    Inputs "tokens" float32 [batch, seq, d_model] and "attention_mask" int64
    [batch, seq] (1 = keep, 0 = padding); output "hidden" float32 [batch, seq, d_model].

    h = tokens + Wo(softmax(QK^T / sqrt(d_head) + (1 - mask) * -10000) V) with
    Q, K, V = MatMul+Add of LayerNorm(tokens) split into heads by Reshape+Transpose;
    hidden = h + W2(gelu(W1(LayerNorm(h)))) with gelu = 0.5 * x * (1 + erf(x / sqrt 2)).
    """
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
    d_head = d_model // heads
    b = _GraphBuilder(seed)
    # 0 in a Reshape target copies that dimension from the input, so batch may be dynamic.
    split_shape = b.const("split_heads.shape", np.array([0, 0, heads, d_head], np.int64))
    merge_shape = b.const("merge_heads.shape", np.array([0, 0, d_model], np.int64))

    x = _layer_norm(b, "tokens", "ln1", d_model)
    q, k, v = (
        b.node("Reshape", [_linear(b, x, f"attn.{p}", d_model, d_model), split_shape], f"attn.{p}")
        for p in "qkv"
    )
    q = b.node("Transpose", [q], "attn.q.transpose", perm=[0, 2, 1, 3])
    k = b.node("Transpose", [k], "attn.k.transpose", perm=[0, 2, 3, 1])
    v = b.node("Transpose", [v], "attn.v.transpose", perm=[0, 2, 1, 3])

    scores = b.node("MatMul", [q, k], "attn.scores")
    scale = b.const("attn.scale", np.array(math.sqrt(d_head), np.float32))
    scores = b.node("Div", [scores, scale], "attn.scaled")

    mask = b.node("Cast", ["attention_mask"], "mask.cast", to=TensorProto.FLOAT)
    mask = b.node("Sub", [b.const("mask.one", np.array(1.0, np.float32)), mask], "mask.invert")
    mask = b.node("Mul", [mask, b.const("mask.neg", np.array(-10000.0, np.float32))], "mask.bias")
    mask = b.node(
        "Unsqueeze", [mask, b.const("mask.axes", np.array([1, 2], np.int64))], "mask.unsqueeze"
    )
    scores = b.node("Add", [scores, mask], "attn.masked")
    probs = b.node("Softmax", [scores], "attn.softmax", axis=-1)

    context = b.node("MatMul", [probs, v], "attn.context")
    context = b.node("Transpose", [context], "attn.context.transpose", perm=[0, 2, 1, 3])
    context = b.node("Reshape", [context, merge_shape], "attn.merge_heads")
    attn = _linear(b, context, "attn.out", d_model, d_model)
    h = b.node("Add", ["tokens", attn], "residual1")

    y = _linear(b, _layer_norm(b, h, "ln2", d_model), "ff1", d_model, ff)
    sqrt2 = b.const("gelu.sqrt2", np.array(math.sqrt(2.0), np.float32))
    erf = b.node("Erf", [b.node("Div", [y, sqrt2], "gelu.div")], "gelu.erf")
    erf = b.node("Add", [erf, b.const("gelu.one", np.array(1.0, np.float32))], "gelu.add")
    y = b.node("Mul", [y, erf], "gelu.mul")
    y = b.node("Mul", [y, b.const("gelu.half", np.array(0.5, np.float32))], "gelu.half_mul")
    y = _linear(b, y, "ff2", ff, d_model)
    b.nodes.append(helper.make_node("Add", [h, y], ["hidden"], name="residual2"))

    return b.model(
        "transformer_block",
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, _dims(batch, seq, d_model)),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, _dims(batch, seq)),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, _dims(batch, seq, d_model))],
        transformer_block.__doc__ or "",
    )


ALL: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn": cnn,
    "mlp": mlp,
    "transformer_block": transformer_block,
}
"""Each builder by name, called with its defaults."""


def transformer_block_feeds(
    count: int, seed: int, seq: int = 16, d_model: int = 64
) -> list[dict[str, np.ndarray]]:
    """Feeds for `transformer_block` (batch 1): standard-normal tokens and a padding mask
    that keeps a random prefix of 4 to `seq` tokens."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        mask = np.zeros((1, seq), np.int64)
        mask[0, : int(rng.integers(4, seq + 1))] = 1
        tokens = rng.standard_normal((1, seq, d_model)).astype(np.float32)
        feeds.append({"tokens": tokens, "attention_mask": mask})
    return feeds

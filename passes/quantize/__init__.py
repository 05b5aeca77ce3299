"""quantize: QDQ quantization that ONNX Runtime's CPU provider turns into integer kernels.

Three kinds, chosen by options:
- static (default): weights int8, activations uint8/int8/int16 with ranges from
  calibration data (ctx.feeds, `--data` on the command line);
- mode=dynamic: weights int8, activations quantized at run time (MatMul-heavy models);
- weights=int4: blockwise int4 weights of MatMul/Gemm, activations float.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import onnx_graphsurgeon as gs

from onnxopt.errors import ModelError, PassError
from onnxopt.graph import upgraded
from onnxopt.pass_api import Option, Pass, PassContext, PassResult, register_pass
from onnxopt.runtime import int8_pair_sums_saturate, trim_memory

from .dynamic import run_dynamic
from .int4 import run_int4
from .mixed import Target, parse_target
from .placement import ABSORBED, DEFAULT_OPS, OPT_IN_OPS
from .precision import Overrides
from .qdq import INT8, INT8_REDUCED, QTYPES, QType
from .static import StaticConfig, run_static

PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis attribute
INT16_OPSET = 21  # 16-bit and 4-bit QuantizeLinear/DequantizeLinear, blocked DQ
QDQ_OPSET = 10
DYNAMIC_OPSET = 11  # DynamicQuantizeLinear
# Option groups, as `onnxopt passes quantize` shows them.
KIND, CALIB, PLACE, PREC, ACCURACY = "kind", "calibration", "placement", "precision", "accuracy"


@register_pass
class Quantize(Pass):
    """Quantize to int8 with QDQ pairs placed where ORT's CPU provider fuses integer kernels.

    Static mode (the default) needs calibration data. It first moves weights out of
    Constant nodes, folds BatchNorm and per-channel Mul/Div that follow a Conv into
    the Conv, turns division by a constant into multiplication (back into the Div
    where it stays float), merges chains of scalar multiplications, turns
    two-input Sum into Add, runs a transformer's row-wise layers on 2-D rows and
    turns each 2-D MatMul + bias Add into Gemm. Then:
    - Conv, MatMul and Gemm with a constant weight are quantized: weights int8
      symmetric per output channel (per tensor with per_channel=false), a Conv/Gemm
      bias int32 with scale = input scale x weight scale, activations uint8
      asymmetric (int8 or int16 symmetric with `activations`).
    - Add, Mul, Concat, average pooling, Sigmoid, Softmax and LeakyRelu are quantized
      when an input is already integer and a quantized op reads their output;
      MaxPool, nearest Resize, Reshape, Transpose, Squeeze, Unsqueeze, Flatten,
      Slice, Gather, Split, Expand and Tile then keep their input's scale and zero
      point so that ORT drops their Q/DQ. Other ops stay float, with no Q/DQ pair
      around them that would only cost time.
    - A Relu or Clip after a quantized op gets the Q behind it (ORT removes it).
    - A Mul by a positive scalar of an integer tensor disappears into the scale of
      a DQ of that tensor's integers: no op, no rounding.
    - ConvTranspose, HardSigmoid, HardSwish and Tanh stay float: ORT's CPU provider
      has no integer kernel for them. MatMul with two computed inputs (attention)
      stays float too: ORT runs it as MatMulIntegerToFloat, but on the digits
      transformer that was no faster, and its ranges move with every input.
    - A MatMul or Gemm with fewer than `min_weights` weights (default 1024) stays
      float when its input is float (no quantized op writes it): a row then costs
      fewer multiply-adds than launching the QuantizeLinear and the integer kernel
      (the digits transformer's 8x48 embedding and 48x10 head: batch 1 went from
      1.29-1.31x to 1.35-1.37x fp32). `min_weights=0` quantizes them all.
    - Nodes already next to Q/DQ are left alone.
    - `reduce_range` stores int8 weights in 7 bits ([-63, 63]). ORT's x86 kernels
      without VNNI add two uint8 x int8 products into a saturating int16, which 8-bit
      weights overflow (wrong outputs, not just lost precision). By default (unset)
      weights get 7 bits when the machine that quantizes lacks VNNI, and the notes say
      so: set it to false for a model that will run on a VNNI machine only.
    The opset is raised to 13 for per-channel weights (21 for int16 and int4; with a
    target, only if int16 nodes are kept), and the notes say so. Ranges come from
    `calibrate`: minmax, percentile, entropy or mse; `cache` names a JSON file that
    keeps the statistics for the next run.

    Precision per node (static mode):
    - `float_nodes` (names or glob patterns; `exclude_nodes` is the older name) and
      `float_ops` (op types; `exclude_ops`) stay float, with no Q/DQ around them
      that would only cost time; `int16_nodes` and `int16_ops` get 16-bit symmetric
      activations with int8 weights (A16W8, opset 21). Float wins where both match.
      A tensor has one Q/DQ type, so the producer and other readers of an int16
      node's tensors see 16 bits too.
    - `transformer_defaults` (on by default) leave in float: an Add of an attention
      mask (large negative constants, or a mask computed from an integer input)
      before Softmax, any tensor whose calibrated range is dominated by such values
      (min <= -1000, max below 1% of |min|), Softmax and LayerNormalization with
      their decomposed forms, and Gather from a constant table (embeddings). The
      notes list the nodes and the reason; int16 overrides win over these.
    Accuracy (static mode):
    - `target` (cosine:X, rel_error:X, top1:X, or a callable f(ref, cand) -> bool
      through the API, given the held-out outputs stacked per output name): the
      last `holdout` share of the feeds is kept out of calibration; if the int8
      model misses the target on it, nodes are ranked by sensitivity
      (onnxopt.analyze) and moved one at a time through `fallback` (int16, then
      float; to float with the quantized nodes that write its inputs), keeping a
      move only if it improves the metric, until the target holds or none is
      left (`max_moves` caps the nodes moved). One calibration serves every
      step. The notes list each step and its metric, and the latency against
      all-int8.
    - `bias_correction`: each quantized Conv/Gemm/MatMul's own mean output shift
      per channel, measured against the float model in one pass over the
      calibration feeds, is subtracted from its bias before the bias is quantized
      (a bias is added where there is none).
    """

    name = "quantize"
    mode: Annotated[
        Literal["static", "dynamic"],
        Option("static: ranges from calibration data; dynamic: at run time (MatMul/Gemm)", KIND),
    ] = "static"
    weights: Annotated[
        Literal["int8", "int4"], Option("int4: blockwise weight-only MatMul/Gemm", KIND)
    ] = "int8"
    activations: Annotated[
        Literal["uint8", "int8", "int16"], Option("activation type (int16: A16W8)", KIND)
    ] = "uint8"
    symmetric_activations: Annotated[
        bool | None, Option("force symmetric ranges (unset: by activation type)", KIND)
    ] = None
    per_channel: Annotated[bool, Option("int8 weights per output channel", KIND)] = True
    reduce_range: Annotated[
        bool | None, Option("7-bit int8 weights (unset: where this CPU lacks VNNI)", KIND)
    ] = None
    block_size: Annotated[int, Option("int4 block size: a power of two, >= 16", KIND)] = 32
    calibrate: Annotated[
        Literal["minmax", "percentile", "entropy", "mse"], Option("range method", CALIB)
    ] = "minmax"
    percentile: Annotated[float, Option("for calibrate=percentile", CALIB)] = 99.99
    bins: Annotated[int, Option("histogram bins (percentile, entropy, mse)", CALIB)] = 2048
    moving_average: Annotated[bool, Option("average per-sample min/max", CALIB)] = False
    cache: Annotated[str | None, Option("JSON file keeping statistics between runs", CALIB)] = None
    include_ops: Annotated[list[str], Option("op types to quantize (default: all)", PLACE)] = []  # noqa: RUF012 - copied per instance
    exclude_ops: Annotated[list[str], Option("op types left float", PLACE)] = []  # noqa: RUF012
    exclude_nodes: Annotated[list[str], Option("node names/globs left float", PLACE)] = []  # noqa: RUF012
    min_weights: Annotated[
        int, Option("a lone MatMul/Gemm with fewer weights stays float", PLACE)
    ] = 1024
    fold: Annotated[bool, Option("fold BatchNorm/Mul into Conv first", PLACE)] = True
    float_nodes: Annotated[list[str], Option("nodes kept float (names/globs)", PREC)] = []  # noqa: RUF012
    float_ops: Annotated[list[str], Option("op types kept float", PREC)] = []  # noqa: RUF012
    int16_nodes: Annotated[list[str], Option("nodes with int16 activations", PREC)] = []  # noqa: RUF012
    int16_ops: Annotated[list[str], Option("op types with int16 activations", PREC)] = []  # noqa: RUF012
    transformer_defaults: Annotated[
        bool, Option("keep masks, Softmax, LayerNorm, embeddings float", PREC)
    ] = True
    target: Annotated[
        str | Callable[[dict, dict], bool] | None,
        Option("accuracy target on held-out feeds: cosine:X, rel_error:X, top1:X", ACCURACY),
    ] = None
    holdout: Annotated[float, Option("share of feeds held out for the target", ACCURACY)] = 0.25
    fallback: Annotated[
        list[Literal["int16", "float"]],
        Option("where missed-target nodes move, in order", ACCURACY),
    ] = ["int16", "float"]  # noqa: RUF012
    max_moves: Annotated[int, Option("cap on nodes moved (0: none)", ACCURACY)] = 0
    bias_correction: Annotated[
        bool, Option("subtract each layer's mean output shift from its bias", ACCURACY)
    ] = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        target_spec = self._check_options()
        notes: list[str] = []
        stats: dict[str, int | float] = {}
        per_channel = self.per_channel
        fallback = list(dict.fromkeys(self.fallback))
        wants_int16 = bool(self.int16_nodes or self.int16_ops)
        if self.weights == "int4":
            target = INT16_OPSET
        elif self.mode == "dynamic":
            target = PER_CHANNEL_OPSET if per_channel else DYNAMIC_OPSET
        elif self.activations == "int16" or wants_int16:
            target = INT16_OPSET
        else:
            target = PER_CHANNEL_OPSET if per_channel else QDQ_OPSET
        replaced: gs.Graph | None = None
        if (graph.opset or 0) < target:
            try:
                replaced = self._upgrade(graph, target, notes)
            except ModelError as exc:
                if target != PER_CHANNEL_OPSET or (graph.opset or 0) < QDQ_OPSET:
                    raise PassError(f"quantize needs opset {target}: {exc}") from None
                else:
                    per_channel = False
                    notes.append(
                        f"per-channel weights need opset 13 and the upgrade failed ({exc}); "
                        "weights are quantized per tensor"
                    )
        work = replaced or graph
        weight_type = self._weight_type(notes) if self.weights == "int8" else INT8
        if self.weights == "int4":
            changed = run_int4(work, self.block_size, self._ops(), self.exclude_nodes, stats, notes)
        elif self.mode == "dynamic":
            changed = run_dynamic(
                work, per_channel, self._ops(), self.exclude_nodes, stats, notes, weight_type
            )
        else:
            config = StaticConfig(
                ops=self._ops(),
                exclude_nodes=list(self.exclude_nodes),
                per_channel=per_channel,
                activation_type=QTYPES[self.activations],
                symmetric=self._symmetric(),
                method=self.calibrate,
                percentile=self.percentile,
                moving_average=self.moving_average,
                bins=self.bins,
                cache=self.cache,
                fold=self.fold,
                overrides=Overrides(
                    float_nodes=[*self.exclude_nodes, *self.float_nodes],
                    int16_nodes=list(self.int16_nodes),
                    float_ops=set(self.float_ops),
                    int16_ops=set(self.int16_ops),
                    transformer_defaults=self.transformer_defaults,
                ),
                target=target_spec,
                holdout=self.holdout,
                fallback=fallback,
                max_moves=self.max_moves,
                bias_correction=self.bias_correction,
                min_weights=self.min_weights,
                weight_type=weight_type,
                stats=stats,
                notes=notes,
            )
            changed, result = run_static(work, ctx, config)
            return PassResult(changed or replaced is not None, stats, notes, graph=result)
        if not changed:
            # An opset upgrade alone is no quantization: the model stays as it was.
            notes.append(
                f"nothing was quantized: {self.mode if self.weights == 'int8' else 'int4'} "
                "mode covers MatMul/Gemm with a constant 2-D weight"
            )
            return PassResult(changed=False, stats=stats, notes=notes)
        return PassResult(changed=True, stats=stats, notes=notes, graph=replaced)

    def _check_options(self) -> Target | None:
        """Refuse bad option values in one line; return the parsed target."""
        static_only = {
            "target": self.target is not None,
            "bias_correction": self.bias_correction,
            "int16_nodes": bool(self.int16_nodes),
            "int16_ops": bool(self.int16_ops),
        }
        if self.mode == "dynamic" or self.weights == "int4":
            used = [name for name, on in static_only.items() if on]
            if used:
                raise PassError(
                    f"quantize: {', '.join(used)} work(s) with static quantization only; "
                    "drop mode=dynamic and weights=int4"
                )
        if not 0.0 < self.holdout < 1.0:
            raise PassError(f"quantize: holdout must be a share in (0, 1), got {self.holdout}")
        if self.max_moves < 0:
            raise PassError(
                f"quantize: max_moves must be 0 (no limit) or more, got {self.max_moves}"
            )
        if self.min_weights < 0:
            raise PassError(
                f"quantize: min_weights must be 0 (quantize all) or more, got {self.min_weights}"
            )
        if not self.fallback:
            raise PassError("quantize: fallback needs at least one of int16, float")
        if self.weights == "int4" and (
            self.block_size < 16 or self.block_size & (self.block_size - 1)
        ):
            raise PassError(
                f"quantize: block_size must be a power of two of at least 16, got {self.block_size}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise PassError(f"quantize: percentile must be in (50, 100], got {self.percentile}")
        if self.bins < 256 or self.bins % 4:
            raise PassError(f"quantize: bins must be a multiple of 4, 256 or more; got {self.bins}")
        known = DEFAULT_OPS | OPT_IN_OPS | ABSORBED
        for option in ("include_ops", "int16_ops"):
            unknown = sorted(set(getattr(self, option)) - known)
            if unknown:
                raise PassError(
                    f"quantize cannot quantize {', '.join(unknown)}; {option} takes "
                    f"{', '.join(sorted(DEFAULT_OPS | OPT_IN_OPS))}"
                )
        return parse_target(self.target) if self.target is not None else None

    def _weight_type(self, notes: list[str]) -> QType:
        """int8 weights in 8 bits, or in 7 where ORT's integer kernels would saturate."""
        if self.reduce_range is not None:
            return INT8_REDUCED if self.reduce_range else INT8
        if not int8_pair_sums_saturate():
            return INT8
        notes.append(
            "int8 weights in 7 bits: this CPU has no VNNI, and ORT's integer kernels "
            "saturate with 8-bit weights there (reduce_range=false for a VNNI machine)"
        )
        return INT8_REDUCED

    def _ops(self) -> set[str]:
        ops = set(self.include_ops) if self.include_ops else set(DEFAULT_OPS)
        return (ops | set(self.int16_ops)) - set(self.exclude_ops) - set(self.float_ops)

    def _symmetric(self) -> bool:
        if self.symmetric_activations is not None:
            return self.symmetric_activations
        return self.activations != "uint8"

    @staticmethod
    def _upgrade(graph: gs.Graph, target: int, notes: list[str]) -> gs.Graph:
        """The graph converted to opset `target` (mixed precision upgrades lazily instead)."""
        before = graph.opset
        converted = upgraded(graph, target)
        trim_memory()
        notes.append(
            f"upgraded the opset from {before} to {target}: "
            + (
                "per-channel DequantizeLinear needs 13"
                if target == PER_CHANNEL_OPSET
                else "16-bit and 4-bit QuantizeLinear/DequantizeLinear need 21"
                if target == INT16_OPSET
                else "DynamicQuantizeLinear needs 11"
                if target == DYNAMIC_OPSET
                else "QuantizeLinear needs 10"
            )
        )
        return converted

"""Static QDQ quantization: prepare, plan, calibrate, then insert Q/DQ and integer constants.

`StaticQuantizer` prepares the float graph once and calibrates once; `build`
then makes a quantized graph for any per-node precision (and bias corrections)
from that same preparation and calibration, which is what lets mixed precision
try one precision after another without measuring ranges again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.calibration import Calibration, calibrate
from onnxopt.data import FeedSource
from onnxopt.errors import ModelError, PassError
from onnxopt.graph import name_matches, to_graph, to_model
from onnxopt.model import upgrade_opset
from onnxopt.pass_api import DATA_HINT, PassContext
from onnxopt.runtime import trim_memory

from . import prepare, rows
from .bias_correction import Applied, LayerProbe, apply_deltas, layer_probes
from .bias_correction import measure as measure_shifts
from .bias_correction import summary as bias_summary
from .insert import activation_params_of, insert, keep_bias_adds_apart, restore_divisions
from .mixed import (
    BENCH_RUNS,
    Search,
    Target,
    changes,
    format_value,
    latency,
    search,
    split_feeds,
)
from .placement import OPT_IN_OPS, Plan, plan_quantization
from .precision import (
    MASK_RANGE,
    Overrides,
    Precision,
    mask_dominated,
    reason_notes,
    resolve,
    summary,
)
from .progress import calibration_progress
from .qdq import INT8, Namer, QType

MAX_MASK_ROUNDS = 4
INT16_OPSET = 21


@dataclass
class StaticConfig:
    """The options of a static run, resolved from the pass options."""

    ops: set[str]
    exclude_nodes: list[str]
    per_channel: bool
    activation_type: QType
    symmetric: bool
    method: str
    percentile: float
    moving_average: bool
    bins: int
    cache: str | None
    fold: bool
    overrides: Overrides = field(default_factory=Overrides)
    target: Target | None = None
    holdout: float = 0.25
    fallback: list[str] = field(default_factory=lambda: ["int16", "float"])
    max_moves: int = 0
    bias_correction: bool = False
    min_weights: int = 0
    weight_type: QType = INT8
    stats: dict[str, int | float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Build:
    """One quantized graph, the plan it was made with and the precision that held."""

    graph: gs.Graph
    plan: Plan
    precision: Precision
    # What a bias correction needs of each quantized layer, filled in when asked for.
    probes: list[LayerProbe] = field(default_factory=list)
    applied: Applied | None = None

    def model(self) -> onnx.ModelProto:
        return to_model(self.graph)


class StaticQuantizer:
    """One prepared float model and one calibration, for as many builds as needed."""

    def __init__(self, graph: gs.Graph, ctx: PassContext, config: StaticConfig):
        self.ctx = ctx
        self.config = config
        self.calibration: Calibration | None = None
        # Div nodes turned into Mul (name -> reciprocal's name, divisor); float ones turn back.
        self.divisions: dict[str, tuple[str, np.ndarray]] = {}
        skip_patterns = [*config.exclude_nodes, *config.overrides.float_nodes]

        def skip(node: gs.Node) -> bool:
            return name_matches(node.name, skip_patterns)

        namer = Namer(graph)
        lifted = prepare.lift_constant_nodes(graph)
        if lifted:
            config.stats["constant_nodes_lifted"] = lifted
        if config.fold:
            folded = prepare.fold_into_conv(graph, namer, skip)
            rewrites = {
                "folded_into_conv": folded,
                "div_to_mul": prepare.div_to_mul(graph, namer, skip, self.divisions),
                "merged_scalar_muls": prepare.merge_scalar_muls(graph, namer, skip),
                "gemm_scalars_folded": prepare.fold_gemm_scalars(graph, namer, skip),
                "sum_to_add": prepare.sum_to_add(graph, skip),
            }
            config.stats.update({k: v for k, v in rewrites.items() if v})
            graph.cleanup(remove_unused_graph_inputs=False)
        self.prepared = any(config.stats.values())
        renamed = prepare.name_nodes(graph, namer)
        if renamed:
            config.stats["nodes_named"] = renamed
        self.model = to_model(graph)
        _release(graph)
        self.ranks = prepare.tensor_ranks(self.model)
        if config.fold and self._gemm_is_matmul():
            graph = to_graph(self.model)
            namer = Namer(graph)
            regions = rows.flatten_rows(graph, namer, skip)
            # The Gemm rewrite keeps every tensor's rank (a Gemm writes its Add's output).
            ranks = rows.ranks(graph) if regions else self.ranks
            gemms = prepare.matmul_add_to_gemm(graph, ranks, namer, skip)
            if regions:
                config.stats["row_regions_flattened"] = regions
            if gemms:
                config.stats["matmul_add_to_gemm"] = gemms
            if regions or gemms:
                graph.cleanup(remove_unused_graph_inputs=False)
                self.model = to_model(graph)
                self.ranks = ranks
                self.prepared = True
            _release(graph)
        self.precision, notes = resolve(to_graph(self.model), config.overrides)
        config.notes.extend(notes)
        # The prepared model at opset 21, made only when a build needs 16-bit Q/DQ: a
        # higher opset can cost speed (ORT's fusions check op versions), so models
        # without int16 nodes keep the opset they had.
        self.wide_model: onnx.ModelProto | None = None

    def widen(self) -> bool:
        """Make the opset-21 copy of the prepared model; False if it cannot be converted."""
        if self.wide_model is not None or _opset(self.model) >= INT16_OPSET:
            return True
        try:
            self.wide_model = upgrade_opset(self.model, INT16_OPSET)
        except ModelError as exc:
            self.config.notes.append(f"no int16 steps: the upgrade to opset 21 failed ({exc})")
            return False
        return True

    def _gemm_is_matmul(self) -> bool:
        """Whether the options treat MatMul and Gemm alike (so one may become the other)."""
        if not any(n.op_type == "MatMul" for n in self.model.graph.node):
            return False
        overrides = self.config.overrides
        return all(
            ("MatMul" in ops) == ("Gemm" in ops)
            for ops in (self.config.ops, overrides.float_ops, overrides.int16_ops)
        )

    # ---- planning and calibration --------------------------------------------------------

    def plan(self, precision: Precision) -> tuple[gs.Graph, Plan]:
        """A fresh copy of the prepared graph and its plan under `precision`."""
        graph = to_graph(self._source(precision))
        plan = plan_quantization(
            graph,
            ops=self.config.ops,
            exclude_nodes=self.config.exclude_nodes,
            per_channel=self.config.per_channel,
            float_nodes=precision.float_nodes,
            int16_nodes=precision.int16_nodes,
            min_weights=self.config.min_weights,
        )
        return graph, plan

    def _source(self, precision: Precision) -> onnx.ModelProto:
        """The prepared model a build under `precision` starts from."""
        if precision.int16_nodes and _opset(self.model) < INT16_OPSET and self.widen():
            return self.wide_model or self.model
        return self.model

    def calibrate(
        self,
        names: list[str],
        feeds: Iterable[dict[str, np.ndarray]],
        model: onnx.ModelProto | None = None,
    ) -> None:
        """Statistics of `names` (in `model`, by default the prepared one); later calls add
        only the names not measured yet."""
        missing = names
        if self.calibration is not None:
            missing = [n for n in names if n not in self.calibration.stats]
            if not missing:
                return
        if feeds is None:
            raise PassError(
                f"quantize needs calibration data: {DATA_HINT}; "
                "or quantize(mode=dynamic) or quantize(weights=int4), which need none"
            )
        result = _calibrate(model or self.model, self.ctx, self.config, missing, feeds)
        if self.calibration is None:
            self.calibration = result
        else:
            self.calibration.stats.update(result.stats)
            self.config.notes.append(f"calibrated {len(missing)} more tensor(s) for a later plan")

    # ---- building ------------------------------------------------------------------------

    def build(
        self,
        precision: Precision,
        feeds: Iterable[dict[str, np.ndarray]],
        *,
        deltas: Mapping[str, np.ndarray] | None = None,
        probe: bool = False,
    ) -> Build:
        """Quantize a fresh copy of the prepared graph with `precision`.

        `deltas` are bias corrections (node name -> per-channel shift to subtract);
        with `probe`, each quantized layer's tensor names are recorded for measuring them.
        """
        config = self.config
        graph, plan = self.plan(precision)
        if not plan.nodes:
            return Build(graph, plan, precision)
        self.calibrate(plan.calibrated, feeds, self._source(precision))
        assert self.calibration is not None
        for _ in range(MAX_MASK_ROUNDS):
            if not config.overrides.transformer_defaults:
                break
            masked = mask_dominated(plan, self.calibration)
            moved = {
                node.name: f"{MASK_RANGE} (min {low:.3g}, max {high + 0.0:.3g})"
                for name, (low, high) in masked.items()
                for node in plan.touching(name)
                if node.name and node.name not in precision.int16_nodes
            }
            if not moved:
                break
            precision = Precision({**precision.float_nodes, **moved}, precision.int16_nodes)
            graph, plan = self.plan(precision)
            self.calibrate(plan.calibrated, feeds, self._source(precision))
        params = activation_params_of(plan, self.calibration, config)
        namer = Namer(graph)
        applied = apply_deltas(graph, plan, namer, deltas) if deltas else None
        keep_bias_adds_apart(plan, namer, self.ranks)
        probes = layer_probes(plan) if probe else []
        insert(graph, namer, plan, params, config)
        for found in probes:
            found.record_quantized_input()
        restored = restore_divisions(graph, plan, namer, self.divisions)
        if restored and "div_to_mul" in config.stats:
            config.stats["div_to_mul"] = len(self.divisions) - restored
            if not config.stats["div_to_mul"]:
                del config.stats["div_to_mul"]
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        return Build(graph, plan, precision, probes, applied)

    def report(self, build: Build, base: Precision | None = None) -> None:
        """Counts and notes of a finished build."""
        config = self.config
        before, after = _opset(self.model), build.graph.opset or 0
        if after > before:
            config.notes.append(
                f"upgraded the opset from {before} to {after}: the int16 nodes' "
                "QuantizeLinear/DequantizeLinear need 21"
            )
        for reason, names in sorted(build.plan.skipped.items()):
            config.notes.append(summary(f"({reason})", names))
        base = base or self.precision
        added = {n: r for n, r in build.precision.float_nodes.items() if n not in base.float_nodes}
        config.notes.extend(reason_notes(added, "then left"))
        for op, count in sorted(build.plan.op_counts().items()):
            config.stats[f"quantized_{op}"] = count
        config.stats["quantized_nodes"] = len(build.plan.nodes)
        config.stats["qdq_tensors"] = len(build.plan.points)
        if build.plan.wide_nodes:
            config.stats["int16_nodes"] = len(build.plan.wide_nodes)


def run_static(graph: gs.Graph, ctx: PassContext, config: StaticConfig) -> tuple[bool, gs.Graph]:
    """Quantize; return whether anything changed and the resulting graph.

    The prepared graph is exported once and `graph` is emptied: calibration and
    every build share that one copy of the weights, which on a large model is
    most of the memory.
    """
    quantizer = StaticQuantizer(graph, ctx, config)
    _note_left_float(config, {node.op_type for node in quantizer.model.graph.node})
    feeds, holdout = ctx.feeds, None
    if config.target is not None:
        feeds, holdout = split_feeds(ctx.feeds, config.holdout)
        config.stats["holdout_samples"] = len(holdout)
    build = quantizer.build(quantizer.precision, feeds, probe=config.bias_correction)
    if not build.plan.nodes:
        quantizer.report(build)
        config.notes.append("no node to quantize: nothing ORT's CPU provider runs on integers")
        return quantizer.prepared, build.graph
    deltas: dict[str, np.ndarray] = {}
    if config.bias_correction:
        deltas = _bias_deltas(quantizer, build, feeds)
        build = quantizer.build(build.precision, feeds, deltas=deltas)
        if build.applied is not None:
            config.notes.extend(bias_summary(deltas, build.applied))
            config.stats["bias_corrected_layers"] = len(build.applied.corrected)
    if config.target is not None:
        if "int16" in config.fallback and not quantizer.widen():
            config.fallback = [level for level in config.fallback if level != "int16"]
        start = build
        build, record = search(
            config.target,
            build,
            lambda precision: quantizer.build(precision, feeds, deltas=deltas),
            quantizer.model,
            feeds,
            holdout,
            fallback=config.fallback,
            max_moves=config.max_moves,
            providers=tuple(ctx.providers),
            threads=ctx.threads,
        )
        _report_search(config, record, start, build, holdout, ctx)
    quantizer.report(build)
    return True, build.graph


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _bias_deltas(
    quantizer: StaticQuantizer, build: Build, feeds: Iterable[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    shifts = measure_shifts(
        quantizer.model,
        build.model(),
        build.probes,
        feeds,
        providers=tuple(quantizer.ctx.providers),
        threads=quantizer.ctx.threads,
    )
    quantizer.config.stats["bias_correction_seconds"] = round(time.perf_counter() - start, 3)
    return shifts


def _report_search(
    config: StaticConfig,
    record: Search,
    start: Build,
    final: Build,
    holdout: FeedSource,
    ctx: PassContext,
) -> None:
    target = config.target
    assert target is not None
    first = record.steps[0]
    config.notes.append(
        f"target {target.label} on {len(holdout)} held-out sample(s): int8 model "
        + format_value(target, first.value, first.met)
    )
    if first.value is not None:
        config.stats["target_int8_value"] = round(first.value, 6)
    moved = [step for step in record.steps[1:]]
    for number, step in enumerate(moved, 1):
        also = {n: p for n, p in step.changed.items() if n != step.moved}
        coupled = (
            " with "
            + ", ".join(f"{n} -> {p}" for n, p in list(also.items())[:6])
            + (f" and {len(also) - 6} more" if len(also) > 6 else "")
            if also
            else ""
        )
        config.notes.append(
            f"step {number}: {step.moved} -> {step.precision}{coupled}: "
            + format_value(target, step.value, step.met)
            + ("" if step.kept else ", not kept")
        )
    last = record.final
    if last.value is not None:
        config.stats["target_value"] = round(last.value, 6)
    config.stats["target_met"] = int(record.met)
    config.stats["mixed_steps"] = len(moved)
    final_precision = final.plan.precisions()
    start_precision = start.plan.precisions()
    diff = changes(start_precision, final_precision)
    config.stats["moved_to_int16"] = sum(p == "int16" for p in diff.values())
    config.stats["moved_to_float"] = sum(p == "float" for p in diff.values())
    for level in ("int16", "float"):
        names = [n for n, p in diff.items() if p == level]
        if names:
            config.notes.append(
                f"higher precision kept: {len(names)} node(s) in {level}: " + ", ".join(names)
            )
    if not record.met:
        config.notes.append(
            f"target {target.label} not met: {len(moved)} step(s) tried every one of the "
            f"{record.ranked} ranked node(s) it could"
            + (f" (max_moves={config.max_moves})" if config.max_moves else "")
        )
    if diff:
        int8_ms, mixed_ms = latency(start.model(), final.model(), holdout, ctx.threads)
        config.stats["latency_int8_ms"] = round(int8_ms, 4)
        config.stats["latency_mixed_ms"] = round(mixed_ms, 4)
        config.stats["latency_cost"] = round(mixed_ms / int8_ms, 3) if int8_ms else 0.0
        config.notes.append(
            f"latency (median of {BENCH_RUNS} interleaved runs, one held-out feed): "
            f"{mixed_ms:.3f} ms vs {int8_ms:.3f} ms all-int8 ({mixed_ms / int8_ms:.2f}x)"
        )


def _release(graph: gs.Graph) -> None:
    """Empty a graph so that the arrays its constants hold can be freed now."""
    for node in graph.nodes:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes.clear()
    graph.inputs.clear()
    graph.outputs.clear()
    trim_memory()


def _note_left_float(config: StaticConfig, present: set[str]) -> None:
    unfused = sorted({op for op in present if op in OPT_IN_OPS and op not in config.ops})
    if unfused:
        config.notes.append(
            f"left {', '.join(unfused)} in float: ORT's CPU provider has no integer kernel "
            "for them (add them to include_ops for other execution providers)"
        )


def _calibrate(
    model: onnx.ModelProto,
    ctx: PassContext,
    config: StaticConfig,
    names: list[str],
    feeds: Iterable[dict[str, np.ndarray]],
) -> Calibration:
    start = time.perf_counter()
    with calibration_progress(ctx, "calibrating") as report:
        calibration = calibrate(
            model,
            feeds,
            names,
            histograms=config.method != "minmax",
            bins=config.bins,
            providers=tuple(ctx.providers),
            threads=ctx.threads,
            progress=report,
            cache=config.cache,
            nonnegative={n.output[0] for n in model.graph.node if n.op_type == "Relu"},
        )
    seconds = time.perf_counter() - start
    config.stats["calibration_samples"] = calibration.samples
    config.stats["calibration_seconds"] = round(
        config.stats.get("calibration_seconds", 0.0) + seconds, 4
    )
    config.stats["calibrated_tensors"] = config.stats.get("calibrated_tensors", 0) + len(names)
    if config.cache and f"calibration cache: {config.cache}" not in config.notes:
        config.notes.append(f"calibration cache: {config.cache}")
    return calibration

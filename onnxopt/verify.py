"""Compare a candidate model with a reference on the same feeds, per output and per layer.

Metrics are accumulated sample by sample (running sums and maxima), so a long
data set costs no more memory than one sample. The verdict depends on what the
candidate is (`lossy_mode`):
- lossless (simplify, or no metadata): every float element satisfies
  |cand - ref| <= atol + rtol * |ref|; tolerances are finite and >= 0;
- lossy (the candidate's metadata names a lossy pass, it holds quantized ops the
  reference lacks, or the caller says so): every output keeps an accuracy budget
  (cosine, SQNR and a task metric; `budget.py`).
In both, a non-finite value must be the same in both models (the same infinity,
NaN where NaN), integer and bool outputs are compared exactly (a lossy candidate's
by the share of equal elements), and an optional lower bound on cosine applies.
"Max rel" is the largest error over the output's largest reference magnitude: an
element-wise ratio explodes where the reference is near zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .budget import MAP_THRESHOLD, TaskStats, describe_budget, judge, parse_budget
from .data import FeedSource, load_feeds, model_inputs
from .errors import FeedError
from .graph import QUANTIZED_OPS
from .model import load_model
from .pipeline import META_LOSSY
from .runtime import create_session, float_tensor_names, iter_tensors, run


@dataclass
class ErrorStats:
    """Running error statistics of a candidate tensor against a reference tensor."""

    name: str
    rtol: float = 1e-3
    atol: float = 1e-4
    elements: int = 0
    samples: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    violations: int = 0
    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    err_sq: float = 0.0
    peak: float = 0.0
    min_cosine: float = 1.0
    argmax_match: int = 0
    argmax_total: int = 0
    nonfinite: int = 0
    exact: bool = False
    shape: tuple[int, ...] = ()

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise FeedError(
                f"output '{self.name}' has shape {list(cand.shape)} in the candidate but "
                f"{list(ref.shape)} in the reference: the models do not compute the same thing"
            )
        self.shape = tuple(ref.shape)
        self.samples += 1
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        if ref.dtype.kind not in "fc":
            # Integers and bools have one right answer: every element must be equal.
            self.exact = True
            self.violations += int(np.count_nonzero(ref.ravel() != cand.ravel()))
            self._accumulate(r, c, np.abs(c - r))
            return
        finite = np.isfinite(r) & np.isfinite(c)
        if not finite.all():
            # A non-finite value must be the same one: the same infinity, NaN where NaN.
            odd = ~finite
            same = (r[odd] == c[odd]) | (np.isnan(r[odd]) & np.isnan(c[odd]))
            self.nonfinite += int(np.count_nonzero(~same))
            r, c = r[finite], c[finite]
        diff = np.abs(c - r)
        if r.size:
            self.violations += int(np.count_nonzero(diff > self.atol + self.rtol * np.abs(r)))
        self._accumulate(r, c, diff)
        if ref.ndim == 2 and ref.shape[1] >= 2:
            self.argmax_match += int(np.count_nonzero(ref.argmax(1) == cand.argmax(1)))
            self.argmax_total += ref.shape[0]

    def _accumulate(self, r: np.ndarray, c: np.ndarray, diff: np.ndarray) -> None:
        self.elements += r.size
        if not r.size:
            return
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        # einsum stays on this thread: BLAS threads would fight ORT's spinning ones.
        dot, rr, cc = (float(np.einsum("i,i->", a, b)) for a, b in ((r, c), (r, r), (c, c)))
        self.dot += dot
        self.ref_sq += rr
        self.cand_sq += cc
        self.err_sq += float(np.einsum("i,i->", diff, diff))
        self.peak = max(self.peak, float(np.abs(r).max()))
        self.min_cosine = min(self.min_cosine, _cosine(dot, rr, cc))

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.elements if self.elements else 0.0

    @property
    def cosine(self) -> float:
        return _cosine(self.dot, self.ref_sq, self.cand_sq)

    @property
    def max_rel(self) -> float:
        """Largest error relative to the reference's largest magnitude: max|c-r| / max|r|.

        Dividing element by element explodes wherever the reference is near zero (a
        sigmoid map's background): this denominator is one number per output.
        """
        if self.max_abs == 0.0:
            return 0.0
        return self.max_abs / self.peak if self.peak else math.inf

    @property
    def rel_rms(self) -> float:
        """Root-mean-square error relative to the reference's RMS: ||c - r|| / ||r||."""
        if self.err_sq == 0.0:
            return 0.0
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else math.inf

    @property
    def sqnr_db(self) -> float:
        return _db(self.ref_sq, self.err_sq)

    @property
    def psnr_db(self) -> float:
        mse = self.err_sq / self.elements if self.elements else 0.0
        return _db(self.peak**2, mse)

    @property
    def argmax_agreement(self) -> float | None:
        return self.argmax_match / self.argmax_total if self.argmax_total else None

    def passed(self, min_cosine: float | None = None) -> bool:
        """The lossless rule: every element within tolerance, non-finite values identical."""
        ok = self.violations == 0 and self.nonfinite == 0
        if min_cosine is not None:
            ok = ok and self.cosine >= min_cosine
        return ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "samples": self.samples,
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "max_rel": self.max_rel,
            "rel_rms": self.rel_rms,
            "exact": self.exact,
            "cosine": self.cosine,
            "min_cosine": self.min_cosine,
            "sqnr_db": self.sqnr_db,
            "psnr_db": self.psnr_db,
            "argmax_agreement": self.argmax_agreement,
            "violations": self.violations,
            "nonfinite_mismatches": self.nonfinite,
        }


def _cosine(dot: float, a: float, b: float) -> float:
    if a == 0.0 and b == 0.0:
        return 1.0
    if a == 0.0 or b == 0.0:
        return 0.0
    return dot / math.sqrt(a * b)


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class VerifyResult:
    """Per-output errors and the verdict: tolerances (lossless) or a budget (lossy)."""

    outputs: list[ErrorStats]
    layers: list[ErrorStats] = field(default_factory=list)
    rtol: float = 1e-3
    atol: float = 1e-4
    min_cosine: float | None = None
    samples: int = 0
    lossy: bool = False
    why: str = "lossless"
    budget: dict[str, float] = field(default_factory=dict)
    map_threshold: float = MAP_THRESHOLD
    tasks: dict[str, TaskStats] = field(default_factory=dict)

    def judge(self, out: ErrorStats) -> tuple[bool, list[str]]:
        """Whether one output passes, and why not."""
        if not self.lossy or out.name not in self.tasks:
            misses = []
            if out.violations:
                rule = "exact" if out.exact else f"rtol={self.rtol:g}, atol={self.atol:g}"
                misses.append(f"{out.violations} elements differ beyond {rule}")
            if out.nonfinite:
                misses.append(f"{out.nonfinite} non-finite values differ")
            if self.min_cosine is not None and out.cosine < self.min_cosine:
                misses.append(f"cosine {out.cosine:.6f} < {self.min_cosine:g}")
            return not misses, misses
        ok, misses, _ = judge(self.budget, out, self.tasks[out.name])
        if self.min_cosine is not None and out.cosine < self.min_cosine:
            ok, misses = False, [*misses, f"cosine {out.cosine:.6f} < {self.min_cosine:g}"]
        return ok, misses

    @property
    def passed(self) -> bool:
        return all(self.judge(o)[0] for o in self.outputs)

    @property
    def rule(self) -> str:
        """The pass rule in words, for a table header."""
        if self.lossy:
            text = f"lossy ({self.why}): budget " + describe_budget(self.budget, self.map_threshold)
        else:
            text = f"lossless ({self.why}): |cand - ref| <= {self.atol:g} + {self.rtol:g}*|ref|"
        if self.min_cosine is not None:
            text += f", cosine >= {self.min_cosine:g}"
        return text

    def output(self, name: str) -> ErrorStats:
        return next(o for o in self.outputs if o.name == name)

    def to_dict(self) -> dict[str, Any]:
        outputs = []
        for o in self.outputs:
            ok, misses = self.judge(o)
            task = self.tasks.get(o.name)
            extra = {"form": task.form, "task": task.values()} if task else {}
            outputs.append(o.to_dict() | extra | {"passed": ok, "misses": misses})
        return {
            "passed": self.passed,
            "mode": "lossy" if self.lossy else "lossless",
            "why": self.why,
            "rule": self.rule,
            "budget": self.budget if self.lossy else None,
            "map_threshold": self.map_threshold,
            "max_rel_denominator": "max |ref| of the output",
            "rtol": self.rtol,
            "atol": self.atol,
            "min_cosine": self.min_cosine,
            "samples": self.samples,
            "outputs": outputs,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def check_tolerances(rtol: float, atol: float, min_cosine: float | None = None) -> None:
    """Tolerances must be finite and >= 0 (a NaN tolerance would pass anything)."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise FeedError(f"{name} must be a finite number >= 0, got {value!r}")
    if min_cosine is not None and not (math.isfinite(min_cosine) and -1 <= min_cosine <= 1):
        raise FeedError(f"min cosine must be a number in [-1, 1], got {min_cosine!r}")


def lossy_mode(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, lossy: bool | None = None
) -> tuple[bool, str]:
    """Whether the candidate is judged by a budget, and why, in a few words.

    In order: the caller's choice; the candidate's metadata, written by `optimize`
    (`onnxopt.lossy`, the lossy passes it ran); quantized ops in the candidate that the
    reference lacks (a model quantized by another tool); else lossless.
    """
    if lossy is not None:
        return lossy, "as asked"
    props = {p.key: p.value for p in candidate.metadata_props}
    if META_LOSSY in props:
        try:
            done = list(json.loads(props[META_LOSSY]))
        except (ValueError, TypeError):
            done = []
        if done:
            return True, f"metadata: {', '.join(map(str, done))}"
        return False, "metadata: no lossy pass"
    ref_ops = {n.op_type for n in reference.graph.node}
    added = sorted({n.op_type for n in candidate.graph.node} & QUANTIZED_OPS - ref_ops)
    if added:
        return True, f"candidate has {', '.join(added)}"
    return False, "no metadata"


def verify(
    reference: Any,
    candidate: Any,
    feeds: FeedSource | str | None = None,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    min_cosine: float | None = None,
    per_layer: bool = False,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 8,
    seed: int = 0,
    lossy: bool | None = None,
    budget: str | Mapping[str, float] | None = None,
    map_threshold: float = MAP_THRESHOLD,
) -> VerifyResult:
    """Run both models on the same feeds (random from the reference's signature by default).

    A lossless candidate passes when every element is within tolerance; a lossy one
    (see `lossy_mode`; a `budget` implies lossy) when every output keeps the budget
    (default `budget.DEFAULT_BUDGET`).
    """
    check_tolerances(rtol, atol, min_cosine)
    if not (math.isfinite(map_threshold) and 0 <= map_threshold <= 1):
        raise FeedError(f"map threshold must lie in [0, 1], got {map_threshold!r}")
    limits = parse_budget(budget)
    ref_model = load_model(reference)
    cand_model = load_model(candidate)
    is_lossy, why = lossy_mode(ref_model, cand_model, True if budget is not None else lossy)
    if budget is not None and lossy is None:
        why = "budget given"
    if feeds is None or isinstance(feeds, str):
        feeds = load_feeds(ref_model, feeds, shapes=shapes, count=samples, seed=seed)
    _check_same_inputs(ref_model, cand_model)
    outputs = [o.name for o in ref_model.graph.output]
    cand_outputs = {o.name for o in cand_model.graph.output}
    missing = [n for n in outputs if n not in cand_outputs]
    if missing:
        raise FeedError(f"candidate lacks the reference outputs {missing}: outputs must keep names")
    stats = {n: ErrorStats(n, rtol, atol) for n in outputs}
    tasks = {n: TaskStats(n, map_threshold) for n in outputs} if is_lossy else {}
    layers: dict[str, ErrorStats] = {}
    common = _common_tensors(ref_model, cand_model, set(outputs)) if per_layer else []
    layers = {n: ErrorStats(n, rtol, atol) for n in common}
    wanted = outputs + common
    ref_iter = _tensors(ref_model, feeds, wanted, common, providers, threads)
    cand_iter = _tensors(cand_model, feeds, wanted, common, providers, threads)
    count = 0
    for ref_values, cand_values in zip(ref_iter, cand_iter, strict=True):
        for name in wanted:
            (stats.get(name) or layers[name]).update(ref_values[name], cand_values[name])
            if name in tasks:
                tasks[name].update(ref_values[name], cand_values[name])
        count += 1
    if count == 0:
        raise FeedError("no feeds to compare on: the data holds no samples")
    if is_lossy and budget is not None:
        _check_budget_applies(limits, tasks)
    ranked = sorted(layers.values(), key=lambda s: s.sqnr_db)
    return VerifyResult(
        list(stats.values()),
        ranked,
        rtol,
        atol,
        min_cosine,
        count,
        lossy=is_lossy,
        why=why,
        budget=limits,
        map_threshold=map_threshold,
        tasks=tasks,
    )


def _tensors(
    model: onnx.ModelProto,
    feeds: FeedSource,
    wanted: list[str],
    layers: list[str],
    providers: Sequence[str],
    threads: int | None,
) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, the wanted tensors; outputs alone come from a fully optimized session.

    Capturing intermediate tensors limits ORT's graph optimizations; a quantized model
    is then not run with the integer kernels it is deployed with.
    """
    if layers:
        yield from iter_tensors(model, feeds, wanted, providers=providers, threads=threads)
        return
    session = create_session(model, providers, threads=threads)
    for feed in feeds:
        yield run(session, feed, wanted)


def _check_budget_applies(limits: Mapping[str, float], tasks: Mapping[str, TaskStats]) -> None:
    found = {"cosine", "sqnr", "rel_rms"}
    for task in tasks.values():
        found |= set(task.values()) | ({"top1"} if task.form == "exact" else set())
    unused = [m for m in limits if m not in found]
    if unused:
        forms = sorted({t.form or "?" for t in tasks.values()})
        raise FeedError(
            f"budget metric(s) {unused} apply to no output (outputs are: {', '.join(forms)}); "
            "top1/top5 need class scores, map a probability map, nn embeddings"
        )


def _check_same_inputs(ref: onnx.ModelProto, cand: onnx.ModelProto) -> None:
    a = {s.name: s.dtype for s in model_inputs(ref)}
    b = {s.name: s.dtype for s in model_inputs(cand)}
    if a != b:
        raise FeedError(
            f"the models take different inputs (reference {a}, candidate {b}): "
            "compare models of the same signature"
        )


def _common_tensors(ref: onnx.ModelProto, cand: onnx.ModelProto, exclude: set[str]) -> list[str]:
    cand_names = set(float_tensor_names(cand))
    return [n for n in float_tensor_names(ref) if n in cand_names and n not in exclude]

"""The ONNX backend test cases, taken only from the installed onnx package, and how to judge them.

Node cases are regenerated from the definitions in `onnx.backend.test.case.node`
(the wheel ships no node/ data): importing one of its modules runs that
module's exporters, seeded, and each `expect` call appends a case to the
package's list, exactly as `onnx.backend.test.cmd_tools generate-data` does.
The pytorch-converted, pytorch-operator and simple cases are read from the
package's backend/test/data folders (model.onnx and test_data_set_0). The light
models (real networks whose weights are ConstantOfShape nodes) come without
inputs: they get seeded random inputs and no expected outputs, so they are
judged against the original model run in ONNX Runtime. Nothing is downloaded.

Judging a result: ORT's outputs on it must match the expected outputs with
|got - want| <= atol + rtol * |want| (RTOL, ATOL), NaN equal to NaN, the same
shapes, element types and sequence lengths. A case whose original model ORT
cannot run, or runs to other values than expected, says nothing about a tool:
`baseline` reports it and callers leave it out.
"""

from __future__ import annotations

import glob
import importlib
import os
import pkgutil
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

RTOL, ATOL = 1e-3, 1e-4
DATA_KINDS = ("pytorch-converted", "pytorch-operator", "simple", "light")
KINDS = ("node", *DATA_KINDS)
NODE_PACKAGE = "onnx.backend.test.case.node"


@dataclass
class BackendCase:
    """One model with its inputs (one per feed input, in order) and expected outputs."""

    name: str
    kind: str
    model: onnx.ModelProto
    inputs: list[Any]
    outputs: list[Any] | None  # None: judge against the original model in ORT

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


# ---- collecting ----------------------------------------------------------------------------


def data_dir() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


def node_modules() -> list[str]:
    """Names of the modules under onnx.backend.test.case.node that define cases, sorted."""
    package = importlib.import_module(NODE_PACKAGE)
    names = []
    for info in pkgutil.walk_packages(package.__path__, f"{NODE_PACKAGE}."):
        if info.ispkg:
            continue
        if not onnx.ONNX_ML and ".ai_onnx_ml" in info.name:
            continue
        names.append(info.name)
    return sorted(names)


_BY_MODULE: dict[str, list[BackendCase]] = {}


def node_cases(modules: Iterable[str] | None = None) -> list[BackendCase]:
    """The node cases the given modules (default: all) define, regenerated in this process."""
    package = importlib.import_module(NODE_PACKAGE)
    found: list[BackendCase] = []
    for name in node_modules() if modules is None else modules:
        if name not in _BY_MODULE:
            registry = package._NodeTestCases
            start = len(registry)
            if name in sys.modules:
                # Imported before, so its exporters already ran: run them again.
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
            _BY_MODULE[name] = [_from_test_case(c) for c in registry[start:]]
        found.extend(_BY_MODULE[name])
    return found


def _from_test_case(case: Any) -> BackendCase:
    inputs, outputs = case.data_sets[0]
    return BackendCase(case.name, "node", case.model, list(inputs), list(outputs))


def data_cases(kinds: Sequence[str] = DATA_KINDS) -> list[BackendCase]:
    """The cases stored in the onnx package's backend/test/data folders."""
    cases: list[BackendCase] = []
    for kind in kinds:
        folder = os.path.join(data_dir(), kind)
        if kind == "light":
            for path in sorted(glob.glob(os.path.join(folder, "light_*.onnx"))):
                model = onnx.load(path)
                name = os.path.basename(path)[: -len(".onnx")]
                cases.append(BackendCase(name, kind, model, random_inputs(model), None))
            continue
        for case_dir in sorted(glob.glob(os.path.join(folder, "*", "model.onnx"))):
            case_dir = os.path.dirname(case_dir)
            model = onnx.load(os.path.join(case_dir, "model.onnx"))
            data = os.path.join(case_dir, "test_data_set_0")
            inputs = [_read_pb(p) for p in sorted(glob.glob(os.path.join(data, "input_*.pb")))]
            outputs = [_read_pb(p) for p in sorted(glob.glob(os.path.join(data, "output_*.pb")))]
            cases.append(BackendCase(os.path.basename(case_dir), kind, model, inputs, outputs))
    return cases


def all_cases() -> list[BackendCase]:
    return node_cases() + data_cases()


def _read_pb(path: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    with open(path, "rb") as f:
        tensor.ParseFromString(f.read())
    return numpy_helper.to_array(tensor)


def feed_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs a caller feeds (IR < 4 lists initializers as inputs too)."""
    initializers = {t.name for t in model.graph.initializer}
    return [vi.name for vi in model.graph.input if vi.name not in initializers]


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    """Seeded standard-normal floats (integers in [0, 4)) for every fed tensor input."""
    rng = np.random.default_rng(seed)
    by_name = {vi.name: vi for vi in model.graph.input}
    values = []
    for name in feed_names(model):
        tensor_type = by_name[name].type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim]
        if np.dtype(dtype).kind == "f":
            values.append(rng.standard_normal(shape).astype(dtype))
        else:
            values.append(rng.integers(0, 4, size=shape).astype(dtype))
    return values


def ci_sample(count: int = 150, seed: int = 0, per_module: int = 2) -> list[BackendCase]:
    """A fixed, seeded sample that is quick to build: a fifth from the stored
    pytorch-converted/pytorch-operator/simple cases, the rest at most `per_module`
    cases from each of the node modules in a seeded order (importing only those)."""
    rng = random.Random(seed)
    stored = sorted(data_cases(("pytorch-converted", "pytorch-operator", "simple")), key=_id)
    picked = rng.sample(stored, min(count // 5, len(stored)))
    modules = node_modules()
    rng.shuffle(modules)
    for module in modules:
        if len(picked) >= count:
            break
        cases = sorted(node_cases([module]), key=_id)
        picked += rng.sample(cases, min(per_module, len(cases), count - len(picked)))
    return sorted(picked, key=_id)


def _id(case: BackendCase) -> str:
    return case.id


def sample(cases: Sequence[BackendCase], count: int, seed: int = 0) -> list[BackendCase]:
    """A fixed sample: the same ids for the same cases, count and seed."""
    ordered = sorted(cases, key=lambda c: c.id)
    return sorted(random.Random(seed).sample(ordered, min(count, len(ordered))), key=lambda c: c.id)


# ---- running and judging -------------------------------------------------------------------


def to_value(value: Any) -> Any:
    """A value ORT can take or return: arrays for tensors, lists for sequences."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [to_value(v) for v in value]
    if value is None or isinstance(value, np.ndarray):
        return value
    return np.asarray(value)


def feed(case: BackendCase, model: onnx.ModelProto | None = None) -> dict[str, Any]:
    names = feed_names(model or case.model)
    return dict(zip(names, (to_value(v) for v in case.inputs), strict=False))


def bind_input_shapes(case: BackendCase) -> onnx.ModelProto:
    """A copy of the case's model with every fed tensor input's dims set to its input's shape."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    values = feed(case)
    for vi in model.graph.input:
        value = values.get(vi.name)
        if not isinstance(value, np.ndarray) or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        if len(shape.dim) != value.ndim:
            continue
        for dim, size in zip(shape.dim, value.shape, strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    return model


def run(model: onnx.ModelProto, case: BackendCase, threads: int = 1) -> list[Any]:
    """ORT's outputs for the case's inputs; raises when ORT cannot load or run the model."""
    from onnxopt.runtime import create_session

    session = create_session(model, ["cpu"], threads=threads)
    return session.run(None, feed(case, model))


def mismatch(want: Any, got: Any, rtol: float = RTOL, atol: float = ATOL) -> str:
    """Why `got` is not `want` ('' when it is)."""
    want, got = to_value(want), to_value(got)
    if isinstance(want, list) or isinstance(got, list):
        if not isinstance(want, list) or not isinstance(got, list) or len(want) != len(got):
            return "sequence length or kind differs"
        return next((m for w, g in zip(want, got, strict=True) if (m := mismatch(w, g))), "")
    if want is None or got is None:
        return "" if want is None and got is None else "optional presence differs"
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return f"shape {got.shape} instead of {want.shape}"
    if want.dtype != got.dtype:
        return f"element type {got.dtype} instead of {want.dtype}"
    if want.dtype.kind in "fc":
        with np.errstate(invalid="ignore", over="ignore"):
            wide_w, wide_g = want.astype(np.float64), got.astype(np.float64)
            close = np.isclose(wide_g, wide_w, rtol=rtol, atol=atol, equal_nan=True)
            # isclose lets inf match inf of the same sign only, as wanted.
        if not np.all(close):
            return f"{int(np.size(close) - np.count_nonzero(close))} elements differ"
        return ""
    if not np.array_equal(want, got):
        return "values differ"
    return ""


def outputs_mismatch(want: Sequence[Any], got: Sequence[Any]) -> str:
    if len(want) != len(got):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        found = mismatch(w, g)
        if found:
            return f"output {i}: {found}"
    return ""


def baseline(case: BackendCase) -> tuple[str, list[Any] | None]:
    """('ok', reference outputs), or ('ort-fails' | 'ort-wrong', None) when ORT cannot judge."""
    try:
        got = run(case.model, case)
    except Exception:  # ORT cannot load or run the original: no tool can be judged on it
        return "ort-fails", None
    if case.outputs is None:
        return "ok", got
    if outputs_mismatch(case.outputs, got):
        return "ort-wrong", None
    return "ok", [to_value(v) for v in case.outputs]


def judge(result: onnx.ModelProto, case: BackendCase, reference: Sequence[Any]) -> tuple[str, str]:
    """('ok' | 'load-error' | 'wrong', detail) for a tool's result on a case."""
    try:
        got = run(result, case)
    except Exception as exc:  # the result does not load or run in ORT
        return "load-error", str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    found = outputs_mismatch(reference, got)
    return ("wrong", found) if found else ("ok", "")


# ---- the quantize check --------------------------------------------------------------------

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
MIN_COSINE = 0.999


def quantizable(case: BackendCase) -> bool:
    """A one-node Conv/MatMul/Gemm case on float32 with a weight input."""
    nodes = case.model.graph.node
    if case.kind != "node" or len(nodes) != 1 or nodes[0].op_type not in QUANTIZED_OPS:
        return False
    values = [to_value(v) for v in case.inputs]
    floats = all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in values)
    return floats and len(values) >= 2 and len(feed_names(case.model)) == len(values)


def weights_as_initializers(case: BackendCase) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """The case's model with every input but the first (weights, bias) as initializers."""
    model = bind_input_shapes(case)
    values = [to_value(v) for v in case.inputs]
    names = feed_names(model)
    graph = model.graph
    keep = [vi for vi in graph.input if vi.name == names[0]]
    for name, value in zip(names[1:], values[1:], strict=True):
        graph.initializer.append(numpy_helper.from_array(value, name))
    del graph.input[:]
    graph.input.extend(keep)
    if model.ir_version < 4:
        model.ir_version = 4
    return model, values[:1]


def quantize_case(case: BackendCase) -> dict[str, Any]:
    """quantize(min_weights=0) on a quantizable case, calibrated on the case's own inputs."""
    import onnxopt
    from onnxopt.data import ListFeeds, model_inputs

    model, kept = weights_as_initializers(case)
    feeds = ListFeeds([dict(zip(feed_names(model), kept, strict=True))], model_inputs(model))
    ctx = onnxopt.PassContext(feeds=feeds, threads=1)
    try:
        result = onnxopt.optimize(model, "quantize(min_weights=0)", ctx)
    except Exception as exc:  # a traceback from quantize: counted, never hidden
        return {"status": "tool-error", "detail": f"{type(exc).__name__}: {exc}"[:200]}
    quantized = any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    probe = BackendCase(case.name, case.kind, result.model, kept, case.outputs)
    try:
        got = run(result.model, probe)
    except Exception as exc:  # the quantized model does not load or run
        return {"status": "load-error", "detail": str(exc)[:200]}
    value = min(
        cosine(np.asarray(to_value(w)), np.asarray(g))
        for w, g in zip(case.outputs or [], got, strict=True)
    )
    return {
        "status": "ok" if value >= MIN_COSINE else "wrong",
        "detail": f"cosine {value:.6f}",
        "cosine": value,
        "quantized": quantized,
        "rollbacks": len(result.rolled_back),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors' values (1.0 for two all-zero tensors)."""
    x, y = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norms == 0.0:
        return 1.0 if not np.any(x) and not np.any(y) else 0.0
    return float(np.dot(x, y) / norms)

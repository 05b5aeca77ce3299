"""The ONNX backend test suite through onnxopt simplify, onnxsim and onnxslim, side by side.

Every case comes from the installed onnx package (onnxopt.test_models.backend_cases):
the node cases regenerated from onnx.backend.test.case.node, and the shipped
pytorch-converted, pytorch-operator, simple and light cases. Nothing is downloaded.
Each case's dynamic input dims are bound to its input shapes; then each tool
simplifies it in a worker process of its own (a hang or a crash costs that
tool that case only) and ORT runs the result on the case's inputs:

- ok: the outputs match the expected ones (rtol 1e-3, atol 1e-4, NaN equal NaN;
  light cases, which come without outputs: the original model's outputs in ORT);
- tool error: the tool raised or its worker died;
- load error: ORT cannot load or run the tool's result;
- wrong: ORT runs the result to other values;
- timeout: the tool took longer than --timeout seconds.
Cases ORT cannot run in their original form, or runs to other values than the
expected ones, judge no tool: they are counted apart and left out. For onnxopt
the table also counts passes rolled back by the pipeline (the output is still
the pass's input, so not wrong).

With --quantize, the node cases of Conv, MatMul and Gemm also run with their
weights (and bias) as initializers through `quantize(min_weights=0)`, calibrated
on the case's own inputs; each result must load in ORT and keep cosine >= 0.999
against the expected outputs.

    python benchmarks/backend_suite.py                    # all cases, three tools
    python benchmarks/backend_suite.py --tools onnxopt --limit 200 --jobs 2
    python benchmarks/backend_suite.py --quantize
    python benchmarks/backend_suite.py --tools "" --quantize   # the quantize check alone

Writes benchmarks/results/backend_suite.json and prints one table per tool.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from onnxopt.test_models import backend_cases as bc

RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("onnxopt", "onnxsim", "onnxslim")
STATUSES = ("ok", "tool-error", "load-error", "wrong", "timeout")


# ---- one tool on one case (in a worker) ----------------------------------------------------


def simplify_with(tool: str, model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The tool's simplified model and how many passes were rolled back (onnxopt only)."""
    if tool == "onnxopt":
        import onnxopt

        result = onnxopt.optimize(model, "simplify", onnxopt.PassContext(threads=1))
        return result.model, len(result.rolled_back)
    if tool == "onnxsim":
        import onnxsim

        simplified, _ = onnxsim.simplify(model)
        return simplified, 0
    import onnxslim

    return onnxslim.slim(model), 0


def tool_case(tool: str, case: bc.BackendCase, reference: list[Any]) -> dict[str, Any]:
    """Status, detail, node counts and rollbacks of one tool on one case."""
    model = bc.bind_input_shapes(case)
    try:
        result, rollbacks = simplify_with(tool, model)
    except Exception as exc:  # the tool itself failed: a tool error, not a harness error
        return {"status": "tool-error", "detail": f"{type(exc).__name__}: {_line(exc)}"}
    if not isinstance(result, onnx.ModelProto):
        return {"status": "tool-error", "detail": f"returned {type(result).__name__}"}
    status, detail = bc.judge(result, case, reference)
    return {
        "status": status,
        "detail": detail,
        "nodes": [len(model.graph.node), len(result.graph.node)],
        "rollbacks": rollbacks,
    }


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _worker(job: tuple[str, int], conn: Any) -> None:
    warnings.filterwarnings("ignore")
    kind, index = job
    case = CASES[index]
    if kind == "baseline":
        status, reference = bc.baseline(case)
        out: dict[str, Any] = {"status": status, "reference": reference}
    elif kind == "quantize":
        out = bc.quantize_case(case)
    else:
        out = tool_case(kind, case, REFERENCES[index])
    conn.send(out)
    conn.close()


# The cases live in the parent; forked workers see them without pickling the models.
CASES: list[bc.BackendCase] = []
REFERENCES: dict[int, Any] = {}


def run_jobs(jobs: list[tuple[str, int]], parallel: int, timeout: float) -> list[dict[str, Any]]:
    """Run each job in a forked worker, at most `parallel` at a time, each under `timeout`."""
    context = mp.get_context("fork")
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    running: dict[int, tuple[Any, Any, float]] = {}
    pending = list(range(len(jobs)))
    while pending or running:
        while pending and len(running) < parallel:
            index = pending.pop(0)
            parent, child = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(jobs[index], child), daemon=True)
            process.start()
            child.close()
            running[index] = (process, parent, time.monotonic())
        for index, (process, conn, started) in list(running.items()):
            if conn.poll(0.01):
                try:
                    results[index] = conn.recv()
                except EOFError:
                    results[index] = {"status": "tool-error", "detail": "worker died"}
            elif not process.is_alive():
                code = process.exitcode
                results[index] = {"status": "tool-error", "detail": f"worker exit {code}"}
            elif time.monotonic() - started > timeout:
                process.kill()
                results[index] = {"status": "timeout", "detail": f"over {timeout:.0f} s"}
            else:
                continue
            process.join(1)
            conn.close()
            del running[index]
    return [r or {} for r in results]


# ---- the suite -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--kinds", default=",".join(bc.KINDS))
    parser.add_argument("--limit", type=int, default=0, help="a seeded sample of this many")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--quantize", action="store_true", help="also the quantize check")
    parser.add_argument("--output", default=str(RESULTS / "backend_suite.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    tools = [t for t in args.tools.split(",") if t]
    kinds = [k for k in args.kinds.split(",") if k]
    for tool in tools:  # imported before the workers fork, so that each does not
        __import__(tool)
    from onnxopt import available_passes
    from onnxopt.api import quiet_libraries

    quiet_libraries()
    available_passes()  # the passes too: otherwise every worker imports them again
    start = time.perf_counter()
    cases = (bc.node_cases() if "node" in kinds else []) + bc.data_cases(
        [k for k in kinds if k != "node"]
    )
    if args.limit:
        cases = bc.sample(cases, args.limit)
    if not tools:  # the quantize check alone needs only its own cases
        cases = [c for c in cases if bc.quantizable(c)]
    CASES[:] = cases
    print(f"{len(cases)} cases collected in {time.perf_counter() - start:.0f} s", flush=True)

    baselines = run_jobs([("baseline", i) for i in range(len(cases))], args.jobs, args.timeout)
    usable = [i for i, b in enumerate(baselines) if b.get("status") == "ok"]
    for i in usable:
        REFERENCES[i] = baselines[i]["reference"]
    excluded = Counter(b.get("status", "?") for b in baselines if b.get("status") != "ok")
    print(f"ORT runs {len(usable)} originals; left out: {dict(excluded)}", flush=True)

    report: dict[str, Any] = {
        "command": "python benchmarks/backend_suite.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "onnx": onnx.__version__,
        "cases": len(cases),
        "usable": len(usable),
        "excluded": dict(excluded),
        "tools": {},
    }
    print(HEADER, flush=True)
    for tool in tools:
        began = time.perf_counter()
        found = run_jobs([(tool, i) for i in usable], args.jobs, args.timeout)
        per_case = {cases[i].id: r for i, r in zip(usable, found, strict=True)}
        counts = Counter(r.get("status", "?") for r in found)
        report["tools"][tool] = {
            "counts": {s: counts.get(s, 0) for s in STATUSES},
            "rollbacks": sum(r.get("rollbacks", 0) for r in found),
            "cases_with_rollbacks": sum(1 for r in found if r.get("rollbacks")),
            "seconds": round(time.perf_counter() - began, 1),
            "not_ok": {k: v for k, v in per_case.items() if v.get("status") != "ok"},
            "nodes": {k: v["nodes"][1] for k, v in per_case.items() if v.get("status") == "ok"},
        }
        print(table(tool, report["tools"][tool], len(usable)), flush=True)
    # Node counts compare only where every tool is right.
    found_sets = [set(t["nodes"]) for t in report["tools"].values()]
    common = set.intersection(*found_sets) if found_sets else set()
    report["nodes_where_all_ok"] = {
        "cases": len(common),
        **{tool: sum(t["nodes"][c] for c in common) for tool, t in report["tools"].items()},
    }
    if tools:
        print(
            f"nodes after simplify, summed over the {len(common)} cases every tool got right: "
            + ", ".join(f"{tool} {report['nodes_where_all_ok'][tool]}" for tool in tools)
        )

    if args.quantize:
        picked = [i for i in usable if bc.quantizable(cases[i])]
        found = run_jobs([("quantize", i) for i in picked], args.jobs, args.timeout)
        counts = Counter(r.get("status", "?") for r in found)
        cosines = [r["cosine"] for r in found if "cosine" in r]
        report["quantize"] = {
            "cases": len(picked),
            "counts": {s: counts.get(s, 0) for s in STATUSES},
            "quantized": sum(1 for r in found if r.get("quantized")),
            "min_cosine": min(cosines) if cosines else None,
            "min_cosine_case": min(
                (
                    (r["cosine"], cases[i].id)
                    for i, r in zip(picked, found, strict=True)
                    if "cosine" in r
                ),
                default=(None, None),
            )[1],
            "not_ok": {
                cases[i].id: r for i, r in zip(picked, found, strict=True) if r["status"] != "ok"
            },
        }
        print(f"quantize(min_weights=0) on {len(picked)} Conv/MatMul/Gemm cases: {dict(counts)}")
        print(
            f"  with a QuantizeLinear: {report['quantize']['quantized']}, min cosine "
            f"{report['quantize']['min_cosine']}"
        )

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.output} ({time.perf_counter() - start:.0f} s)")
    return 0


HEADER = (
    "| tool | cases | ok | tool error | load error | wrong | timeout | cases with a rollback |\n"
    "|---|---|---|---|---|---|---|---|"
)


def table(tool: str, found: dict[str, Any], usable: int) -> str:
    cells = " | ".join(str(found["counts"][s]) for s in STATUSES)
    return f"| {tool} | {usable} | {cells} | {found['cases_with_rollbacks']} |"


if __name__ == "__main__":
    sys.exit(main())

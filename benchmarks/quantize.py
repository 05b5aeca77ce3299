"""onnxopt's quantize pass against onnxruntime.quantization, as whole processes, scored on tasks.

    python benchmarks/quantize.py                       # all models, minmax/percentile/entropy
    python benchmarks/quantize.py --models digits,ppocr_cls --methods minmax --repeats 3

Models, data and scores (everything seeded, nothing downloaded but the PP-OCR wheel):
- ppocr_det: PP-OCRv4 detection; 16 synthetic pages (`--det-size`, 640 by default)
  calibrate, 8 others test. Score: box recall / precision (%) of the int8 model's DB
  boxes against the fp32 model's boxes at IoU 0.5 (`test_models/textpages.py`).
- ppocr_cls: the PP-OCR text-direction classifier; 64 rendered lines (seed 1)
  calibrate; score: accuracy (%) on the 400 labelled lines of seed 0.
- digits: the committed digits CNN; 100 training images calibrate; score: top-1 (%)
  on the 539 held-out images.
Each score carries a 95 % bootstrap interval over the test items (pages, lines,
images; 1000 resamples, seed 0).

Tools (benchmarks/quantize_children.py): per method, onnxopt `quantize(calibrate=M)`
against ORT's best documented path (`quant_pre_process`, then `quantize_static` with
QDQ, per-channel int8 weights, uint8 activations, the same method, percentile and
feeds); and once per model, defaults against defaults (`quantize` against
`quantize_static(model, out, reader)`), labelled as such. ORT gets the model raised to
opset 13 (per-channel weights need it), onnxopt the original. A tool whose step fails
shows its error line in the table.

Time and memory: each run is a whole process from the same start (imports, model
load, data read, quantize, write), timed from spawn to exit, with its peak RSS read
by a wrapper process (getrusage of its one child). With `--repeats N` the tools
alternate, N processes each; the table shows the median and the min-max. Latency:
fp32 and every int8 model of a model in one interleaved `onnxopt.bench` run on the
CPU provider (`--threads`, 1 by default), batch 1.

Writes benchmarks/results/quantize.json and quantize.md (`--out` names them) and prints
the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CHILD = HERE / "quantize_children.py"
METHODS = ("minmax", "percentile", "entropy")
WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "seconds = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "lines = [x for x in done.stderr.strip().splitlines() if x.strip()]\n"
    "print(json.dumps({'code': done.returncode, 'process_s': seconds, 'peak_rss_mb': peak,\n"
    "    'stdout': done.stdout.strip().splitlines()[-1:], 'stderr': lines[-1:]}))\n"
)


def prepare(name: str, work: Path, det_size: int) -> dict[str, Any]:
    """Write the model, ORT's opset-13 copy, calib.npz and test.npz; describe them."""
    from onnxopt.model import upgrade_opset
    from onnxopt.test_models import digits, fetch
    from onnxopt.test_models.textlines import labelled_feeds
    from onnxopt.test_models.textpages import text_page

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    labels = None
    if name == "ppocr_det":
        model = onnx.load(fetch.fetch("ppocr_det"))
        calib = np.concatenate([text_page(1000 + i, det_size) for i in range(16)])
        test = np.concatenate([text_page(5000 + i, det_size) for i in range(8)])
        metric = "box recall / precision vs fp32 boxes %"
    elif name == "ppocr_cls":
        model = onnx.load(fetch.fetch("ppocr_cls"))
        calib, _ = labelled_feeds(64, 1)
        test, labels = labelled_feeds(400, 0)
        metric = "direction accuracy % (400 labelled lines)"
    elif name == "digits":
        model = onnx.load(digits.DIGITS_CNN)
        x_train, _, test, labels = digits.load_digits_split()
        calib = x_train[:100]
        metric = "top-1 % (539 held-out images)"
    else:
        raise SystemExit(f"unknown model {name!r}; choose from ppocr_det, ppocr_cls, digits")
    input_name = model.graph.input[0].name
    paths = {"model": folder / "fp32.onnx", "ort_model": folder / "fp32_opset13.onnx"}
    onnx.save(model, paths["model"])
    onnx.save(upgrade_opset(model, 13), paths["ort_model"])
    np.savez(folder / "calib.npz", **{input_name: calib})
    return {
        "name": name,
        "folder": folder,
        "input": input_name,
        "metric": metric,
        "calib": folder / "calib.npz",
        "test": test,
        "labels": labels,
        **paths,
    }


def run_tool(tool: str, method: str, info: dict[str, Any], target: Path) -> dict[str, Any]:
    source = info["ort_model"] if tool.startswith("ort") else info["model"]
    command = [sys.executable, str(CHILD), tool, method, str(source), str(info["calib"])]
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command, str(target)],
        capture_output=True,
        text=True,
        cwd=info["folder"],  # quant_pre_process leaves sym_shape_infer_temp.onnx in the cwd
    )
    record = json.loads(done.stdout.strip().splitlines()[-1])
    child = json.loads(record["stdout"][0]) if record["stdout"] else {}
    if record["code"] != 0 or "error" in child:
        return {"error": child.get("error") or (record["stderr"] or ["failed"])[0][:200]}
    return {k: record[k] for k in ("process_s", "peak_rss_mb")} | child


def outputs(path: Path, x: np.ndarray, input_name: str) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x[i : i + 1]})[0] for i in range(len(x))])


def score(info: dict[str, Any], path: Path, reference: np.ndarray | None) -> dict[str, Any]:
    """The task score and its 95 % bootstrap interval over test items."""
    from onnxopt.test_models.textpages import db_boxes, match_boxes

    got = outputs(path, info["test"], info["input"])
    rng = np.random.default_rng(0)
    if info["name"] == "ppocr_det":
        assert reference is not None
        counts = []
        for page, want in zip(got, reference, strict=True):
            boxes, expected = db_boxes(page[0]), db_boxes(want[0])
            counts.append((match_boxes(boxes, expected), len(boxes), len(expected)))
        table = np.array(counts, np.float64)
        resampled = table[rng.integers(0, len(table), (1000, len(table)))].sum(axis=1)
        total = table.sum(axis=0)
        return {
            "recall": 100 * total[0] / total[2],
            "precision": 100 * total[0] / max(total[1], 1),
            "recall_ci": list(np.percentile(100 * resampled[:, 0] / resampled[:, 2], [2.5, 97.5])),
            "precision_ci": list(
                np.percentile(100 * resampled[:, 0] / np.maximum(resampled[:, 1], 1), [2.5, 97.5])
            ),
            "boxes": int(total[1]),
            "reference_boxes": int(total[2]),
        }
    correct = (got.argmax(axis=1) == info["labels"]).astype(np.float64)
    means = correct[rng.integers(0, len(correct), (1000, len(correct)))].mean(axis=1)
    return {
        "accuracy": 100 * correct.mean(),
        "accuracy_ci": list(100 * np.percentile(means, [2.5, 97.5])),
    }


def latency(info: dict[str, Any], paths: dict[str, Path], runs: int, threads: int) -> dict:
    from onnxopt import bench
    from onnxopt.data import ListFeeds, model_inputs

    model = onnx.load(info["model"])
    feeds = ListFeeds([{info["input"]: info["test"][:1]}], model_inputs(model))
    labels = list(paths)
    result = bench(
        [str(p) for p in paths.values()],
        ["cpu"],
        labels=labels,
        feeds=feeds,
        threads=threads,
        warmup=3,
        runs=runs,
    )
    return {
        t.label: {
            "p50_ms": t.p50,
            "p25_ms": float(np.percentile(t.latencies_ms, 25)),
            "p75_ms": float(np.percentile(t.latencies_ms, 75)),
        }
        for t in result.timings
    }


def measure(info: dict[str, Any], methods: list[str], repeats: int) -> list[dict[str, Any]]:
    """Quantize with each pair of tools, interleaved; returns one row per tool pair."""
    rows = []
    pairs = [(m, ("onnxopt", "ort-best")) for m in methods]
    pairs.append(("defaults", ("onnxopt-defaults", "ort-defaults")))
    for index, (method, tools) in enumerate(pairs):
        runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
        for repeat in range(repeats):
            order = tools if (index + repeat) % 2 == 0 else tools[::-1]
            for tool in order:
                print(f"  {info['name']} {method} {tool} ...", file=sys.stderr, flush=True)
                target = info["folder"] / f"{tool}_{method}.onnx"
                runs[tool].append(run_tool(tool, method, info, target))
        row: dict[str, Any] = {"model": info["name"], "method": method, "tools": {}}
        for tool, found in runs.items():
            failed = [r for r in found if "error" in r]
            if failed:
                row["tools"][tool] = {"error": failed[0]["error"]}
                continue
            merged: dict[str, Any] = {"repeats": len(found), "notes": found[0].get("notes", [])}
            if "pre" in found[0]:
                merged["pre"] = found[0]["pre"]
            for key in ("process_s", "peak_rss_mb", "call_s"):
                values = [r[key] for r in found]
                merged[key] = statistics.median(values)
                merged[f"{key}_range"] = [min(values), max(values)]
            merged["path"] = str(info["folder"] / f"{tool}_{method}.onnx")
            row["tools"][tool] = merged
        rows.append(row)
    return rows


def evaluate(info: dict[str, Any], rows: list[dict], runs: int, threads: int) -> dict[str, Any]:
    """Score fp32 and every int8 model; time them in one interleaved bench run."""
    reference = (
        outputs(info["model"], info["test"], info["input"]) if info["labels"] is None else None
    )
    fp32 = score(info, info["model"], reference)
    paths = {"fp32": info["model"]}
    for row in rows:
        for tool, found in row["tools"].items():
            if "error" not in found:
                found["score"] = score(info, Path(found["path"]), reference)
                paths[f"{tool}/{row['method']}"] = Path(found["path"])
    timings = latency(info, paths, runs, threads)
    for row in rows:
        for tool, found in row["tools"].items():
            if "error" not in found:
                found["latency"] = timings[f"{tool}/{row['method']}"]
    return {"fp32_score": fp32, "fp32_latency": timings["fp32"]}


def _score_text(found: dict[str, Any]) -> str:
    s = found["score"]
    if "accuracy" in s:
        low, high = s["accuracy_ci"]
        return f"{s['accuracy']:.2f} [{low:.2f}, {high:.2f}]"
    r_low, r_high = s["recall_ci"]
    p_low, p_high = s["precision_ci"]
    return (
        f"{s['recall']:.1f} [{r_low:.1f}, {r_high:.1f}] / "
        f"{s['precision']:.1f} [{p_low:.1f}, {p_high:.1f}]"
    )


def markdown(results: list[dict[str, Any]], command: str, machine: str) -> str:
    lines = [
        f"`{command}` ({machine})",
        "",
        "| model | method | tool | process s (median, min-max) | peak RSS MB | p50 ms | x fp32 "
        "| score [95 % CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "onnxopt": "onnxopt",
        "ort-best": "ORT best (pre-processed)",
        "onnxopt-defaults": "onnxopt defaults",
        "ort-defaults": "ORT defaults",
    }
    for result in results:
        fp32_ms = result["fp32_latency"]["p50_ms"]
        fp32 = {"score": result["fp32_score"]}
        lines.append(
            f"| {result['model']} | fp32 | - | - | - | {fp32_ms:.3g} | 1 | {_score_text(fp32)} |"
        )
        for row in result["rows"]:
            for tool, found in row["tools"].items():
                name = names[tool]
                if "skip_symbolic_shape" in found.get("pre", ""):
                    name = "ORT best (pre-processed with skip_symbolic_shape)"
                label = f"| {result['model']} | {row['method']} | {name} |"
                if "error" in found:
                    lines.append(f"{label} failed: {found['error']} | | | | |")
                    continue
                low, high = found["process_s_range"]
                p50 = found["latency"]["p50_ms"]
                lines.append(
                    f"{label} {found['process_s']:.3g} ({low:.3g}-{high:.3g}) | "
                    f"{found['peak_rss_mb']:.0f} | {p50:.3g} | {fp32_ms / p50:.2f} | "
                    f"{_score_text(found)} |"
                )
    lines.append("")
    lines.append(f"Score: {'; '.join(sorted({r['model'] + ': ' + r['metric'] for r in results}))}.")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocr_det,ppocr_cls,digits")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for timing")
    parser.add_argument("--repeats", type=int, default=3, help="processes per tool")
    parser.add_argument("--det-size", type=int, default=640, help="PP-OCRv4 page size")
    parser.add_argument("--out", default="quantize", help="results/OUT.json and OUT.md")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-quantize-bench-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            print(f"{name}: preparing", file=sys.stderr, flush=True)
            info = prepare(name, Path(tmp), args.det_size)
            rows = measure(info, methods, args.repeats)
            result = {"model": name, "metric": info["metric"], "rows": rows}
            result |= evaluate(info, rows, args.runs, args.threads)
            results.append(result)
    command = ("python benchmarks/quantize.py " + " ".join(sys.argv[1:])).strip()
    machine = f"{cpu_name()}, python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    text = markdown(results, command, machine)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    payload = {"command": command, "machine": machine, "results": results, "markdown": text}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (RESULTS / f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

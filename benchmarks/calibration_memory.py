"""Peak memory of `quantize(calibrate=entropy)` through the CLI does not grow with samples.

    python benchmarks/calibration_memory.py [--samples 16,64,256] [--size 640] [--repeats 1]

For each sample count N, the script writes one .npz holding N seeded synthetic text
pages (`onnxopt.test_models.textpages.text_page`) as the array `x` [N, 3, size, size],
then runs, as a whole process,

    python -m onnxopt optimize det.onnx -o q.onnx --data calib_N.npz \\
        --passes "quantize(calibrate=entropy)"

on PP-OCRv4 detection, and reads that process's peak RSS from the kernel
(`resource.getrusage(RUSAGE_CHILDREN)` in a fresh wrapper process that waits for it
alone). Runs are interleaved over the counts when repeated. The table shows the median
peak RSS and wall time per count and the ratio of the largest count's peak to the
smallest's.

Writes benchmarks/results/calibration_memory.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "seconds = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print(done.returncode, peak, seconds)\n"
    "sys.stderr.write(done.stderr)\n"
)


def write_pages(path: Path, samples: int, size: int) -> None:
    """`samples` seeded pages [N, 3, size, size] float32 in one uncompressed .npz, written
    a page at a time (the writer holds one page, as the reader should)."""
    import zipfile

    from onnxopt.test_models.textpages import text_page

    header = {"descr": "<f4", "fortran_order": False, "shape": (samples, 3, size, size)}
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("x.npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array_header_2_0(stream, header)
            for i in range(samples):
                stream.write(np.ascontiguousarray(text_page(1000 + i, size)).tobytes())


def cpu_name() -> str:
    """The CPU's model name (lscpu's), and the machine type."""
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    return platform.machine()


def run_once(model: Path, data: Path, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "onnxopt",
        "optimize",
        str(model),
        "-o",
        str(out),
        "--data",
        str(data),
        "--passes",
        "quantize(calibrate=entropy)",
        "-q",
    ]
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True)
    code, peak, seconds = done.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"onnxopt failed: {done.stderr.strip()}")
    return {"peak_rss_mb": float(peak), "seconds": float(seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="16,64,256")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from onnxopt.report import Table, render_markdown, render_terminal, write_json, write_text
    from onnxopt.test_models import fetch

    counts = [int(c) for c in args.samples.split(",") if c]
    model = fetch.fetch("ppocr_det")
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n in counts:
            print(f"writing {n} pages ...", file=sys.stderr, flush=True)
            write_pages(folder / f"calib_{n}.npz", n, args.size)
        for repeat in range(args.repeats):
            order = counts if repeat % 2 == 0 else counts[::-1]
            for n in order:
                print(f"optimize with {n} samples ...", file=sys.stderr, flush=True)
                data = folder / f"calib_{n}.npz"
                result = run_once(model, data, folder / "q.onnx")
                result["npz_mb"] = data.stat().st_size / 2**20
                runs[n].append(result)
    table = Table(
        f"Calibration memory through the CLI, PP-OCRv4 det {args.size}x{args.size}, "
        "quantize(calibrate=entropy), one .npz",
        ["samples", ".npz MB", "peak RSS MB (median)", "peak RSS MB (min-max)", "seconds"],
    )
    medians = {}
    for n in counts:
        peaks = [r["peak_rss_mb"] for r in runs[n]]
        medians[n] = statistics.median(peaks)
        table.rows.append(
            [
                n,
                round(runs[n][0]["npz_mb"]),
                round(medians[n]),
                f"{round(min(peaks))}-{round(max(peaks))}",
                round(statistics.median(r["seconds"] for r in runs[n]), 1),
            ]
        )
    growth = medians[counts[-1]] / medians[counts[0]]
    table.notes.append(f"peak RSS at {counts[-1]} samples / at {counts[0]} samples: {growth:.3f}")
    render_terminal([table])
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/calibration_memory.py " + " ".join(sys.argv[1:])
    markdown = f"`{command.strip()}`\n\n" + render_markdown([table])
    write_json(
        RESULTS / "calibration_memory.json",
        {
            "command": command.strip(),
            "machine": cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "runs": {str(n): runs[n] for n in counts},
            "growth": round(growth, 3),
            "markdown": markdown,
        },
    )
    write_text(RESULTS / "calibration_memory.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

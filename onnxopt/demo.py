"""`onnxopt demo`: the main job end to end on the two embedded digits models.

For the trained digits CNN and digits transformer (`test_models/`), on the held-out
split of the digits set shipped beside them (`test_models/digits.py`):
- `simplify`;
- `simplify,quantize`, calibrated on 256 training images;
- `simplify,prune-channels(ratio=0.3,data_aware=true,reconstruct=true)`, its recovery fitted
  on the same training images;
then one table: held-out top-1 of fp32 and of each result, the verify verdict against
fp32 (tolerances for simplify, the accuracy budget for the lossy ones), file size,
MACs, and the speed-up over fp32 at batch 64 on one thread (all models of a digits
network benched interleaved; "≈1.0x" when within the run-to-run spread). It also writes
`demo-report.html` (the CNN's int8 result against fp32, see `onnxopt report`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .api import bench, inspect, optimize_file, verify
from .data import ListFeeds, model_inputs
from .model import load_model
from .report import Table, write_text

VARIANTS = {
    "simplify": "simplify",
    "int8": "simplify,quantize",
    "pruned": "simplify,prune-channels(ratio=0.3,round_to=8,data_aware=true,reconstruct=true)",
}
CALIBRATION = 256
BATCH = 64


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from .test_models.digits import load_digits_split

    return load_digits_split()


def _feeds(model: Any, x: np.ndarray, batch: int) -> ListFeeds:
    specs = model_inputs(load_model(model))
    return ListFeeds([{specs[0].name: x[i : i + batch]} for i in range(0, len(x), batch)], specs)


def _top1(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    from .test_models.digits import top1

    return top1(model, x, y)


def run_demo(
    out_dir: str | None = None, runs: int = 50, report: str | None = "demo-report.html"
) -> tuple[list[Table], bool]:
    """The demo's tables, and whether every result passes verify."""
    from .test_models import digits

    x_train, _, x_test, y_test = _data()
    sources = {
        "digits CNN": digits.DIGITS_CNN,
        "digits transformer": Path(digits.__file__).with_name("digits_transformer.onnx"),
    }
    table = Table(
        f"Demo: held-out digits ({len(y_test)} images), speed-up at batch {BATCH}, 1 thread",
        ["model", "variant", "top-1 %", "verify", "size KB", "MACs/sample", "speed-up"],
    )
    passed = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for label, source in sources.items():
            stem = source.stem
            calib = _feeds(source, x_train[:CALIBRATION], 32)
            test = _feeds(source, x_test, 128)
            paths = {"fp32": Path(source)}
            for variant, spec in VARIANTS.items():
                if variant == "int8" and "transformer" in label:
                    spec += ",fuse-attention"  # the pipeline docs/accuracy.md measures
                paths[variant] = folder / f"{stem}.{variant}.onnx"
                optimize_file(source, paths[variant], passes=spec, data=calib, threads=1)
            batch = {model_inputs(load_model(source))[0].name: x_test[:BATCH]}
            timing = bench(
                list(paths.values()),
                labels=list(paths),
                data=ListFeeds([batch], model_inputs(load_model(source))),
                threads=1,
                runs=runs,
                warmup=5,
            )
            for variant, path in paths.items():
                if variant == "fp32":
                    verdict = "-"
                else:
                    check = verify(source, path, test, threads=1)
                    passed &= check.passed
                    verdict = ("PASS" if check.passed else "FAIL") + (
                        " (budget)" if check.lossy else " (exact)"
                    )
                summary = inspect(path)
                table.rows.append(
                    [
                        label,
                        variant,
                        f"{_top1(path, x_test, y_test):.2f}",
                        verdict,
                        f"{path.stat().st_size / 1024:.1f}",
                        f"{summary.macs:,}",
                        timing.timing(variant).speedup_text,
                    ]
                )
        if report:
            from .proof import build_report

            target = folder / report if out_dir else Path(report)
            page = build_report(
                digits.DIGITS_CNN,
                folder / "digits_cnn.int8.onnx",
                _feeds(digits.DIGITS_CNN, x_test, 128),
                title="onnxopt demo: digits CNN, int8 against fp32",
                runs=20,
                threads=1,
            )
            write_text(target, page)
            table.notes.append(f"report: {target}")
    table.notes.append(
        "verify: (exact) element-wise tolerances; (budget) cosine, SQNR and top-1/top-5 "
        "agreement with fp32; speed-up: median latency of fp32 over the variant's"
    )
    if out_dir:
        table.notes.append(f"models kept in {out_dir}")
    return [table], passed

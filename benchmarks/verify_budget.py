"""verify's lossy budget on good and deliberately broken int8 models.

For each model: `simplify,quantize` (default options) calibrated on one set of feeds, then a
broken copy with every DequantizeLinear scale halved; `verify` with no options (the
default budget, read from the metadata `optimize` wrote) compares each with the float
model on held-out feeds. Prints one row per (model, int8 good/broken): the cosine, the
SQNR, the task metric and the verdict. The default budget must pass every good model
and fail every broken one; a
`simplify,convert-fp16` copy is a third, lossy but good, candidate.

    python benchmarks/verify_budget.py [--models det,cls,digits_cnn,digits_transformer]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnxopt import api  # noqa: E402
from onnxopt.data import ListFeeds, model_inputs  # noqa: E402
from onnxopt.report import render_markdown  # noqa: E402
from onnxopt.test_models import digits, fetch, textlines  # noqa: E402
from onnxopt.verify import verify  # noqa: E402

PIPELINE = "simplify,quantize"
TEST_MODELS = Path(__file__).resolve().parents[1] / "test_models"


def halve_dequantize_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every DequantizeLinear reads a scale half as large (its own initializer)."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    inits = {t.name: t for t in broken.graph.initializer}
    for i, node in enumerate(broken.graph.node):
        if node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]) * 0.5
        name = f"{node.input[1]}.halved{i}"
        broken.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), name))
        node.input[1] = name
    return broken


def data(name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """(float model, calibration images, held-out images)."""
    if name == "det":
        from onnxopt.test_models.textpages import text_page

        calib = np.concatenate([text_page(1000 + i) for i in range(8)])
        test = np.concatenate([text_page(5000 + i) for i in range(8)])
        return fetch.fetch("ppocr_det"), calib, test
    if name == "cls":
        calib, _ = textlines.labelled_feeds(256, seed=1)
        test, _ = textlines.labelled_feeds(200, seed=2)
        return fetch.fetch("ppocr_cls"), calib, test
    x_train, _, x_test, _ = digits.load_digits_split()
    return TEST_MODELS / f"{name}.onnx", x_train[:100], x_test


def feeds(model: onnx.ModelProto, x: np.ndarray, batch: int) -> ListFeeds:
    specs = model_inputs(model)
    key = specs[0].name
    return ListFeeds([{key: x[i : i + batch]} for i in range(0, len(x), batch)], specs)


def measure(name: str, work: Path) -> list[list[object]]:
    source, calib, test = data(name)
    model = onnx.load(source)
    batch = 1 if name == "det" else 16
    good = work / f"{name}.int8.onnx"
    start = time.perf_counter()
    api.optimize_file(source, good, passes=PIPELINE, data=feeds(model, calib, batch))
    seconds = time.perf_counter() - start
    bad = work / f"{name}.broken.onnx"
    onnx.save(halve_dequantize_scales(onnx.load(good)), bad)
    half = work / f"{name}.fp16.onnx"
    api.optimize_file(source, half, passes="simplify,convert-fp16")
    rows = []
    for label, path in (("int8", good), ("int8, DQ scales halved", bad), ("fp16", half)):
        result = verify(source, path, feeds(model, test, batch))
        for out in result.outputs:
            task = result.tasks[out.name]
            rows.append(
                [
                    name,
                    label,
                    out.name,
                    task.form,
                    f"{out.cosine:.4f}",
                    f"{out.sqnr_db:.1f}",
                    task.describe(),
                    "PASS" if result.judge(out)[0] else "FAIL",
                ]
            )
    print(f"{name}: quantized in {seconds:.1f} s; {len(test)} held-out samples", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="det,cls,digits_cnn,digits_transformer")
    args = parser.parse_args()
    api.quiet_libraries()
    from onnxopt.report import Table

    table = Table(
        "verify with the default budget",
        ["model", "candidate", "output", "form", "cosine", "SQNR dB", "task metric", "verdict"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            table.rows += measure(name, Path(tmp))
    print(render_markdown([table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""onnxopt demo: simplify, quantize and prune both digits models; numbers checked independently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxopt.demo import run_demo
from onnxopt.summary import summarize
from onnxopt.test_models import digits


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[list]]:
    folder = tmp_path_factory.mktemp("demo")
    (table,), passed = run_demo(str(folder), runs=5, report=None)
    assert passed
    return folder, table.rows


def test_every_result_passes_verify_with_its_own_rule(demo) -> None:
    _, rows = demo
    assert [(r[0], r[1]) for r in rows] == [
        (m, v)
        for m in ("digits CNN", "digits transformer")
        for v in ("fp32", "simplify", "int8", "pruned")
    ]
    verdicts = {(r[0], r[1]): r[3] for r in rows}
    assert verdicts[("digits CNN", "simplify")] == "PASS (exact)"
    assert verdicts[("digits CNN", "int8")] == "PASS (budget)"
    assert verdicts[("digits transformer", "pruned")] == "PASS (budget)"


def test_accuracy_size_and_macs_are_measured_on_the_written_models(demo) -> None:
    folder, rows = demo
    x_train, _, x_test, y_test = digits.load_digits_split()
    by = {(r[0], r[1]): r for r in rows}
    for label, stem in (("digits CNN", "digits_cnn"), ("digits transformer", "digits_transformer")):
        fp32 = by[(label, "fp32")]
        assert float(fp32[2]) == pytest.approx(
            digits.top1(Path(digits.__file__).with_name(f"{stem}.onnx"), x_test, y_test), abs=0.005
        )
        for variant in ("int8", "pruned"):
            path = folder / f"{stem}.{variant}.onnx"
            row = by[(label, variant)]
            assert float(row[2]) == pytest.approx(digits.top1(path, x_test, y_test), abs=0.005)
            assert float(row[2]) >= float(fp32[2]) - 1.0  # at most a point lost
            assert float(row[4]) == pytest.approx(path.stat().st_size / 1024, abs=0.05)
            assert int(row[5].replace(",", "")) == summarize(onnx.load(path)).macs
        assert float(by[(label, "int8")][4]) < 0.6 * float(fp32[4])  # int8 weights
        assert int(by[(label, "pruned")][5].replace(",", "")) < int(fp32[5].replace(",", ""))
        assert by[(label, "fp32")][6] == "1.00x"


def test_cli_demo_writes_the_report_without_the_test_extra(tmp_path) -> None:
    # `pip install .` has none of the test extra: the demo must not reach for it.
    blocked = ["sklearn", "onnxsim", "onnxslim", "hypothesis", "pytest", "matplotlib"]
    script = (
        f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
        "from onnxopt.cli import main\nsys.exit(main(['demo', '--runs', '3', '-q']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "demo-report.html").read_text()
    assert "<section id='per-layer'>" in page and "lossy (metadata: quantize)" in page

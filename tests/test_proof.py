"""The HTML report: every section, offline, and no horizontal overflow at 1280 px in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import PassContext, optimize
from onnxopt.cli import main
from onnxopt.data import ListFeeds, model_inputs
from onnxopt.proof import SECTIONS, build_report
from onnxopt.test_models import digits

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("report")
    model = onnx.load(digits.DIGITS_CNN)
    x_train, _, x_test, _ = digits.load_digits_split()
    specs = model_inputs(model)
    calib = ListFeeds([{"image": x_train[i : i + 32]} for i in range(0, 128, 32)], specs)
    result = optimize(model, "simplify,quantize", PassContext(feeds=calib))
    test = ListFeeds([{"image": x_test[i : i + 64]} for i in range(0, 256, 64)], specs)
    page = build_report(model, result.model, test, pipeline=result, runs=6, threads=1)
    path = folder / "report.html"
    path.write_text(page)
    return path, page


def test_every_section_is_there_and_the_page_is_offline(report) -> None:
    _, page = report
    for section in SECTIONS:
        assert f"<section id='{section}'>" in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing to fetch
    assert "<style>" in page and page.count("<svg") >= 3
    # The verdict and the task metric of the quantized classifier, the passes that ran.
    assert "lossy (metadata: quantize)" in page and "top1 " in page
    assert "fuse-bn" in page and "quantize" in page
    for node in ("/0/Conv", "/3/Conv", "/7/Conv", "/14/Gemm"):
        assert node in page  # per-layer rows, by node name
    assert "QLinearConv" in page or "QLinearMatMul" in page or "QGemm" in page  # ORT's ops


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_it_without_horizontal_overflow_at_1280(report, tmp_path) -> None:
    path, page = report
    probe = tmp_path / "probe.html"
    measure = (
        "<script>document.body.setAttribute('data-width', "
        "document.documentElement.scrollWidth);"
        "document.body.setAttribute('data-sections', "
        "document.querySelectorAll('section').length)</script></body>"
    )
    probe.write_text(page.replace("</body>", measure))
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*common, "--window-size=1280,900", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    width = int(re.search(r'data-width="(\d+)"', dom).group(1))
    assert 0 < width <= 1280
    assert re.search(r'data-sections="(\d+)"', dom).group(1) == str(len(SECTIONS))
    png = tmp_path / "report.png"
    subprocess.run(
        [*common, "--window-size=1280,2000", f"--screenshot={png}", path.as_uri()],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    image = Image.open(png)
    assert image.size == (1280, 2000)
    # Not a blank page: the white section boxes and dark text both show.
    pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 80 and pixels.max() > 240


def test_report_command_writes_the_page(tmp_path) -> None:
    x = digits.load_digits_split()[2][:8]
    np.savez(tmp_path / "test.npz", image=x)
    out = tmp_path / "r.html"
    code = main(
        [
            "report",
            str(digits.DIGITS_CNN),
            str(digits.DIGITS_CNN),
            "--data",
            str(tmp_path / "test.npz"),
            "-o",
            str(out),
            "--runs",
            "3",
            "-q",
        ]
    )
    page = out.read_text()
    assert code == 0 and "lossless (no metadata)" in page and "PASS" in page
    assert "carries no onnxopt metadata" in page

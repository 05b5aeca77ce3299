"""The Python API: the CLI's argument names (data=, shape=) and errors that name them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.errors import FeedError
from onnxopt.test_models import builders


@pytest.fixture(scope="module")
def any_size(tmp_path_factory) -> Path:
    """builders.cnn with a dynamic batch, height and width (global pooling before the head)."""
    model = builders.cnn(seed=0, batch=None, size=16)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    path = tmp_path_factory.mktemp("api") / "cnn.onnx"
    onnx.save(model, path)
    return path


def test_verify_bench_and_optimize_file_take_data_and_shape(any_size: Path, tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    npz = tmp_path / "calib.npz"
    np.savez(npz, image=x)
    out = tmp_path / "q.onnx"
    result = onnxopt.optimize_file(any_size, out, passes="simplify,quantize", data=npz)
    assert result.records[-1].status == "changed"
    check = onnxopt.verify(any_size, out, data=npz)
    assert check.samples == 4 and check.passed  # by the lossy budget: the metadata says quantize
    # Random feeds: the shape as a mapping or as the CLI writes it.
    for shape in ({"image": (1, 3, 16, 16)}, "image=1x3x16x16"):
        assert onnxopt.verify(any_size, any_size, shape=shape, samples=2).outputs[0].max_abs == 0
    timing = onnxopt.bench([any_size, out], "cpu", shape={"image": (1, 3, 16, 16)}, runs=3)
    assert len(timing.timings) == 2
    summary = onnxopt.inspect(any_size, shape="image=1x3x16x16")
    assert summary.macs_unknown == 0 and summary.macs > 0


def test_errors_name_api_arguments_in_python_and_flags_on_the_command_line(any_size) -> None:
    with pytest.raises(FeedError) as err:
        onnxopt.verify(any_size, any_size)
    assert "pass shape={'image': (1, 3, N, N)} with N set" in str(err.value)
    assert "--shape" not in str(err.value)
    done = subprocess.run(
        [sys.executable, "-m", "onnxopt", "verify", str(any_size), str(any_size)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "pass --shape image=1x3xNxN with N set" in done.stderr


def test_the_core_names_are_refused_with_the_api_name(any_size) -> None:
    with pytest.raises(TypeError, match=r"takes shape= \(as --shape\), not shapes="):
        onnxopt.verify(any_size, any_size, shapes={"image": (1, 3, 16, 16)})
    with pytest.raises(TypeError, match=r"takes data= \(as --data\), not feeds="):
        onnxopt.bench([any_size], feeds="calib.npz")


def test_running_the_cli_in_process_gives_python_its_voice_back(any_size, tmp_path) -> None:
    from onnxopt.cli import main

    assert main(["verify", str(any_size), str(any_size)]) == 2  # said with --shape
    with pytest.raises(FeedError, match=r"pass shape=\{'image'"):
        onnxopt.verify(any_size, any_size)

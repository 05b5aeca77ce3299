"""The `onnxopt` command, run as a real process: happy paths and the bad-input table.

Every bad input must give one line on stderr, a non-zero exit, no output file,
and an untouched input file.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

from onnxopt.data import model_inputs
from onnxopt.runtime import available_providers
from onnxopt.test_models import builders


def onnxopt(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxopt", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(builders.cnn(batch=None, size=16), folder / "cnn.onnx")
    return folder


def external_model(folder: Path, location: str) -> Path:
    model = builders.mlp()
    path = folder / "ext.onnx"
    onnx.save_model(
        model, path, save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    stored = onnx.load(path, load_external_data=False)
    for tensor in stored.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(stored, path)
    return path


def _truncated(folder: Path) -> list[str]:
    data = (folder / "cnn.onnx").read_bytes()
    (folder / "bad.onnx").write_bytes(data[: len(data) // 3])
    return ["optimize", folder / "bad.onnx", "-o", folder / "out.onnx"]


def _not_onnx(folder: Path) -> list[str]:
    (folder / "bad.onnx").write_text("name,value\n1,2\n")
    return ["optimize", folder / "bad.onnx", "-o", folder / "out.onnx"]


def _outside(folder: Path) -> list[str]:
    external_model(folder, "../weights.bin")
    return ["optimize", folder / "ext.onnx", "-o", folder / "out.onnx"]


def _missing_external(folder: Path) -> list[str]:
    path = external_model(folder, "weights.bin")
    (folder / "weights.bin").unlink()
    return ["optimize", path, "-o", folder / "out.onnx"]


def _unknown_pass(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", folder / "out.onnx", "--passes", "fold-it"]


def _bad_option(folder: Path) -> list[str]:
    return [
        "optimize",
        folder / "cnn.onnx",
        "-o",
        folder / "out.onnx",
        "--passes",
        "fold-constants(size_threshold=big)",
    ]


def _unavailable_provider(folder: Path) -> list[str]:
    missing = next(
        p
        for p in ("cuda", "tensorrt", "openvino", "dml", "coreml")
        if p not in available_providers()
    )
    return [
        "bench",
        folder / "cnn.onnx",
        "--providers",
        f"{missing},cpu",
        "--json",
        folder / "out.json",
    ]


def _wrong_shape(folder: Path) -> list[str]:
    np.savez(folder / "feeds.npz", image=np.zeros((2, 3, 8, 8), np.float32))
    return [
        "optimize",
        folder / "cnn.onnx",
        "-o",
        folder / "out.onnx",
        "--data",
        folder / "feeds.npz",
    ]


def _wrong_dtype(folder: Path) -> list[str]:
    np.savez(folder / "feeds.npz", image=np.zeros((2, 3, 16, 16), np.float16))
    return [
        "verify",
        folder / "cnn.onnx",
        folder / "cnn.onnx",
        "--data",
        folder / "feeds.npz",
        "--json",
        folder / "out.json",
    ]


def _unknown_shape_name(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", folder / "out.onnx", "--shape", "img=1x3x8x8"]


def _misfit_shape(folder: Path) -> list[str]:
    return ["inspect", folder / "cnn.onnx", "--shape", "image=1x4x16x16"]


def _missing_folder(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", folder / "nowhere" / "out.onnx"]


def _same_path(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", folder / "cnn.onnx"]


def _optimize_json_over_input(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", folder / "o.onnx", "--json", folder / "cnn.onnx"]


def _verify_json_over_input(folder: Path) -> list[str]:
    model = folder / "cnn.onnx"
    return ["verify", model, model, "--json", model]


def _bench_markdown_over_input(folder: Path) -> list[str]:
    return ["bench", folder / "cnn.onnx", "--runs", "1", "--markdown", folder / "cnn.onnx"]


def _inspect_json_over_input(folder: Path) -> list[str]:
    return ["inspect", folder / "cnn.onnx", "--json", folder / "cnn.onnx"]


def _analyze_html_over_data(folder: Path) -> list[str]:
    np.savez(folder / "feeds.npz", image=np.zeros((2, 3, 16, 16), np.float32))
    model, data = folder / "cnn.onnx", folder / "feeds.npz"
    return ["analyze", model, model, "--data", data, "--html", data]


def _cache_over_input(folder: Path) -> list[str]:
    spec = f"quantize(cache={folder / 'cnn.onnx'})"
    return ["optimize", folder / "cnn.onnx", "-o", folder / "o.onnx", "--passes", spec]


def _output_over_external_data(folder: Path) -> list[str]:
    return ["optimize", external_model(folder, "weights.bin"), "-o", folder / "weights.bin"]


def _output_to_a_device(folder: Path) -> list[str]:
    # A private node like /dev/null (never /dev/null itself: a regression run as root
    # would replace the machine's).
    device = folder.parent / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return ["optimize", folder / "cnn.onnx", "-o", device]


def _output_to_a_fifo(folder: Path) -> list[str]:
    __import__("os").mkfifo(folder / "pipe")
    return ["optimize", folder / "cnn.onnx", "-o", folder / "pipe"]


def _output_in_proc(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", "/proc/x"]


def _name_too_long(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", folder / ("x" * 250)]


def _json_in_a_missing_folder(folder: Path) -> list[str]:
    return ["optimize", folder / "cnn.onnx", "-o", folder / "o.onnx", "--json", "nodir/r.json"]


def _json_is_a_folder(folder: Path) -> list[str]:
    (folder / "reports").mkdir()
    args = ["--json", folder / "reports"]
    return ["optimize", folder / "cnn.onnx", "-o", folder / "o.onnx", *args]


def _invalid_model(folder: Path) -> list[str]:
    model = onnx.load(folder / "cnn.onnx")
    node = onnx.helper.make_node("Transpose", [model.graph.input[0].name], ["t"], perm=[0, 9])
    model.graph.node.append(node)
    onnx.save(model, folder / "bad.onnx")
    return ["optimize", folder / "bad.onnx", "-o", folder / "o.onnx"]


def _opset_1(folder: Path) -> list[str]:
    # Valid for the onnx checker; ORT has no kernel for Relu-1.
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "old",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    opsets = [onnx.helper.make_opsetid("", 1)]
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=opsets, ir_version=8), folder / "old.onnx"
    )
    return ["optimize", folder / "old.onnx", "-o", folder / "o.onnx"]


def _offset_past_the_end(folder: Path) -> list[str]:
    path = external_model(folder, "weights.bin")
    stored = onnx.load(path, load_external_data=False)
    for entry in stored.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = str(10**9)
    onnx.save(stored, path)
    return ["optimize", path, "-o", folder / "o.onnx"]


def _option(command: str, *rest: str) -> Any:
    models = 2 if command == "verify" else 1
    return lambda folder: [command, *[folder / "cnn.onnx"] * models, *rest]


BAD_INPUTS = {
    "truncated .onnx": (_truncated, r"truncated|not a valid ONNX"),
    "not ONNX": (_not_onnx, r"not an ONNX model"),
    "external data outside the folder": (_outside, r"outside the model's folder"),
    "missing external data": (_missing_external, r"weights.bin.*missing"),
    "unknown pass": (_unknown_pass, r"unknown pass 'fold-it'; available: .*fold-constants"),
    "bad pass option": (_bad_option, r"size_threshold of 'fold-constants' expects int"),
    "unavailable provider": (_unavailable_provider, r"not available here; available: cpu"),
    "feeds of the wrong shape": (_wrong_shape, r"'image' has shape \[1, 3, 8, 8\]"),
    "feeds of the wrong dtype": (_wrong_dtype, r"'image' is float16 but the model expects"),
    "--shape of no input": (_unknown_shape_name, r"--shape names img, .*its inputs: image"),
    "--shape that does not fit": (_misfit_shape, r"--shape image=1x4x16x16 does not fit"),
    "output in a missing folder": (_missing_folder, r"folder .*nowhere does not exist"),
    "output equal to input": (_same_path, r"is the input model"),
    "optimize --json over the input": (_optimize_json_over_input, r"--json .* this run reads"),
    "verify --json over the input": (_verify_json_over_input, r"--json .* this run reads"),
    "bench --markdown over the input": (_bench_markdown_over_input, r"--markdown .*run reads"),
    "inspect --json over the input": (_inspect_json_over_input, r"--json .* this run reads"),
    "analyze --html over the data": (_analyze_html_over_data, r"--html .*feeds.npz, a file"),
    "quantize cache over the input": (_cache_over_input, r"option cache=.*this run reads"),
    "-o over the external data": (_output_over_external_data, r"weights.bin.*this run reads"),
    "-o a device": (_output_to_a_device, r"null is not a regular file"),
    "-o a FIFO": (_output_to_a_fifo, r"pipe is not a regular file"),
    "-o /proc/x": (_output_in_proc, r"cannot write output into /proc"),
    "-o a name too long": (_name_too_long, r"file name x+\.\.\. is too long"),
    "--json in a missing folder": (_json_in_a_missing_folder, r"--json folder nodir does not"),
    "--json a folder": (_json_is_a_folder, r"--json .*reports is a folder"),
    "invalid model": (_invalid_model, r"not a valid ONNX model .*Invalid attribute perm"),
    "opset 1 that ORT cannot load": (_opset_1, r"does not load in ONNX Runtime .*Relu\(1\)"),
    "external offset past the end": (_offset_past_the_end, r"reads bytes 1000000000\.\."),
    "--image-mean of 2 values": (
        _option("verify", "--image-mean", "0.5,0.5"),
        r"--image-mean: expected 3 numbers",
    ),
    "--samples -1": (_option("verify", "--samples", "-1"), r"--samples: must be at"),
    "--runs 0": (_option("bench", "--runs", "0"), r"--runs: must be at least 1, got 0"),
    "--shape beyond int64": (
        _option("inspect", "--shape", "image=99999999999999999999x4"),
        r"--shape: .*positive integer",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(model_dir: Path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    args = make(model_dir)
    before = digest(model_dir)
    result = onnxopt(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxopt: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in result.stderr
    assert digest(model_dir) == before, "inputs changed or an output file appeared"
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".onnxopt-")]


def test_usage_errors_are_one_line(model_dir: Path) -> None:
    result = onnxopt("optimize", model_dir / "cnn.onnx")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "-o/--output" in result.stderr


def test_optimize_verify_bench_inspect(model_dir: Path) -> None:
    source, output = model_dir / "cnn.onnx", model_dir / "cnn.opt.onnx"
    before = source.read_bytes()
    run = onnxopt("optimize", source, "-o", output, "--json", model_dir / "passes.json")
    assert run.returncode == 0, run.stderr
    assert source.read_bytes() == before
    report = json.loads((model_dir / "passes.json").read_text())
    assert report["nodes_after"] == len(onnx.load(output).graph.node) < report["nodes_before"]

    check = onnxopt("verify", source, output, "--samples", "3", "--json", model_dir / "v.json")
    assert check.returncode == 0, check.stderr
    metrics = json.loads((model_dir / "v.json").read_text())
    assert metrics["passed"] and metrics["samples"] == 3
    assert metrics["outputs"][0]["name"] == "logits"

    timing = onnxopt(
        "bench", source, output, "--runs", "5", "--warmup", "1", "--json", model_dir / "b.json"
    )
    assert timing.returncode == 0, timing.stderr
    rows = json.loads((model_dir / "b.json").read_text())["results"]
    assert [r["model"] for r in rows] == ["cnn.onnx", "cnn.opt.onnx"]
    assert rows[0]["speedup_vs_first"] == 1.0 and rows[1]["runs"] == 5
    assert "speed-up" in timing.stdout and "1.00x" in timing.stdout

    info = onnxopt("inspect", source, "--shape", "image=2x3x16x16", "--json", model_dir / "i.json")
    assert info.returncode == 0, info.stderr
    summary = json.loads((model_dir / "i.json").read_text())
    assert summary["nodes"] == len(onnx.load(source).graph.node)
    assert summary["ops"]["Conv"] >= 4 and summary["macs"] > 0
    # Brackets in a cell are text, not console markup: the input's dims are shown.
    declared = model_inputs(onnx.load(source))[0].describe()
    assert "[" in declared and declared in info.stdout


def test_verify_failure_exits_1(model_dir: Path) -> None:
    other = builders.cnn(seed=1, batch=None, size=16)
    onnx.save(other, model_dir / "other.onnx")
    result = onnxopt("verify", model_dir / "cnn.onnx", model_dir / "other.onnx", "--samples", "2")
    assert result.returncode == 1
    assert "FAIL" in result.stdout
    assert result.stderr.strip().splitlines() == [
        "onnxopt: error: outputs ['logits'] differ beyond rtol=0.001, atol=0.0001"
    ]


def test_passes_lists_names_and_options(tmp_path: Path) -> None:
    result = onnxopt("passes", "--json", tmp_path / "p.json")
    assert result.returncode == 0
    listing = {p["name"]: p for p in json.loads((tmp_path / "p.json").read_text())["passes"]}
    assert {"fold-constants", "simplify"} <= set(listing)
    assert listing["fold-constants"]["options"][0]["name"] == "size_threshold"


def test_passes_shows_one_pass_with_what_each_option_does(tmp_path: Path) -> None:
    result = onnxopt("passes", "quantize", "--json", tmp_path / "q.json")
    assert result.returncode == 0, result.stderr
    (item,) = json.loads((tmp_path / "q.json").read_text())["passes"]
    options = {o["name"]: o for o in item["options"]}
    assert len(options) > 20 and all(o["help"] for o in options.values())
    assert {o["group"] for o in options.values()} == {
        "kind",
        "calibration",
        "placement",
        "precision",
        "accuracy",
    }
    assert (
        options["calibrate"]["group"] == "calibration" and options["min_weights"]["default"] == 1024
    )
    # The rules (the docstring) come first, then the table with each option's line.
    assert "Precision per node" in result.stdout and "histogram bins" in result.stdout
    unknown = onnxopt("passes", "quantise")
    assert unknown.returncode == 2 and "did you mean 'quantize'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_demo_optimizes_verifies_and_benches(tmp_path: Path) -> None:
    result = onnxopt("demo", "--out-dir", tmp_path, "--runs", "5")
    assert result.returncode == 0, result.stderr
    original = onnx.load(tmp_path / "demo_cnn.onnx")
    optimized = onnx.load(tmp_path / "demo_cnn.opt.onnx")
    assert len(optimized.graph.node) < len(original.graph.node)
    assert "Verify: PASS" in result.stdout and "speed-up" in result.stdout


def test_verify_on_an_image_folder(model_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    result = onnxopt(
        "verify",
        model_dir / "cnn.onnx",
        model_dir / "cnn.onnx",
        "--data",
        images,
        "--shape",
        "image=1x3x16x16",
        "--image-mean",
        "0.5,0.5,0.5",
        "--image-std",
        "0.25,0.25,0.25",
        "--json",
        tmp_path / "v.json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "v.json").read_text())["samples"] == 3
    bad = onnxopt(
        "verify",
        model_dir / "cnn.onnx",
        model_dir / "cnn.onnx",
        "--data",
        images,
        "--shape",
        "image=1x3x16x16",
        "--image-mean",
        "half",
    )
    assert bad.returncode == 2 and "--image-mean" in bad.stderr


def test_inspect_lists_channel_groups(tmp_path: Path) -> None:
    from onnxopt.test_models.digits import DIGITS_CNN

    result = onnxopt("inspect", DIGITS_CNN, "--prune-groups", "--json", tmp_path / "i.json")
    assert result.returncode == 0, result.stderr
    groups = json.loads((tmp_path / "i.json").read_text())["channel_groups"]
    frozen = [g for g in groups if g["frozen"]]
    assert [g["classes"] for g in groups if not g["frozen"]] == [16, 32, 64, 64]
    assert len(frozen) == 1 and "graph output 'logits'" in frozen[0]["frozen"][0]
    assert "Channel groups" in result.stdout


def test_analyze_ranks_quantized_nodes(tmp_path: Path) -> None:
    from onnxopt.test_models.digits import DIGITS_CNN, load_digits_split

    np.savez(tmp_path / "calib.npz", image=load_digits_split()[0][:16])
    quantized = tmp_path / "q.onnx"
    made = onnxopt(
        "optimize",
        DIGITS_CNN,
        "-o",
        quantized,
        "--passes",
        "quantize",
        "--data",
        tmp_path / "calib.npz",
        "-q",
    )
    assert made.returncode == 0, made.stderr
    result = onnxopt(
        "analyze",
        DIGITS_CNN,
        quantized,
        "--data",
        tmp_path / "calib.npz",
        "--json",
        tmp_path / "a.json",
        "--html",
        tmp_path / "a.html",
    )
    assert result.returncode == 0, result.stderr
    layers = json.loads((tmp_path / "a.json").read_text())["layers"]
    isolated = [layer["isolated_sqnr_db"] for layer in layers]
    assert isolated == sorted(isolated) and len(layers) >= 5
    assert {"Conv", "Gemm"} <= {layer["op"] for layer in layers}
    assert "data:image/png;base64," in (tmp_path / "a.html").read_text()


def test_version_names_onnxopt_onnx_and_onnxruntime() -> None:
    result = onnxopt("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == (
        f"onnxopt 0.1.0 (onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__})"
    )


BREAKING_PASS = """
import sys
import onnx_graphsurgeon as gs
from onnxopt import PassResult, register_pass
from onnxopt.cli import main


@register_pass("t-break")
def break_it(graph: gs.Graph, ctx) -> PassResult:
    graph.nodes[0].op = "NoSuchOp"
    return PassResult(True)


sys.exit(main(sys.argv[1:]))
"""


def test_a_rollback_is_reported_on_stderr_even_with_quiet(model_dir: Path) -> None:
    """One line per rolled-back pass, whatever -q says; --strict makes it an error."""
    out = model_dir / "out.onnx"
    argv = [sys.executable, "-c", BREAKING_PASS, "optimize", str(model_dir / "cnn.onnx")]
    argv += ["-o", str(out), "--passes", "t-break,cleanup,t-break", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all("pass t-break rolled back" in line for line in lines), lines
    assert done.stdout == "" and out.exists()
    strict = subprocess.run([*argv, "--strict"], capture_output=True, text=True, timeout=300)
    assert strict.returncode != 0 and len(strict.stderr.strip().splitlines()) == 1


def test_ort_log_lines_stay_off_stderr(model_dir: Path) -> None:
    """A constant ORT fails to compute is left unfolded; ORT's own log of it is not shown."""
    nodes = [
        onnx.helper.make_node("Gather", ["table", "bad"], ["row"]),
        onnx.helper.make_node("Add", ["x", "row"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "table"),
        onnx.numpy_helper.from_array(np.array(7, np.int64), "bad"),
    ]
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        nodes, "g", [vi("x", onnx.TensorProto.FLOAT, [4])], [vi("y", onnx.TensorProto.FLOAT, [4])]
    )
    graph.initializer.extend(inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, model_dir / "bad_gather.onnx")
    done = onnxopt("optimize", model_dir / "bad_gather.onnx", "-o", model_dir / "o.onnx")
    assert done.returncode == 0, done.stderr
    assert "onnxruntime" not in done.stderr and "\x1b[" not in done.stderr, done.stderr


def test_ctrl_c_during_start_up_is_one_line(model_dir: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxopt", "inspect", str(model_dir / "cnn.onnx")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    # numpy's shared objects are mapped: the heavy imports (numpy, onnx, ORT) are under way.
    while "numpy" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["onnxopt: interrupted while starting; nothing was done"]
    assert stdout == ""


def test_import_is_light_and_keeps_the_function_names() -> None:
    code = (
        "import sys, onnxopt\n"
        "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules\n"
        "import onnxopt.verify, onnxopt.bench\n"
        "assert callable(onnxopt.verify) and callable(onnxopt.bench), 'functions, not modules'\n"
        "from onnxopt import OutputError, optimize_file, verify\n"
        "assert callable(verify)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

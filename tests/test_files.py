"""Where outputs may go (onnxopt.files): collisions with inputs, non-regular targets,
folders, unwritable places, file-size limits, and temporary folders left by killed runs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt.api import optimize_file
from onnxopt.calibration import calibrate
from onnxopt.errors import OutputError
from onnxopt.files import HOST_TAG, TEMP_PREFIX, check_outputs, protected, remove_stale
from onnxopt.model import save_model
from onnxopt.test_models import builders


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(builders.cnn(batch=None, size=16), path)
    return path


def test_report_or_output_over_an_input_is_refused_before_any_pass(
    cnn: Path, tmp_path: Path
) -> None:
    before = sha(cnn)
    (tmp_path / "hard.onnx").hardlink_to(cnn)
    (tmp_path / "soft.json").symlink_to(cnn)
    ran: list[str] = []
    for output, reports in [
        (tmp_path / "o.onnx", {"--json": cnn}),
        (tmp_path / "o.onnx", {"--json": tmp_path / "soft.json"}),  # symlink to the input
        (tmp_path / "hard.onnx", {}),  # hard link to the input
        (tmp_path / "o.onnx", {"--json": tmp_path / "o.onnx"}),  # two outputs, one file
    ]:
        with pytest.raises(OutputError, match="this run reads|input model|same file"):
            optimize_file(
                cnn,
                output,
                reports=reports,
                progress=lambda label, done, total: ran.append(label),
            )
    assert ran == [], "a pass ran before the paths were checked"
    assert sha(cnn) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "hard.onnx", "soft.json"]


def test_quantize_cache_over_the_input_or_its_data_is_refused(cnn: Path, tmp_path: Path) -> None:
    image = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", image=image)
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    for victim in (cnn, tmp_path / "calib.npz"):
        with pytest.raises(OutputError, match=f"cache={victim}.*this run reads"):
            optimize_file(
                cnn,
                tmp_path / "q.onnx",
                passes=f"quantize(cache={victim})",
                data=tmp_path / "calib.npz",
            )
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before
    # A writer deep inside a pass, called without the run's arguments, refuses too.
    model = onnx.load(cnn)
    with protected([cnn]), pytest.raises(OutputError, match="calibration cache"):
        calibrate(model, [{"image": image[:1]}], ["image"], cache=cnn)
    assert sha(cnn) == before["cnn.onnx"]


def test_non_regular_targets_are_refused_and_a_folder_means_a_folder(
    cnn: Path, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "pipe")
    targets = [tmp_path / "pipe"]
    with contextlib.suppress(PermissionError):  # a private /dev/null: never the machine's
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        targets.append(tmp_path / "null")
    for target in targets:
        with pytest.raises(OutputError, match="not a regular file"):
            optimize_file(cnn, target)
        assert not target.is_file()
    for target in targets:
        target.unlink()
    with pytest.raises(OutputError, match="folder .*nowhere does not exist"):
        optimize_file(cnn, f"{tmp_path}/nowhere/")
    assert not (tmp_path / "nowhere").exists()
    out = tmp_path / "out"
    out.mkdir()
    for spelled in (out, f"{out}/"):
        optimize_file(cnn, spelled)
        assert sorted(p.name for p in out.iterdir()) == ["cnn.onnx"]
        onnx.checker.check_model(onnx.load(out / "cnn.onnx"), full_check=True)
    with pytest.raises(OutputError, match="is the input model"):
        optimize_file(cnn, tmp_path)  # its own folder: the input's name is the input


def test_unwritable_places_are_refused_before_any_pass(cnn: Path, tmp_path: Path) -> None:
    ran: list[str] = []
    cases = {
        "/proc/x.onnx": "cannot write output into /proc",
        tmp_path / ("x" * 250 + ".onnx"): "too long",
    }
    for target, message in cases.items():
        with pytest.raises(OutputError, match=message):
            optimize_file(cnn, target, progress=lambda *a: ran.append(a[0]))
    with pytest.raises(OutputError, match="--json folder .*nodir does not exist"):
        check_outputs({"--json": tmp_path / "nodir" / "r.json"})
    with pytest.raises(OutputError, match="--json .* is a folder"):
        check_outputs({"--json": tmp_path})
    assert ran == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(cnn: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write output"):
            optimize_file(cnn, folder / "o.onnx")
    finally:
        folder.chmod(0o755)


SAVE_UNDER_LIMIT = """
import resource, sys
import onnx
from onnxopt.errors import OnnxoptError
from onnxopt.model import save_model
model = onnx.load(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_model(model, sys.argv[2], external_data=sys.argv[3] == "external")
except OnnxoptError as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_a_file_size_limit_gives_one_line_and_no_partial_file(tmp_path: Path, layout: str) -> None:
    source = tmp_path / "src" / "mlp.onnx"
    source.parent.mkdir()
    onnx.save(builders.cnn(batch=None, size=16), source)  # ~30 KB, over the 4 KB limit
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.onnx").write_bytes(b"previous")
    result = subprocess.run(
        [sys.executable, "-c", SAVE_UNDER_LIMIT, source, out / "old.onnx", layout],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert "File too large" in result.stdout and "ulimit -f" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["old.onnx"]
    assert (out / "old.onnx").read_bytes() == b"previous"


# Pauses the model's rename into place (a real file write, paused) and says so.
SLOW_SAVE = """
import os, sys, time
real_replace = os.replace
def paused(src, dst):
    if str(dst).endswith("out.onnx"):
        print("writing", flush=True)
        time.sleep(60)
    real_replace(src, dst)
os.replace = paused
from onnxopt.launch import main
sys.exit(main(sys.argv[1:]))
"""


def _start_slow_save(cnn: Path, out: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, "optimize", str(cnn), "-o", str(out / "out.onnx")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "writing", process.stderr.read()
    temps = [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(temps) == 1 and temps[0].is_dir()
    return process


def test_sigterm_while_writing_leaves_nothing(cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    process = _start_slow_save(cnn, out)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines() == ["onnxopt: terminated; no partial file was left"]
    assert list(out.iterdir()) == []


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(
    cnn: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    process = _start_slow_save(cnn, out)
    process.kill()
    process.communicate(timeout=60)
    (stale,) = out.iterdir()
    assert stale.name.startswith(f"{TEMP_PREFIX}{process.pid}-{HOST_TAG}-")
    kept = [
        f"{TEMP_PREFIX}{os.getpid()}-{HOST_TAG}-live",  # a live process's folder
        f"{TEMP_PREFIX}{process.pid}-0badc0de-x",  # a dead pid, but of another host
    ]
    for name in kept:
        (out / name).mkdir()
    save_model(onnx.load(cnn), out / "next.onnx")
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, "next.onnx"])


def test_stale_cleanup_removes_only_our_folders_of_dead_processes(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = f"{dead.pid}-{HOST_TAG}"
    (tmp_path / f".onnxopt-{tag}-file").write_text("a file, not our folder")
    for name in (".onnxopt-notapid", f"onnxopt-{tag}-x", f".onnxopt-{tag}-x"):
        (tmp_path / name).mkdir()
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".onnxopt-notapid", f"onnxopt-{tag}-x", f".onnxopt-{tag}-file"]
    )

"""A built wheel, installed into a fresh virtual environment, works: CLI, passes, test models.

The venv sees the already-installed dependencies through a plain path entry
(no site-dir processing), so the editable install of the checkout cannot
shadow the wheel, and the test needs no network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from onnxopt import list_passes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy: a stale build/ folder in the checkout must not hide a
    # module that the package list forgets.
    source = work / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis"
        ),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(work),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:] or built.stdout[-2000:]
    (wheel,) = work.glob("onnxopt-*.whl")
    env = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--quiet",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return env


def test_wheel_holds_the_core_the_passes_and_the_test_models(wheel_env: Path) -> None:
    python = wheel_env / "bin" / "python"
    code = (
        "import json, onnxopt, onnxopt.passes, onnxopt.test_models.builders as b;"
        "from onnxopt.test_models import digits;"
        "print(json.dumps([onnxopt.__file__, onnxopt.passes.__file__, b.__file__,"
        " digits.DIGITS_CNN.is_file()]))"
    )
    out = subprocess.run(
        [python, "-c", code], check=True, capture_output=True, text=True, cwd=wheel_env
    )
    core, passes, builders, has_model = json.loads(out.stdout)
    for path in (core, passes, builders):
        assert Path(path).is_relative_to(wheel_env), path
    assert has_model


def test_wheel_cli_finds_the_passes_and_runs_the_demo(wheel_env: Path, tmp_path: Path) -> None:
    cli = wheel_env / "bin" / "onnxopt"
    listing = subprocess.run(
        [cli, "passes", "--json", tmp_path / "p.json"], capture_output=True, text=True, cwd=tmp_path
    )
    assert listing.returncode == 0, listing.stderr
    names = {p["name"] for p in json.loads((tmp_path / "p.json").read_text())["passes"]}
    assert names == {p["name"] for p in list_passes()}, "the wheel lacks passes of the checkout"
    demo = subprocess.run(
        [cli, "demo", "--runs", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert demo.returncode == 0, demo.stderr
    assert "PASS (budget)" in demo.stdout and "FAIL" not in demo.stdout

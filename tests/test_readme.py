"""The README's walk-through, API and custom-pass examples run exactly as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxopt.pass_api import unregister_pass
from onnxopt.test_models import builders

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {marker}"
    return match.group(1)


def test_custom_pass_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    model = builders.cnn()
    assert sum(n.op_type == "Dropout" for n in model.graph.node) == 1
    onnx.save(model, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        exec(compile(readme_block("readme-custom-pass"), "README.md", "exec"), namespace)
    finally:
        unregister_pass("remove-dropout")
    result = namespace["result"]
    assert capsys.readouterr().out.strip() == "{'dropout_removed': 1}"
    assert not [n for n in result.model.graph.node if n.op_type == "Dropout"]
    assert len(result.model.graph.node) == len(model.graph.node) - 1
    assert [o.name for o in result.model.graph.output] == ["logits"]


def test_setup_commands_are_what_ci_runs() -> None:
    text = README.read_text()
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", text, re.S).group(1)
    install, tests = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert install.endswith("&& onnxopt demo")
    ci = (README.parent / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert install.split(" && ")[0] in ci


def readme_commands(marker: str) -> list[str]:
    """The commands of the bash block after `marker`, comments dropped, run with this Python."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(marker) :], re.S).group(1)
    commands = []
    for line in block.splitlines():
        command = line.split("  #")[0].strip()
        if command and not command.startswith("#"):
            program, _, rest = command.partition(" ")
            runner = {"python": [sys.executable], "onnxopt": [sys.executable, "-m", "onnxopt"]}
            commands.append(" ".join(shlex.quote(p) for p in runner[program]) + " " + rest)
    return commands


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    folder = tmp_path_factory.mktemp("walkthrough")
    done = [
        subprocess.run(["bash", "-c", c], cwd=folder, capture_output=True, text=True, timeout=600)
        for c in readme_commands("readme-walkthrough")
    ]
    return folder, done


def test_every_walkthrough_command_runs_and_says_what_the_readme_says(walkthrough) -> None:
    folder, done = walkthrough
    assert len(done) == 8
    for result in done:
        assert result.returncode == 0, (result.args, result.stderr)
        assert "Traceback" not in result.stderr
    inspect, verify, bench, report = done[1], done[4], done[5], done[6]
    assert "unknown" not in inspect.stdout  # MACs counted at the --shape given
    assert "unknown" not in done[3].stdout  # and, when optimizing with data, at its size
    assert "Verify: PASS" in verify.stdout and "lossy (metadata: quantize)" in verify.stdout
    assert "map IoU" in verify.stdout
    assert all(name in bench.stdout for name in ("det.onnx", "det.opt.onnx", "det.int8.onnx"))
    int8 = onnx.load(folder / "det.int8.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) > 10
    page = (folder / "report.html").read_text()
    assert "<script src=" not in page and "Verify" in page and report.returncode == 0


def test_api_example_runs_on_the_walkthrough_files(walkthrough, monkeypatch, capsys) -> None:
    folder, _ = walkthrough
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(readme_block("readme-api"), "README.md", "exec"), namespace)
    result, check, summary = namespace["result"], namespace["check"], namespace["summary"]
    assert check.passed and check.samples == 4
    assert result.records[-1].name == "quantize" and result.records[-1].status == "changed"
    assert summary.macs_unknown == 0 and summary.macs > 0
    printed = capsys.readouterr().out.split()
    assert printed[:3] == [str(result.nodes_before), str(result.nodes_after), "True"]

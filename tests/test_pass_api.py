"""Pass API: registration of classes and functions, typed options, spec parsing, plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Annotated, Literal

import onnx_graphsurgeon as gs
import pytest

from onnxopt import Group, Pass, PassContext, PassError, PassResult, parse_spec, register_pass
from onnxopt.pass_api import (
    Option,
    available_passes,
    get_pass,
    reload_plugins,
    unregister_pass,
)


@pytest.fixture
def toy_passes():
    @register_pass
    class Scale(Pass):
        """Multiply nothing; exists to carry typed options."""

        name = "toy-scale"
        ratio: float = 0.5
        round_to: int = 1
        mode: Literal["uniform", "global"] = "uniform"
        protect: list[str] = []
        strict_names: bool = False

        def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
            return PassResult(changed=False)

    @register_pass("toy-count")
    def toy_count(graph: gs.Graph, ctx: PassContext, *, limit: int = 3) -> PassResult:
        """Count nodes up to a limit."""
        return PassResult(changed=False, stats={"counted": min(len(graph.nodes), limit)})

    yield
    unregister_pass("toy-scale")
    unregister_pass("toy-count")


def test_spec_parses_names_options_and_groups(toy_passes) -> None:
    steps = parse_spec(
        "toy-count, toy-scale(ratio=0.3,round_to=8,mode=global,protect=a|b*),"
        "{toy-count(limit=5),toy-scale}"
    )
    assert [type(s).__name__ for s in steps] == ["toy_count", "Scale", "Group"]
    scale = steps[1]
    assert (scale.ratio, scale.round_to, scale.mode, scale.protect) == (
        0.3,
        8,
        "global",
        ["a", "b*"],
    )
    group = steps[2]
    assert isinstance(group, Group) and group.steps[0].limit == 5 and group.steps[1].ratio == 0.5
    assert repr(scale) == "toy-scale(ratio=0.3,round_to=8,mode=global,protect=['a', 'b*'])"


def test_lists_in_brackets_read_like_python(toy_passes) -> None:
    (step,) = parse_spec("toy-scale(protect=[conv*, head],ratio=0.25)")
    assert step.protect == ["conv*", "head"] and step.ratio == 0.25
    (step,) = parse_spec("toy-scale(protect=[])")
    assert step.protect == []


def test_list_defaults_are_not_shared_between_instances(toy_passes) -> None:
    first = get_pass("toy-scale")()
    first.protect.append("edited")
    assert get_pass("toy-scale")().protect == []


def test_options_carry_their_help_and_group() -> None:
    @register_pass
    class Helped(Pass):
        """A pass whose options say what they do."""

        name = "toy-helped"
        level: Annotated[int, Option("how hard to try", "effort")] = 2
        plain: bool = True

        def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
            return PassResult(changed=False)

    @register_pass("toy-helped-fn")
    def helped_fn(
        graph: gs.Graph, ctx: PassContext, *, limit: Annotated[int, Option("at most")] = 3
    ) -> PassResult:
        """Count nothing."""
        return PassResult(changed=False)

    try:
        level, plain = get_pass("toy-helped").options()
        assert (level.type, level.default, level.help, level.group) == (
            int,
            2,
            "how hard to try",
            "effort",
        )
        assert (plain.type, plain.help) == (bool, "")
        assert parse_spec("toy-helped(level=5)")[0].level == 5
        (limit,) = get_pass("toy-helped-fn").options()
        assert (limit.type, limit.help) == (int, "at most")
        assert parse_spec("toy-helped-fn(limit=7)")[0].limit == 7
    finally:
        unregister_pass("toy-helped")
        unregister_pass("toy-helped-fn")


def test_function_pass_runs_with_its_options(toy_passes) -> None:
    graph = gs.Graph(nodes=[gs.Node("Relu") for _ in range(7)])
    (step,) = parse_spec("toy-count(limit=5)")
    assert step.run(graph, PassContext()).stats == {"counted": 5}
    assert get_pass("toy-count").summary() == "Count nodes up to a limit."


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-pass", r"unknown pass 'no-such-pass'; available: .*fold-constants"),
        ("toy-scael", r"unknown pass 'toy-scael' \(did you mean 'toy-scale'\?\)"),
        ("toy-scale(ratoi=0.3)", r"no option 'ratoi' \(did you mean 'ratio'\?\); options: ratio,"),
        ("toy-scale(ratio=abc)", r"option ratio of 'toy-scale' expects float, got 'abc'"),
        ("toy-scale(round_to=2.5)", r"option round_to of 'toy-scale' expects int"),
        ("toy-scale(mode=random)", r"expects uniform\|global"),
        ("toy-scale(strict_names=maybe)", r"expects bool"),
        ("toy-scale(ratio)", r"must be key=value"),
        (
            "toy-scale(protect=a,b)",
            r"option 'b' .* a list goes in brackets: toy-scale\(exclude_ops",
        ),
        ("toy-scale(protect=[a,b)", r"unbalanced '\[' or '\]'"),
        ("toy-scale(ratio=0.3", r"unclosed '\('"),
        ("{toy-count", r"unclosed '\{'"),
        ("", r"empty pass spec"),
    ],
)
def test_bad_specs_fail_with_what_is_valid(toy_passes, spec: str, message: str) -> None:
    with pytest.raises(PassError, match=message):
        parse_spec(spec)


def test_names_must_be_kebab_case_and_unique(toy_passes) -> None:
    with pytest.raises(PassError, match="kebab-case"):
        register_pass("Bad_Name")(lambda graph, ctx: PassResult(False))

    class Other(Pass):
        """Another pass."""

        name = "toy-count"

    with pytest.raises(PassError, match="already registered"):
        register_pass(Other)


def test_function_options_need_defaults() -> None:
    def needs(graph: gs.Graph, ctx: PassContext, *, level: int) -> PassResult:
        return PassResult(False)

    with pytest.raises(PassError, match="needs a default"):
        register_pass("toy-needs")(needs)


def test_simplify_group_expands_to_a_repeated_group() -> None:
    (group,) = parse_spec("simplify")
    assert isinstance(group, Group) and group.repeat
    assert "fold-constants" in [s.name for s in group.steps]
    with pytest.raises(PassError, match="takes no options"):
        parse_spec("simplify(level=2)")


def test_entry_point_plugins_are_discovered(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "site"
    package.mkdir()
    (package / "toy_plugin.py").write_text(
        textwrap.dedent('''
        from onnxopt import Pass, PassResult

        class CountRelu(Pass):
            """Count Relu nodes."""

            threshold: int = 0

            def run(self, graph, ctx):
                n = sum(node.op == "Relu" for node in graph.nodes)
                return PassResult(False, {"relu": n})
    ''')
    )
    dist = package / "toy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[onnxopt.passes]\ncount-relu = toy_plugin:CountRelu\nbroken-plugin = toy_plugin:Nope\n"
    )
    monkeypatch.syspath_prepend(str(package))
    try:
        reload_plugins()
        passes = available_passes()
        assert "count-relu" in passes and "broken-plugin" not in passes
        (step,) = parse_spec("count-relu(threshold=2)")
        graph = gs.Graph(nodes=[gs.Node("Relu"), gs.Node("Relu"), gs.Node("Add")])
        assert step.run(graph, PassContext()).stats == {"relu": 2}
    finally:
        unregister_pass("count-relu")
        sys.modules.pop("toy_plugin", None)

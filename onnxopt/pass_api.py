"""What every pass, built-in or custom, is written against.

A pass is either a `Pass` subclass whose annotated class attributes are its
options, or a function `f(graph, ctx, *, option=default, ...)` decorated with
`@register_pass("name")`. Either way it receives a `gs.Graph` and a
`PassContext`, edits the graph in place (or returns a new one) and returns a
`PassResult` that says whether anything changed, with counts.

Passes are found in three places: the built-ins (`onnxopt.passes`), the
entry-point group `onnxopt.passes` of installed packages, and anything
registered at run time. A spec string such as
`fold-constants,prune-channels(ratio=0.3,round_to=8)` names passes with
options; `{a,b}` repeats a group until no pass in it changes the graph.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import logging
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from .errors import OnnxoptError, PassError, arg
from .options import Option, OptionSpec, coerce, did_you_mean, option_spec, type_name

ENTRY_POINT_GROUP = "onnxopt.passes"
# How a pass that needs data says where it comes from (`data_hint()` in the user's words).
DATA_SOURCES = "a .npz file, a folder of them, or a folder of images"


def data_hint() -> str:
    """`pass --data (...)` on the command line, `pass data= (...)` in Python."""
    return f"pass {arg('data')} ({DATA_SOURCES})"


MAX_REPEAT = 10

log = logging.getLogger("onnxopt")


@dataclass
class PassContext:
    """What a pass may need beyond the graph.

    `feeds` is a re-iterable source of input dicts (calibration data), `providers`
    short execution-provider names, `shapes` bindings for dynamic input dims.
    """

    feeds: Any = None
    providers: Sequence[str] = ("cpu",)
    threads: int | None = None
    seed: int = 0
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    model_dir: Path | None = None
    cache_dir: Path | None = None
    logger: logging.Logger = field(default_factory=lambda: log)
    # Long loops report (label, done, total) here; the CLI draws a bar from it.
    progress: Callable[[str, int, int | None], None] | None = None

    def report(self, label: str, done: int, total: int | None) -> None:
        """Tell whoever watches how far a long loop (calibration, reconstruction) is."""
        if self.progress is not None:
            self.progress(label, done, total)
        elif total and (done == total or done % max(1, total // 10) == 0):
            self.logger.info("%s: %d/%d", label, done, total)


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, counts, and notes for the user."""

    changed: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    graph: gs.Graph | None = None


class Pass:
    """Base of class-based passes. Annotated class attributes are the options."""

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        specs = {o.name: o for o in self.options()}
        for key, value in options.items():
            if key not in specs:
                raise PassError(
                    f"pass '{self.name}' has no option '{key}'{did_you_mean(key, list(specs))}; "
                    f"options: {', '.join(specs) or 'none'} (onnxopt passes {self.name})"
                )
            setattr(self, key, coerce(self.name, specs[key], value))
        for key, spec in specs.items():
            if key not in options:
                # A copy: a list default is never shared between instances.
                setattr(self, key, copy.copy(spec.default))

    @classmethod
    def options(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls, include_extras=True)
        specs = []
        for klass in reversed(cls.__mro__):
            for key in getattr(klass, "__annotations__", {}):
                if key.startswith("_") or typing.get_origin(hints[key]) is ClassVar:
                    continue
                if hints[key] is ClassVar or key in {s.name for s in specs}:
                    continue
                specs.append(option_spec(key, hints[key], getattr(cls, key, None)))
        return specs

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def option_values(self) -> dict[str, Any]:
        return {o.name: getattr(self, o.name) for o in self.options()}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return self.run(graph, ctx)

    def __repr__(self) -> str:
        defaults = {o.name: o.default for o in self.options()}
        opts = ",".join(f"{k}={v}" for k, v in self.option_values().items() if v != defaults[k])
        return f"{self.name}({opts})" if opts else self.name


@dataclass
class Group:
    """Passes run in order, repeated until none of them changes the graph."""

    steps: list[Pass | Group]
    repeat: bool = True
    max_rounds: int = MAX_REPEAT

    def __repr__(self) -> str:
        return "{" + ",".join(repr(s) for s in self.steps) + "}"


Step = Pass | Group

_REGISTRY: dict[str, type[Pass]] = {}
_ALIASES: dict[str, tuple[str, str]] = {}
_discovered = False


def register_pass(target: Any = None, *, name: str | None = None, replace: bool = False) -> Any:
    """Register a pass class or function.

    Use as `@register_pass` on a Pass subclass with a `name`, or as
    `@register_pass("kebab-name")` on a function `f(graph, ctx, *, opt=default)`.
    """
    if isinstance(target, str):
        return lambda obj: register_pass(obj, name=target, replace=replace)
    if target is None:
        return lambda obj: register_pass(obj, name=name, replace=replace)
    cls = target if isinstance(target, type) else _function_pass(target, name)
    pass_name = name or cls.name
    _check_name(pass_name)
    cls.name = pass_name
    if not replace and pass_name in _REGISTRY and _REGISTRY[pass_name] is not cls:
        existing = _REGISTRY[pass_name]
        if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise PassError(f"a pass named '{pass_name}' is already registered: pick another name")
    _REGISTRY[pass_name] = cls
    return target


def register_group(name: str, spec: str, summary: str) -> None:
    """Register a name that stands for a spec, such as `simplify` for `{a,b,c}`."""
    _check_name(name)
    _ALIASES[name] = (spec, summary)


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)
    _ALIASES.pop(name, None)


def _check_name(name: str | None) -> None:
    if not name or name != name.lower() or " " in name or "_" in name:
        raise PassError(f"pass name {name!r} must be kebab-case, such as 'remove-dropout'")


def _function_pass(func: Callable[..., PassResult], name: str | None) -> type[Pass]:
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)
    params = list(sig.parameters.values())
    if len(params) < 2 or params[0].kind == params[0].KEYWORD_ONLY:
        raise PassError(f"pass function {func.__name__} must take (graph, ctx, *, options...)")
    annotations: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for param in params[2:]:
        if param.default is param.empty:
            raise PassError(f"option '{param.name}' of {func.__name__} needs a default value")
        annotations[param.name] = hints.get(param.name, type(param.default))
        defaults[param.name] = param.default

    def run(self: Pass, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return func(graph, ctx, **self.option_values())

    namespace = {
        "__annotations__": annotations,
        "__doc__": func.__doc__,
        "__module__": func.__module__,
        "__qualname__": func.__qualname__,
        "name": name or func.__name__.replace("_", "-"),
        "run": run,
        **defaults,
    }
    return types.new_class(func.__name__, (Pass,), {}, lambda ns: ns.update(namespace))


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("onnxopt.passes")
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("could not load pass plugin %s (%s): %s", ep.name, ep.value, exc)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass):
            if ep.name not in _REGISTRY:
                register_pass(obj, name=ep.name)
        elif callable(obj) and ep.name not in _REGISTRY:
            register_pass(obj, name=ep.name)


def reload_plugins() -> None:
    """Look for entry-point passes again (after installing a plugin in a running process)."""
    global _discovered
    _discovered = False
    _discover()


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (built-ins, plugins, run-time registrations)."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def available_groups() -> dict[str, tuple[str, str]]:
    _discover()
    return dict(sorted(_ALIASES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        valid = sorted([*passes, *_ALIASES])
        raise PassError(
            f"unknown pass '{name}'{did_you_mean(name, valid)}; available: {', '.join(valid)}"
        )
    return passes[name]


# ---- spec parsing -------------------------------------------------------------------------


def parse_spec(spec: str) -> list[Step]:
    """Parse `a,b(k=v,k2=v2),{c,d}` into pass instances and repeated groups."""
    _discover()
    text = spec.strip()
    if not text:
        raise PassError("empty pass spec: name at least one pass, such as 'simplify'")
    steps, pos = _parse_list(text, 0, closing=None)
    if pos != len(text):
        raise PassError(f"unexpected '{text[pos:]}' in pass spec '{spec}'")
    return steps


def _parse_list(text: str, pos: int, closing: str | None) -> tuple[list[Step], int]:
    steps: list[Step] = []
    while True:
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == "{":
            inner, pos = _parse_list(text, pos + 1, closing="}")
            steps.append(Group(inner))
        else:
            start = pos
            while pos < len(text) and text[pos] not in ",(){}":
                pos += 1
            name = text[start:pos].strip()
            if not name:
                raise PassError(f"missing pass name at position {start} of '{text}'")
            options: dict[str, str | list[str]] = {}
            pos = _skip(text, pos)
            if pos < len(text) and text[pos] == "(":
                end = text.find(")", pos)
                if end < 0:
                    raise PassError(f"unclosed '(' after '{name}' in pass spec '{text}'")
                options = _parse_options(name, text[pos + 1 : end])
                pos = end + 1
            steps.extend(_instantiate(name, options))
        pos = _skip(text, pos)
        if pos >= len(text):
            if closing:
                raise PassError(f"unclosed '{{' in pass spec '{text}'")
            return steps, pos
        if text[pos] == ",":
            pos += 1
            continue
        if closing and text[pos] == closing:
            return steps, pos + 1
        raise PassError(f"unexpected '{text[pos]}' at position {pos} of pass spec '{text}'")


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _parse_options(name: str, body: str) -> dict[str, str | list[str]]:
    """`k=v,k2=[a,b]` into a dict; a list is in brackets (or `|`-separated: `k2=a|b`)."""
    options: dict[str, str | list[str]] = {}
    for part in filter(None, (p.strip() for p in _split_top(body, name))):
        key, sep, value = part.partition("=")
        if not sep:
            raise PassError(
                f"option '{part}' of '{name}' must be key=value; "
                f"a list goes in brackets: {name}(exclude_ops=[Conv,Mul])"
            )
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            options[key.strip()] = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        else:
            options[key.strip()] = value
    return options


def _split_top(body: str, name: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            break
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    if depth != 0:
        raise PassError(f"unbalanced '[' or ']' in the options of '{name}': '{body}'")
    return [*parts, body[start:]]


def _instantiate(name: str, options: dict[str, str | list[str]]) -> list[Step]:
    if name in _ALIASES and name not in _REGISTRY:
        if options:
            raise PassError(f"'{name}' stands for '{_ALIASES[name][0]}' and takes no options")
        return parse_spec(_ALIASES[name][0])
    return [get_pass(name)(**options)]


def describe_pass(cls: type[Pass]) -> dict[str, Any]:
    return {
        "name": cls.name,
        "summary": cls.summary(),
        "description": inspect.getdoc(cls) or "",
        "options": [dataclasses.asdict(o) | {"type": type_name(o.type)} for o in cls.options()],
    }


__all__ = [
    "data_hint",
    "ENTRY_POINT_GROUP",
    "Group",
    "OnnxoptError",
    "Option",
    "OptionSpec",
    "Pass",
    "PassContext",
    "PassResult",
    "Step",
    "available_groups",
    "available_passes",
    "describe_pass",
    "did_you_mean",
    "get_pass",
    "parse_spec",
    "register_group",
    "register_pass",
    "reload_plugins",
    "unregister_pass",
]

"""Typed pass options: what each option is (name, type, default, help, group) and how a
spec string's value becomes that type.

An option is an annotated class attribute of a Pass (or a keyword-only argument of a
pass function); `Annotated[int, Option("what it does", "group")]` adds its help line.
Values from a spec are text (`ratio=0.3`, `exclude_ops=[Conv,Mul]`); values from the
API are Python objects; both go through `coerce`.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from .errors import PassError


@dataclass(frozen=True)
class Option:
    """What an option does, for `onnxopt passes NAME`: `x: Annotated[int, Option("...")] = 1`.

    `group` gathers the options of a pass with many (calibration, placement, ...).
    """

    help: str
    group: str = ""


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any
    default: Any
    help: str = ""
    group: str = ""

    def describe(self) -> str:
        return f"{self.name}: {type_name(self.type)} = {self.default!r}"


def option_spec(name: str, hint: Any, default: Any) -> OptionSpec:
    """The spec of one option; an `Annotated[type, Option(...)]` hint gives its help."""
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        info = next((e for e in extras if isinstance(e, Option)), Option(""))
        return OptionSpec(name, base, default, info.help, info.group)
    return OptionSpec(name, hint, default)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def coerce(pass_name: str, spec: OptionSpec, value: Any) -> Any:
    """Turn a spec-string value (or a Python value from the API) into the option's type."""
    try:
        return _coerce(spec.type, value)
    except (TypeError, ValueError):
        raise PassError(
            f"option {spec.name} of '{pass_name}' expects {type_name(spec.type)}, got {value!r}"
        ) from None


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise ValueError(value)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        items = value.split("|") if isinstance(value, str) else list(value)
        return [_coerce(item, v.strip() if isinstance(v, str) else v) for v in items if v != ""]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, int):
            return value
        text = str(value).replace("_", "")
        number = float(text)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if tp is Any or callable(value) and not isinstance(value, str):
        return value
    return tp(value)

"""Every figure in a generated section of BENCHMARKS.md comes from committed JSON.

A section opts in with a marker line under its heading, naming the JSON files that a
script wrote (paths from the repository root, comma-separated):

    <!-- figures: benchmarks/results/calibration_memory.json -->

The section runs to the next heading of the same or a higher level, or to a sub-heading
that carries a marker of its own (its own section). Its figures are
the numbers in its table rows (lines starting with `|`, header and separator rows
left out). A figure is found when some number in the named JSON (a number value, or
a number written inside a string value, such as the Markdown table a script stores)
prints the same at the figure's own precision. Sections without a marker are not
checked (other engineers' sections adopt the marker when their script writes JSON).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*figures:\s*(.+?)\s*-->")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def sections(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(heading, JSON paths, table rows) for each section that carries a marker."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = MARKER.search(line)
        if not match:
            continue
        start = max(j for j in range(i + 1) if lines[j].startswith("#"))
        level = len(lines[start]) - len(lines[start].lstrip("#"))
        rows = []
        body = lines[i + 1 :]
        for k, row in enumerate(body):
            if row.startswith("#") and (
                len(row) - len(row.lstrip("#")) <= level
                or (k + 1 < len(body) and MARKER.search(body[k + 1]))
            ):
                break
            following = body[k + 1].strip() if k + 1 < len(body) else ""
            if _is_row(row) and not _is_separator(row) and not _is_separator(following):
                rows.append(row.strip())
        paths = [p.strip() for p in match.group(1).split(",")]
        found.append((lines[start], paths, rows))
    return found


def _is_row(line: str) -> bool:
    return line.strip().startswith("|")


def _is_separator(line: str) -> bool:
    return bool(re.fullmatch(r"\|[\s|:-]+\|", line.strip()))


def figures(row: str) -> list[str]:
    return NUMBER.findall(row.replace("**", ""))


def json_numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        return [float(n) for n in NUMBER.findall(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in json_numbers(v)]
    return []


def printed_same(figure: str, number: float) -> bool:
    decimals = len(figure.split(".")[1]) if "." in figure and "e" not in figure.lower() else 0
    if "e" in figure.lower():
        return abs(float(figure) - number) <= 1e-9 * max(1.0, abs(number))
    return f"{number:.{decimals}f}" == f"{float(figure):.{decimals}f}"


def unmatched(rows: list[str], numbers: list[float]) -> list[str]:
    known = set(numbers)
    missing = []
    for row in rows:
        for figure in figures(row):
            if float(figure) in known or any(printed_same(figure, n) for n in numbers):
                continue
            missing.append(f"{figure} in {row}")
    return missing


def test_every_figure_of_a_marked_section_is_in_its_committed_json() -> None:
    marked = sections((ROOT / "BENCHMARKS.md").read_text())
    assert marked, "BENCHMARKS.md has no section marked <!-- figures: ... -->"
    for heading, paths, rows in marked:
        assert rows, f"{heading}: marked but holds no table rows"
        numbers: list[float] = []
        for path in paths:
            file = ROOT / path
            assert file.is_file(), f"{heading}: {path} is not committed"
            numbers += json_numbers(json.loads(file.read_text()))
        assert not unmatched(rows, numbers), (heading, unmatched(rows, numbers))


@pytest.mark.parametrize(
    ("row", "numbers", "ok"),
    [
        ("| 16 | 613 | 2.26× |", [16.0, 612.9, 2.2641], True),
        ("| 16 | 613 | 2.26× |", [16.0, 612.9, 2.2], False),  # 2.26 typed by hand
        ("| digits | 99.63 / 99.5 % |", [99.6289, 99.5], True),
        ("| digits | 99.63 |", [99.6], False),
    ],
)
def test_a_figure_must_print_the_same_at_its_precision(row, numbers, ok) -> None:
    assert (not unmatched([row], numbers)) is ok


def test_sections_end_at_the_next_heading_of_their_level() -> None:
    text = "\n".join(
        [
            "## A",
            "<!-- figures: a.json -->",
            "| n | MB |",
            "|---|---|",
            "| 16 | 613 |",
            "### sub",
            "| 64 | 700 |",
            "## B",
            "| 1 | 2 |",
        ]
    )
    ((heading, paths, rows),) = sections(text)
    assert heading == "## A" and paths == ["a.json"]
    assert rows == ["| 16 | 613 |", "| 64 | 700 |"]

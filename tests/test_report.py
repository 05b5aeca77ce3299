"""Tables for people: numbers, times and widths as a person reads them."""

from __future__ import annotations

import io
import re

from rich.console import Console

from onnxopt.report import Table, fmt, fmt_duration, render_terminal


def test_numbers_read_at_a_glance() -> None:
    assert fmt(10440.3) == "10,440" and fmt(1_171_841) == "1,171,841" and fmt(672) == "672"
    assert fmt(5447.25) == "5447" and fmt(0.99875) == "0.9988"
    assert fmt(1.2e-7) == "1.200e-07"  # a real error figure keeps its digits
    assert fmt(None) == "-" and fmt(True) == "yes" and fmt(float("inf")) == "inf"


def test_times_are_in_one_unit_with_three_significant_digits() -> None:
    assert fmt_duration(6.169e-4) == "0.617 ms"
    assert fmt_duration(0.0451) == "45.1 ms"
    assert fmt_duration(1.2345) == "1.23 s"
    assert fmt_duration(208.4) == "208 s"


def test_a_wide_table_fits_80_columns_and_keeps_numbers_whole() -> None:
    table = Table("Passes", ["pass", "nodes", "time", "stats"])
    stats = ", ".join(f"statistic_{i}=0.{i}" for i in range(12))
    table.rows.append(["quantize(calibrate=entropy,percentile=99.99)", 1_171_841, 12345.6, stats])
    out = io.StringIO()
    render_terminal([table], Console(file=out, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("1,171,841" in line for line in lines)  # not broken over two lines
    assert any("12,346" in line for line in lines)
    assert len([line for line in lines if re.search(r"statistic_\d", line)]) > 1  # text wraps

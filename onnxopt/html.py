"""The one HTML report: a self-contained page of sections, tables and inline SVG charts.

Nothing is fetched: the CSS, the script that sorts a table when its header is clicked,
and the charts (SVG drawn here, no plotting library) are all in the file, so it opens
offline and can be mailed or attached to a CI run. The page fits 1280 px: long names
wrap, and a table wider than the page scrolls inside its own box.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .report import Table, fmt

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;
background:#f5f6f8}
main{max-width:1240px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:0 0 8px}
h3{font-size:14px;margin:12px 0 6px}
nav{margin:6px 0 14px;display:flex;flex-wrap:wrap;gap:6px}
nav a{background:#e3e8f0;border-radius:4px;padding:2px 8px;color:#1d2430;text-decoration:none}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 14px;margin:12px 0}
.box{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e6e9ee;padding:3px 8px;text-align:left;vertical-align:top;
overflow-wrap:break-word}
th{background:#f0f2f5;cursor:pointer;position:sticky;top:0}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{color:#17702f;font-weight:600}.fail{color:#b3261e;font-weight:600}
ul.notes{margin:6px 0 0;padding-left:18px;color:#4a5568;font-size:12.5px}
svg{max-width:100%;height:auto;display:block}
.verdict{font-size:16px;margin:4px 0 8px}
"""

SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.from(body.rows), asc = th.dataset.asc !== '1';
    rows.sort(function(a, b){
      var x = a.cells[i].dataset.v ?? a.cells[i].textContent;
      var y = b.cells[i].dataset.v ?? b.cells[i].textContent;
      var p = parseFloat(x), q = parseFloat(y);
      var c = (isNaN(p) || isNaN(q)) ? x.localeCompare(y) : p - q;
      return asc ? c : -c;
    });
    th.dataset.asc = asc ? '1' : '0';
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


@dataclass
class Section:
    id: str
    title: str
    tables: list[Table] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)  # inline SVG
    lead: str = ""  # a line of HTML-escaped text above the tables
    verdict: bool | None = None


def _breakable(text: str) -> str:
    """Escaped text with break chances inside long tokens (dims, dotted node names)."""
    out = []
    for token in re.split(r"(\s+)", text):
        token = html.escape(token)
        if len(token) > 24:
            token = re.sub(r"([./_\]\[x:,])", r"\1<wbr>", token)
        out.append(token)
    return "".join(out)


def _cell(value: object) -> str:
    text = html.escape(fmt(value))
    if isinstance(value, bool) or value is None:
        return f"<td>{text}</td>"
    if isinstance(value, int | float):
        number = value if math.isfinite(value) else (1e300 if value > 0 else -1e300)
        return f'<td class="n" data-v="{number!r}">{text}</td>'
    low = text.lower()
    if low == "pass" or low.startswith("pass"):
        return f'<td class="pass">{text}</td>'
    if low.startswith("fail"):
        return f'<td class="fail">{text}</td>'
    return f"<td>{_breakable(fmt(value))}</td>"


def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return (
        f"<h3>{html.escape(table.title)}</h3><div class='box'><table class='sortable'>"
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
        + (f"<ul class='notes'>{notes}</ul>" if notes else "")
    )


def bar_chart(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    unit: str = "",
    width: int = 1180,
    max_bars: int = 40,
) -> str:
    """Horizontal bars, one group per label (names on the left, readable), as inline SVG.

    Non-finite values are drawn at the longest bar and labelled "inf". At most
    `max_bars` labels are drawn (the caller orders them, worst first).
    """
    labels = list(labels)[:max_bars]
    colors = ["#3b6fd4", "#e08a2c", "#3a9b5c", "#9b59b6"]
    names = list(series)
    finite = [v for s in series.values() for v in list(s)[: len(labels)] if math.isfinite(v)] or [
        1.0
    ]
    low, high = min(0.0, min(finite)), max(0.0, max(finite))
    span = (high - low) or 1.0
    label_w, row_h, bar_h, top = 330, 6 + 12 * len(names), 11, 44
    plot_w = width - label_w - 70
    height = top + row_h * len(labels) + 16

    def x(v: float) -> float:
        v = high if not math.isfinite(v) and v > 0 else (low if not math.isfinite(v) else v)
        return label_w + (v - low) / span * plot_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" font-family="system-ui,sans-serif" font-size="11">',
        f'<text x="4" y="16" font-size="13" font-weight="600">{html.escape(title)}</text>',
    ]
    for i, name in enumerate(names):
        out.append(
            f'<rect x="{label_w + 160 * i}" y="24" width="10" height="10" fill="{colors[i % 4]}"/>'
            f'<text x="{label_w + 14 + 160 * i}" y="33">{html.escape(name)}</text>'
        )
    zero = x(0.0)
    out.append(f'<line x1="{zero}" y1="{top - 4}" x2="{zero}" y2="{height - 12}" stroke="#888"/>')
    for row, label in enumerate(labels):
        y0 = top + row * row_h
        short = label if len(label) <= 48 else label[:22] + "…" + label[-25:]
        out.append(
            f'<text x="{label_w - 6}" y="{y0 + row_h / 2 + 3}" text-anchor="end">'
            f"<title>{html.escape(label)}</title>{html.escape(short)}</text>"
        )
        for i, name in enumerate(names):
            value = list(series[name])[row]
            a, b = sorted((zero, x(value)))
            y = y0 + 3 + i * 12
            text = fmt(value) + unit if math.isfinite(value) else "inf"
            out.append(
                f'<rect x="{a:.1f}" y="{y}" width="{max(b - a, 1):.1f}" height="{bar_h}" '
                f'fill="{colors[i % 4]}"><title>{html.escape(label)}: {text}</title></rect>'
                f'<text x="{b + 4:.1f}" y="{y + 9}" fill="#333">{html.escape(text)}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def render_page(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    nav = "".join(f"<a href='#{s.id}'>{html.escape(s.title)}</a>" for s in sections)
    body = []
    for s in sections:
        parts = [f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>"]
        if s.verdict is not None:
            word, cls = ("PASS", "pass") if s.verdict else ("FAIL", "fail")
            parts.append(f"<div class='verdict'><span class='{cls}'>{word}</span></div>")
        if s.lead:
            parts.append(f"<p>{html.escape(s.lead)}</p>")
        parts += [table_html(t) for t in s.tables]
        parts += [f"<div class='box'>{svg}</div>" for svg in s.charts]
        parts.append("</section>")
        body.append("".join(parts))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav>"
        + "".join(body)
        + f"</main><script>{SCRIPT}</script></body></html>"
    )

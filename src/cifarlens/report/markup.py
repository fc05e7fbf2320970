"""HTML building blocks of the report and ``compare``: escaping, embedded images, tables, numbers.

Everything that comes from a run goes through :func:`esc` (``html.escape`` with quotes).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["duration", "esc", "flatten", "flops_text", "img", "note", "params_text", "pct", "table"]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{esc(css)}"' if css else ""
    return f'<img{cls} src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.2f} h"


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], *, numeric: Sequence[int] = (),
          row_class: Sequence[str] | None = None, css: str = "") -> str:
    """An HTML table (no header row when ``headers`` is None); every cell is escaped.
    Columns in ``numeric`` are right-aligned."""
    head = f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr></thead>" if headers else ""
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(row_class[i])}"' if row_class and row_class[i] else ""
        cells = "".join(f'<td class="num">{esc(c)}</td>' if j in numeric else f"<td>{esc(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    cls = f' class="{esc(css)}"' if css else ""
    return f"<table{cls}>{head}<tbody>{''.join(body)}</tbody></table>"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists and nested dicts inside values become JSON."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (dict, list, tuple)):
            out[name] = json.dumps(value, sort_keys=True, default=str)
        else:
            out[name] = value
    return out


def params_text(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def flops_text(flops: float | None) -> str:
    if flops is None:
        return "—"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOPs"
    return f"{flops:.3g} FLOPs"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'

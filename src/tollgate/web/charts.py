"""Server-rendered SVG charts (no JavaScript, no library): one bar per day."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from decimal import Decimal
from typing import Any

from markupsafe import Markup, escape

__all__ = ["bar_chart"]

_W, _H = 760, 180
_PAD_L, _PAD_B, _PAD_T = 92, 22, 8


def bar_chart(
    points: Sequence[dict[str, Any]],
    value: str,
    *,
    label: str,
    fmt: Callable[[Any], str],
) -> Markup:
    """Bars of ``points[i][value]`` per ``points[i]["day"]``, with a y-axis maximum, day
    labels at the ends and a tooltip (``<title>``) per bar. ``label`` names the chart for
    screen readers."""
    values = [Decimal(str(p[value] or 0)) for p in points]
    top = max(values, default=Decimal(0))
    width = _W - _PAD_L
    height = _H - _PAD_B - _PAD_T
    n = max(len(points), 1)
    step = width / n
    bar = max(step * 0.8, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(label)}"'
        ' xmlns="http://www.w3.org/2000/svg">',
        f'<line class="axis" x1="{_PAD_L}" y1="{_PAD_T + height}" x2="{_W}"'
        f' y2="{_PAD_T + height}"/>',
        f'<text class="tick" x="{_PAD_L - 6}" y="{_PAD_T + 10}" text-anchor="end">'
        f"{escape(fmt(top))}</text>",
        f'<text class="tick" x="{_PAD_L - 6}" y="{_PAD_T + height}" text-anchor="end">0</text>',
    ]
    for i, (point, amount) in enumerate(zip(points, values, strict=True)):
        h = 0.0 if top == 0 else float(amount / top) * height
        x = _PAD_L + i * step + (step - bar) / 2
        y = _PAD_T + height - h
        day: date = point["day"]
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}">'
            f"<title>{escape(day.isoformat())}: {escape(fmt(amount))}</title></rect>"
        )
    if points:
        first, last = points[0]["day"], points[-1]["day"]
        parts.append(
            f'<text class="tick" x="{_PAD_L}" y="{_H - 6}">{escape(first.isoformat())}</text>'
        )
        parts.append(
            f'<text class="tick" x="{_W}" y="{_H - 6}" text-anchor="end">'
            f"{escape(last.isoformat())}</text>"
        )
    parts.append("</svg>")
    # Every value above went through escape(); the rest is this function's own markup.
    return Markup("".join(parts))  # noqa: S704

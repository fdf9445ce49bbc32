"""The run's metrics plot: reward gain vs KL to the reference, one point per policy method, as a small SVG.

Written by hand rather than with matplotlib, which is not a dependency of the product (only of the benchmarks).
The report artifact shows it inline through the file server (Prefect 3.8's image artifact only prints its URL).
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

WIDTH, HEIGHT, MARGIN = 560, 360, 56
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min([*values, 0.0]), max([*values, 0.0])
    pad = (high - low) * 0.1 or 1.0
    return low - pad, high + pad


def metrics_svg(policy: dict[str, dict[str, Any]], title: str) -> str | None:
    """SVG of reward_gain (y) against kl (x) per method; None when no method has both numbers."""
    points = [(method, _finite(row.get("kl")), _finite(row.get("reward_gain"))) for method, row in policy.items()]
    points = [(method, x, y) for method, x, y in points if x is not None and y is not None]
    if not points:
        return None
    (x0, x1), (y0, y1) = _span([p[1] for p in points]), _span([p[2] for p in points])

    def sx(x: float) -> float:
        return MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)

    def sy(y: float) -> float:
        return HEIGHT - MARGIN - (y - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for x in _ticks(x0, x1):
        out.append(f'<line x1="{sx(x):.1f}" y1="{MARGIN}" x2="{sx(x):.1f}" y2="{HEIGHT - MARGIN}" stroke="#eee"/>'
                   f'<text x="{sx(x):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{x:.3g}</text>')
    for y in _ticks(y0, y1):
        out.append(f'<line x1="{MARGIN}" y1="{sy(y):.1f}" x2="{WIDTH - MARGIN}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<text x="{MARGIN - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    out += [f'<line x1="{MARGIN}" y1="{sy(0):.1f}" x2="{WIDTH - MARGIN}" y2="{sy(0):.1f}" stroke="#999" '
            'stroke-dasharray="4 3"/>',
            f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">KL(policy || reference) per answer, '
            'nats</text>',
            f'<text x="14" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 14 {HEIGHT / 2})">'
            'reward gain over the reference</text>']
    for i, (method, x, y) in enumerate(points):
        color = COLORS[i % len(COLORS)]
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{color}"><title>{escape(method)}: '
                   f'gain {y:.3g}, KL {x:.3g}</title></circle>'
                   f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 6:.1f}" fill="{color}">{escape(method)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

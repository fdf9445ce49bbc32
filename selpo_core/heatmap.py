"""Token-reward heatmap: one self-contained HTML file (inline CSS, no script, no external assets).

Each pair is shown with chosen and rejected side by side; every response token is its own text
(`text[offset_start:offset_end]`, an empty span such as EOS shown as a symbol) on a diverging background:
red for negative reward, white for 0, green for positive. The scale is symmetric around 0 and saturates at a
robust maximum (the 95th percentile of |reward| over the tokens shown), so a few outliers do not wash out
every other token. Selected tokens get a dark outline and bold text. Hovering a token shows its exact reward
(and the true reward, when the rows carry `true_rewards`). All text goes through `html.escape`.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EOS_SYMBOL = "\u23ce"  # ⏎: the response's last token with an empty span (EOS)
EMPTY_SYMBOL = "\u2205"  # ∅: any other token with an empty span (a special token inside the text)
SCALE_PERCENTILE = 95.0

# Ends of the diverging scale (ColorBrewer RdYlGn-like ends, light enough for black text on top).
_NEGATIVE = (215, 48, 39)
_POSITIVE = (26, 152, 80)
_MAX_ALPHA = 0.85  # a saturated token still keeps black text readable

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; background: #fafafa; }
h1 { font-size: 1.3em; }
.legend { display: flex; align-items: center; gap: .6em; margin: .5em 0 1.5em; font-size: .9em; }
.bar { width: 260px; height: 14px; border: 1px solid #999;
       background: linear-gradient(to right, rgb(215,48,39), #fff, rgb(26,152,80)); }
.pair { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em;
        margin-bottom: 1em; }
.pair-head { font-size: .8em; color: #666; margin-bottom: .4em; font-family: monospace; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.side-head { font-size: .8em; font-weight: 600; color: #444; margin-bottom: .3em; }
.resp { white-space: pre-wrap; line-height: 1.9; font-family: ui-monospace, monospace; font-size: .9em; }
.t { border-radius: 3px; padding: 1px 0; }
.sel { outline: 2px solid #111; outline-offset: -1px; font-weight: 700; }
.special { color: #666; }
"""


def _color(reward: float, scale: float) -> str:
    """Background of a token: white at 0, towards red (negative) or green (positive), saturating at scale."""
    if not math.isfinite(reward):
        return "rgb(160,160,160)"
    v = max(-1.0, min(1.0, reward / scale))
    end = _POSITIVE if v > 0 else _NEGATIVE
    a = abs(v) * _MAX_ALPHA
    r, g, b = (round(255 + (c - 255) * a) for c in end)
    return f"rgb({r},{g},{b})"


def robust_scale(rows: Sequence[dict[str, Any]], percentile: float = SCALE_PERCENTILE) -> float:
    """The |reward| at which colours saturate: a percentile of |reward| over all tokens, never 0."""
    values = [abs(float(x)) for row in rows for x in row["rewards"] if math.isfinite(float(x))]
    if not values:
        return 1.0
    scale = float(np.percentile(values, percentile))
    if scale <= 0:  # e.g. almost all rewards exactly 0: fall back to the largest, then to 1
        scale = max(values) or 1.0
    return scale


def _token_label(text: str, start: int, end: int, is_last: bool) -> tuple[str, bool]:
    """(visible text of a token, whether it is a placeholder symbol for an empty span)."""
    if end > start:
        return text[start:end], False
    return (EOS_SYMBOL if is_last else EMPTY_SYMBOL), True


def _tooltip(row: dict[str, Any], i: int) -> str:
    # 9 significant digits print a float32 exactly, so the tooltip is the stored value, not a rounding.
    parts = [f"reward {float(row['rewards'][i]):+.9g}"]
    if row.get("true_rewards") is not None:
        parts.append(f"true reward {float(row['true_rewards'][i]):+.6g}")
    if row.get("log_ratio") is not None:
        parts.append(f"log-ratio {float(row['log_ratio'][i]):+.6g}")
    if row.get("token_ids") is not None:
        parts.append(f"token id {int(row['token_ids'][i])}")
    if row.get("selected") is not None and row["selected"][i]:
        parts.append("selected")
    return " | ".join(parts)


def _response_html(row: dict[str, Any], scale: float) -> str:
    text = str(row.get("text", ""))
    starts, ends, rewards = row["offset_start"], row["offset_end"], row["rewards"]
    if not len(starts) == len(ends) == len(rewards):
        raise ValueError(
            f"example {row.get('example_id')} {row.get('side')}: {len(rewards)} rewards but "
            f"{len(starts)}/{len(ends)} offsets"
        )
    selected = row.get("selected")
    out: list[str] = []
    cursor = 0
    for i, (start, end) in enumerate(zip(starts, ends)):
        start, end = int(start), int(end)
        if start > cursor:  # text between tokens (usually spaces) keeps the response's own layout
            out.append(html.escape(text[cursor:start]))
        label, special = _token_label(text, start, end, i == len(starts) - 1)
        classes = (
            "t" + (" sel" if selected is not None and selected[i] else "") + (" special" if special else "")
        )
        style = f"background:{_color(float(rewards[i]), scale)}"
        title = html.escape(_tooltip(row, i), quote=True)
        out.append(f'<span class="{classes}" style="{style}" title="{title}">{html.escape(label)}</span>')
        cursor = max(cursor, end)
    if cursor < len(text):  # a tail no token covers (e.g. a truncated response)
        out.append(html.escape(text[cursor:]))
    return "".join(out)


def _side_html(row: dict[str, Any] | None, side: str, scale: float) -> str:
    if row is None:
        return f'<div><div class="side-head">{side}: (missing)</div></div>'
    rewards = [float(x) for x in row["rewards"]]
    summary = f"{side}: {len(rewards)} tokens, reward sum {sum(rewards):+.4g}"
    if row.get("selected") is not None:
        summary += f", {sum(bool(s) for s in row['selected'])} selected"
    if row.get("true_rewards") is not None:
        summary += f", true reward sum {sum(float(x) for x in row['true_rewards']):+.4g}"
    return (
        f'<div><div class="side-head">{html.escape(summary)}</div>'
        f'<div class="resp">{_response_html(row, scale)}</div></div>'
    )


def _group_pairs(rows: Sequence[dict[str, Any]], max_examples: int) -> list[tuple[str, dict[str, dict]]]:
    """Rows grouped by example_id in order of first appearance, at most `max_examples` examples."""
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        example_id = str(row["example_id"])
        if example_id not in groups:
            if len(groups) >= max_examples:
                continue
            groups[example_id] = {}
        groups[example_id][str(row["side"])] = row
    return list(groups.items())


def _legend(scale: float) -> str:
    # Not class "t": the sample is no token of the data.
    sample = f'<span class="sel" style="background:{_color(scale, scale)}">selected</span>'
    return (
        '<div class="legend">'
        f'<span>{-scale:+.3g}</span><div class="bar"></div><span>{scale:+.3g}</span>'
        f"<span>reward, colour saturates at the {SCALE_PERCENTILE:g}th percentile of |reward| "
        f"({scale:.3g}); red: lower, green: higher; hover a token for its exact value.</span>"
        f"<span>{sample} outlined: a selected token. {EOS_SYMBOL} end of sequence.</span>"
        "</div>"
    )


def write_heatmap(rows: list[dict[str, Any]], out_path: Path, *, title: str, max_examples: int = 40) -> Path:
    """Write the HTML heatmap of the first `max_examples` pairs of `rows` (score-table row dicts with
    optional `selected: list[bool]` and `true_rewards: list[float]`) to `out_path`; return the path."""
    groups = _group_pairs(rows, max_examples)
    shown = [row for _, sides in groups for row in sides.values()]
    scale = robust_scale(shown)
    body = []
    for example_id, sides in groups:
        extra = [s for s in sides if s not in ("chosen", "rejected")]  # unexpected sides are shown, not lost
        cells = "".join(_side_html(sides.get(side), side, scale) for side in ("chosen", "rejected", *extra))
        body.append(
            f'<div class="pair"><div class="pair-head">example {html.escape(example_id)}</div>'
            f'<div class="sides">{cells}</div></div>'
        )
    n_total = len({str(row["example_id"]) for row in rows})
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p>{len(groups)} of {n_total} examples shown.</p>\n"
        f"{_legend(scale)}\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Temp + rename (a reader never sees half a page); explicit UTF-8, whatever the locale says.
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out_path)
    return out_path


__all__ = ["write_heatmap", "robust_scale", "EOS_SYMBOL"]

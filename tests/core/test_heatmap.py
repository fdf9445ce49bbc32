"""Heatmap: every token's text appears escaped, colours follow the reward sign, markup is well formed."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from selpo_core.heatmap import EOS_SYMBOL, robust_scale, write_heatmap

VOID = {"meta", "br", "img", "link", "input", "hr"}


class _Collector(HTMLParser):
    """Checks nesting and collects every token span (class "t") with its attributes and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tokens: list[dict[str, Any]] = []
        self.external: list[str] = []
        self._in_token: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in ("script", "link", "img", "iframe") or "src" in attributes:
            self.external.append(tag)
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "span" and "t" in (attributes.get("class") or "").split() and self._in_token is None:
            self._in_token = {**attributes, "text": "", "depth": len(self.stack)}

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        if self._in_token is not None and self._in_token["depth"] == len(self.stack):
            self.tokens.append(self._in_token)
            self._in_token = None
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self._in_token is not None:
            self._in_token["text"] += data


def _row(example_id: str, side: str, words: list[str], rewards: list[float], **extra: Any) -> dict[str, Any]:
    text = " ".join(words)
    starts, ends, pos = [], [], 0
    for word in words:
        starts.append(pos)
        ends.append(pos + len(word))
        pos += len(word) + 1
    starts.append(len(text))  # EOS: empty span at the end
    ends.append(len(text))
    return {"example_id": example_id, "side": side, "text": text, "offset_start": starts, "offset_end": ends,
            "token_ids": list(range(len(rewards))), "rewards": rewards, **extra}  # fmt: skip


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return [
        _row("ex<1>", "chosen", ["good", "<b>bold</b>", "a&b"], [1.5, 0.25, 0.0, 0.125],
             selected=[True, False, False, True], true_rewards=[1.0, 0.0, 0.0, 0.0]),
        _row("ex<1>", "rejected", ['"quoted"', "bad", "it's"], [-0.5, -2.0, 0.0, 0.3333333],
             selected=[False, True, False, False], true_rewards=[0.0, -1.0, 0.0, 0.0]),
        _row("ex2", "chosen", ["x"], [0.0, 0.0]),
        _row("ex2", "rejected", ["y", "z"], [0.1, -0.1, 0.0]),
    ]  # fmt: skip


def _parse(path: Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    collector.close()
    return collector


def _expected_labels(row: dict[str, Any]) -> list[str]:
    spans = zip(row["offset_start"], row["offset_end"])
    return [row["text"][s:e] if e > s else EOS_SYMBOL for s, e in spans]


def test_tokens_escaped_selected_marked_well_formed(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = write_heatmap(rows, tmp_path / "sub" / "heat.html", title="Scores <&> test")
    page = out.read_text(encoding="utf-8")
    parsed = _parse(out)
    assert not parsed.errors and not parsed.stack, (parsed.errors, parsed.stack)
    assert not parsed.external  # self-contained: no script, stylesheet link or image
    # Raw markup from the data never reaches the page; its escaped form does.
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "Scores &lt;&amp;&gt; test" in page and "ex&lt;1&gt;" in page
    # Every token, in order, with its exact text (EOS as the symbol).
    assert [t["text"] for t in parsed.tokens] == [label for row in rows for label in _expected_labels(row)]
    rewards = [r for row in rows for r in row["rewards"]]
    selected = [s for row in rows for s in row.get("selected", [False] * len(row["rewards"]))]
    for token, reward, is_selected in zip(parsed.tokens, rewards, selected, strict=True):
        assert f"reward {reward:+.9g}" in token["title"]
        assert ("sel" in token["class"].split()) == is_selected
    assert "true reward -1" in parsed.tokens[5]["title"]  # the "bad" token of the rejected response
    assert page.count('class="t sel') == sum(selected)


def _rgb(style: str) -> tuple[int, int, int]:
    match = re.search(r"rgb\((\d+),(\d+),(\d+)\)", style)
    assert match, style
    r, g, b = (int(x) for x in match.groups())
    return r, g, b


def test_colours_diverge_around_zero(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    parsed = _parse(write_heatmap(rows, tmp_path / "heat.html", title="t"))
    by_reward = dict(zip([r for row in rows for r in row["rewards"]], parsed.tokens))
    positive, negative, zero = (_rgb(by_reward[v]["style"]) for v in (1.5, -2.0, 0.0))
    assert zero == (255, 255, 255)
    assert positive[1] > positive[0] and positive[1] > positive[2]  # green
    assert negative[0] > negative[1] and negative[0] > negative[2]  # red
    # Saturation is capped: the two largest |rewards| both sit at or beyond the robust max.
    small = _rgb(by_reward[0.125]["style"])
    assert sum(small) > sum(positive)


def test_robust_scale_ignores_outliers() -> None:
    rows = [{"rewards": [0.1] * 99 + [1000.0]}]
    assert robust_scale(rows) == pytest.approx(0.1)
    assert robust_scale([{"rewards": [0.0, 0.0]}]) == 1.0
    assert robust_scale([{"rewards": [0.0] * 99 + [2.0]}]) == 2.0


def test_max_examples_and_bad_rows(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    parsed = _parse(write_heatmap(rows, tmp_path / "one.html", title="t", max_examples=1))
    assert len(parsed.tokens) == len(rows[0]["rewards"]) + len(rows[1]["rewards"])
    assert "1 of 2 examples shown" in (tmp_path / "one.html").read_text(encoding="utf-8")
    broken = dict(rows[0], rewards=[1.0])
    with pytest.raises(ValueError, match="1 rewards but 4/4 offsets"):
        write_heatmap([broken], tmp_path / "bad.html", title="t")

"""Scoring's progress bar works with tqdm disabled (TQDM_DISABLE=1, as the benchmarks and quiet CI set it)."""

from __future__ import annotations

import functools

import pytest

from selpo_core import scoring


def test_disabled_bar_still_has_its_description(monkeypatch: pytest.MonkeyPatch) -> None:
    # TQDM_DISABLE=1 is read when tqdm is imported; a disabled bar is what it makes.
    monkeypatch.setattr(scoring, "tqdm", functools.partial(scoring.tqdm, disable=True))
    bar = scoring._bar(100, "scoring[rank 1]")
    assert bar.disable and bar.desc == "scoring[rank 1]"

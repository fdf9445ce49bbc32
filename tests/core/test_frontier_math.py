"""The frontier benchmark's reading of reward at matched KL (benchmarks/frontier.py): upper envelope from the
reference, linear interpolation, no extrapolation past a method's largest KL."""

from __future__ import annotations

import pytest

from benchmarks.frontier import at_kl, frontier, matched


def rows(points: list[tuple[float, float]], method: str = "m", seed: int = 0) -> list[dict]:
    return [{"task": "t", "method": method, "seed": seed, "kl": kl, "reward_gain": gain} for kl, gain in points]


def test_envelope_keeps_only_points_that_gain_more_at_more_kl() -> None:
    envelope = frontier(rows([(4.0, 1.0), (1.0, 0.5), (2.0, 0.2), (8.0, 3.0), (6.0, -1.0)]))
    assert envelope == [(0.0, 0.0), (1.0, 0.5), (4.0, 1.0), (8.0, 3.0)]


def test_reward_at_matched_kl_interpolates_and_never_extrapolates() -> None:
    envelope = [(0.0, 0.0), (1.0, 0.5), (4.0, 1.0), (8.0, 3.0)]
    assert at_kl(envelope, 0.5, reached=8.0) == pytest.approx(0.25)
    assert at_kl(envelope, 2.0, reached=8.0) == pytest.approx(0.5 + 0.5 / 3)
    assert at_kl(envelope, 8.0, reached=8.0) == pytest.approx(3.0)
    assert at_kl(envelope, 10.0, reached=8.0) is None
    # A point past the last rise still counts as reached: its budget allows the best point below it.
    assert at_kl([(0.0, 0.0), (1.0, 0.5)], 5.0, reached=6.0) == pytest.approx(0.5)


def test_matched_table_per_method_and_seed() -> None:
    table = matched(rows([(1.0, 1.0), (10.0, 4.0)], "a") + rows([(2.0, 0.5)], "b", seed=1))
    assert table[("t", "a", 0)][5.0] == pytest.approx(1.0 + 3.0 * 4 / 9)
    assert table[("t", "b", 1)][1.0] == pytest.approx(0.25) and table[("t", "b", 1)][5.0] is None


def test_wins_count_only_seeds_where_dpo_reaches_the_kl() -> None:
    from benchmarks.frontier import _wins

    table = matched(rows([(1.0, 1.0), (10.0, 4.0)], "sepo") + rows([(2.0, 0.5)], "dpo")
                    + rows([(1.0, 2.0)], "sepo", seed=1) + rows([(1.0, 3.0)], "dpo", seed=1))
    assert _wins(table, "t", "sepo", 1.0, seeds=2) == [1, 2]  # seed 0: 1.0 > 0.25; seed 1: 2.0 < 3.0
    assert _wins(table, "t", "sepo", 5.0, seeds=2) == [0, 0]  # DPO never got there: no comparison, no win

"""TIS-DPO token weights: hand cases, and the official per-response transforms on identical inputs.

`official_*` are small reference computations written from reading exlaw/TIS-DPO (`token_weight_estimation.py`
for the raw score, `preference_datasets.py` for `rank_based_transform`, `threshold_and_scale_transform`,
`binary_weight_transform` and the negation of chosen weights); they work on one Python list per response.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from selpo_core.token_weights import binary_weights, clamp_scale_weights, rank_weights, tis_dpo_scores

T, F = True, False


def padded(rows: list[list[float]], pad: float = math.nan) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [N, L] values (junk `pad` off the mask) and the mask."""
    length = max(len(r) for r in rows)
    values = torch.full((len(rows), length), pad)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        values[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return values, mask


def rows_of(weights: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [weights[i][mask[i]].tolist() for i in range(len(mask))]


def test_scores_are_oriented_per_side() -> None:
    pos = torch.tensor([[-1.0, -2.0]])
    neg = torch.tensor([[-3.0, -0.5]])
    # Chosen: log pi_pos - log pi_neg (a token the DPO oracle likes more is important).
    assert tis_dpo_scores(pos, neg, side="chosen").tolist() == [[2.0, -1.5]]
    # Rejected: log pi_neg - log pi_pos (a token the reverse oracle likes more is important).
    assert tis_dpo_scores(pos, neg, side="rejected").tolist() == [[-2.0, 1.5]]
    with pytest.raises(ValueError, match="side"):
        tis_dpo_scores(pos, neg, side="both")  # type: ignore[arg-type]


def test_rank_weights_hand_case() -> None:
    scores, mask = padded([[3.0, 1.0, 2.0], [2.0, 2.0, 1.0], [5.0], [-math.inf, 0.0, 4.0, 1.0, 2.0]])
    weights = rank_weights(scores, mask, min_weight=0.7, max_weight=1.3)
    got = rows_of(weights, mask)
    # Row 0: ranks 2, 0, 1. Row 1: ties by position (the earlier 2.0 ranks lower): ranks 1, 2, 0.
    # Row 2: one token -> the midpoint. Row 3: ranks 0, 1, 4, 2, 3 over n - 1 = 4 steps of 0.15.
    expected = [[1.3, 0.7, 1.0], [1.0, 1.3, 0.7], [1.0], [0.7, 0.85, 1.3, 1.0, 1.15]]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-6)
    assert weights.dtype == torch.float32 and (weights[~mask] == 0).all()


def test_clamp_scale_weights_hand_case() -> None:
    scores, mask = padded([[-3.0, 0.0, 0.75, 2.0], [-1.5]])
    weights = clamp_scale_weights(scores, mask, min_score=-1.5, max_score=1.5, min_weight=0.7, max_weight=1.3)
    # clamp to [-1.5, 1.5], then 0.7 + (s + 1.5) * 0.6 / 3.
    assert rows_of(weights, mask)[0] == pytest.approx([0.7, 1.0, 1.15, 1.3], abs=1e-6)
    assert rows_of(weights, mask)[1] == pytest.approx([0.7], abs=1e-6)
    assert (weights[~mask] == 0).all()


def test_binary_weights_follow_the_selection_rule() -> None:
    scores, mask = padded([[0.5, 3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [4.0]])
    weights = binary_weights(scores, mask, k=0.5)
    # max(1, floor(0.5 * n)): 2, 1, 1 tokens; ties to the earliest position.
    assert rows_of(weights, mask) == [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0]]


def test_bad_inputs_are_refused() -> None:
    scores, mask = padded([[1.0, 2.0]])
    with pytest.raises(ValueError, match="lower bound"):
        rank_weights(scores, mask, min_weight=1.3, max_weight=0.7)
    with pytest.raises(ValueError, match="lower bound"):
        clamp_scale_weights(scores, mask, min_score=1.0, max_score=1.0, min_weight=0.7, max_weight=1.3)
    with pytest.raises(ValueError, match="NaN"):
        rank_weights(torch.tensor([[1.0, math.nan]]), torch.tensor([[T, T]]), min_weight=0.7, max_weight=1.3)
    with pytest.raises(ValueError, match="bool mask"):
        rank_weights(scores, mask.long(), min_weight=0.7, max_weight=1.3)


# ------------------------------------------------------------------------------- against the official code


def official_raw_weights(dpo_logps: list[float], reverse_logps: list[float], *, chosen: bool) -> list[float]:
    """score_2 - score_1 with model 1 the DPO and model 2 the reverse-DPO model; chosen weights negated."""
    raw = [b - a for a, b in zip(dpo_logps, reverse_logps, strict=True)]
    return [-x for x in raw] if chosen else raw


def official_rank_based(nums: list[float], min_scale: float, max_scale: float) -> list[float]:
    order = sorted(range(len(nums)), key=lambda k: nums[k])
    if len(nums) == 1:
        return [1.0]
    scaled = {idx: min_scale + (i / (len(nums) - 1)) * (max_scale - min_scale) for i, idx in enumerate(order)}
    return [scaled[i] for i in range(len(nums))]


def official_threshold_and_scale(nums: list[float], min_val: float, max_val: float, min_scale: float,
                                 max_scale: float) -> list[float]:
    out = []
    for num in nums:
        num = max(min_val, min(max_val, num))
        out.append(min_scale + (num - min_val) * (max_scale - min_scale) / (max_val - min_val))
    return out


def official_binary(nums: list[float], top_percent: float) -> list[float]:
    ordered = sorted(nums, reverse=True)
    threshold_index = int(len(nums) * top_percent / 100)
    value = {num: 1 if i < threshold_index else 0 for i, num in enumerate(ordered)}
    return [float(value[num]) for num in nums]


def random_rows(seed: int) -> tuple[list[list[float]], list[list[float]]]:
    """DPO and reverse-DPO log-probs per response; distinct values (no ties), as real float scores are."""
    rng = random.Random(seed)
    lengths = [rng.randint(2, 30) for _ in range(12)]
    dpo = [[-rng.uniform(0.0, 8.0) for _ in range(n)] for n in lengths]
    reverse = [[-rng.uniform(0.0, 8.0) for _ in range(n)] for n in lengths]
    return dpo, reverse


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_transforms_match_official_code(side: str) -> None:
    dpo, reverse = random_rows(7 if side == "chosen" else 8)
    dpo_t, mask = padded(dpo)
    reverse_t, _ = padded(reverse)
    scores = tis_dpo_scores(dpo_t.double(), reverse_t.double(), side=side)  # type: ignore[arg-type]
    raw = [official_raw_weights(a, b, chosen=side == "chosen") for a, b in zip(dpo, reverse, strict=True)]
    for got_row, want_row in zip(rows_of(scores, mask), raw, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-5)

    # The transforms on the same scores (float32 here, as they are stored), so both sides read equal inputs.
    stored = [[float(x) for x in row] for row in rows_of(scores, mask)]
    presets = [(0.7, 1.3), (0.5, 1.5), (0.6, 1.4)]  # default.yaml, aggressive.yaml, named_params.yaml
    for lo, hi in presets:
        got = rows_of(rank_weights(scores, mask, min_weight=lo, max_weight=hi), mask)
        for g, row in zip(got, stored, strict=True):
            assert g == pytest.approx(official_rank_based(row, lo, hi), abs=1e-6)
    # The official script rounds scores (to 2 decimals), which creates ties; rounded coarser here to be sure of
    # ties: rank ties still agree (by position).
    rounded = torch.round(scores * 4) / 4
    got = rows_of(rank_weights(rounded, mask, min_weight=0.7, max_weight=1.3), mask)
    assert any(len(set(row)) < len(row) for row in rows_of(rounded, mask))
    for g, row in zip(got, rows_of(rounded, mask), strict=True):
        assert g == pytest.approx(official_rank_based(row, 0.7, 1.3), abs=1e-6)
    for min_val, max_val, lo, hi in [(-1.5, 1.5, 0.7, 1.3), (-2.0, 2.0, 0.5, 1.5)]:
        got = rows_of(clamp_scale_weights(scores, mask, min_score=min_val, max_score=max_val, min_weight=lo,
                                          max_weight=hi), mask)
        for g, row in zip(got, stored, strict=True):
            assert g == pytest.approx(official_threshold_and_scale(row, min_val, max_val, lo, hi), abs=1e-6)
    for top_percent in (50, 75):  # every response has >= 2 tokens, so int(n * p) >= 1 = selpo's max(1, .)
        got = rows_of(binary_weights(scores, mask, k=top_percent / 100), mask)
        for g, row in zip(got, stored, strict=True):
            assert g == official_binary(row, top_percent)

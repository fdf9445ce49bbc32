"""Truth metrics of token rewards and selections, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from selpo_core.oracle_quality import (
    auroc,
    key_recall,
    precision_at_key_rate,
    score_truth_metrics,
    selection_precision,
    token_auroc,
)


def test_auroc_hand_values_and_ties() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auroc([1.0, 1.0], [True, False]) == 0.5
    assert math.isnan(auroc([1.0, 2.0], [True, True]))


def test_token_auroc_orients_each_side() -> None:
    # Chosen: positive keys should score high; rejected: negative keys low. Opposite-sign keys are left out.
    out = token_auroc([3.0, 0.0, 1.0, -5.0], [1, 0, 0, -1], [-3.0, 0.0, 2.0, 9.0], [-1, 0, 0, 1])
    assert out == {"token_auroc": 1.0, "token_auroc_positive": 1.0, "token_auroc_negative": 1.0}


def test_key_recall_hand_case() -> None:
    out = key_recall([True, True, False, False], [1, 0, 1, 1], [True, False], [0, -1])
    assert out["key_recall_chosen"] == pytest.approx(1 / 3)
    assert out["key_recall_rejected"] == 0.0
    assert out["key_recall"] == pytest.approx(1 / 4)
    assert math.isnan(key_recall([True], [0], [True], [0])["key_recall"])


def test_precision_at_key_rate_hand_case() -> None:
    # Chosen: 2 positive keys; the 2 highest rewards are a key (5.0) and a filler (4.0) -> 0.5.
    # Rejected: 1 negative key; the lowest reward (-3.0) is that key -> 1.0. Pooled: 2 of 3.
    out = precision_at_key_rate([5.0, 4.0, 1.0, 0.0], [1, 0, 1, -1], [-3.0, 0.0, 1.0], [-1, 0, 0])
    assert out["precision_at_key_rate_chosen"] == 0.5
    assert out["precision_at_key_rate_rejected"] == 1.0
    assert out["precision_at_key_rate"] == pytest.approx(2 / 3)
    assert out["key_rate"] == pytest.approx(3 / 7)
    # Ties go to the earlier token: the filler before the key wins the single slot.
    assert precision_at_key_rate([1.0, 1.0], [0, 1], [], [])["precision_at_key_rate_chosen"] == 0.0


def test_precision_is_capped_by_the_key_rate_and_recall_is_not() -> None:
    # 1 key in 10 tokens, a perfect ranking, k = 0.3 (3 tokens kept): precision 1/3, recall 1.
    rewards = [float(10 - i) for i in range(10)]
    labels = [1] + [0] * 9
    kept = [i < 3 for i in range(10)]
    assert selection_precision(kept, labels, [], [])["selection_precision"] == pytest.approx(1 / 3)
    assert key_recall(kept, labels, [], [])["key_recall"] == 1.0
    assert precision_at_key_rate(rewards, labels, [], [])["precision_at_key_rate"] == 1.0


def test_score_truth_metrics_pools_rows_by_side_and_reports_both_aurocs() -> None:
    eos = 3
    rows = [{"side": "chosen", "token_ids": [10, 11, eos], "rewards": [2.0, 0.0, -1.0]},
            {"side": "rejected", "token_ids": [12, 13, eos], "rewards": [-1.0, 0.5, -4.0]},
            {"side": "chosen", "token_ids": [14], "rewards": [1.0]}]
    labels = [[1, 0, 0], [-1, 0, 0], [1]]
    out = score_truth_metrics(rows, labels, special_token_ids={eos})
    # With EOS (a filler by label) the rejected EOS (-4.0) outranks the negative key (-1.0): AUROC 1/2 there.
    assert out["token_auroc_negative"] == 0.5 and out["token_auroc_positive"] == 1.0
    assert out["token_auroc_no_special_negative"] == 1.0 and out["token_auroc_no_special"] == 1.0
    # Precision at the key rate ranks the non-special tokens: the key is the lowest once EOS is out.
    assert out["precision_at_key_rate"] == 1.0 and out["key_rate"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="labels"):
        score_truth_metrics(rows, [[1, 0], [-1, 0, 0], [1]], special_token_ids={eos})

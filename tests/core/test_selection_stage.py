"""The select stage's library part: special tokens are never selected, counts follow the selectable tokens."""

from __future__ import annotations

import dataclasses

import pytest
from tokenizers import AddedToken

from selpo_core.config import ConfigError, SelectConfig, SyntheticConfig, load_run_config
from selpo_core.selection_stage import select_rows, selection_truth_metrics, special_token_ids
from selpo_core.synthetic import build_tokenizer, make_vocabulary

EOS, MARKER = 3, 9  # ids in the hand rows below; MARKER stands for a chat-template marker inside the text


def row(side: str, token_ids: list[int], rewards: list[float]) -> dict:
    return {"side": side, "token_ids": token_ids, "rewards": rewards}


def selected_positions(rows: list[dict]) -> list[list[int]]:
    return [[i for i, s in enumerate(r["selected"]) if s] for r in rows]


def hand_rows() -> list[dict]:
    return [
        # 10 tokens, EOS last with the highest reward: 9 selectable -> max(1, floor(0.3 * 9)) = 2.
        row("chosen", [20, 21, 22, 23, 24, 25, 26, 27, 28, EOS], [0.0, 5.0, 1.0, 4.0, 0.5, 0.2, 0.1, 3.0, 0.3, 9.0]),
        # A marker in the middle and EOS, both with the lowest rewards: 5 selectable -> 1 token.
        row("rejected", [30, MARKER, 31, 32, 33, 34, EOS], [-1.0, -9.0, 0.5, -2.0, 0.0, 1.0, -8.0]),
        # Only EOS: nothing selectable, nothing selected, reported.
        row("rejected", [EOS], [-5.0]),
        row("chosen", [40, 41, EOS], [1.0, 2.0, 3.0]),
    ]


def test_special_tokens_are_never_selected_and_counts_use_selectable_tokens() -> None:
    rows = hand_rows()
    metrics = select_rows(SelectConfig(), rows, special_token_ids={EOS, MARKER, 0, 1})
    assert selected_positions(rows) == [[1, 3], [3], [], [1]]
    assert metrics["special_selected_fraction/chosen"] == 0.0
    assert metrics["special_selected_fraction/rejected"] == 0.0
    assert metrics["special_token_fraction/rejected"] == pytest.approx(3 / 8)
    assert metrics["selected_fraction/chosen"] == pytest.approx(3 / 13)
    assert metrics["responses_without_selection"] == 1


def test_with_exclusion_off_eos_competes_like_any_token() -> None:
    rows = hand_rows()
    cfg = SelectConfig(exclude_special_tokens=False)
    metrics = select_rows(cfg, rows, special_token_ids={EOS, MARKER})
    # 10 tokens -> 3: EOS (9.0), 5.0, 4.0. 7 tokens -> 2: the marker (-9.0) and EOS (-8.0).
    assert selected_positions(rows) == [[1, 3, 9], [1, 6], [0], [2]]
    assert metrics["special_selected_fraction/chosen"] == pytest.approx(2 / 4)
    assert metrics["special_selected_fraction/rejected"] == pytest.approx(3 / 3)
    assert metrics["responses_without_selection"] == 0


def test_global_rule_also_excludes_special_tokens() -> None:
    rows = hand_rows()
    select_rows(SelectConfig(rule="global", k_chosen=0.25, k_rejected=0.25), rows, special_token_ids={EOS, MARKER})
    for r in rows:
        assert not any(s for s, t in zip(r["selected"], r["token_ids"], strict=True) if t in (EOS, MARKER))
    assert any(any(r["selected"]) for r in rows)


def test_special_token_ids_include_added_special_tokens() -> None:
    tokenizer = build_tokenizer(make_vocabulary(SyntheticConfig(n_filler=20, n_positive=2, n_negative=2)))
    base = special_token_ids(tokenizer)
    assert base == {tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    tokenizer.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<think>", special=False)])
    marker, think = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<think>"])
    assert marker not in tokenizer.all_special_ids  # why all_special_ids alone is not enough
    assert special_token_ids(tokenizer) == base | {marker}
    assert think not in special_token_ids(tokenizer)


def test_config_field_default_and_override() -> None:
    assert SelectConfig().exclude_special_tokens is True
    cfg = load_run_config(None, ["select.exclude_special_tokens=false"])
    assert cfg.select.exclude_special_tokens is False
    with pytest.raises(ConfigError):
        dataclasses.replace(SelectConfig(), k_chosen=0.0)


def test_selection_truth_metrics_recall_and_precision() -> None:
    rows = [dict(row("chosen", [20, 21, 22, 23, EOS], [2.0, 0.0, 1.0, -1.0, 5.0]),
                 selected=[True, False, False, False, False]),
            dict(row("rejected", [30, 31, 32], [0.0, -2.0, -1.0]), selected=[False, True, False])]
    labels = [[1, 0, 1, -1, 0], [0, -1, -1]]
    metrics = selection_truth_metrics(rows, labels, special_token_ids={EOS})
    # Chosen keeps 1 of its 2 positive keys, rejected 1 of its 2 negative keys.
    assert metrics["key_recall_chosen"] == 0.5 and metrics["key_recall_rejected"] == 0.5
    assert metrics["key_recall"] == 0.5 and metrics["selection_precision"] == 1.0
    # Ranking without EOS: chosen's top 2 rewards (2.0, 1.0) are both keys; rejected's bottom 2 too.
    assert metrics["precision_at_key_rate"] == 1.0 and metrics["key_rate"] == pytest.approx(4 / 7)
    # With EOS (reward 5.0, a filler by label) the chosen AUROC drops: 2 keys x 2 fillers, 2 of 4 pairs lost
    # (the negative key in a chosen response is left out of the chosen AUROC).
    assert metrics["token_auroc_positive"] == 0.5
    assert metrics["token_auroc_no_special_positive"] == 1.0

"""Selection rules and cross-tokenizer transfer, checked against values worked out by hand."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from selpo_core.selection import (
    global_threshold_select,
    sepo_select,
    topk_mask,
    transfer_rewards,
)


def batch(rows: list[list[float]], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [N, L] rewards and mask from ragged rows."""
    length = max((len(r) for r in rows), default=0)
    rewards = torch.full((len(rows), length), pad_value)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        rewards[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return rewards, mask


def positions(selected: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in selected]


# ----------------------------------------------------------------------------------------------- top-k


def test_counts_follow_max_one_floor_k_n() -> None:
    # n = 1, 2, 3, 10 with k = 0.3: floor(0.3, 0.6, 0.9, 3.0) = 0, 0, 0, 3 -> max(1, .) = 1, 1, 1, 3.
    rewards, mask = batch([[5.0], [1.0, 2.0], [3.0, 1.0, 2.0], [float(v) for v in range(10)]])
    sel = topk_mask(rewards, mask, 0.3, largest=True)
    assert sel.sum(dim=1).tolist() == [1, 1, 1, 3]
    # The highest rewards: row 1 -> position 1 (2.0), row 2 -> position 0 (3.0), row 3 -> 7, 8, 9.
    assert positions(sel) == [[0], [1], [0], [7, 8, 9]]


@pytest.mark.parametrize(("k", "n", "count"), [(0.29, 100, 29), (0.53, 100, 53)])
def test_count_uses_exact_fraction_not_float_product(k: float, n: int, count: int) -> None:
    # The user means k * n = count exactly, but floats floor it one lower: 0.29 * 100 is 28.999999999999996
    # in float64, and an int tensor times 0.53 is computed in float32, giving 52.99999.
    assert k * n < count or float((torch.tensor([n]) * k).item()) < count
    rewards, mask = batch([[float(v) for v in range(n)]])
    sel = topk_mask(rewards, mask, k, largest=True)
    assert int(sel.sum()) == count
    assert positions(sel) == [list(range(n - count, n))]


def test_rejected_side_picks_lowest() -> None:
    chosen, chosen_mask = batch([[0.5, -2.0, 4.0, 1.0, 3.0, 0.0, -1.0, 2.0, 6.0, 5.0]])
    rejected, rejected_mask = batch([[0.5, -2.0, 4.0, 1.0, 3.0, 0.0, -1.0, 2.0, 6.0, 5.0]])
    sel_c, sel_r = sepo_select(chosen, chosen_mask, rejected, rejected_mask)
    # k = 0.3 of 10 tokens = 3. Top: 6.0 (8), 5.0 (9), 4.0 (2). Bottom: -2.0 (1), -1.0 (6), 0.0 (5).
    assert positions(sel_c) == [[2, 8, 9]]
    assert positions(sel_r) == [[1, 5, 6]]


def test_separate_fractions_per_side() -> None:
    rewards, mask = batch([[float(v) for v in range(10)]])
    sel_c, sel_r = sepo_select(rewards, mask, rewards, mask, k_chosen=0.2, k_rejected=0.5)
    assert positions(sel_c) == [[8, 9]]
    assert positions(sel_r) == [[0, 1, 2, 3, 4]]


def test_ties_go_to_earliest_positions() -> None:
    rows = [[1.0, 3.0, 3.0, 3.0, 0.0, 3.0, 1.0], [2.0] * 7, [1.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0]]
    rewards, mask = batch(rows)
    # k = 0.3 of 7 -> floor(2.1) = 2 tokens per row.
    top = topk_mask(rewards, mask, 0.3, largest=True)
    assert positions(top) == [[1, 2], [0, 1], [0, 2]]
    bottom = topk_mask(rewards, mask, 0.3, largest=False)
    # Row 0: 0.0 at 4, then the first 1.0 at 0. Row 1: all tied. Row 2: zeros at 1 and 3 (not 4, 5).
    assert positions(bottom) == [[0, 4], [0, 1], [1, 3]]


def test_padding_is_never_selected_wherever_it_sits() -> None:
    # Pads carry values that would win if they were read: large for chosen, very negative for rejected.
    chosen, chosen_mask = batch([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0, 1.0, 3.0, 5.0]], pad_value=100.0)
    rejected, rejected_mask = batch([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0, 1.0, 3.0, 5.0]], pad_value=-100.0)
    sel_c, sel_r = sepo_select(chosen, chosen_mask, rejected, rejected_mask, k_chosen=0.5, k_rejected=0.5)
    # Row 0: 3 tokens -> floor(1.5) = 1; row 1: 6 tokens -> 3.
    assert positions(sel_c) == [[2], [0, 4, 5]]
    assert positions(sel_r) == [[0], [1, 2, 3]]
    assert not bool((sel_c & ~chosen_mask).any()) and not bool((sel_r & ~rejected_mask).any())


def test_left_padding_does_not_tie_with_infinite_rewards() -> None:
    # Filling pads with -inf and sorting once would let the earlier pads tie with the real -inf rewards
    # and win; the mask alone must decide.
    rewards = torch.tensor([[9.0, 9.0, -math.inf, 1.0, -math.inf]])
    mask = torch.tensor([[False, False, True, True, True]])
    sel = topk_mask(rewards, mask, 1.0, largest=True)
    assert positions(sel) == [[2, 3, 4]]
    sel = topk_mask(rewards, mask, 0.6, largest=True)  # floor(1.8) = 1 -> the 1.0 at position 3
    assert positions(sel) == [[3]]


def test_zero_length_rows_select_nothing_and_are_counted() -> None:
    rewards, mask = batch([[1.0, 2.0], [], [3.0], []])
    sel_c, sel_r = sepo_select(rewards, mask, rewards, mask)
    assert positions(sel_c) == [[1], [], [0], []]
    assert positions(sel_r) == [[0], [], [0], []]
    # Only the empty responses select nothing, so they are the ones to count and report.
    assert int((~sel_c.any(dim=1)).sum()) == int((~mask.any(dim=1)).sum()) == 2


def test_matches_brute_force_on_random_ties() -> None:
    # Reference: Python sorted() on (reward, position) keys, an independent statement of the rule.
    rng = random.Random(0)
    rows = [[float(rng.randint(0, 3)) for _ in range(rng.randint(0, 17))] for _ in range(40)]
    rewards, mask = batch(rows, pad_value=10.0)
    for k in (0.1, 0.3, 0.5, 1.0):
        for largest in (True, False):
            sel = topk_mask(rewards, mask, k, largest=largest)
            expected = []
            for row in rows:
                if not row:
                    expected.append([])
                    continue
                count = max(1, round(k * 10) * len(row) // 10)
                order = sorted(range(len(row)), key=lambda i: (-row[i] if largest else row[i], i))
                expected.append(sorted(order[:count]))
            assert positions(sel) == expected, (k, largest)


def test_bad_arguments_are_refused() -> None:
    rewards, mask = batch([[1.0, 2.0]])
    for k in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            topk_mask(rewards, mask, k, largest=True)
    with pytest.raises(ValueError):
        topk_mask(torch.tensor([[1.0, math.nan]]), torch.tensor([[True, True]]), 0.5, largest=True)
    with pytest.raises(TypeError):
        topk_mask(rewards, mask.long(), 0.5, largest=True)
    # NaN under padding is fine: padding is never read.
    sel = topk_mask(torch.tensor([[1.0, math.nan]]), torch.tensor([[True, False]]), 0.5, largest=True)
    assert positions(sel) == [[0]]


def test_works_in_bfloat16() -> None:
    rewards, mask = batch([[0.5, 2.0, -1.0, 1.0]])
    sel_c, sel_r = sepo_select(rewards.bfloat16(), mask, rewards.bfloat16(), mask, 0.5, 0.5)
    assert positions(sel_c) == [[1, 3]] and positions(sel_r) == [[0, 2]]


# ------------------------------------------------------------------------------------ global threshold


def test_global_threshold_hand_case() -> None:
    chosen, chosen_mask = batch([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0]])
    rejected, rejected_mask = batch([[0.5, -1.0, 2.0], [3.0, 3.0, -2.0, 7.0, 1.0], [2.5]])
    sel_c, sel_r = global_threshold_select(chosen, chosen_mask, rejected, rejected_mask, 0.3, 0.3)
    # Chosen: 6 values 1..6, 0.7-quantile at position 0.7 * 5 = 3.5 -> 4 + 0.5 * (5 - 4) = 4.5: keeps 5, 6;
    # the long response gets nothing, which the caller must count.
    assert positions(sel_c) == [[], [0, 1]]
    # Rejected: sorted -2, -1, 0.5, 1, 2, 2.5, 3, 3, 7; 0.3-quantile at 0.3 * 8 = 2.4
    # -> 0.5 + 0.4 * (1 - 0.5) = 0.7: keeps -2, -1, 0.5; the single-token response gets nothing.
    assert positions(sel_r) == [[0, 1], [2], []]
    unselected = int((rejected_mask.any(1) & ~sel_r.any(1)).sum())
    assert unselected == 1


def test_global_threshold_exact_position_keeps_the_order_statistic() -> None:
    # k_chosen = 0.7 -> q = 1 - 0.7, which floats make 0.30000000000000004; over 11 values the position
    # 0.3 * 10 = 3 is whole, so the threshold is the 4th smallest (3000) exactly and 3000 is kept.
    # torch.quantile(x, 1 - 0.7) returns 3000.0000000000005 here and would drop it.
    values = [float(v) * 1000 for v in range(11)]
    chosen, chosen_mask = batch([values[:6], values[6:]])
    rejected, rejected_mask = batch([[0.0]])
    sel_c, _ = global_threshold_select(chosen, chosen_mask, rejected, rejected_mask, 0.7, 0.3)
    assert positions(sel_c) == [[3, 4, 5], [0, 1, 2, 3, 4]]


def test_global_threshold_keeps_ties_and_handles_empty_side() -> None:
    chosen, chosen_mask = batch([[1.0, 2.0, 2.0, 2.0]])
    empty, empty_mask = batch([[], []])
    sel_c, sel_r = global_threshold_select(chosen, chosen_mask, empty, empty_mask, 0.25, 0.3)
    # 0.75-quantile of 1, 2, 2, 2 at position 2.25 -> 2: all three 2.0 tokens tie and are kept.
    assert positions(sel_c) == [[1, 2, 3]]
    assert positions(sel_r) == [[], []]


# ------------------------------------------------------------------------------------ offset transfer


def f64_bits(values: list[float]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def test_transfer_identity_is_bit_exact() -> None:
    offsets = [(0, 3), (3, 4), (5, 9), (9, 9)]
    rewards = [0.1 + 0.2, 1 / 3, -7e-300, float(torch.tensor(0.3, dtype=torch.float32))]
    out = transfer_rewards(offsets, rewards, list(offsets))
    assert f64_bits(out) == f64_bits(rewards)


def test_transfer_weighted_mean_by_character_overlap() -> None:
    src = [(0, 2), (2, 6), (7, 10)]
    rewards = [1.0, 4.0, -2.0]
    dst = [(0, 1), (1, 4), (4, 8), (8, 10), (10, 10)]
    out = transfer_rewards(src, rewards, dst)
    # (0,1): 1 char of r=1 -> 1.0. (1,4): 1 char of r=1, 2 of r=4 -> 9/3 = 3.0.
    # (4,8): 2 chars of r=4, char 6 uncovered (no weight), 1 char of r=-2 -> (8 - 2) / 3 = 2.0.
    # (8,10): 2 chars of r=-2 -> -2.0. (10,10): empty, no source empty span there -> 0.0.
    assert out == [1.0, 3.0, 2.0, -2.0, 0.0]


def test_transfer_uncovered_and_empty_spans() -> None:
    src = [(0, 5), (6, 8), (8, 8), (0, 0), (8, 8)]
    rewards = [2.0, 3.0, -1.5, 9.0, 4.0]
    dst = [(0, 0), (0, 3), (3, 6), (5, 6), (6, 8), (8, 8), (8, 8), (8, 8)]
    out = transfer_rewards(src, rewards, dst)
    # (3,6) covers 2 chars of "sunny"-like r=2 plus an uncovered space -> 2.0 undiluted; (5,6) only the
    # space -> 0.0. Empty spans match source empty spans at the same character in order: at 0 -> 9.0,
    # at 8 -> -1.5 then 4.0, and a third one at 8 has no partner -> 0.0.
    assert out == [9.0, 2.0, 2.0, 0.0, 3.0, -1.5, 4.0, 0.0]


def test_transfer_pieces_of_one_token_keep_its_reward_exactly() -> None:
    # 0.1 * 3 / 3 is 0.10000000000000002 and 0.7 * 3 / 3 is 0.6999999999999998 in floats: a piece under a
    # single source reward must get that reward itself, as must a piece over two tokens of equal reward.
    src = [(0, 6), (6, 9), (9, 12), (12, 13)]
    rewards = [0.1, 0.7, 0.7, 1 / 3]
    dst = [(0, 3), (3, 6), (6, 8), (8, 11), (11, 13)]
    out = transfer_rewards(src, rewards, dst)
    assert f64_bits(out[:4]) == f64_bits([0.1, 0.1, 0.7, 0.7])
    # (11,13): 1 char of 0.7 and 1 of 1/3 -> (0.7 + 1/3) / 2.
    assert out[4] == pytest.approx((0.7 + 1 / 3) / 2, rel=1e-15)


def test_transfer_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        transfer_rewards([(0, 1), (1, 2)], [1.0], [(0, 2)])
    with pytest.raises(ValueError):
        transfer_rewards([(2, 1)], [1.0], [(0, 2)])


def test_transfer_long_text_matches_direct_overlap() -> None:
    # Thousands of tokens: the vectorised path against a direct per-token overlap sum.
    rng = random.Random(1)
    text_len = 20_000

    def spans(max_len: int) -> list[tuple[int, int]]:
        out, pos = [], 0
        while pos < text_len:
            pos += rng.randint(0, 1)  # sometimes skip a character, like a dropped space
            end = min(text_len, pos + rng.randint(1, max_len))
            if pos < end:
                out.append((pos, end))
            pos = end
        return out

    src, dst = spans(6), spans(9)
    rewards = [rng.uniform(-3, 3) for _ in src]
    out = transfer_rewards(src, rewards, dst)
    for (a, b), got in zip(dst[::97], out[::97], strict=True):
        pairs = [(min(b, e) - max(a, s), r) for (s, e), r in zip(src, rewards, strict=True)]
        pairs = [(w, r) for w, r in pairs if w > 0]
        want = sum(w * r for w, r in pairs) / sum(w for w, _ in pairs) if pairs else 0.0
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------- transfer with real HF tokenizers

TEXT = "it is sunny and hot!"
EOS = "</s>"


def hf(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token=EOS)


def word_tokenizer() -> Tokenizer:
    # Word level on \w+|[^\w\s]+: "hot!" is two tokens, spaces belong to no token.
    words = ["[UNK]", EOS, "it", "is", "sunny", "and", "hot", "!"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def wordpiece_tokenizer() -> Tokenizer:
    # Split on whitespace only, so "hot!" is one token; "sunny" is not in the vocab and splits sun + ##ny.
    pieces = ["[UNK]", EOS, "it", "is", "sun", "##ny", "and", "hot!"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def char_tokenizer() -> Tokenizer:
    # A BPE trained in-process with no room for merges: one token per character, spaces included.
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=1, special_tokens=["[UNK]", EOS], show_progress=False)
    tok.train_from_iterator(["it is sunny and hot!", "the day is hot"], trainer=trainer)
    return tok


def response_offsets(tok: PreTrainedTokenizerFast, text: str) -> list[tuple[int, int]]:
    """Response offsets as the contract has them: the text's tokens, then EOS with span (len, len)."""
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return [tuple(span) for span in enc["offset_mapping"]] + [(len(text), len(text))]


SRC_REWARDS = {"it": 0.5, "is": -1.0, "sunny": 2.0, "and": 0.25, "hot": 1.0, "!": 5.0, EOS: -0.75}


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    return hf(word_tokenizer())


def source(word_tok: PreTrainedTokenizerFast) -> tuple[list[tuple[int, int]], list[float]]:
    offsets = response_offsets(word_tok, TEXT)
    pieces = [TEXT[s:e] for s, e in offsets[:-1]] + [EOS]
    assert pieces == ["it", "is", "sunny", "and", "hot", "!", EOS]
    return offsets, [SRC_REWARDS[p] for p in pieces]


def test_transfer_word_to_wordpiece(word_tok: PreTrainedTokenizerFast) -> None:
    src_offsets, src_rewards = source(word_tok)
    dst_tok = hf(wordpiece_tokenizer())
    dst_offsets = response_offsets(dst_tok, TEXT)
    assert [TEXT[s:e] for s, e in dst_offsets] == ["it", "is", "sun", "ny", "and", "hot!", ""]
    out = transfer_rewards(src_offsets, src_rewards, dst_offsets)
    # sun and ny both lie inside "sunny" -> 2.0 each; "hot!" = 3 chars of 1.0 + 1 char of 5.0 -> 8/4 = 2.0;
    # EOS -> EOS.
    assert out == [0.5, -1.0, 2.0, 2.0, 0.25, 2.0, -0.75]


def test_transfer_word_to_characters(word_tok: PreTrainedTokenizerFast) -> None:
    src_offsets, src_rewards = source(word_tok)
    dst_tok = hf(char_tokenizer())
    dst_offsets = response_offsets(dst_tok, TEXT)
    assert [TEXT[s:e] for s, e in dst_offsets[:-1]] == list(TEXT)
    out = transfer_rewards(src_offsets, src_rewards, dst_offsets)
    # Each character takes its word's reward; the four spaces overlap no word -> 0.0.
    expected = [0.5] * 2 + [0.0] + [-1.0] * 2 + [0.0] + [2.0] * 5 + [0.0] + [0.25] * 3 + [0.0]
    expected += [1.0] * 3 + [5.0] + [-0.75]
    assert out == expected


def test_transfer_characters_back_to_words(word_tok: PreTrainedTokenizerFast) -> None:
    char_offsets = response_offsets(hf(char_tokenizer()), TEXT)
    # Character rewards 0, 1, 2, ... (EOS gets 100): a word's reward is the mean of its characters' indices.
    char_rewards = [float(i) for i in range(len(TEXT))] + [100.0]
    word_offsets = response_offsets(word_tok, TEXT)
    out = transfer_rewards(char_offsets, char_rewards, word_offsets)
    # it (0,2): 0.5; is (3,5): 3.5; sunny (6,11): 8.0; and (12,15): 13.0; hot (16,19): 17.0; ! (19,20): 19.
    assert out == [0.5, 3.5, 8.0, 13.0, 17.0, 19.0, 100.0]


def test_transfer_same_hf_tokenizer_is_identity(word_tok: PreTrainedTokenizerFast) -> None:
    src_offsets, _ = source(word_tok)
    rewards = [0.1, 0.2 + 0.1, 1 / 3, 2 / 7, -1e-310, 1e300, 0.7]
    dst_offsets = response_offsets(hf(word_tokenizer()), TEXT)
    out = transfer_rewards(src_offsets, rewards, dst_offsets)
    assert f64_bits(out) == f64_bits(rewards)

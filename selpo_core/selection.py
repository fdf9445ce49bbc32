"""Token selection rules and cross-tokenizer reward transfer.

A batch of ragged per-response sequences (token rewards or scores) is a padded float tensor
``rewards [N, L]`` plus a bool ``mask [N, L]`` that is True on real response tokens (EOS included, see
docs/CONTRACTS.md). Padding is found from the mask only, never from values, and may sit anywhere in a row.
Every rule returns a bool ``selected [N, L]`` that is a subset of ``mask``; no gradient flows through it.
Tokens that must never be selected (EOS, BOS, pad, chat-template markers) are simply left out of ``mask``:
counts then follow the selectable tokens, max(1, floor(k * n_selectable)) (see ``selection_stage``).

Rules (docs/METHODS.md):
- ``sepo_select`` / ``topk_mask``: SePO, per response, count = max(1, floor(k * n_tokens)); chosen keeps
  its highest rewards, rejected its lowest; ties go to the earliest position.
- ``global_threshold_select``: one threshold per side over all tokens of that side (a dataset-global
  variant; short responses may get no token).

Fractions ``k`` are read as exact rationals (nearest fraction with denominator <= 10**6), so 0.29 * 100
gives 29 tokens and the 0.3-quantile of 11 values is exactly the 4th smallest; plain float arithmetic gets 28
and a threshold a hair above the 4th smallest (which then drops that token). Selective-DPO's per-step
quantile rule lives with its loss (``losses.selective_dpo_masks``).

``transfer_rewards`` maps one response's token rewards between two tokenizers through the character spans
(offset mappings) of the shared response text; with identical offsets it is an exact identity.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

# Denominator bound for reading k and q as rationals: exact for any decimal a user writes with up to six
# digits, and small enough that n_tokens * numerator stays far inside int64.
_MAX_DENOMINATOR = 1_000_000


def _as_fraction(x: float, name: str, *, lo_open: bool) -> Fraction:
    """``x`` as the exact rational the user meant (0.3 -> 3/10); validates 0 < x <= 1 or 0 <= x <= 1."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    ok = (0 < x <= 1) if lo_open else (0 <= x <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if lo_open else '[0, 1]'}, got {x!r}")
    exact = x if isinstance(x, Fraction) else Fraction(float(x))
    return exact.limit_denominator(_MAX_DENOMINATOR)


def _check_batch(values: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(
            f"{name}: expected 2-D values and a mask of the same shape, got {tuple(values.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must be a bool tensor, got {mask.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"{name}: values must be floating point, got {values.dtype}")
    # NaN has no place in an order; refusing it beats selecting an arbitrary token.
    if bool(torch.isnan(values[mask]).any()):
        raise ValueError(f"{name}: NaN among the masked values")


def _select_counts(n_tokens: torch.Tensor, k: Fraction) -> torch.Tensor:
    """max(1, floor(k * n)) in exact integer arithmetic; 0 where n == 0."""
    counts = torch.div(n_tokens * k.numerator, k.denominator, rounding_mode="floor")
    return torch.where(n_tokens > 0, counts.clamp(min=1), torch.zeros_like(counts))


def topk_mask(rewards: torch.Tensor, mask: torch.Tensor, k: float, *, largest: bool) -> torch.Tensor:
    """Per row, keep the ``max(1, floor(k * n))`` masked tokens with the highest (``largest=True``) or
    lowest rewards; rows with no masked token keep nothing. Ties go to the earliest position."""
    _check_batch(rewards, mask, "topk_mask")
    kf = _as_fraction(k, "k", lo_open=True)
    n_rows, length = rewards.shape
    counts = _select_counts(mask.sum(dim=1), kf)

    # A stable sort keeps equal rewards in position order, which is the tie rule. Masked-out entries are
    # then moved behind all real tokens by a second stable sort on the mask itself rather than by filling
    # them with -inf/+inf: a filled pad would tie with a real -inf reward and, placed earlier in the row
    # (left padding), win the tie.
    key = rewards.detach()
    order = torch.sort(key, dim=1, descending=largest, stable=True).indices
    pad_last = torch.sort((~mask).gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    order = order.gather(1, pad_last)

    rank = torch.arange(length, device=rewards.device).expand(n_rows, length)
    keep_sorted = rank < counts.unsqueeze(1)
    return torch.zeros_like(mask).scatter(1, order, keep_sorted)


def sepo_select(
    chosen_rewards: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_rewards: torch.Tensor,
    rejected_mask: torch.Tensor,
    k_chosen: float = 0.3,
    k_rejected: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SePO: chosen keeps its top ``k_chosen`` fraction by reward, rejected its bottom ``k_rejected``."""
    return (
        topk_mask(chosen_rewards, chosen_mask, k_chosen, largest=True),
        topk_mask(rejected_rewards, rejected_mask, k_rejected, largest=False),
    )


def _row_quantiles(values: torch.Tensor, mask: torch.Tensor, q: Fraction) -> torch.Tensor:
    """Linear-interpolation q-quantile of each row's masked values ([N], float64; NaN for empty rows).

    Same definition as torch.quantile(interpolation='linear'): position q * (n - 1) in the sorted values,
    lerp between its neighbours. The position is computed exactly, so a whole position returns that order
    statistic bit-exactly; torch computes it in floating point and can land a hair above it. Also not
    limited to torch.quantile's 2**24 elements, which a dataset-global threshold can exceed.
    """
    n = mask.sum(dim=1)
    if values.shape[1] == 0:
        return torch.full(n.shape, float("nan"), dtype=torch.float64, device=values.device)
    vals = values.detach().to(torch.float64)
    # +inf pads sort behind every real value; a real +inf ties with them but only values are read here.
    srt = torch.sort(vals.masked_fill(~mask, float("inf")), dim=1).values
    pos_num = (n - 1).clamp(min=0) * q.numerator
    lo = torch.div(pos_num, q.denominator, rounding_mode="floor")
    rem = pos_num - lo * q.denominator
    hi = torch.where(rem > 0, lo + 1, lo)
    v_lo = srt.gather(1, lo.unsqueeze(1)).squeeze(1)
    v_hi = srt.gather(1, hi.unsqueeze(1)).squeeze(1)
    weight = rem.to(torch.float64) / q.denominator
    between = torch.lerp(v_lo, v_hi, weight)
    # lerp gives NaN when an end is infinite (-inf + w * inf); the limit is that infinite end.
    between = torch.where(
        torch.isfinite(v_lo) & torch.isfinite(v_hi), between, torch.where(v_lo == -math.inf, v_lo, v_hi)
    )
    out = torch.where(rem > 0, between, v_lo)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def global_threshold_select(
    chosen_rewards: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_rewards: torch.Tensor,
    rejected_mask: torch.Tensor,
    k_chosen: float = 0.3,
    k_rejected: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset-global variant: one threshold per side over ALL tokens of that side.

    Chosen keeps tokens with reward >= the (1 - k_chosen)-quantile of every chosen token; rejected keeps
    reward <= the k_rejected-quantile of every rejected token (linear interpolation, exact positions, see
    ``_row_quantiles``). Pass the whole dataset (or the set the threshold should be global over) at once.
    Ties at the threshold are all kept, so a side may keep a little more than its fraction. Unlike
    ``sepo_select`` there is no per-response minimum: a short (or uniformly mediocre) response may get no
    token. Callers must count those, e.g. ``int((mask.any(1) & ~selected.any(1)).sum())``, and report them.
    """
    _check_batch(chosen_rewards, chosen_mask, "global_threshold_select(chosen)")
    _check_batch(rejected_rewards, rejected_mask, "global_threshold_select(rejected)")
    q_chosen = 1 - _as_fraction(k_chosen, "k_chosen", lo_open=True)
    q_rejected = _as_fraction(k_rejected, "k_rejected", lo_open=True)

    def side(values: torch.Tensor, mask: torch.Tensor, q: Fraction, upper: bool) -> torch.Tensor:
        if not bool(mask.any()):
            return torch.zeros_like(mask)
        flat = values.reshape(1, -1)
        threshold = _row_quantiles(flat, mask.reshape(1, -1), q)[0]
        v = values.detach().to(torch.float64)
        return mask & (v >= threshold if upper else v <= threshold)

    return (
        side(chosen_rewards, chosen_mask, q_chosen, upper=True),
        side(rejected_rewards, rejected_mask, q_rejected, upper=False),
    )


# ---------------------------------------------------------------------------------------------------------
# Cross-tokenizer transfer


def transfer_rewards(
    src_offsets: Sequence[tuple[int, int]],
    src_rewards: Sequence[float],
    dst_offsets: Sequence[tuple[int, int]],
) -> list[float]:
    """Map one response's token rewards from a source tokenization onto a destination tokenization.

    Offsets are (start, end) character spans into the same response text. A destination token's reward is
    the mean of the source rewards overlapping its characters, weighted by overlap length in characters.
    Characters no source token covers (e.g. spaces a word-level source leaves out) carry no weight, so
    " sunny" over source "sunny" keeps sunny's reward undiluted.

    Destination tokens that overlap nothing:
    - an empty span (s, s) (EOS is (len, len) by contract) takes the reward of the source token with the
      same empty span in the same order among empty spans at that character (EOS -> EOS); if the source
      has no such token it gets 0.0;
    - a non-empty span covering only uncovered characters (whitespace) gets 0.0.
    0.0 is the neutral reward (oracle and reference agree), so these tokens neither attract nor repel
    selection on principle; callers that want them never selected should mask them.

    When ``src_offsets == dst_offsets`` the source rewards are returned as they are (bit-identical).
    Cost is O(n_src log n_src + n_dst log n_src + pairs), pairs ~ the number of overlapping token pairs.
    """
    src = np.asarray(src_offsets, dtype=np.int64).reshape(-1, 2)
    dst = np.asarray(dst_offsets, dtype=np.int64).reshape(-1, 2)
    rewards = np.asarray(src_rewards, dtype=np.float64).reshape(-1)
    if len(rewards) != len(src):
        raise ValueError(f"{len(src)} source offsets but {len(rewards)} source rewards")
    for name, spans in (("src_offsets", src), ("dst_offsets", dst)):
        if len(spans) and bool(((spans[:, 0] < 0) | (spans[:, 1] < spans[:, 0])).any()):
            raise ValueError(f"{name}: spans must satisfy 0 <= start <= end")
    if np.array_equal(src, dst):
        # Same tokenization: no arithmetic at all, so the identity is exact.
        return [float(r) for r in src_rewards]

    out = np.zeros(len(dst), dtype=np.float64)
    if len(dst) == 0:
        return []
    d_start, d_end = dst[:, 0], dst[:, 1]
    empty_dst = d_start == d_end

    src_nonempty = src[:, 0] < src[:, 1]
    s_idx = np.flatnonzero(src_nonempty)
    if len(s_idx) and not bool(empty_dst.all()):
        # Source tokens sorted by start: those starting before a destination end form a prefix [0, hi).
        # With the running max of their ends, those that can still reach past the destination start
        # begin at lo; [lo, hi) is a superset of the overlapping ones (tight for ordinary tokenizers,
        # whose spans are monotone); members that do not overlap are dropped below.
        s_idx = s_idx[np.argsort(src[s_idx, 0], kind="stable")]
        s_start, s_end, s_rew = src[s_idx, 0], src[s_idx, 1], rewards[s_idx]
        reach = np.maximum.accumulate(s_end)
        j_idx = np.flatnonzero(~empty_dst)
        lo = np.searchsorted(reach, d_start[j_idx], side="right")
        hi = np.searchsorted(s_start, d_end[j_idx], side="left")
        n_pairs = np.maximum(hi - lo, 0)
        pair_dst = np.repeat(np.arange(len(j_idx)), n_pairs)
        # Within-group index: running position minus the group's first position.
        group_first = np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
        pair_src = np.repeat(lo, n_pairs) + (np.arange(len(pair_dst)) - group_first)
        overlap = np.minimum(d_end[j_idx][pair_dst], s_end[pair_src]) - np.maximum(
            d_start[j_idx][pair_dst], s_start[pair_src]
        )
        keep = overlap > 0
        pair_dst, pair_rew, overlap = pair_dst[keep], s_rew[pair_src[keep]], overlap[keep].astype(np.float64)
        # Sum of r * overlap over the sum of overlaps: small integer weights, so hand cases like
        # (3 * 1.0 + 1 * 5.0) / 4 come out exact.
        total = np.bincount(pair_dst, weights=overlap, minlength=len(j_idx))
        weighted = np.bincount(pair_dst, weights=overlap * pair_rew, minlength=len(j_idx))
        covered = total > 0
        mean = np.where(covered, weighted / np.where(covered, total, 1.0), 0.0)
        if len(pair_dst):
            # A token under a single source reward (a piece of one word, several pieces of equal reward)
            # gets that reward itself, not r * len / len with its rounding. pair_dst is sorted, so each
            # destination's pairs are one contiguous run.
            starts = np.flatnonzero(np.r_[True, pair_dst[1:] != pair_dst[:-1]])
            lo_r = np.minimum.reduceat(pair_rew, starts)
            uniform = lo_r == np.maximum.reduceat(pair_rew, starts)
            mean[pair_dst[starts[uniform]]] = lo_r[uniform]
        out[j_idx] = mean

    if bool(empty_dst.any()):
        # Few tokens have empty spans (EOS, stray specials): a dict over them is linear and simple.
        src_empty: dict[int, list[float]] = {}
        for i in np.flatnonzero(~src_nonempty):
            src_empty.setdefault(int(src[i, 0]), []).append(float(rewards[i]))
        seen: dict[int, int] = {}
        for j in np.flatnonzero(empty_dst):
            pos = int(d_start[j])
            nth = seen.get(pos, 0)
            seen[pos] = nth + 1
            matches = src_empty.get(pos, [])
            out[j] = matches[nth] if nth < len(matches) else 0.0
    return [float(x) for x in out]

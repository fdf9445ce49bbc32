"""TIS-DPO token importance weights from two contrastive oracles (the inputs of `losses.tis_dpo_loss`).

Liu et al., "TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization With Estimated
Weights" (ICLR 2025, arXiv 2410.04350); official exlaw/TIS-DPO `token_weight_estimation.py` (the raw
log-prob differences) and `preference_datasets.py` (the per-response transforms).

Two models score every response token: the DPO oracle pi_pos (trained on the pairs as they are) and a
reverse-DPO oracle pi_neg (trained with chosen and rejected swapped). `tis_dpo_scores` orients their
difference per side so that a HIGHER score means a MORE important token on both sides (a good token in a
chosen response, a bad one in a rejected response); one of the transforms below then maps each response's
scores to weights, offline, once per dataset:

- `rank_weights`: the response's tokens ranked by score, spread linearly over [min_weight, max_weight]
  (official `rank_based`, 0.7-1.3, the README's TIS-DPO run);
- `clamp_scale_weights`: the score clamped to [min_score, max_score] and mapped linearly onto
  [min_weight, max_weight] (official `threshold_and_scale`, -1.5..1.5 -> 0.7-1.3);
- `binary_weights`: 1 on the top-k fraction of the response's tokens by score, 0 elsewhere (official
  `binary`): the form closest to SePO's selected mask, i.e. the ablation against sepo.

Batches are padded [N, L] tensors with a bool `mask` of the tokens to weight, as in `selection`. Tokens outside
the mask get weight 0: the official pipeline estimates weights on the text tokens only and gives EOS weight 0,
so pass the selectable mask (special tokens excluded, see `selection_stage.special_token_ids`) to match it.
Differences from the official code, on purpose: scores are not rounded to 2 decimals first (the official
script rounds, which creates ties), and `binary_weights` keeps max(1, floor(k * n)) tokens with ties to the
earliest position (selpo's selection rule) where the official keeps int(n * k) and resolves ties by value.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from selpo_core.selection import topk_mask


def tis_dpo_scores(oracle_logps: Tensor, reverse_oracle_logps: Tensor, *,
                   side: Literal["chosen", "rejected"]) -> Tensor:
    """Oriented importance scores [N, L] float32: chosen log pi_pos - log pi_neg, rejected log pi_neg - log pi_pos.

    `oracle_logps` are the DPO oracle's per-token log-probs of the responses, `reverse_oracle_logps` the
    reverse-DPO oracle's, on the same tokens (official: weight = score_2 - score_1 with model 1 the DPO and
    model 2 the reverse model, negated for chosen responses).
    """
    if side not in ("chosen", "rejected"):
        raise ValueError(f"side={side!r} is not allowed; choose one of chosen, rejected")
    difference = oracle_logps.float() - reverse_oracle_logps.float()
    return difference if side == "chosen" else -difference


def _check(scores: Tensor, mask: Tensor, lo: float, hi: float, names: str) -> None:
    if scores.dim() != 2 or mask.shape != scores.shape or mask.dtype != torch.bool:
        raise ValueError(f"expected 2-D scores and a bool mask of the same shape, got {tuple(scores.shape)} "
                         f"and {tuple(mask.shape)} {mask.dtype}")
    if bool(torch.isnan(scores[mask]).any()):
        raise ValueError("NaN among the masked scores: a weight needs an order")
    if not lo < hi:
        raise ValueError(f"{names}: the lower bound must be below the upper, got {lo} and {hi}")


def rank_weights(scores: Tensor, mask: Tensor, *, min_weight: float, max_weight: float) -> Tensor:
    """Per row, the i-th smallest of the n masked scores (i = 0..n-1) gets min + i / (n - 1) * (max - min).

    Ties go by position (the earlier token ranks lower), as the official stable sort does; a one-token row
    gets the midpoint (the official 1.0, the midpoint of every released range). Float32 [N, L], 0 off-mask.
    """
    _check(scores, mask, min_weight, max_weight, "min_weight/max_weight")
    n_rows, length = scores.shape
    # Stable ascending sort, then off-mask entries moved behind the real ones by a second stable sort on the
    # mask (no fill values that could tie with a real -inf score).
    order = torch.sort(scores.detach().float(), dim=1, stable=True).indices
    order = order.gather(1, torch.sort((~mask).gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    positions = torch.arange(length, device=scores.device).expand(n_rows, length).contiguous()
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    n = mask.sum(dim=1, keepdim=True)
    spread = ranks.double() / (n - 1).clamp(min=1).double()
    weights = torch.where(n > 1, min_weight + spread * (max_weight - min_weight), (min_weight + max_weight) / 2)
    return torch.where(mask, weights, 0.0).float()


def clamp_scale_weights(scores: Tensor, mask: Tensor, *, min_score: float, max_score: float,
                        min_weight: float, max_weight: float) -> Tensor:
    """min_weight + (clamp(s, min_score, max_score) - min_score) * (max_weight - min_weight) / (max_score -
    min_score), per token (no per-row statistics). Float32 [N, L], 0 off-mask."""
    _check(scores, mask, min_score, max_score, "min_score/max_score")
    _check(scores, mask, min_weight, max_weight, "min_weight/max_weight")
    clamped = scores.detach().double().clamp(min_score, max_score)
    weights = min_weight + (clamped - min_score) * (max_weight - min_weight) / (max_score - min_score)
    return torch.where(mask, weights, 0.0).float()


def binary_weights(scores: Tensor, mask: Tensor, *, k: float) -> Tensor:
    """1.0 on each row's max(1, floor(k * n)) highest-scoring masked tokens (ties to the earliest), else 0."""
    return topk_mask(scores.detach().float(), mask, k, largest=True).float()

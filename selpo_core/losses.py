"""Preference losses as pure functions of per-token log-probs (formulas: docs/METHODS.md).

Every loss takes per-token log-probs [B, T] aligned to `input_ids` (chosen and rejected already split, see
docs/CONTRACTS.md) and bool masks [B, T], and returns `(losses [B], chosen_rewards [B], rejected_rewards [B])`
in float32 with the rewards detached. Masks decide which tokens count; values outside a mask are ignored
(never used to detect padding). Nothing here runs a model.

Hyper-parameters are keyword-only and have NO defaults: the config is the one place that holds them (a default
here would be a second copy that drifts, as Selective-DPO's beta 0.01 against policy.beta 0.1 once did). Masks
that a method builds from the model's own log-probs (`selective_dpo_masks`, `confpo_mask`) are built once per
step by the caller and passed to the loss, so the step can log exactly the fractions the loss used.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from selpo_core.logps import masked_mean, masked_sum

LossOutput = tuple[Tensor, Tensor, Tensor]
TDPO_VARIANTS: tuple[str, ...] = ("tdpo1", "tdpo2")


def _log_ratio_sum(policy_logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """S - S^ref [B]: the per-token log-ratio summed over `mask` (float32 before subtracting)."""
    return masked_sum(policy_logps.float() - ref_logps.float(), mask)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290).

    z = beta * [(S_w - S_w^ref) - (S_l - S_l^ref)], L = -log sigma(z). With `label_smoothing` eps > 0 this is
    conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the label is flipped with
    probability eps, L = -(1 - eps) log sigma(z) - eps log sigma(-z). Rewards: beta * (S - S^ref).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = _log_ratio_sum(policy_chosen_logps, ref_chosen_logps, chosen_mask)
    rejected_ratio = _log_ratio_sum(policy_rejected_logps, ref_rejected_logps, rejected_mask)
    z = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (arXiv 2310.12036).

    h = (S_w - S_w^ref) - (S_l - S_l^ref) on SUMMED log-ratios, as in the paper and docs/METHODS.md;
    L = (h - 1 / (2 beta))^2. Note TRL's "ipo" averages the log-probs over tokens instead, so its beta is
    not interchangeable with this one. Rewards: beta * (S - S^ref).
    """
    if beta <= 0:
        raise ValueError(f"IPO needs beta > 0 (its target margin is 1 / (2 beta)), got {beta}")
    chosen_ratio = _log_ratio_sum(policy_chosen_logps, ref_chosen_logps, chosen_mask)
    rejected_ratio = _log_ratio_sum(policy_rejected_logps, ref_rejected_logps, rejected_mask)
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
) -> LossOutput:
    """SimPO, Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv 2405.14734).

    Reference-free and length-normalised: L = -log sigma(beta * (mean_w - mean_l) - gamma) with
    gamma = beta * gamma_beta_ratio. Rewards: beta * mean log-prob.
    """
    chosen_reward = beta * masked_mean(policy_chosen_logps, chosen_mask)
    rejected_reward = beta * masked_mean(policy_rejected_logps, rejected_mask)
    losses = -F.logsigmoid(chosen_reward - rejected_reward - beta * gamma_beta_ratio)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def sepo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_selected_mask: Tensor,
    rejected_selected_mask: Tensor,
    *,
    gamma: float,
    margin: float,
) -> LossOutput:
    """SePO, Yang et al., "Selective Preference Optimization" (arXiv 2408.13518).

    Reference-free contrastive loss on the oracle-selected tokens only:
    u(y) = gamma * mean over selected tokens of log pi_theta(y_t), L = -log sigma(u_w - u_l - margin).
    Defaults gamma = 1, margin (lambda) = 0 follow the official code (the paper searches gamma 2.1-2.5).
    An empty selection gives u = 0 (selection guarantees at least one token). Rewards: u.
    """
    chosen_u = gamma * masked_mean(policy_chosen_logps, chosen_selected_mask)
    rejected_u = gamma * masked_mean(policy_rejected_logps, rejected_selected_mask)
    losses = -F.logsigmoid(chosen_u - rejected_u - margin)
    return losses, chosen_u.detach(), rejected_u.detach()


def _quantile_mask(scores: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Tokens of `mask` whose score >= the per-row `quantile` of that row's masked scores (linear interp.)."""
    masked_scores = torch.where(mask, scores, torch.nan)
    # nanquantile ignores the NaN-filled off-mask entries; an empty row yields NaN and selects nothing.
    threshold = torch.nanquantile(masked_scores, quantile, dim=-1, keepdim=True, interpolation="linear")
    selected = mask & (scores >= threshold)
    # The quantile never exceeds the row maximum for finite scores, but an infinite score (policy logp -inf)
    # makes it NaN (inf - inf), which would select nothing: add each row's best token explicitly so every
    # non-empty sequence keeps at least one token.
    best = torch.where(mask, scores, -torch.inf).argmax(dim=-1, keepdim=True)
    best_mask = torch.zeros_like(mask).scatter_(-1, best, True) & mask.any(dim=-1, keepdim=True)
    return selected | best_mask


def selective_dpo_masks(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    quantile: float,
) -> tuple[Tensor, Tensor]:
    """Selective-DPO token masks (Dong, arXiv 2507.07725): (chosen_selected, rejected_selected) bool [B, T].

    Scores: chosen s_t = log pi_ref - log pi_theta (tokens the policy under-rates), rejected
    s_t = log pi_theta - log pi_ref (tokens the policy over-rates). A token is kept when s_t >= the
    `quantile` of its own sequence's masked scores (torch.quantile 'linear' semantics; ties at the threshold
    are kept), so q = 0.6 keeps about the top 40%. Computed on detached values: no gradient through the mask.
    Here `ref_*` is the scorer; it may differ from the DPO anchor (see `selective_dpo_loss`).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    with torch.no_grad():
        chosen_scores = ref_chosen_logps.float() - policy_chosen_logps.float()
        rejected_scores = policy_rejected_logps.float() - ref_rejected_logps.float()
        return (
            _quantile_mask(chosen_scores, chosen_mask, quantile),
            _quantile_mask(rejected_scores, rejected_mask, quantile),
        )


def selective_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    anchor_chosen_logps: Tensor,
    anchor_rejected_logps: Tensor,
    chosen_selected_mask: Tensor,
    rejected_selected_mask: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Selective-DPO, Dong (arXiv 2507.07725; released code: a TRL fork, loss_type "sdpo").

    DPO on the sums over the tokens `selective_dpo_masks` selected this step (build the masks once, pass them
    here and log their fractions): L = -log sigma(beta * [sum_{S_w}(logp - logp_anchor) - sum_{S_l}(...)]).
    The released code scores and anchors with the same reference; here the scorer (given to
    `selective_dpo_masks`) and the anchor (`anchor_*_logps`) may be different models.
    Rewards: beta * selected log-ratio sums (what the loss sees).
    """
    return dpo_loss(
        policy_chosen_logps, policy_rejected_logps, anchor_chosen_logps, anchor_rejected_logps,
        chosen_selected_mask, rejected_selected_mask, beta=beta, label_smoothing=0.0,
    )


def selective_ref_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_selected_mask: Tensor,
    rejected_selected_mask: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Reference-anchored selective loss: DPO log-ratios summed over the ORACLE-selected tokens only.

    selpo's ablation, not a published method: SePO's offline selection (Yang et al., arXiv 2408.13518; the
    selection stage's `selected` masks) with DPO's anchored loss (Rafailov et al. 2023) instead of SePO's
    reference-free one, so the selection can be judged apart from the loss:
    L = -log sigma(beta * [sum_{S_w}(logp - logp_ref) - sum_{S_l}(logp - logp_ref)]).
    Same formula as `selective_dpo_loss`, whose masks come from the policy at every step instead.
    Rewards: beta * selected log-ratio sums.
    """
    return dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_selected_mask, rejected_selected_mask, beta=beta, label_smoothing=0.0,
    )


def tdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    chosen_kl: Tensor,
    rejected_kl: Tensor,
    *,
    variant: Literal["tdpo1", "tdpo2"],
    beta: float,
    alpha: float,
) -> LossOutput:
    """TDPO, Zeng et al. 2024, "Token-level Direct Preference Optimization" (ICML 2024, arXiv 2404.11999).

    u = (S_w - S_w^ref) - (S_l - S_l^ref); D(y) = sum over response positions of the per-token
    KL(pi_ref || pi_theta) (from `logps.model_logps_and_kl`).
    TDPO1: L = -log sigma(beta * (u - (D_l - D_w))).
    TDPO2: L = -log sigma(beta * (u - alpha * (D_l - sg(D_w)))).
    The variant is required because the official config and code disagree on the default.
    Rewards: beta * (S - S^ref).
    """
    if variant not in TDPO_VARIANTS:
        raise ValueError(f"variant={variant!r} is not allowed; choose one of {', '.join(TDPO_VARIANTS)}")
    chosen_ratio = _log_ratio_sum(policy_chosen_logps, ref_chosen_logps, chosen_mask)
    rejected_ratio = _log_ratio_sum(policy_rejected_logps, ref_rejected_logps, rejected_mask)
    chosen_seq_kl = masked_sum(chosen_kl, chosen_mask)
    rejected_seq_kl = masked_sum(rejected_kl, rejected_mask)
    if variant == "tdpo1":
        kl_term = rejected_seq_kl - chosen_seq_kl
    else:
        # TDPO2 stops the gradient through the chosen KL so the model is not pushed away from pi_ref on y_w.
        kl_term = alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio - kl_term))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def tso_dual_clip_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float,
    chosen_reward_max: float,
    rejected_reward_min: float,
) -> LossOutput:
    """Dual-clip DPO for TSO, after Chen et al., "Self-Training with Scaled Preference Optimization"
    (arXiv 2409.02118).

    This clip form is selpo's reading of the TSO paper, NOT a published formula (the paper's exact dual-clip
    equation and code were not available): r = beta * (S - S^ref) and
    L = -log sigma(min(r_w, chosen_reward_max) - max(r_l, rejected_reward_min)),
    so a pair whose chosen reward is already above its cap and rejected reward below its floor stops pulling
    (zero gradient). Inside the bounds it equals DPO. Rewards: the unclipped r.
    """
    chosen_ratio = _log_ratio_sum(policy_chosen_logps, ref_chosen_logps, chosen_mask)
    rejected_ratio = _log_ratio_sum(policy_rejected_logps, ref_rejected_logps, rejected_mask)
    chosen_reward = beta * chosen_ratio
    rejected_reward = beta * rejected_ratio
    clipped = chosen_reward.clamp(max=chosen_reward_max) - rejected_reward.clamp(min=rejected_reward_min)
    losses = -F.logsigmoid(clipped)
    return losses, chosen_reward.detach(), rejected_reward.detach()


# ------------------------------------------------------------------------ token-weighted and confidence-based


def _weighted_log_ratio_sum(policy_logps: Tensor, ref_logps: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """sum_t w_t * (logp_t - logp_ref_t) over `mask` [B]; weights are constants (no gradient).

    Off-mask weights are zeroed first: a NaN weight there would otherwise turn the zero gradient of the masked
    product into NaN (0 * NaN).
    """
    weights = torch.where(mask, weights.detach().float(), 0.0)
    return masked_sum((policy_logps.float() - ref_logps.float()) * weights, mask)


def tgdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_token_rewards: Tensor,
    rejected_token_rewards: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float,
    alpha: float,
) -> LossOutput:
    """TGDPO, Zhu et al., "TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference
    Optimization" (ICML 2025, arXiv 2506.14574; official trainer dvlab-research/TGDPO, loss_type "sigmoid").

    `*_token_rewards` are r_t = log pi_oracle(y_t) - log pi_ref(y_t), the oracle's RAW per-token log-ratio
    (the official trainer scales it by beta itself). Per-token weights: chosen beta * (1 + alpha * beta * r_t),
    rejected beta * (1 - alpha * beta * r_t); L = -log sigma(sum_w w_t (logp - logp_ref) - sum_l w_t (logp -
    logp_ref)). As in the official code the weights are not clipped: a weight goes negative when
    alpha * beta * |r_t| > 1 and is used as it is. alpha = 0 is DPO. Rewards: the weighted sums (their
    difference is the logit; the official trainer logs the unweighted beta * (S - S^ref) instead).
    """
    chosen_weights = beta * (1.0 + alpha * beta * torch.where(chosen_mask, chosen_token_rewards.float(), 0.0))
    rejected_weights = beta * (1.0 - alpha * beta * torch.where(rejected_mask, rejected_token_rewards.float(), 0.0))
    chosen_reward = _weighted_log_ratio_sum(policy_chosen_logps, ref_chosen_logps, chosen_weights, chosen_mask)
    rejected_reward = _weighted_log_ratio_sum(policy_rejected_logps, ref_rejected_logps, rejected_weights,
                                              rejected_mask)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def tis_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_weights: Tensor,
    rejected_weights: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """TIS-DPO, Liu et al., "TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization With
    Estimated Weights" (ICLR 2025, arXiv 2410.04350; official exlaw/TIS-DPO `tisdpo_loss`, token_level off).

    DPO with each token's log-ratio multiplied by its importance weight (stored offline, see
    `token_weights.tis_dpo_weights`): L = -log sigma(beta * [sum_w w_t (logp - logp_ref) - sum_l w_t (logp -
    logp_ref)]). All weights 1 is DPO. The official data pipeline gives EOS weight 0 (weights are estimated on
    the text tokens only); pass weights that are 0 there to match it. Rewards: beta * weighted sums (as the
    official code reports).
    """
    chosen_ratio = _weighted_log_ratio_sum(policy_chosen_logps, ref_chosen_logps, chosen_weights, chosen_mask)
    rejected_ratio = _weighted_log_ratio_sum(policy_rejected_logps, ref_rejected_logps, rejected_weights,
                                             rejected_mask)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def confpo_mask(policy_logps: Tensor, mask: Tensor) -> Tensor:
    """ConfPO's kept tokens [B, T]: probability under the policy below the response's mean token probability.

    The mean is of PROBABILITIES exp(logp) over `mask` (official: log of the mean of exp(logp), compared with
    logp; exp is monotone so this is the same set), strictly below it, on detached values (no gradient
    through the mask). Float64, so a one-token response (p == mean) reliably keeps nothing.
    """
    with torch.no_grad():
        probs = torch.where(mask, policy_logps.double().exp(), 0.0)
        mean_prob = probs.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
        return mask & (probs < mean_prob)


def confpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_kept_mask: Tensor,
    rejected_kept_mask: Tensor,
    *,
    beta: float,
    gamma: float,
) -> LossOutput:
    """ConfPO, Yoon et al., "ConfPO: Exploiting Policy Model Confidence for Critical Token Selection in
    Preference Optimization" (ICML 2025, arXiv 2506.08712; official hee-suk-yoon/ConfPO `cpo_loss_confpo`).

    SimPO on the low-confidence tokens only, no oracle and no reference: with the masks from `confpo_mask`
    (built once per step), u = mean over kept tokens of logp and L = -log sigma(beta * (u_w - u_l) - gamma).
    `gamma` is the absolute margin (TRL's simpo_gamma; `simpo_loss`'s gamma_beta_ratio * beta). A pair where
    either side keeps no token is dropped as the official code drops it: its loss is 0 and it still counts in
    the batch mean. Rewards: beta * u (0 for a side with no kept token).
    """
    chosen_reward = beta * masked_mean(policy_chosen_logps, chosen_kept_mask)
    rejected_reward = beta * masked_mean(policy_rejected_logps, rejected_kept_mask)
    kept_pair = chosen_kept_mask.any(dim=-1) & rejected_kept_mask.any(dim=-1)
    losses = torch.where(kept_pair, -F.logsigmoid(chosen_reward - rejected_reward - gamma), 0.0)
    return losses, chosen_reward.detach(), rejected_reward.detach()

"""Training objectives: `step_fn(model, batch) -> (loss, metrics)` for SFT and every preference method.

The training loop knows nothing about methods; a preference step does one forward (chosen and rejected
concatenated), hands the split per-token tensors to its method's loss (`losses.py`, one small function per
method below), and reports TRL's metric names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selpo_core import losses
from selpo_core.config import LossParams
from selpo_core.logps import masked_sum, model_logps_and_kl, model_per_token_logps, split_pair

if TYPE_CHECKING:
    from selpo_core.train import StepFn

LOSS_FIELDS: dict[str, tuple[str, ...]] = {
    "dpo": ("beta", "label_smoothing"),
    "ipo": ("beta",),
    "simpo": ("simpo_beta", "simpo_gamma_beta_ratio"),
    "sepo": ("sepo_gamma", "sepo_margin"),
    "sepo_dpo": ("beta",),
    "selective_dpo": ("beta", "sdpo_quantile"),
    "tdpo1": ("beta",),
    "tdpo2": ("beta", "tdpo_alpha"),
    "tso": ("beta", "tso_chosen_reward_max", "tso_rejected_reward_min"),
    "tgdpo": ("beta", "tgdpo_alpha"),
    "tis_dpo": ("beta",),
    "confpo": ("confpo_beta", "confpo_gamma"),
}
"""The LossParams fields each method's loss reads: exactly what enters its stage key."""

# Methods whose loss needs reference log-probs of the sampled tokens (from a model or from the Parquet).
NEEDS_REF_LOGPS = ("dpo", "ipo", "tso", "selective_dpo", "sepo_dpo", "tgdpo", "tis_dpo")
# Methods that need the full reference distribution at every position (cannot be read from a file).
NEEDS_REF_MODEL_ALWAYS = ("tdpo1", "tdpo2")
# Methods that train on the select stage's key tokens (SePO's selection).
NEEDS_SELECTION = ("sepo", "sepo_dpo")
# Methods whose loss reads log-probs only at `selected_mask` positions: the LM head and log-softmax run there
# only (and their logps/* metrics sum over the selected tokens).
READS_SELECTED_ONLY = ("sepo", "sepo_dpo")
# Methods that weight tokens by stored per-token values: TGDPO the oracle's token rewards, TIS-DPO its weights.
NEEDS_TOKEN_VALUES = ("tgdpo", "tis_dpo")


@dataclass
class PairTensors:
    """One forward's per-token tensors, split into chosen and rejected halves ([B, T] each)."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_mask: Tensor
    rejected_mask: Tensor
    batch: dict[str, Any]
    ref: tuple[Tensor, Tensor] | None = None
    kl: tuple[Tensor, Tensor] | None = None

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        return split_pair(self.batch[name])


Metrics = dict[str, Tensor]
LossFn = Callable[[LossParams, PairTensors, Metrics], "losses.LossOutput"]


def sft_step(model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean negative log-likelihood of the response tokens (prompt and padding masked out)."""
    per_token_logps = model_per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                            packed=batch.get("packed"))
    n_tokens = batch["loss_mask"].sum().clamp(min=1)
    loss = -(per_token_logps * batch["loss_mask"]).sum() / n_tokens
    return loss, {"nll": loss.detach()}


def make_preference_step(method: str, params: LossParams, ref_model: Any | None) -> StepFn:
    """Step function for `method` with the loss hyper-parameters `params` (an OracleConfig or PolicyConfig).

    `ref_model` is used when the batch carries no `ref_per_token_logps`."""
    if method not in LOSS_FIELDS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(LOSS_FIELDS)}")
    loss_fn = METHOD_LOSSES[method]

    def step(model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        input_ids, attention_mask, packed = batch["input_ids"], batch["attention_mask"], batch.get("packed")
        loss_mask = batch["loss_mask"]
        if method in READS_SELECTED_ONLY:
            loss_mask = loss_mask & batch["selected_mask"]  # the LM head runs at the selected rows only
        if ref_model is not None and next(ref_model.parameters()).device != input_ids.device:
            ref_model.to(input_ids.device)  # the training loop places the policy and batches, not the reference
        per_token_kl = ref_logps = None
        if method in NEEDS_REF_MODEL_ALWAYS:
            if ref_model is None:
                raise ValueError(f"{method} needs a reference model at every step")
            policy_logps, ref_logps, per_token_kl = model_logps_and_kl(
                model, ref_model, input_ids, attention_mask, loss_mask, packed=packed
            )
        else:
            policy_logps = model_per_token_logps(model, input_ids, attention_mask, loss_mask, packed=packed)
            if method in NEEDS_REF_LOGPS:
                ref_logps = _reference_logps(method, ref_model, batch, loss_mask)
        # The masks stay the response masks (the losses and selected fractions read them); log-probs are 0
        # outside `loss_mask`, which for READS_SELECTED_ONLY is the selection.
        tensors = PairTensors(*split_pair(policy_logps), *split_pair(batch["loss_mask"]), batch,
                              ref=split_pair(ref_logps) if ref_logps is not None else None,
                              kl=split_pair(per_token_kl) if per_token_kl is not None else None)
        metrics: Metrics = {}
        per_example_losses, chosen_rewards, rejected_rewards = loss_fn(params, tensors, metrics)
        metrics.update(_reward_metrics(chosen_rewards, rejected_rewards))
        metrics.update(_logps_metrics(tensors, selected_only=method in READS_SELECTED_ONLY))
        return per_example_losses.mean(), metrics

    return step


# ------------------------------------------------------------------------------------------ one per method


def _dpo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    return losses.dpo_loss(t.chosen_logps, t.rejected_logps, *t.ref, t.chosen_mask, t.rejected_mask, beta=p.beta,
                           label_smoothing=p.label_smoothing)


def _ipo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    return losses.ipo_loss(t.chosen_logps, t.rejected_logps, *t.ref, t.chosen_mask, t.rejected_mask, beta=p.beta)


def _tso(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    out = losses.tso_dual_clip_loss(t.chosen_logps, t.rejected_logps, *t.ref, t.chosen_mask, t.rejected_mask,
                                    beta=p.beta, chosen_reward_max=p.tso_chosen_reward_max,
                                    rejected_reward_min=p.tso_rejected_reward_min)
    # Rewards are reported unclipped: these say how often the clip stopped a pair pulling.
    metrics["clip/chosen_fraction"] = (out[1] > p.tso_chosen_reward_max).float().mean()
    metrics["clip/rejected_fraction"] = (out[2] < p.tso_rejected_reward_min).float().mean()
    return out


def _simpo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    return losses.simpo_loss(t.chosen_logps, t.rejected_logps, t.chosen_mask, t.rejected_mask, beta=p.simpo_beta,
                             gamma_beta_ratio=p.simpo_gamma_beta_ratio)


def _sepo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    chosen_selected, rejected_selected = t.split("selected_mask")
    metrics.update(_selected_fractions(chosen_selected, rejected_selected, t.chosen_mask, t.rejected_mask))
    return losses.sepo_loss(t.chosen_logps, t.rejected_logps, chosen_selected, rejected_selected,
                            gamma=p.sepo_gamma, margin=p.sepo_margin)


def _sepo_dpo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    chosen_selected, rejected_selected = t.split("selected_mask")
    metrics.update(_selected_fractions(chosen_selected, rejected_selected, t.chosen_mask, t.rejected_mask))
    return losses.selective_ref_dpo_loss(t.chosen_logps, t.rejected_logps, *t.ref, chosen_selected,
                                         rejected_selected, beta=p.beta)


def _selective_dpo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    chosen_selected, rejected_selected = losses.selective_dpo_masks(
        t.chosen_logps, t.rejected_logps, *t.ref, t.chosen_mask, t.rejected_mask, quantile=p.sdpo_quantile)
    metrics.update(_selected_fractions(chosen_selected, rejected_selected, t.chosen_mask, t.rejected_mask))
    return losses.selective_dpo_loss(t.chosen_logps, t.rejected_logps, *t.ref, chosen_selected, rejected_selected,
                                     beta=p.beta)


def _tdpo(variant: str) -> LossFn:
    def loss(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
        assert t.kl is not None
        metrics["kl/chosen"] = masked_sum(t.kl[0], t.chosen_mask).mean().detach()
        metrics["kl/rejected"] = masked_sum(t.kl[1], t.rejected_mask).mean().detach()
        return losses.tdpo_loss(t.chosen_logps, t.rejected_logps, *t.ref, t.chosen_mask, t.rejected_mask, *t.kl,
                                variant=variant, beta=p.beta, alpha=p.tdpo_alpha)

    return loss


def _tgdpo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    return losses.tgdpo_loss(t.chosen_logps, t.rejected_logps, *t.ref, *t.split("token_values"), t.chosen_mask,
                             t.rejected_mask, beta=p.beta, alpha=p.tgdpo_alpha)


def _tis_dpo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    return losses.tis_dpo_loss(t.chosen_logps, t.rejected_logps, *t.ref, *t.split("token_values"), t.chosen_mask,
                               t.rejected_mask, beta=p.beta)


def _confpo(p: LossParams, t: PairTensors, metrics: Metrics) -> losses.LossOutput:
    chosen_kept = losses.confpo_mask(t.chosen_logps, t.chosen_mask)
    rejected_kept = losses.confpo_mask(t.rejected_logps, t.rejected_mask)
    metrics.update(_selected_fractions(chosen_kept, rejected_kept, t.chosen_mask, t.rejected_mask))
    return losses.confpo_loss(t.chosen_logps, t.rejected_logps, chosen_kept, rejected_kept, beta=p.confpo_beta,
                              gamma=p.confpo_gamma)


METHOD_LOSSES: dict[str, LossFn] = {
    "dpo": _dpo, "ipo": _ipo, "tso": _tso, "simpo": _simpo, "sepo": _sepo, "sepo_dpo": _sepo_dpo,
    "selective_dpo": _selective_dpo, "tdpo1": _tdpo("tdpo1"), "tdpo2": _tdpo("tdpo2"), "tgdpo": _tgdpo,
    "tis_dpo": _tis_dpo, "confpo": _confpo,
}


def _reference_logps(method: str, ref_model: Any | None, batch: dict[str, Any], loss_mask: Tensor) -> Tensor:
    """Stored reference log-probs, or the reference model's at `loss_mask` (0 elsewhere)."""
    if "ref_per_token_logps" in batch:
        return batch["ref_per_token_logps"]
    if ref_model is None:
        raise ValueError(f"{method} needs reference log-probs: give a reference model or scores")
    with torch.no_grad():
        return model_per_token_logps(ref_model, batch["input_ids"], batch["attention_mask"], loss_mask,
                                     packed=batch.get("packed"))


def _logps_metrics(t: PairTensors, *, selected_only: bool) -> dict[str, Tensor]:
    """Mean summed policy log-prob per response: `logps/chosen` over all response tokens (TRL's name), or
    `logps/chosen_selected` over the selected tokens only, for methods that compute no other log-probs."""
    suffix = "_selected" if selected_only else ""
    return {f"logps/chosen{suffix}": masked_sum(t.chosen_logps, t.chosen_mask).mean().detach(),
            f"logps/rejected{suffix}": masked_sum(t.rejected_logps, t.rejected_mask).mean().detach()}


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }


def _selected_fractions(chosen_selected: Tensor, rejected_selected: Tensor, chosen_mask: Tensor,
                        rejected_mask: Tensor) -> dict[str, Tensor]:
    return {
        "selected_fraction/chosen": chosen_selected.sum() / chosen_mask.sum().clamp(min=1),
        "selected_fraction/rejected": rejected_selected.sum() / rejected_mask.sum().clamp(min=1),
    }

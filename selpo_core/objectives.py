"""Training objectives: `step_fn(model, batch) -> (loss, metrics)` for SFT and every preference method.

The training loop knows nothing about methods; each step function here does one forward (chosen and
rejected concatenated), calls one pure loss from `losses.py`, and reports TRL's metric names.
"""

from __future__ import annotations

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
    "selective_dpo": ("beta", "sdpo_quantile"),
    "tdpo1": ("beta",),
    "tdpo2": ("beta", "tdpo_alpha"),
    "tso": ("beta", "tso_chosen_reward_max", "tso_rejected_reward_min"),
}
"""The LossParams fields each method's loss reads: exactly what enters its stage key."""

# Methods whose loss needs reference log-probs of the sampled tokens (from a model or from the Parquet).
NEEDS_REF_LOGPS = ("dpo", "ipo", "tso", "selective_dpo")
# Methods that need the full reference distribution at every position (cannot be read from a file).
NEEDS_REF_MODEL_ALWAYS = ("tdpo1", "tdpo2")


def sft_step(model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean negative log-likelihood of the response tokens (prompt and padding masked out)."""
    per_token_logps = model_per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    n_tokens = batch["loss_mask"].sum().clamp(min=1)
    loss = -(per_token_logps * batch["loss_mask"]).sum() / n_tokens
    return loss, {"nll": loss.detach()}


def make_preference_step(method: str, params: LossParams, ref_model: Any | None) -> StepFn:
    """Step function for `method` with the loss hyper-parameters `params` (an OracleConfig or PolicyConfig).

    `ref_model` is used when the batch carries no `ref_per_token_logps`."""
    if method not in LOSS_FIELDS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(LOSS_FIELDS)}")

    def step(model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        input_ids, attention_mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        metrics: dict[str, Tensor] = {}
        if ref_model is not None and next(ref_model.parameters()).device != input_ids.device:
            ref_model.to(input_ids.device)  # the training loop places the policy and batches, not the reference
        if method in NEEDS_REF_MODEL_ALWAYS:
            if ref_model is None:
                raise ValueError(f"{method} needs a reference model at every step")
            policy_logps, ref_logps, per_token_kl = model_logps_and_kl(
                model, ref_model, input_ids, attention_mask, loss_mask
            )
        else:
            policy_logps = model_per_token_logps(model, input_ids, attention_mask, loss_mask)
            ref_logps = _reference_logps(method, ref_model, batch) if method in NEEDS_REF_LOGPS else None
        chosen_logps, rejected_logps = split_pair(policy_logps)
        chosen_mask, rejected_mask = split_pair(loss_mask)
        if method in ("dpo", "ipo", "tso"):
            ref_chosen, ref_rejected = split_pair(ref_logps)
            if method == "dpo":
                out = losses.dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_mask,
                                      rejected_mask, beta=params.beta, label_smoothing=params.label_smoothing)
            elif method == "ipo":
                out = losses.ipo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_mask,
                                      rejected_mask, beta=params.beta)
            else:
                out = losses.tso_dual_clip_loss(
                    chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_mask, rejected_mask,
                    beta=params.beta, chosen_reward_max=params.tso_chosen_reward_max,
                    rejected_reward_min=params.tso_rejected_reward_min,
                )
                # Rewards are reported unclipped: these say how often the clip stopped a pair pulling.
                metrics["clip/chosen_fraction"] = (out[1] > params.tso_chosen_reward_max).float().mean()
                metrics["clip/rejected_fraction"] = (out[2] < params.tso_rejected_reward_min).float().mean()
        elif method == "simpo":
            out = losses.simpo_loss(chosen_logps, rejected_logps, chosen_mask, rejected_mask,
                                    beta=params.simpo_beta, gamma_beta_ratio=params.simpo_gamma_beta_ratio)
        elif method == "sepo":
            chosen_selected, rejected_selected = split_pair(batch["selected_mask"])
            out = losses.sepo_loss(chosen_logps, rejected_logps, chosen_selected, rejected_selected,
                                   gamma=params.sepo_gamma, margin=params.sepo_margin)
            metrics.update(_selected_fractions(chosen_selected, rejected_selected, chosen_mask, rejected_mask))
        elif method == "selective_dpo":
            ref_chosen, ref_rejected = split_pair(ref_logps)
            chosen_selected, rejected_selected = losses.selective_dpo_masks(
                chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_mask, rejected_mask,
                quantile=params.sdpo_quantile,
            )
            out = losses.selective_dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_selected,
                                            rejected_selected, beta=params.beta)
            metrics.update(_selected_fractions(chosen_selected, rejected_selected, chosen_mask, rejected_mask))
        elif method in ("tdpo1", "tdpo2"):
            ref_chosen, ref_rejected = split_pair(ref_logps)
            chosen_kl, rejected_kl = split_pair(per_token_kl)
            out = losses.tdpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_mask,
                                   rejected_mask, chosen_kl, rejected_kl, variant=method, beta=params.beta,
                                   alpha=params.tdpo_alpha)
            metrics["kl/chosen"] = masked_sum(chosen_kl, chosen_mask).mean().detach()
            metrics["kl/rejected"] = masked_sum(rejected_kl, rejected_mask).mean().detach()
        else:
            raise ValueError(f"unknown method {method!r}")
        per_example_losses, chosen_rewards, rejected_rewards = out
        metrics.update(_reward_metrics(chosen_rewards, rejected_rewards))
        metrics["logps/chosen"] = masked_sum(chosen_logps, chosen_mask).mean().detach()
        metrics["logps/rejected"] = masked_sum(rejected_logps, rejected_mask).mean().detach()
        return per_example_losses.mean(), metrics

    return step


def _reference_logps(method: str, ref_model: Any | None, batch: dict[str, Any]) -> Tensor:
    if "ref_per_token_logps" in batch:
        return batch["ref_per_token_logps"]
    if ref_model is None:
        raise ValueError(f"{method} needs reference log-probs: give a reference model or scores")
    with torch.no_grad():
        return model_per_token_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])


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

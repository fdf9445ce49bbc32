"""The training stages: SFT (the reference, and a separate policy model's start), the oracle, and the policy.

Every stage keys on what its training reads: its loss's own hyper-parameters (`objectives.LOSS_FIELDS`), the
training settings that can change the weights (not logging or checkpoint cadence), and its inputs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selpo_core.artifacts import StageOutput
from selpo_core.config import TRAIN_FIELDS_NOT_IN_KEY, ModelConfig, RunConfig, TrainConfig, save_config, to_dict
from selpo_core.objectives import (
    LOSS_FIELDS,
    NEEDS_REF_LOGPS,
    NEEDS_REF_MODEL_ALWAYS,
    NEEDS_SELECTION,
    NEEDS_TOKEN_VALUES,
)
from selpo_core.stages.plan import StageInput, StagePlan
from selpo_core.stages.prepare import tokenized_pairs

log = logging.getLogger("selpo.stages")


def train_key(train: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(train).items() if k not in TRAIN_FIELDS_NOT_IN_KEY}


def loss_key(method: str, params: Any) -> dict[str, Any]:
    return {name: getattr(params, name) for name in LOSS_FIELDS[method]}


def _fp32() -> Any:
    import torch

    return torch.float32


def _train_metrics(result: Any, n_params: int) -> dict[str, Any]:
    return {"steps": result.steps, "seconds": round(result.seconds, 2), "parameters": n_params,
            "tokens_per_second": round(result.tokens_per_second, 1), "total_tokens": result.total_tokens,
            "total_tokens_per_second": round(result.total_tokens_per_second, 1), **result.final_metrics}


# ---------------------------------------------------------------------------------------------------- SFT


def plan_sft(cfg: RunConfig, which: str, data: StageInput, base: StageInput) -> StagePlan:
    """SFT of `cfg.<which>` (reference or policy_model) from `base`: the model path, or the synthetic task
    (whose tokenizer a tiny model is built over)."""
    model_cfg: ModelConfig = getattr(cfg, which)
    section = {"train": train_key(cfg.sft.train), "model": {k: v for k, v in to_dict(model_cfg).items() if k != "path"}}
    return StagePlan(f"sft_{which}", "sft", f"SFT {which.replace('_', ' ')}", section,
                     {"data": data, "base": base})


def _init_model(model_cfg: ModelConfig, base: str, from_task: bool) -> tuple[Any, Any]:
    """The starting weights: a real checkpoint, or a tiny model over the synthetic task's tokenizer."""
    from selpo_core import models

    if not from_task:
        tokenizer = models.load_tokenizer(base, trust_remote_code=model_cfg.trust_remote_code)
        # fp32 master weights: training uses bf16 autocast, never bf16 weights.
        model = models.load_model(base, dtype=_fp32(), trust_remote_code=model_cfg.trust_remote_code)
        return model, tokenizer
    tokenizer = models.load_tokenizer(f"{base}/tokenizer")
    return models.build_tiny_model(model_cfg, tokenizer), tokenizer


def run_sft(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    from selpo_core import data, models
    from selpo_core.objectives import sft_step
    from selpo_core.train import train

    which = plan.name.removeprefix("sft_")
    model_cfg: ModelConfig = getattr(cfg, which)
    model, tokenizer = _init_model(model_cfg, inputs["base"], from_task=not model_cfg.path)
    model = models.maybe_apply_lora(model, model_cfg)
    rows = data.load_sft_data(f"{inputs['data']}/sft.jsonl")
    items = data.tokenize_sft(rows, tokenizer, cfg.data)
    result = train(model, sft_step, items, lambda batch: data.collate_sft(batch, tokenizer.pad_token_id),
                   [item.length for item in items], cfg.sft.train, out.partial_dir / "checkpoints",
                   log_dir=out.work_dir / "tb", desc=f"sft {which}")
    models.save_model_dir(model, tokenizer, out.work_dir / "model")
    save_config(cfg.sft, out.work_dir / "config.yaml")
    out.metrics.update(_train_metrics(result, models.count_parameters(model)))


# ------------------------------------------------------------------------------------------------- oracle


def plan_oracle(cfg: RunConfig, data: StageInput, reference: StageInput, *, reverse: bool = False) -> StagePlan:
    """The oracle; `reverse`: the same training with chosen and rejected swapped (TIS-DPO's contrastive pair)."""
    oracle = cfg.oracle
    section = {"loss": oracle.loss, "loss_params": loss_key(oracle.loss, oracle), "subset_fraction":
               oracle.subset_fraction, "subset_count": oracle.subset_count, "subset_seed": oracle.subset_seed,
               "train": train_key(oracle.train), "reverse": reverse}
    name, title = ("oracle_reverse", "train reverse oracle") if reverse else ("oracle", "train oracle")
    return StagePlan(name, "oracle", title, section, {"data": data, "reference": reference})


def _swapped(pair: Any) -> Any:
    """The pair with its preference reversed (same example, rejected as chosen)."""
    from dataclasses import replace

    return replace(pair, chosen_ids=pair.rejected_ids, rejected_ids=pair.chosen_ids, chosen_text=pair.rejected_text,
                   rejected_text=pair.chosen_text, chosen_offsets=pair.rejected_offsets,
                   rejected_offsets=pair.chosen_offsets)


def oracle_subset(cfg: RunConfig, pairs: list[Any]) -> list[Any]:
    count = cfg.oracle.subset_count or max(1, int(round(cfg.oracle.subset_fraction * len(pairs))))
    count = min(count, len(pairs))
    indices = sorted(random.Random(cfg.oracle.subset_seed).sample(range(len(pairs)), count))
    return [pairs[i] for i in indices]


def run_oracle(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """DPO (or IPO/SimPO) from the reference on a seeded random subset of the training pairs."""
    from selpo_core import data, models
    from selpo_core.objectives import make_preference_step
    from selpo_core.train import train

    tokenizer = models.load_tokenizer(inputs["reference"])
    pairs = oracle_subset(cfg, tokenized_pairs(cfg, inputs["data"], tokenizer, name="reference"))
    if plan.section.get("reverse"):
        pairs = [_swapped(pair) for pair in pairs]
    model = models.load_model(inputs["reference"], dtype=_fp32())
    ref_model = models.frozen_copy(model) if cfg.oracle.loss != "simpo" else None
    packed = _packing(cfg.oracle.train.pack_pairs, model)
    result = train(model, make_preference_step(cfg.oracle.loss, cfg.oracle, ref_model), pairs,
                   lambda batch: data.collate_pairs(batch, tokenizer.pad_token_id, packed=packed),
                   [pair.length for pair in pairs], cfg.oracle.train, out.partial_dir / "checkpoints",
                   log_dir=out.work_dir / "tb", desc="oracle", frozen_forward_params=_forward_params(ref_model))
    models.save_model_dir(model, tokenizer, out.work_dir / "model")
    save_config(cfg.oracle, out.work_dir / "config.yaml")
    out.metrics.update({"n_pairs": len(pairs), **_train_metrics(result, models.count_parameters(model))})


# ------------------------------------------------------------------------------------------------- policy


def plan_policy(cfg: RunConfig, method: str, data: StageInput, policy_init: StageInput, anchor: StageInput, *,
                ref_logps: tuple[StageInput, str] | None, selection: StageInput | None,
                token_values: tuple[StageInput, str, float] | None = None, label: str = "",
                title: str = "") -> StagePlan:
    """Train the policy with one method from `policy_init`. Inputs are only what the method reads: the anchor
    model (DPO family without stored log-probs, TDPO always), the anchor's stored log-probs (the score stage and
    its column: `ref_logps` of the reference, `oracle_logps` of the oracle), the selection (sepo, sepo_dpo),
    stored per-token values (a stage, its Parquet column, a scale: TGDPO's token rewards, TIS-DPO's weights).

    `label` names the stage when one method is trained several times in a run (TSO rounds); `title` the task."""
    p = cfg.policy
    section: dict[str, Any] = {"method": method, "loss_params": loss_key(method, p), "train": train_key(p.train),
                               "lora": {"r": cfg.policy_model.lora_r, "alpha": cfg.policy_model.lora_alpha}}
    inputs: dict[str, StageInput] = {"data": data, "policy_init": policy_init}
    if method in NEEDS_REF_LOGPS and ref_logps is not None:
        inputs["ref_logps"], section["ref_logps_column"] = ref_logps
    elif method in NEEDS_REF_LOGPS or method in NEEDS_REF_MODEL_ALWAYS:
        inputs["anchor"] = anchor
    if method in NEEDS_SELECTION:
        if selection is None:
            raise ValueError(f"{method} trains on selected tokens: it needs the select stage")
        inputs["selection"] = selection
    if method in NEEDS_TOKEN_VALUES:
        if token_values is None:
            raise ValueError(f"{method} weights tokens by stored values: it needs their stage")
        inputs["token_values"], section["token_values_column"], section["token_values_scale"] = token_values
    name = label or method
    return StagePlan(f"policy_{name}", "policy", title or f"train policy [{name}]", section, inputs)


def run_policy(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """Train the policy with one method from the same data, scores and selection as every other method."""
    from selpo_core import data, models
    from selpo_core.objectives import make_preference_step
    from selpo_core.train import train

    method = plan.section["method"]
    init_dir = inputs["policy_init"]
    tokenizer = models.load_tokenizer(init_dir)
    pairs = tokenized_pairs(cfg, inputs["data"], tokenizer, name="policy")
    model = models.load_model(init_dir, dtype=_fp32())
    per_token = _per_token_inputs(plan, inputs)
    ref_model = None
    if "anchor" in inputs:
        same = plan.inputs["anchor"].fingerprint == plan.inputs["policy_init"].fingerprint
        ref_model = models.frozen_copy(model if same else models.load_model(inputs["anchor"], dtype=_fp32()))
    model = models.maybe_apply_lora(model, cfg.policy_model)
    packed = _packing(cfg.policy.train.pack_pairs, model)

    def collate(batch: list[Any]) -> dict[str, Any]:
        return data.collate_pairs(batch, tokenizer.pad_token_id, packed=packed, **_pair_extras(batch, per_token))

    result = train(model, make_preference_step(method, cfg.policy, ref_model), pairs, collate,
                   [pair.length for pair in pairs], cfg.policy.train, out.partial_dir / "checkpoints",
                   log_dir=out.work_dir / "tb", desc=f"policy {plan.name.removeprefix('policy_')}",
                   frozen_forward_params=_forward_params(ref_model))
    models.save_model_dir(model, tokenizer, out.work_dir / "model")
    save_config(cfg.policy, out.work_dir / "config.yaml")
    out.metrics.update({"method": method, "reads_ref_logps_from_scores": "ref_logps" in inputs,
                        "trained_token_fraction": _trained_token_fraction(method, pairs, per_token, result),
                        **_train_metrics(result, models.count_parameters(model))})


@dataclass
class PerToken:
    """A stored per-token input of the policy: its (example_id, side) -> row lookup, the column, a scale."""

    lookup: dict[tuple[str, str], dict[str, Any]]
    column: str
    scale: float = 1.0


def _per_token_inputs(plan: StagePlan, inputs: dict[str, str]) -> dict[str, PerToken]:
    """collate_pairs' keyword prefix (selected, ref_logps, values) -> what the policy stage reads for it."""
    import pyarrow.parquet as pq

    from selpo_core.scoring import read_scores, scores_to_pair_lookup

    out: dict[str, PerToken] = {}
    if "selection" in inputs:
        out["selected"] = PerToken(scores_to_pair_lookup(pq.read_table(f"{inputs['selection']}/selection.parquet")),
                                   "selected")
    if "ref_logps" in inputs:
        out["ref_logps"] = PerToken(scores_to_pair_lookup(read_scores(f"{inputs['ref_logps']}/scores")),
                                    plan.section["ref_logps_column"])
    if "token_values" in inputs:
        column = plan.section["token_values_column"]
        source = Path(inputs["token_values"])
        table = pq.read_table(source / ("weights.parquet" if column == "weights" else "selection.parquet"))
        out["values"] = PerToken(scores_to_pair_lookup(table), column, plan.section["token_values_scale"])
    return out


def _pair_extras(batch: list[Any], per_token: dict[str, PerToken]) -> dict[str, Any]:
    """collate_pairs' per-response keyword lists, looked up by (example_id, side) on the policy's own tokens."""
    kwargs: dict[str, Any] = {}
    for prefix, source in per_token.items():
        for side in ("chosen", "rejected"):
            values = []
            for pair in batch:
                row = source.lookup[(pair.example_id, side)]
                expected = pair.chosen_ids if side == "chosen" else pair.rejected_ids
                if list(row["token_ids"]) != list(expected):
                    raise ValueError(f"{prefix} of example {pair.example_id} ({side}) was computed on other tokens "
                                     "than the policy's: the artifacts do not match this data or tokenizer")
                value = row[source.column]
                values.append(value if source.scale == 1.0 else [v * source.scale for v in value])
            kwargs[f"{side}_{prefix}"] = values
    return kwargs


def _trained_token_fraction(method: str, pairs: list[Any], per_token: dict[str, PerToken], result: Any) -> float:
    """Fraction of response tokens whose log-prob enters the loss."""
    if "selected" in per_token:
        selected = sum(sum(row["selected"]) for row in per_token["selected"].lookup.values())
        total = sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)
        return round(selected / max(1, total), 4)
    if method in ("selective_dpo", "confpo"):  # masks built each step: their fraction at the last logged steps
        chosen = result.final_metrics.get("selected_fraction/chosen", float("nan"))
        rejected = result.final_metrics.get("selected_fraction/rejected", float("nan"))
        return round((chosen + rejected) / 2, 4)
    return 1.0


def _packing(requested: bool, model: Any) -> bool:
    """Pack pair rows when asked and the model keeps packed sequences apart; say so when it cannot."""
    from selpo_core.logps import supports_packing

    if not requested:
        return False
    if not supports_packing(model):
        log.warning("train.pack_pairs: %s cannot keep packed sequences apart; training on padded rows",
                    type(model).__name__)
        return False
    return True


def _forward_params(ref_model: Any | None) -> int:
    """Matmul parameters of the reference that runs forward on every batch (for the FLOP/s and MFU metrics)."""
    from selpo_core.hardware import flop_parameters

    return flop_parameters(ref_model)[0] if ref_model is not None else 0

"""The token stages: offline scoring (oracle vs reference log-probs of every response token, Parquet shards) and
key-token selection on the policy's tokens (SePO top/bottom-k or a global threshold, plus the heatmap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selpo_core.artifacts import StageOutput, code_version, stable_hash
from selpo_core.config import RunConfig, save_config, to_dict
from selpo_core.stages import dist
from selpo_core.stages.plan import StageInput, StagePlan
from selpo_core.stages.prepare import tokenized_pairs

SCORE_FIELDS_NOT_IN_REF_LOGPS = ("beta", "one_model_at_a_time")
"""Score settings that cannot change the stored reference log-probs (beta scales only the rewards)."""


def plan_score(cfg: RunConfig, data: StageInput, oracle: StageInput, reference: StageInput, *,
               reverse: bool = False) -> StagePlan:
    """`reverse`: the reverse oracle's log-probs (TIS-DPO) in the same format, as stage score_reverse."""
    name, title = ("score_reverse", "score tokens (reverse oracle)") if reverse else ("score", "score tokens")
    return StagePlan(name, "score", title, {"score": to_dict(cfg.score)},
                     {"data": data, "oracle": oracle, "reference": reference})


StoredLogps = tuple[StageInput, str]
"""A source of per-token log-probs of one model: the score stage (as an input) and the column that holds them."""


def stored_logps(score: StagePlan) -> dict[str, StoredLogps]:
    """{model fingerprint: stored log-probs} of the two models the score stage ran, its reference (ref_logps)
    and its oracle (oracle_logps). Each source's fingerprint holds only what that column depends on (the data,
    that model, the scoring settings), so a method anchored to the reference (dpo, ipo, tso) keeps its key when
    the oracle or score.beta change."""
    settings = {k: v for k, v in score.section["score"].items() if k not in SCORE_FIELDS_NOT_IN_REF_LOGPS}

    def source(role: str, column: str) -> StoredLogps:
        fingerprint = stable_hash({"data": score.inputs["data"].fingerprint, "settings": settings,
                                   "model": score.inputs[role].fingerprint, "code": code_version()})
        return StageInput(fingerprint=f"{column}:{fingerprint}", stage=score.dirname), column

    return {score.inputs["reference"].fingerprint: source("reference", "ref_logps"),
            score.inputs["oracle"].fingerprint: source("oracle", "oracle_logps")}


def run_score(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """Per-token rewards beta * (log pi_oracle - log pi_ref) of every training response, as Parquet shards."""
    from selpo_core import models, scoring

    tokenizer = models.load_tokenizer(inputs["reference"])
    pairs = tokenized_pairs(cfg, inputs["data"], tokenizer)
    shard_dir = out.partial_dir / "scores"
    rank, world_size = dist.rank_and_world()
    out.metrics.update(scoring.score_pairs(pairs, Path(inputs["oracle"]), Path(inputs["reference"]), cfg.score,
                                           shard_dir, rank=rank, world_size=world_size))
    dist.barrier()
    if rank != 0:  # the other ranks' shards are done; the main process assembles and publishes
        return
    (out.work_dir / "scores").mkdir()
    for shard in sorted([*shard_dir.glob("part-*.parquet"), *shard_dir.glob("plan.json")]):
        shard.rename(out.work_dir / "scores" / shard.name)
    if (Path(inputs["data"]) / "task.json").is_file():
        scores = scoring.read_scores(out.work_dir / "scores")
        out.metrics.update(_oracle_truth_metrics(scores, Path(inputs["data"]), tokenizer))
    else:  # real data: how well the oracle's implicit reward orders the held-out pairs
        out.metrics.update(_oracle_heldout_metrics(cfg, inputs, tokenizer))
    save_config(cfg.score, out.work_dir / "config.yaml")


def _oracle_heldout_metrics(cfg: RunConfig, inputs: dict[str, str], tokenizer: Any) -> dict[str, Any]:
    from selpo_core.evaluate import implicit_reward_accuracy, wilson_interval

    heldout = tokenized_pairs(cfg, inputs["data"], tokenizer, "heldout", name="reference")
    if not heldout:
        return {}
    # A fixed batch: the score stage's key does not hold evaluate.batch_size.
    accuracy = implicit_reward_accuracy(inputs["oracle"], inputs["reference"], heldout, batch_size=16)
    return {"oracle_heldout_accuracy": accuracy["accuracy"], "oracle_heldout_n": len(heldout),
            "oracle_heldout_ci95": list(wilson_interval(accuracy["accuracy"] * len(heldout), len(heldout)))}


def _oracle_truth_metrics(table: Any, data_dir: Path, tokenizer: Any) -> dict[str, float]:
    """Token AUROC of the oracle's rewards against the synthetic task's key words (with and without special
    tokens such as EOS) and precision at the key rate."""
    from selpo_core.oracle_quality import score_truth_metrics
    from selpo_core.selection_stage import special_token_ids
    from selpo_core.synthetic import GroundTruth

    truth = GroundTruth.load(data_dir)
    rows = table.to_pylist()
    labels = [truth.key_labels(list(zip(row["offset_start"], row["offset_end"])), row["text"]) for row in rows]
    return score_truth_metrics(rows, labels, special_token_ids(tokenizer))


def plan_select(cfg: RunConfig, data: StageInput, scores: StageInput, policy_init: StageInput) -> StagePlan:
    """Selection on the policy's tokens: it reads the policy's tokenizer, so it keys on the policy's start."""
    return StagePlan("select", "select", "select key tokens", {"select": to_dict(cfg.select)},
                     {"data": data, "scores": scores, "policy_init": policy_init})


def run_select(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """selection.parquet (example_id, side, token_ids, rewards, selected) and token_heatmap.html."""
    from selpo_core import models, selection_stage

    policy_tokenizer = models.load_tokenizer(inputs["policy_init"])
    policy_pairs = tokenized_pairs(cfg, inputs["data"], policy_tokenizer)
    data_dir = Path(inputs["data"])
    truth_dir = data_dir if (data_dir / "task.json").is_file() else None
    out.metrics.update(selection_stage.write_selection(
        cfg.select, Path(inputs["scores"]) / "scores", policy_pairs, out.work_dir,
        special_token_ids=selection_stage.special_token_ids(policy_tokenizer), truth_dir=truth_dir,
    ))
    save_config(cfg.select, out.work_dir / "config.yaml")


def plan_tis_weights(cfg: RunConfig, data: StageInput, scores: StageInput, reverse_scores: StageInput,
                     policy_init: StageInput) -> StagePlan:
    """TIS-DPO's token weights on the policy's tokens, from the DPO oracle's and the reverse oracle's scores."""
    p = cfg.policy
    section = {"tis": {"weighting": p.tis_weighting, "min_weight": p.tis_min_weight, "max_weight": p.tis_max_weight,
                       "score_clip": p.tis_score_clip, "k": p.tis_k}}
    return StagePlan("tis_weights", "tis_weights", "TIS-DPO token weights", section,
                     {"data": data, "scores": scores, "reverse_scores": reverse_scores, "policy_init": policy_init})


def run_tis_weights(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    from selpo_core import models, selection_stage

    tokenizer = models.load_tokenizer(inputs["policy_init"])
    policy_pairs = tokenized_pairs(cfg, inputs["data"], tokenizer, name="policy")
    out.metrics.update(selection_stage.write_tis_weights(
        cfg.policy, Path(inputs["scores"]) / "scores", Path(inputs["reverse_scores"]) / "scores", policy_pairs,
        out.work_dir, special_token_ids=selection_stage.special_token_ids(tokenizer)))

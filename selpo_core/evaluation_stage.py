"""The evaluate stage: what can be measured offline about one trained policy.

Any data: KL(policy || reference) estimated on the policy's answers, answer length, the rate of answers that
end with EOS, implicit-reward accuracy on the held-out pairs (with its count and a 95% interval); with a
reward model, its mean score and the win rate against the baseline's answers (default: the reference's).
Synthetic task: also the mean true reward of the policy's answers and its gain over the reference's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selpo_core.benchmarks_io import GenerationRecord, read_generations
from selpo_core.config import EvaluateConfig


def _single_turn(records: list[GenerationRecord]) -> tuple[list[str], list[str], list[bool]]:
    """(prompt, answer, ended) per sample; multi-turn records contribute their last turn."""
    prompts, answers, ended = [], [], []
    for record in records:
        for sample, reasons in zip(record.answers, record.finish_reasons):
            prompts.append(record.turns[-1])
            answers.append(sample[-1])
            ended.append(reasons[-1] == "eos")
    return prompts, answers, ended


def evaluate_run(cfg: EvaluateConfig, *, data_dir: Path, generations_dir: Path, reference_generations_dir: Path,
                 model_dir: Path, reference_dir: Path, heldout_pairs: list[Any], reward_model: str = "",
                 baseline_answers: str = "") -> dict[str, Any]:
    """`heldout_pairs`: the data stage's held-out pairs in the policy's tokens; `reward_model` / `baseline_answers`:
    cfg.evaluate's paths as the stage resolved them (empty: none)."""
    from selpo_core import evaluate

    records = read_generations(generations_dir / "generations.jsonl")
    prompts, answers, ended = _single_turn(records)
    metrics: dict[str, Any] = {"n_answers": len(answers),
                               "eos_rate": sum(ended) / len(ended) if ended else float("nan")}
    reference_prompts, reference_answers, _ = _single_turn(
        read_generations(reference_generations_dir / "generations.jsonl"))
    if (data_dir / "task.json").is_file():
        truth = evaluate.synthetic_metrics(answers, reference_answers, prompts, data_dir, model_dir, reference_dir,
                                           policy_ended=ended, batch_size=cfg.batch_size)
        metrics.update({"mean_reward": truth["true_reward"], "reference_reward": truth["true_reward_reference"],
                        "reward_gain": truth["reward_gain"]})
    else:
        truth = evaluate.answer_metrics(answers, prompts, model_dir, reference_dir, policy_ended=ended,
                                        batch_size=cfg.batch_size)
    metrics.update({"kl": truth["kl_seq"], "kl_per_token": truth["kl_per_token"],
                    "answer_words": truth["answer_words"], "answer_tokens": truth["answer_tokens"]})
    if reward_model:
        scores = evaluate.reward_model_scores(reward_model, prompts, answers, batch_size=cfg.batch_size)
        metrics["reward_model_score"] = sum(scores) / max(1, len(scores))
        # Against the baseline's answers when given, else the reference's (the policy's own start).
        if baseline_answers:
            _, baseline, _ = _single_turn(read_generations(baseline_answers))
        elif reference_prompts == prompts:
            baseline = reference_answers
        else:
            baseline = []
        if baseline:
            metrics.update({f"win/{k}": v for k, v in evaluate.pairwise_win_rate(
                reward_model, prompts, answers, baseline, batch_size=cfg.batch_size).items()})
    if heldout_pairs:
        accuracy = evaluate.implicit_reward_accuracy(model_dir, reference_dir, heldout_pairs,
                                                     batch_size=cfg.batch_size)
        low, high = evaluate.wilson_interval(accuracy["accuracy"] * accuracy["n"], accuracy["n"])
        metrics.update({"implicit_reward_accuracy": accuracy["accuracy"], "implicit_reward_n": int(accuracy["n"]),
                        "implicit_reward_ci95": [low, high],
                        # In log-ratio units (the implicit reward over beta): the same whatever the method's beta.
                        "implicit_logratio_margin": accuracy["margin"]})
    return metrics

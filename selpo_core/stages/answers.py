"""The answer stages: generation (benchmark prompts answered by one model) and offline evaluation of a policy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from selpo_core.artifacts import StageOutput
from selpo_core.config import RunConfig, save_config, to_dict
from selpo_core.stages.plan import StageInput, StagePlan, external
from selpo_core.stages.prepare import tokenized_pairs

GENERATE_FIELDS_NOT_IN_KEY = ("prompts", "vllm_python")
"""Generation settings that are inputs (the prompts file, by content) or cannot change an answer."""


def plan_generate(cfg: RunConfig, data: StageInput, model: StageInput, label: str, title: str = "") -> StagePlan:
    """Answer cfg.generate.prompts (or the data stage's prompts.jsonl) with `model`; `label` names the answers."""
    section = {"generate": {k: v for k, v in to_dict(cfg.generate).items() if k not in GENERATE_FIELDS_NOT_IN_KEY},
               "label": label}
    prompts = external(cfg.generate.prompts) if cfg.generate.prompts else replace(data, sub="prompts.jsonl")
    return StagePlan(f"generate_{label}", "generate", title or f"generate [{label}]", section,
                     {"prompts": prompts, "model": model})


def run_generate(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    from selpo_core.generate import generate_answers

    label = plan.section["label"]
    out.metrics.update(generate_answers(cfg.generate, Path(inputs["model"]), inputs["prompts"], out.work_dir,
                                        model_name=label))
    save_config(cfg.generate, out.work_dir / "config.yaml")


def plan_evaluate(cfg: RunConfig, data: StageInput, generations: StageInput, reference_generations: StageInput,
                  model: StageInput, reference: StageInput, label: str, title: str = "") -> StagePlan:
    """Evaluate the answers of `model` (a policy) against those of `reference` (its start)."""
    section = {"evaluate": {k: v for k, v in to_dict(cfg.evaluate).items()
                            if k not in ("reward_model", "baseline_answers")}, "label": label}
    inputs = {"data": data, "generations": generations, "reference_generations": reference_generations,
              "model": model, "reference": reference}
    if cfg.evaluate.reward_model:
        inputs["reward_model"] = external(cfg.evaluate.reward_model)
    if cfg.evaluate.baseline_answers:
        inputs["baseline_answers"] = external(cfg.evaluate.baseline_answers)
    return StagePlan(f"evaluate_{label}", "evaluate", title or f"evaluate [{label}]", section, inputs)


def run_evaluate(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """metrics.json + report.md: ground-truth reward gain and KL (synthetic), reward model, implicit accuracy."""
    from selpo_core.evaluate import write_report
    from selpo_core.evaluation_stage import evaluate_run
    from selpo_core.models import load_tokenizer

    data_dir = Path(inputs["data"])
    heldout = tokenized_pairs(cfg, data_dir, load_tokenizer(inputs["model"]), "heldout", name="policy")
    metrics = evaluate_run(cfg.evaluate, data_dir=data_dir, generations_dir=Path(inputs["generations"]),
                           reference_generations_dir=Path(inputs["reference_generations"]),
                           model_dir=Path(inputs["model"]), reference_dir=Path(inputs["reference"]),
                           heldout_pairs=heldout,
                           reward_model=inputs.get("reward_model", ""),
                           baseline_answers=inputs.get("baseline_answers", ""))
    write_report(metrics, out.work_dir, title=f"selpo evaluation: {plan.section['label']}")
    out.metrics.update(metrics)


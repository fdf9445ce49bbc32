"""The pipeline's stages as plain functions: `(cfg, inputs...) -> artifact dir`, no Prefect.

Each stage computes its key from its own config section, its inputs' fingerprints and the code version,
returns at once when `<run_dir>/<stage>-<key>/` is complete, and otherwise writes it atomically. So the same
function serves a notebook, `python -m selpo_core.stages` in a fresh process, and a Prefect task (which adds
its own cache, retries and UI on top).
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selpo_core.artifacts import StageOutput, is_complete, read_manifest, stage_key, stage_output
from selpo_core.config import ModelConfig, RunConfig, load_run_config, save_config, to_dict

log = logging.getLogger("selpo.stages")


class InjectedFailure(RuntimeError):
    """Raised by `fail_stage` (a testing aid to exercise resume of a failed run)."""


_PLAN_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("selpo_plan_only", default=False)


def planned_dir(stage_fn: Callable[..., Path], cfg: RunConfig, *args: Any, **kwargs: Any) -> Path:
    """Where `stage_fn(cfg, *args)` writes (or has written) its artifact, without running it.

    The Prefect tasks use this as their cache key, so Prefect's cache and the directory agree by construction.
    """
    token = _PLAN_ONLY.set(True)
    try:
        return stage_fn(cfg, *args, **kwargs)
    finally:
        _PLAN_ONLY.reset(token)


def run_stage(cfg: RunConfig, stage: str, section: dict[str, Any], inputs: dict[str, str | Path],
              body: Callable[[StageOutput], None]) -> Path:
    """Run `body` into a fresh stage dir unless a complete one with the same key exists."""
    key = stage_key(stage, section, inputs)
    final = cfg.run_dir / f"{stage}-{key}"
    if _PLAN_ONLY.get():
        return final
    if is_complete(final):
        log.info("%s: reusing %s", stage, final)
        return final
    rank, world_size = _rank_and_world()
    if world_size > 1:
        _init_distributed()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    log.info("%s: writing %s", stage, final)
    with stage_output(cfg.run_dir, stage, key, inputs=inputs, config=section, main_process=rank == 0) as out:
        if cfg.fail_stage and stage.split("_")[0] == cfg.fail_stage:
            raise InjectedFailure(f"fail_stage={cfg.fail_stage!r}: failing stage {stage} on purpose")
        body(out)
        _barrier()  # every rank's part (shards, gradients) is done before the main process publishes
    _barrier()  # nobody reads the stage before it is published
    return final


def _init_distributed() -> None:
    """Under torchrun every rank runs each stage collectively; stages without accelerate need the group too."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


# ------------------------------------------------------------------------------------------------- data


def make_synthetic(cfg: RunConfig) -> Path:
    """The built-in task (tokenizer, SFT corpus, pairs, ground truth, held-out prompts)."""
    from selpo_core import synthetic

    def body(out: StageOutput) -> None:
        out.metrics.update(synthetic.write_task(cfg.synthetic, out.work_dir))

    return run_stage(cfg, "synthetic", {"synthetic": to_dict(cfg.synthetic)}, {}, body)


def prepare_data(cfg: RunConfig, task_dir: Path | None) -> Path:
    """Validate the preference data once and split off the held-out pairs.

    Writes train.jsonl / heldout.jsonl (normalised pairs with example_id), sft.jsonl (the synthetic corpus, or
    prompt + chosen of the training pairs), prompts.jsonl (what generation answers) and report.json.
    """
    from selpo_core import data

    data_cfg = cfg.data
    if not data_cfg.path:
        if task_dir is None:
            raise ValueError("data.path is empty and no synthetic task was made: set data.path")
        data_cfg = _replace(data_cfg, path=str(task_dir / "pairs.jsonl"), format="standard")
    inputs: dict[str, str | Path] = {"pairs": data_cfg.path}
    if task_dir is not None:
        inputs["task"] = task_dir

    def body(out: StageOutput) -> None:
        examples, report = data.load_preference_data(data_cfg)
        train, heldout = data.split_heldout(examples, data_cfg.heldout_fraction, data_cfg.seed)
        _write_examples(out.file("train.jsonl"), train)
        _write_examples(out.file("heldout.jsonl"), heldout)
        if task_dir is not None:
            for name in ("sft.jsonl", "prompts.jsonl", "task.json", "truth.jsonl"):
                out.file(name).write_bytes((task_dir / name).read_bytes())
        else:
            with open(out.file("sft.jsonl"), "w") as handle:
                for row in data.sft_rows_from_examples(train):
                    handle.write(json.dumps(row) + "\n")
        out.metrics.update({"n_train": len(train), "n_heldout": len(heldout), **_report_dict(report)})

    return run_stage(cfg, "data", {"data": to_dict(cfg.data)}, inputs, body)


def _write_examples(path: Path, examples: list[Any]) -> None:
    with open(path, "w") as handle:
        for example in examples:
            # The source row travels along so tokenize-time errors still name it.
            handle.write(json.dumps({"example_id": example.example_id, "prompt": example.prompt,
                                     "chosen": example.chosen, "rejected": example.rejected,
                                     "row": example.row}) + "\n")


def read_examples(path: Path) -> list[Any]:
    from selpo_core.data import PreferenceExample

    with open(path) as handle:
        return [PreferenceExample(**json.loads(line)) for line in handle if line.strip()]


def _report_dict(report: Any) -> dict[str, Any]:
    metrics = {"data/n_rows": report.n_rows, "data/n_kept": report.n_kept, "data/format": report.format}
    metrics.update({f"data/skipped/{reason}": count for reason, count in report.skipped.items()})
    return metrics


def _replace(config: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(config, **changes)


# ------------------------------------------------------------------------------------------------ models


def _init_model(model_cfg: ModelConfig, data_dir: Path, task_dir: Path | None) -> tuple[Any, Any]:
    """The starting weights: a real checkpoint, or a tiny model over the synthetic task's tokenizer."""
    from selpo_core import models

    if model_cfg.path:
        tokenizer = models.load_tokenizer(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
        # fp32 master weights: training uses bf16 autocast, never bf16 weights.
        model = models.load_model(model_cfg.path, dtype=_fp32(), trust_remote_code=model_cfg.trust_remote_code)
    else:
        if task_dir is None:
            raise ValueError("model path is empty and there is no synthetic task: set reference.path")
        tokenizer = models.load_tokenizer(str(task_dir / "tokenizer"))
        model = models.build_tiny_model(model_cfg, tokenizer)
    return model, tokenizer


def sft(cfg: RunConfig, data_dir: Path, task_dir: Path | None, which: str) -> Path:
    """Supervised fine-tuning of `cfg.<which>` (reference or policy_model) on data_dir/sft.jsonl."""
    from selpo_core import data, models
    from selpo_core.objectives import sft_step
    from selpo_core.train import train

    model_cfg: ModelConfig = getattr(cfg, which)
    section = {"sft": to_dict(cfg.sft), "model": to_dict(model_cfg), "data": to_dict(cfg.data)}
    inputs: dict[str, str | Path] = {"data": data_dir}
    if task_dir is not None:
        inputs["task"] = task_dir

    def body(out: StageOutput) -> None:
        model, tokenizer = _init_model(model_cfg, data_dir, task_dir)
        model = models.maybe_apply_lora(model, model_cfg)
        rows = data.load_sft_data(data_dir / "sft.jsonl")
        items = data.tokenize_sft(rows, tokenizer, cfg.data)
        result = train(model, sft_step, items, lambda batch: data.collate_sft(batch, tokenizer.pad_token_id),
                       [item.length for item in items], cfg.sft.train, out.partial_dir / "checkpoints",
                       log_dir=out.work_dir / "tb", desc=f"sft {which}")
        models.save_model_dir(model, tokenizer, out.work_dir / "model")
        save_config(cfg.sft, out.work_dir / "config.yaml")
        out.metrics.update(_train_metrics(result, models.count_parameters(model)))

    return run_stage(cfg, f"sft_{which}", section, inputs, body)


def _train_metrics(result: Any, n_params: int) -> dict[str, Any]:
    return {"steps": result.steps, "seconds": round(result.seconds, 2), "parameters": n_params,
            "tokens_per_second": round(result.tokens_per_second, 1), **result.final_metrics}


# ------------------------------------------------------------------------------------------------ oracle


def tokenized_pairs(cfg: RunConfig, data_dir: Path, tokenizer: Any, split: str = "train") -> list[Any]:
    from selpo_core import data

    path = data_dir / f"{split}.jsonl"
    pairs, _report = data.tokenize_pairs(read_examples(path), tokenizer, cfg.data, source=str(path))
    return pairs


def oracle_subset(cfg: RunConfig, pairs: list[Any]) -> list[Any]:
    count = cfg.oracle.subset_count or max(1, int(round(cfg.oracle.subset_fraction * len(pairs))))
    count = min(count, len(pairs))
    indices = sorted(random.Random(cfg.oracle.subset_seed).sample(range(len(pairs)), count))
    return [pairs[i] for i in indices]


def train_oracle(cfg: RunConfig, data_dir: Path, reference_dir: Path) -> Path:
    """DPO (or IPO/SimPO) from the reference on a seeded random subset of the training pairs."""
    from selpo_core import data, models
    from selpo_core.objectives import MethodParams, make_preference_step
    from selpo_core.train import train

    section = {"oracle": to_dict(cfg.oracle), "data": to_dict(cfg.data)}

    def body(out: StageOutput) -> None:
        model_dir = _model_dir(reference_dir)
        tokenizer = models.load_tokenizer(str(model_dir))
        pairs = oracle_subset(cfg, tokenized_pairs(cfg, data_dir, tokenizer))
        model = models.load_model(str(model_dir), dtype=_fp32())
        ref_model = models.frozen_copy(model) if cfg.oracle.loss != "simpo" else None
        params = MethodParams(method=cfg.oracle.loss, beta=cfg.oracle.beta, simpo_beta=cfg.oracle.beta)
        result = train(model, make_preference_step(params, ref_model), pairs,
                       lambda batch: data.collate_pairs(batch, tokenizer.pad_token_id),
                       [pair.length for pair in pairs], cfg.oracle.train, out.partial_dir / "checkpoints",
                       log_dir=out.work_dir / "tb", desc="oracle")
        models.save_model_dir(model, tokenizer, out.work_dir / "model")
        save_config(cfg.oracle, out.work_dir / "config.yaml")
        out.metrics.update({"n_pairs": len(pairs), **_train_metrics(result, models.count_parameters(model))})

    return run_stage(cfg, "oracle", section, {"data": data_dir, "reference": reference_dir}, body)


def _model_dir(path: str | Path) -> Path:
    """A stage dir holds its weights in model/; a user's path is the model dir itself (or a hub id)."""
    candidate = Path(path) / "model"
    return candidate if candidate.is_dir() else Path(path)


def _fp32() -> Any:
    import torch

    return torch.float32


# ----------------------------------------------------------------------------------------- scoring, selection


def score_tokens(cfg: RunConfig, data_dir: Path, oracle_dir: Path, reference_dir: Path) -> Path:
    """Per-token rewards beta * (log pi_oracle - log pi_ref) of every training response, as Parquet shards."""
    from selpo_core import models, scoring

    section = {"score": to_dict(cfg.score), "data": to_dict(cfg.data)}
    inputs: dict[str, str | Path] = {"data": data_dir, "oracle": oracle_dir, "reference": reference_dir}

    def body(out: StageOutput) -> None:
        tokenizer = models.load_tokenizer(str(_model_dir(reference_dir)))
        pairs = tokenized_pairs(cfg, data_dir, tokenizer)
        shard_dir = out.partial_dir / "scores"
        rank, world_size = _rank_and_world()
        out.metrics.update(scoring.score_pairs(pairs, _model_dir(oracle_dir), _model_dir(reference_dir),
                                               cfg.score, shard_dir, rank=rank, world_size=world_size))
        _barrier()
        if rank != 0:  # the other ranks' shards are done; the main process assembles and publishes
            return
        (out.work_dir / "scores").mkdir()
        for shard in sorted([*shard_dir.glob("part-*.parquet"), *shard_dir.glob("plan.json")]):
            shard.rename(out.work_dir / "scores" / shard.name)
        table = scoring.read_scores(out.work_dir / "scores")
        if (data_dir / "task.json").is_file():
            out.metrics.update(_oracle_truth_metrics(table, data_dir))
        save_config(cfg.score, out.work_dir / "config.yaml")

    return run_stage(cfg, "score", section, inputs, body)


def _rank_and_world() -> tuple[int, int]:
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _truth_labels(rows: list[dict[str, Any]], data_dir: Path) -> list[list[int]]:
    from selpo_core.synthetic import GroundTruth

    truth = GroundTruth.load(data_dir)
    return [truth.key_labels(list(zip(row["offset_start"], row["offset_end"])), row["text"]) for row in rows]


def _oracle_truth_metrics(table: Any, data_dir: Path) -> dict[str, float]:
    from selpo_core.oracle_quality import token_auroc

    rows = table.to_pylist()
    labels = _truth_labels(rows, data_dir)
    by_side: dict[str, tuple[list[float], list[int]]] = {"chosen": ([], []), "rejected": ([], [])}
    for row, row_labels in zip(rows, labels):
        rewards, side_labels = by_side[row["side"]]
        rewards.extend(row["rewards"])
        side_labels.extend(row_labels)
    return token_auroc(*by_side["chosen"], *by_side["rejected"])


def select_tokens(cfg: RunConfig, data_dir: Path, scores_dir: Path, policy_init_dir: Path | str) -> Path:
    """Key tokens per response (SePO top/bottom-k or a global threshold), on the policy's tokens.

    Writes selection.parquet (example_id, side, token_ids, rewards, selected) and token_heatmap.html.
    """
    from selpo_core import models, selection_stage

    section = {"select": to_dict(cfg.select), "data": to_dict(cfg.data)}
    inputs: dict[str, str | Path] = {"data": data_dir, "scores": scores_dir, "policy_init": policy_init_dir}

    def body(out: StageOutput) -> None:
        policy_tokenizer = models.load_tokenizer(str(_model_dir(policy_init_dir)))
        policy_pairs = tokenized_pairs(cfg, data_dir, policy_tokenizer)
        truth_dir = data_dir if (data_dir / "task.json").is_file() else None
        out.metrics.update(selection_stage.write_selection(
            cfg.select, scores_dir / "scores", policy_pairs, out.work_dir,
            special_token_ids=selection_stage.special_token_ids(policy_tokenizer), truth_dir=truth_dir,
        ))
        save_config(cfg.select, out.work_dir / "config.yaml")

    return run_stage(cfg, "select", section, inputs, body)


# ------------------------------------------------------------------------------------------------ policy


def policy_section(cfg: RunConfig, method: str) -> dict[str, Any]:
    policy = to_dict(cfg.policy)
    policy.pop("methods")  # each method's stage depends on its own name, not on which others are trained
    return {"method": method, "policy": policy, "data": to_dict(cfg.data)}


def train_policy(cfg: RunConfig, method: str, data_dir: Path, policy_init_dir: Path | str, reference_dir: Path | str,
                 scores_dir: Path | None, selection_dir: Path | None, label: str = "") -> Path:
    """Train the policy with one method from the same data, scores and selection as every other method.

    `scores_dir` is optional for methods that run their reference model (or when ref_logps_from_scores is off);
    `selection_dir` is needed by sepo only. `label` names the stage dir when one method is trained several
    times in a run (TSO rounds).
    """
    import pyarrow.parquet as pq

    from selpo_core import data, models
    from selpo_core.objectives import NEEDS_REF_LOGPS, NEEDS_REF_MODEL_ALWAYS, MethodParams, make_preference_step
    from selpo_core.scoring import read_scores, scores_to_pair_lookup
    from selpo_core.train import train

    p = cfg.policy
    # The anchor of the DPO family is `reference_dir` (the policy's own start, normally); Selective-DPO may name
    # another, larger scorer/anchor. Stored log-probs serve only if they came from that same model.
    anchor = p.sdpo_reference if method == "selective_dpo" and p.sdpo_reference else reference_dir
    scored_with = read_manifest(scores_dir)["inputs"]["reference"]["path"] if _exists(scores_dir) else None
    reads_scores = (method in NEEDS_REF_LOGPS and p.ref_logps_from_scores and scored_with is not None
                    and _same_model(anchor, scored_with))
    # Inputs are only what the method reads, so e.g. a new selection re-runs sepo but not dpo.
    inputs: dict[str, str | Path] = {"data": data_dir, "policy_init": policy_init_dir, "reference": anchor}
    if reads_scores:
        inputs["scores"] = scores_dir
    if method == "sepo":
        if selection_dir is None:
            raise ValueError("sepo trains on selected tokens: it needs the select stage's output")
        inputs["selection"] = selection_dir

    def body(out: StageOutput) -> None:
        init_dir = _model_dir(policy_init_dir)
        tokenizer = models.load_tokenizer(str(init_dir))
        pairs = tokenized_pairs(cfg, data_dir, tokenizer)
        model = models.load_model(str(init_dir), dtype=_fp32())
        extras: dict[str, Any] = {}
        ref_model = None
        if method == "sepo":
            extras["selected"] = scores_to_pair_lookup(pq.read_table(selection_dir / "selection.parquet"))
        if reads_scores:
            extras["ref"] = scores_to_pair_lookup(read_scores(scores_dir / "scores"))
        elif method in NEEDS_REF_LOGPS or method in NEEDS_REF_MODEL_ALWAYS:
            ref_model = models.frozen_copy(model) if _same_model(anchor, init_dir) else models.frozen_copy(
                models.load_model(str(_model_dir(anchor)), dtype=_fp32()))
        model = models.maybe_apply_lora(model, cfg.policy_model)
        params = MethodParams(method=method, beta=p.beta, label_smoothing=p.label_smoothing, sepo_gamma=p.sepo_gamma,
                              sepo_margin=p.sepo_margin, simpo_beta=p.simpo_beta,
                              simpo_gamma_beta_ratio=p.simpo_gamma_beta_ratio, tdpo_alpha=p.tdpo_alpha,
                              sdpo_quantile=p.sdpo_quantile, tso_chosen_reward_max=p.tso_chosen_reward_max,
                              tso_rejected_reward_min=p.tso_rejected_reward_min)

        def collate(batch: list[Any]) -> dict[str, Any]:
            return data.collate_pairs(batch, tokenizer.pad_token_id, **_pair_extras(batch, extras))

        result = train(model, make_preference_step(params, ref_model), pairs, collate,
                       [pair.length for pair in pairs], p.train, out.partial_dir / "checkpoints",
                       log_dir=out.work_dir / "tb", desc=f"policy {method}")
        models.save_model_dir(model, tokenizer, out.work_dir / "model")
        save_config(cfg.policy, out.work_dir / "config.yaml")
        out.metrics.update({"method": method, "reads_ref_logps_from_scores": reads_scores,
                            "trained_token_fraction": _trained_token_fraction(method, pairs, extras, result),
                            **_train_metrics(result, models.count_parameters(model))})

    return run_stage(cfg, f"policy_{label or method}", policy_section(cfg, method), inputs, body)


def _exists(stage: Path | None) -> bool:
    """A finished stage dir (in plan-only mode an upstream dir may not exist yet)."""
    return stage is not None and is_complete(stage)


def _same_model(a: Path | str, b: Path | str) -> bool:
    return Path(_model_dir(a)).resolve() == Path(_model_dir(b)).resolve() if Path(str(a)).exists() else str(a) == str(b)


def _pair_extras(batch: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    """Per-response selected masks and reference log-probs looked up by (example_id, side)."""
    kwargs: dict[str, Any] = {}
    for name, column, prefix in (("selected", "selected", "selected"), ("ref", "ref_logps", "ref_logps")):
        if name not in extras:
            continue
        lookup = extras[name]
        for side in ("chosen", "rejected"):
            values = []
            for pair in batch:
                row = lookup[(pair.example_id, side)]
                expected = pair.chosen_ids if side == "chosen" else pair.rejected_ids
                if list(row["token_ids"]) != list(expected):
                    raise ValueError(f"{name} of example {pair.example_id} ({side}) was computed on other tokens "
                                     "than the policy's: the artifacts do not match this data or tokenizer")
                values.append(row[column])
            kwargs[f"{side}_{prefix}"] = values
    return kwargs


def _trained_token_fraction(method: str, pairs: list[Any], extras: dict[str, Any], result: Any) -> float:
    """Fraction of response tokens whose log-prob enters the loss."""
    if method == "sepo":
        selected = sum(sum(row["selected"]) for row in extras["selected"].values())
        total = sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)
        return round(selected / max(1, total), 4)
    if method == "selective_dpo":
        chosen = result.final_metrics.get("selected_fraction/chosen", float("nan"))
        rejected = result.final_metrics.get("selected_fraction/rejected", float("nan"))
        return round((chosen + rejected) / 2, 4)
    return 1.0


# -------------------------------------------------------------------------------------- generate, evaluate


def generate(cfg: RunConfig, data_dir: Path, model_dir: Path | str, label: str) -> Path:
    """Answer the benchmark prompts (cfg.generate.prompts, or the synthetic held-out prompts) with a model."""
    from selpo_core.generate import generate_answers

    prompts = cfg.generate.prompts or str(data_dir / "prompts.jsonl")
    section = {"generate": to_dict(cfg.generate), "label": label}
    inputs: dict[str, str | Path] = {"prompts": prompts, "model": model_dir}

    def body(out: StageOutput) -> None:
        out.metrics.update(generate_answers(cfg.generate, _model_dir(model_dir), prompts, out.work_dir,
                                            model_name=label))
        save_config(cfg.generate, out.work_dir / "config.yaml")

    return run_stage(cfg, f"generate_{label}", section, inputs, body)


def evaluate(cfg: RunConfig, data_dir: Path, generations_dir: Path, reference_generations_dir: Path,
             model_dir: Path | str, reference_dir: Path | str, label: str) -> Path:
    """metrics.json + report.md: ground-truth reward gain and KL (synthetic), reward model, implicit accuracy."""
    from selpo_core.evaluate import write_report
    from selpo_core.evaluation_stage import evaluate_run

    section = {"evaluate": to_dict(cfg.evaluate), "beta": cfg.policy.beta, "data": to_dict(cfg.data), "label": label}
    inputs: dict[str, str | Path] = {"data": data_dir, "generations": generations_dir,
                                     "reference_generations": reference_generations_dir, "model": model_dir,
                                     "reference": reference_dir}

    def body(out: StageOutput) -> None:
        metrics = evaluate_run(cfg.evaluate, data_dir=data_dir, generations_dir=generations_dir,
                                  reference_generations_dir=reference_generations_dir,
                                  model_dir=_model_dir(model_dir), reference_dir=_model_dir(reference_dir),
                                  heldout_pairs=read_examples(data_dir / "heldout.jsonl"), beta=cfg.policy.beta,
                                  data_cfg=cfg.data)
        write_report(metrics, out.work_dir, title=f"selpo evaluation: {label}")
        out.metrics.update(metrics)

    return run_stage(cfg, f"evaluate_{label}", section, inputs, body)


# ---------------------------------------------------------------------------------------- whole pipeline


def policy_init(cfg: RunConfig, data_dir: Path, task_dir: Path | None, reference_dir: Path | str) -> Path | str:
    """The policy starts from the reference unless `policy_model` names another (e.g. larger) model."""
    if cfg.policy_model == cfg.reference:
        return reference_dir
    return sft(cfg, data_dir, task_dir, "policy_model") if cfg.sft.enabled else cfg.policy_model.path


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """The whole pipeline without Prefect (the flow in flows/ composes the same calls as tasks)."""
    from selpo_core import report

    timer = report.StageTimer()
    task_dir = timer.run("synthetic", make_synthetic, cfg) if not cfg.data.path else None
    data_dir = timer.run("data", prepare_data, cfg, task_dir)
    reference_dir: Path | str = cfg.reference.path
    if cfg.sft.enabled:
        reference_dir = timer.run("sft", sft, cfg, data_dir, task_dir, "reference")
    init_dir = timer.run("sft_policy_model", policy_init, cfg, data_dir, task_dir, reference_dir)
    oracle_dir = timer.run("oracle", train_oracle, cfg, data_dir, reference_dir)
    scores_dir = timer.run("score", score_tokens, cfg, data_dir, oracle_dir, reference_dir)
    selection_dir = timer.run("select", select_tokens, cfg, data_dir, scores_dir, init_dir)
    reference_generations = timer.run("generate_reference", generate, cfg, data_dir, init_dir, "reference")
    evaluations = {}
    for method in cfg.policy.methods:
        policy_dir = timer.run(f"policy_{method}", train_policy, cfg, method, data_dir, init_dir, init_dir,
                               scores_dir, selection_dir)
        generations = timer.run(f"generate_{method}", generate, cfg, data_dir, policy_dir, method)
        evaluations[method] = timer.run(f"evaluate_{method}", evaluate, cfg, data_dir, generations,
                                        reference_generations, policy_dir, init_dir, method)
    return report.write_summary(cfg, scores_dir=scores_dir, selection_dir=selection_dir, evaluations=evaluations,
                                stages=timer.records)


STAGE_CHOICES = ("synthetic", "data", "sft", "oracle", "score", "select", "policy", "generate", "evaluate", "all")


def main(argv: list[str] | None = None) -> int:
    """`python -m selpo_core.stages STAGE --config FILE [--set k=v ...]`: run STAGE in this process.

    Upstream stages are resolved through their directories (finished ones are reused, missing ones run), so a
    stage can be run in a fresh process, under `torchrun`, or in the vLLM venv.
    """
    parser = argparse.ArgumentParser(prog="python -m selpo_core.stages", description=main.__doc__)
    parser.add_argument("stage", choices=STAGE_CHOICES)
    parser.add_argument("--config", default=None, help="run config YAML (default: the synthetic demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.field=value")
    parser.add_argument("--method", default=None, help="policy method for the policy/generate/evaluate stages")
    args = parser.parse_args(argv)
    configure_logging()
    cfg = load_run_config(args.config, args.overrides)
    if args.stage == "all":
        from selpo_core.report import format_table

        print(format_table(run_pipeline(cfg)))
        return 0
    print(run_upto(cfg, args.stage, args.method or cfg.policy.methods[0]))
    return 0


def configure_logging() -> None:
    """selpo's own progress at INFO; third-party per-file chatter (checkpoint saves, weight loading) hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass


def run_upto(cfg: RunConfig, stage: str, method: str) -> Path:
    """Run (or reuse) every stage up to `stage` and return its directory."""
    task_dir = make_synthetic(cfg) if not cfg.data.path else None
    if stage == "synthetic":
        if task_dir is None:
            raise ValueError("the synthetic stage runs only when data.path is empty")
        return task_dir
    data_dir = prepare_data(cfg, task_dir)
    if stage == "data":
        return data_dir
    reference_dir: Path | str = sft(cfg, data_dir, task_dir, "reference") if cfg.sft.enabled else cfg.reference.path
    if stage == "sft":
        return Path(reference_dir)
    oracle_dir = train_oracle(cfg, data_dir, reference_dir)
    if stage == "oracle":
        return oracle_dir
    scores_dir = score_tokens(cfg, data_dir, oracle_dir, reference_dir)
    if stage == "score":
        return scores_dir
    init_dir = policy_init(cfg, data_dir, task_dir, reference_dir)
    selection_dir = select_tokens(cfg, data_dir, scores_dir, init_dir)
    if stage == "select":
        return selection_dir
    policy_dir = train_policy(cfg, method, data_dir, init_dir, init_dir, scores_dir, selection_dir)
    if stage == "policy":
        return policy_dir
    generations = generate(cfg, data_dir, policy_dir, method)
    if stage == "generate":
        return generations
    reference_generations = generate(cfg, data_dir, init_dir, "reference")
    return evaluate(cfg, data_dir, generations, reference_generations, policy_dir, init_dir, method)


if __name__ == "__main__":
    # Run the importable module's functions, not this __main__ copy's: the plan-only context variable and
    # the stage functions must be the ones report.py and the tasks import.
    from selpo_core import stages as _stages

    sys.exit(_stages.main())

"""The run summary (`runs/<run>/summary.json`) and its results table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from selpo_core.artifacts import atomic_write_json, read_manifest


def input_dir(stage_dir: Path | str, name: str) -> Path:
    """The directory a stage read as its input `name`: a stage in the same store, or the user's own path."""
    entry = read_manifest(stage_dir)["inputs"][name]
    if entry.get("stage"):
        return Path(stage_dir).resolve().parent / entry["stage"]
    return Path(entry["path"])


def _metrics(stage_dir: Path | str) -> dict[str, Any]:
    return read_manifest(stage_dir).get("metrics", {})


def build_summary(scores_dir: Path | str, selection_dir: Path | str, evaluations: dict[str, Path | str],
                  stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers `make demo` prints, from the stages' manifests (so a re-run reports cached stages too)."""
    score_metrics = _metrics(scores_dir)
    select_metrics = _metrics(selection_dir)
    oracle = {
        "token_auroc": score_metrics.get("token_auroc"),
        "token_auroc_positive": score_metrics.get("token_auroc_positive"),
        "token_auroc_negative": score_metrics.get("token_auroc_negative"),
        "selection_precision": select_metrics.get("selection_precision"),
        "selection_precision_chance": select_metrics.get("selection_precision_chance"),
        "scoring_tokens_per_second": score_metrics.get("real_tokens_per_second"),
        "scoring_pad_fraction": score_metrics.get("pad_fraction"),
    }
    policy = {}
    for method, eval_dir in evaluations.items():
        manifest = read_manifest(eval_dir)
        eval_metrics = manifest.get("metrics", {})
        policy_dir = input_dir(eval_dir, "model")
        policy_metrics = _metrics(policy_dir)
        policy[method] = {
            "reward_gain": eval_metrics.get("reward_gain"),
            "mean_reward": eval_metrics.get("mean_reward"),
            "kl": eval_metrics.get("kl"),
            "implicit_accuracy": eval_metrics.get("implicit_reward_accuracy"),
            "trained_token_fraction": policy_metrics.get("trained_token_fraction"),
            "train_seconds": policy_metrics.get("seconds"),
        }
    return {"oracle": oracle, "policy": policy, "stages": stages}


def write_summary(cfg: Any, *, scores_dir: Path | str, selection_dir: Path | str,
                  evaluations: dict[str, Path | str], stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary = build_summary(scores_dir, selection_dir, evaluations, stages)
    summary["run"] = {"name": cfg.name, "dir": str(cfg.run_dir)}
    atomic_write_json(Path(cfg.run_dir) / "summary.json", summary)
    return summary


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text (also valid markdown) results: oracle quality, then one row per policy method, then stages."""
    oracle = summary["oracle"]
    lines = [
        "| oracle | token AUROC | AUROC +key (chosen) | AUROC -key (rejected) | selection precision | chance |",
        "|---|---|---|---|---|---|",
        f"| oracle | {_fmt(oracle['token_auroc'])} | {_fmt(oracle['token_auroc_positive'])} | "
        f"{_fmt(oracle['token_auroc_negative'])} | {_fmt(oracle['selection_precision'])} | "
        f"{_fmt(oracle['selection_precision_chance'])} |",
        "",
        "| method | reward gain | mean reward | KL to ref | implicit acc | trained tokens | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in summary["policy"].items():
        lines.append(f"| {method} | {_fmt(row['reward_gain'])} | {_fmt(row['mean_reward'])} | {_fmt(row['kl'])} | "
                     f"{_fmt(row['implicit_accuracy'])} | {_fmt(row['trained_token_fraction'], 2)} | "
                     f"{_fmt(row['train_seconds'], 1)} |")
    lines += ["", "| stage | seconds | cached |", "|---|---|---|"]
    for stage, row in summary["stages"].items():
        lines.append(f"| {stage} | {_fmt(row['seconds'], 1)} | {_fmt(row['cached'])} |")
    return "\n".join(lines)


def load_summary(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the pipeline first (selpo run CONFIG)")
    return json.loads(path.read_text())

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
        "token_auroc_no_special": score_metrics.get("token_auroc_no_special"),
        "key_recall": select_metrics.get("key_recall"),
        "precision_at_key_rate": score_metrics.get("precision_at_key_rate"),
        "key_rate": score_metrics.get("key_rate"),
        "selection_precision": select_metrics.get("selection_precision"),
        "selection_precision_chance": select_metrics.get("selection_precision_chance"),
        "heldout_accuracy": score_metrics.get("oracle_heldout_accuracy"),
        "heldout_n": score_metrics.get("oracle_heldout_n"),
        "heldout_ci95": score_metrics.get("oracle_heldout_ci95"),
        "scoring_tokens_per_second": score_metrics.get("real_tokens_per_second"),
        "scoring_pad_fraction": score_metrics.get("pad_fraction"),
    }
    policy = {}
    for method, eval_dir in evaluations.items():
        eval_metrics = _metrics(eval_dir)
        policy_metrics = _metrics(input_dir(eval_dir, "model"))
        policy[method] = {
            "reward_gain": eval_metrics.get("reward_gain"),
            "mean_reward": eval_metrics.get("mean_reward"),
            "kl": eval_metrics.get("kl"),
            "implicit_accuracy": eval_metrics.get("implicit_reward_accuracy"),
            "implicit_n": eval_metrics.get("implicit_reward_n"),
            "implicit_ci95": eval_metrics.get("implicit_reward_ci95"),
            "answer_tokens": eval_metrics.get("answer_tokens"),
            "eos_rate": eval_metrics.get("eos_rate"),
            "reward_model_score": eval_metrics.get("reward_model_score"),
            "win_rate": eval_metrics.get("win/win_rate"),
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
    """Plain-text (also valid markdown) results: oracle quality, then one row per policy method, then stages.

    The synthetic task has a true reward (gain over the reference's answers); real data has what can be measured
    without one: held-out implicit-reward accuracy with its count and 95% interval, and the reward model's score
    and win rate when evaluate.reward_model is set. Columns that no method has are left out.
    """
    oracle = summary["oracle"]
    lines: list[str] = []
    if oracle.get("token_auroc") is not None:
        lines += [
            "| oracle | token AUROC | AUROC +key (chosen) | AUROC -key (rejected) | AUROC w/o EOS etc. | "
            "key recall in selection | precision at key rate |",
            "|---|---|---|---|---|---|---|",
            f"| oracle | {_fmt(oracle['token_auroc'])} | {_fmt(oracle['token_auroc_positive'])} | "
            f"{_fmt(oracle['token_auroc_negative'])} | {_fmt(oracle.get('token_auroc_no_special'))} | "
            f"{_fmt(oracle.get('key_recall'))} | {_fmt(oracle.get('precision_at_key_rate'))} |",
            "",
        ]
    elif oracle.get("heldout_accuracy") is not None:  # real data: no key-token truth, but held-out pairs
        low, high = oracle["heldout_ci95"]
        lines += ["| oracle | held-out implicit acc | n | 95% interval |", "|---|---|---|---|",
                  f"| oracle | {_fmt(oracle['heldout_accuracy'])} | {oracle['heldout_n']} | {low:.2f}-{high:.2f} |", ""]
    rows = summary["policy"].values()
    columns = [(name, title, digits) for name, title, digits in METHOD_COLUMNS
               if any(row.get(name) is not None for row in rows)]
    lines += ["| method | " + " | ".join(title for _, title, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for method, row in summary["policy"].items():
        cells = [_implicit(row) if name == "implicit_accuracy" else _fmt(row.get(name), digits)
                 for name, _, digits in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | seconds | cached |", "|---|---|---|"]
    for stage, row in summary["stages"].items():
        lines.append(f"| {stage} | {_fmt(row['seconds'], 1)} | {_fmt(row['cached'])} |")
    return "\n".join(lines)


METHOD_COLUMNS = [("reward_gain", "reward gain", 3), ("mean_reward", "mean reward", 3), ("kl", "KL to ref", 3),
                  ("implicit_accuracy", "implicit acc", 3), ("reward_model_score", "RM score", 3),
                  ("win_rate", "RM win rate", 3), ("answer_tokens", "answer tokens", 1),
                  ("eos_rate", "ends with EOS", 2), ("trained_token_fraction", "trained tokens", 2),
                  ("train_seconds", "train s", 1)]
"""(summary field, column title, decimals) of the method table."""


def _implicit(row: dict[str, Any]) -> str:
    """Held-out implicit-reward accuracy; on real data (no true reward) with its count and 95% interval."""
    value = _fmt(row.get("implicit_accuracy"))
    interval, n = row.get("implicit_ci95"), row.get("implicit_n")
    if row.get("reward_gain") is None and interval and n:
        return f"{value} (n={n}, {interval[0]:.2f}-{interval[1]:.2f})"
    return value


def load_summary(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the pipeline first (selpo run CONFIG)")
    return json.loads(path.read_text())

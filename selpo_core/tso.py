"""TSO (Chen et al., arXiv 2409.02118): iterative self-training on pairs a judge builds from a model matrix.

One round r = three stages of its own on top of the pipeline's (docs/TSO.md; selpo_core/stages/tso.py):
  prompts    a fresh seeded slice of the training prompts         -> tso_round{r}_prompts-<key>/prompts.jsonl
  candidates every generator of the matrix answers them (the current policy always; `initial` = the SFT start;
             any model dir or hub id), plus the dataset's human chosen responses -> candidates.jsonl
  pairs      the judge (ground truth, a reward model, or a label file) ranks each prompt's candidates; pairs come
             from the ranking; feedback correction flags the pairs whose order the policy's own implicit reward
             beta * log(pi / pi_ref) gets wrong -> pairs.jsonl (TRL standard) + train.jsonl/heldout.jsonl
then the pipeline's policy stage (`tso.loss`, dual clip from policy.tso_*), generate and evaluate. After a round
the reference becomes the latest policy. The rounds are nodes of the one stage graph (stages/graph.py); this
module checks a TSO run, runs it without Prefect, and writes its summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selpo_core.artifacts import atomic_write_json, read_manifest
from selpo_core.config import RunConfig, to_dict
from selpo_core.stages.tso import round_label

log = logging.getLogger("selpo.tso")

ROUND_STAGES = {"prompts": "{label}_prompts", "candidates": "{label}_candidates", "pairs": "{label}_pairs",
                "policy": "policy_{label}", "generations": "generate_{label}", "evaluation": "evaluate_{label}"}
"""A round's stages in the graph, by their role in the summary."""


def round_dirs(dirs: dict[str, Path | str], rounds: int) -> list[dict[str, str]]:
    """Per round, {role: stage dir} from the graph's {stage name: dir}."""
    return [{role: str(dirs[name.format(label=round_label(r))]) for role, name in ROUND_STAGES.items()}
            for r in range(1, rounds + 1)]


def run_tso(cfg: RunConfig) -> dict[str, Any]:
    """All rounds without Prefect; finished stages (so finished rounds) are reused. Returns the summary."""
    from selpo_core.stages.graph import plan_graph, run_graph
    from selpo_core.stages.runner import LocalRun

    graph = plan_graph(cfg, tso=True)
    dirs = run_graph(graph, graph.tso_targets(), LocalRun(cfg))
    rounds = round_dirs(dirs, cfg.tso.rounds)
    for r, round_ in enumerate(rounds, start=1):
        row = round_metrics(round_)
        log.info("TSO round %d: %d pairs, %d corrected, true reward %s, KL to initial %s", r, row["n_pairs"],
                 row["n_corrected"], row["true_reward"], row["kl_to_initial"])
    return write_summary(cfg, rounds)


def round_metrics(dirs: dict[str, str]) -> dict[str, Any]:
    """One table row from a round's stage manifests."""
    pairs, train = read_manifest(dirs["pairs"])["metrics"], read_manifest(dirs["policy"])["metrics"]
    evaluation = read_manifest(dirs["evaluation"])["metrics"]
    return {"n_prompts": pairs["n_prompts"], "n_candidates": pairs["n_candidates"], "n_pairs": pairs["n_pairs"],
            "n_corrected": pairs["n_corrected"], "corrected_fraction": pairs["corrected_fraction"],
            "n_policy_ties": pairs["n_policy_ties"], "train_loss": train.get("loss"),
            "train_reward_accuracy": train.get("rewards/accuracies"),
            "true_reward": evaluation.get("mean_reward"), "reward_gain": evaluation.get("reward_gain"),
            "kl_to_initial": evaluation.get("kl"), "implicit_accuracy": evaluation.get("implicit_reward_accuracy"),
            "dirs": dirs}


def write_summary(cfg: RunConfig, rounds: list[dict[str, str]]) -> dict[str, Any]:
    """runs/<run>/tso_summary.json: the TSO config and one row per round (round 0: the starting policy)."""
    rows = [{"round": r, **round_metrics(dirs)} for r, dirs in enumerate(rounds, start=1)]
    if rows:
        start = read_manifest(rounds[0]["evaluation"])["metrics"].get("reference_reward")
        rows.insert(0, {"round": 0, "true_reward": start, "reward_gain": 0.0 if start is not None else None,
                        "kl_to_initial": 0.0})
    summary = {"run": cfg.name, "tso": to_dict(cfg.tso), "clip": {"chosen_reward_max": cfg.policy.tso_chosen_reward_max,
               "rejected_reward_min": cfg.policy.tso_rejected_reward_min}, "rounds": rows}
    atomic_write_json(cfg.run_dir / "tso_summary.json", summary)
    return summary


def format_rounds(summary: dict[str, Any]) -> str:
    """Markdown table of the per-round metrics."""
    def cell(value: Any, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)

    lines = ["| round | pairs | corrected | true reward | reward gain | KL to initial | implicit acc | train loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary["rounds"]:
        corrected = "-" if "n_corrected" not in row else f"{row['n_corrected']} ({row['corrected_fraction']:.0%})"
        lines.append(f"| {row['round']} | {cell(row.get('n_pairs'))} | {corrected} | {cell(row.get('true_reward'))} | "
                     f"{cell(row.get('reward_gain'))} | {cell(row.get('kl_to_initial'))} | "
                     f"{cell(row.get('implicit_accuracy'))} | {cell(row.get('train_loss'))} |")
    return "\n".join(lines)



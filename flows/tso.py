"""TSO as a Prefect flow: the pipeline's start (data, SFT), then one subflow per round ("TSO round 2"), whose task
runs are the round's steps ("TSO round 2 · build pairs", "· train", ...). Every step is a cached task, so a
re-run or a UI Retry reuses finished rounds and resumes the failed one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.graph import StageGraph
from flows.pipeline import flow_run_label
from selpo_core.tso import format_rounds, round_label
from tasks import evaluate, generate
from tasks.common import run_stage_task
from tasks.tso import build_pairs, candidates, publish_tso, resolve_tso_config, round_prompts, run_tso_task, train_round


@flow(name="tso-round", flow_run_name="TSO round {round_index}")
def tso_round(config: dict[str, Any], tso: dict[str, Any], round_index: int, data_dir: str, policy_dir: str,
              anchor_dir: str, initial_dir: str, reference_generations_dir: str) -> dict[str, Any]:
    """One round: prompts -> candidates (model matrix) -> judge + pairs -> train -> generate -> evaluate.

    `anchor_dir` is the reference `policy_dir` was trained against (feedback correction reads its implicit reward).
    """
    records: dict[str, dict[str, Any]] = {}
    r, label = round_index, round_label(round_index)
    prompts_dir = run_tso_task(round_prompts, f"{label}_prompts", records, config, tso, r, data_dir=data_dir)
    candidates_dir = run_tso_task(candidates, f"{label}_candidates", records, config, tso, r, data_dir=data_dir,
                                  policy_dir=policy_dir, prompts_path=str(Path(prompts_dir) / "prompts.jsonl"),
                                  initial_dir=initial_dir)
    pairs_dir = run_tso_task(build_pairs, f"{label}_pairs", records, config, tso, r, candidates_dir=candidates_dir,
                             data_dir=data_dir, policy_dir=policy_dir, reference_dir=anchor_dir)
    policy = run_tso_task(train_round, f"{label}_train", records, config, tso, r, pairs_dir=pairs_dir,
                          policy_dir=policy_dir)
    generations = run_stage_task(generate.with_options(task_run_name=f"TSO round {r} · generate"),
                                 f"{label}_generate", records, config, data_dir=data_dir, model_dir=policy,
                                 label=label)
    evaluation = run_stage_task(evaluate.with_options(task_run_name=f"TSO round {r} · evaluate"),
                                f"{label}_evaluate", records, config, data_dir=data_dir, generations_dir=generations,
                                reference_generations_dir=reference_generations_dir, model_dir=policy,
                                reference_dir=initial_dir, label=label)
    dirs = {"prompts": prompts_dir, "candidates": candidates_dir, "pairs": pairs_dir, "policy": policy,
            "generations": generations, "evaluation": evaluation}
    return {"dirs": dirs, "stages": records}


@flow(name="tso", flow_run_name=flow_run_label)
def tso_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None,
             run_name: str | None = None) -> dict[str, Any]:
    """TSO self-training: rounds of model-matrix candidates, judged pairs and dual-clip DPO (docs/TSO.md).

    Args:
        config_path: run config YAML with an optional `tso:` section; empty: the synthetic demo, TSO defaults.
        overrides: fields to change, e.g. {"tso.rounds": 2, "tso.generators": ["initial"], "policy.beta": 0.2}.
        run_name: artifacts go to <runs_dir>/<run_name>/ (default: the config's `name`).
    """
    config, tso = resolve_tso_config(config_path, overrides, run_name)
    graph = StageGraph(config)
    data_dir, initial_dir = graph.data_dir, graph.policy_init_dir
    reference_generations_dir = graph.reference_generations_dir
    records = graph.records
    rounds: list[dict[str, str]] = []
    policy_dir = anchor_dir = initial_dir
    for r in range(1, tso["rounds"] + 1):
        result = tso_round(config, tso, r, data_dir, policy_dir, anchor_dir, initial_dir, reference_generations_dir)
        rounds.append(result["dirs"])
        records.update(result["stages"])
        # The next round starts from (and is anchored to) the policy just trained; `anchor_dir` keeps the reference
        # that policy was trained against, which feedback correction needs for its implicit reward.
        anchor_dir, policy_dir = policy_dir, result["dirs"]["policy"]
    summary = publish_tso(config, tso, rounds, records)
    get_run_logger().info("TSO %s: %s\n%s", config["name"], Path(config["runs_dir"]) / config["name"],
                          format_rounds(summary))
    return summary

"""Token-level stage tasks: score every response token with the oracle, then select the key tokens."""

from __future__ import annotations

from typing import Any

from prefect import task

from selpo_core import stages
from tasks.common import STAGE_TASK_OPTIONS, as_path, run_config
from tasks.launch import launched


@task(name="score tokens", task_run_name="score tokens", **STAGE_TASK_OPTIONS)
def score_tokens(config: dict[str, Any], data_dir: str, oracle_dir: str, reference_dir: str) -> str:
    """Per-token rewards beta * (log pi_oracle - log pi_ref) as Parquet shards -> the scores dir.

    Sharded over the ranks when SELPO_LAUNCHER is set (tasks/launch.py).
    """
    if stage_dir := launched("score_tokens", config, data_dir=data_dir, oracle_dir=oracle_dir,
                             reference_dir=reference_dir):
        return stage_dir
    return str(stages.score_tokens(run_config(config), as_path(data_dir), as_path(oracle_dir),
                                   as_path(reference_dir)))


@task(name="select key tokens", task_run_name="select key tokens", **STAGE_TASK_OPTIONS)
def select_tokens(config: dict[str, Any], data_dir: str, scores_dir: str, policy_init_dir: str) -> str:
    """Key tokens per response on the policy's tokens, plus token_heatmap.html -> the selection dir."""
    return str(stages.select_tokens(run_config(config), as_path(data_dir), as_path(scores_dir),
                                    as_path(policy_init_dir)))

"""Data stage tasks: the built-in synthetic task and the validated, split preference data."""

from __future__ import annotations

from typing import Any

from prefect import task

from selpo_core import stages
from tasks.common import STAGE_TASK_OPTIONS, as_path, run_config


@task(name="make synthetic task", task_run_name="make synthetic task", **STAGE_TASK_OPTIONS)
def make_synthetic(config: dict[str, Any]) -> str:
    """Tokenizer, SFT corpus, pairs with known token rewards, held-out prompts -> the task dir."""
    return str(stages.make_synthetic(run_config(config)))


@task(name="prepare data", task_run_name="prepare data", **STAGE_TASK_OPTIONS)
def prepare_data(config: dict[str, Any], task_dir: str | None) -> str:
    """Validate the preference data once, split off held-out pairs -> the data dir."""
    return str(stages.prepare_data(run_config(config), as_path(task_dir)))

"""Generation and evaluation tasks (one task run per model label: reference or a policy method)."""

from __future__ import annotations

from typing import Any

from prefect import task

from selpo_core import stages
from tasks.common import STAGE_TASK_OPTIONS, as_path, run_config


@task(name="generate", task_run_name="generate [{label}]", **STAGE_TASK_OPTIONS)
def generate(config: dict[str, Any], data_dir: str, model_dir: str, label: str) -> str:
    """Answer the held-out/benchmark prompts with a model -> the generations dir."""
    return str(stages.generate(run_config(config), as_path(data_dir), as_path(model_dir), label))


@task(name="evaluate", task_run_name="evaluate [{label}]", **STAGE_TASK_OPTIONS)
def evaluate(config: dict[str, Any], data_dir: str, generations_dir: str, reference_generations_dir: str,
             model_dir: str, reference_dir: str, label: str) -> str:
    """Reward gain, KL to the reference, implicit-reward accuracy -> the evaluation dir (metrics.json)."""
    return str(stages.evaluate(run_config(config), as_path(data_dir), as_path(generations_dir),
                               as_path(reference_generations_dir), as_path(model_dir), as_path(reference_dir), label))

"""Training stage tasks: SFT, the oracle, and the policy (one task run per method).

With SELPO_LAUNCHER set they run as multi-process launches (tasks/launch.py), else in this process.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.runtime import task_run

from selpo_core import stages
from tasks.common import STAGE_TASK_OPTIONS, as_path, run_config
from tasks.launch import launched


@task(name="SFT", task_run_name="SFT {which}", **STAGE_TASK_OPTIONS)
def sft(config: dict[str, Any], data_dir: str, task_dir: str | None, which: str) -> str:
    """Supervised fine-tuning of the reference (or a separate policy model) -> its stage dir."""
    if stage_dir := launched("sft", config, data_dir=data_dir, task_dir=task_dir, which=which):
        return stage_dir
    return str(stages.sft(run_config(config), as_path(data_dir), as_path(task_dir), which))


@task(name="train oracle", task_run_name="train oracle", **STAGE_TASK_OPTIONS)
def train_oracle(config: dict[str, Any], data_dir: str, reference_dir: str) -> str:
    """DPO from the reference on a random subset of the pairs -> the oracle's stage dir."""
    if stage_dir := launched("train_oracle", config, data_dir=data_dir, reference_dir=reference_dir):
        return stage_dir
    return str(stages.train_oracle(run_config(config), as_path(data_dir), as_path(reference_dir)))


def policy_run_name() -> str:
    """ "train policy [sepo]", or the label of a repeated method (e.g. a TSO round)."""
    params = task_run.parameters
    return f"train policy [{params.get('label') or params.get('method')}]"


@task(name="train policy", task_run_name=policy_run_name, **STAGE_TASK_OPTIONS)
def train_policy(config: dict[str, Any], method: str, data_dir: str, policy_init_dir: str, reference_dir: str,
                 scores_dir: str | None, selection_dir: str | None, label: str = "") -> str:
    """Train the policy with one method from the shared scores and selection -> its stage dir."""
    inputs = {"data_dir": data_dir, "policy_init_dir": policy_init_dir, "reference_dir": reference_dir,
              "scores_dir": scores_dir, "selection_dir": selection_dir}
    if stage_dir := launched("train_policy", config, method=method, label=label, **inputs):
        return stage_dir
    return str(stages.train_policy(run_config(config), method, **{k: as_path(v) for k, v in inputs.items()},
                                   label=label))

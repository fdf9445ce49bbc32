"""Multi-process stages: with SELPO_LAUNCHER set (e.g. "accelerate launch --multi_gpu --num_processes 4", or
"torchrun --nproc_per_node 4"), the training and scoring stages run as ranks of
`$SELPO_LAUNCHER -m selpo_core.stages --plan <plan.json> --config <resolved config>`.

Prefect runs once, in the task; the ranks make no Prefect calls (a flow run launched on every rank would
report the same task runs N times). The ranks get the exact plan the task runs, so they write exactly its
stage dir; the task streams their output into its log and returns the dir.
SELPO_LAUNCHER="python" runs a stage in a fresh single process (frees all memory when it ends).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path

from prefect import get_run_logger

from selpo_core.artifacts import atomic_write_text
from selpo_core.config import RunConfig, save_config
from selpo_core.stages.plan import StagePlan
from selpo_core.stages.runner import stage_dir, verify_stage

LAUNCHER_ENV = "SELPO_LAUNCHER"
LAUNCHED_KINDS = ("sft", "oracle", "score", "policy")
"""The stages that train or score: worth their own processes (and GPUs)."""


def launcher() -> list[str]:
    argv = shlex.split(os.environ.get(LAUNCHER_ENV, ""))
    return [sys.executable] if argv == ["python"] else argv


def launched(cfg: RunConfig, plan: StagePlan) -> Path | None:
    """Run `plan` under the launcher and return its dir; None when no launcher is set (run it in-process)."""
    argv = launcher()
    if not argv or plan.kind not in LAUNCHED_KINDS:
        return None
    final = stage_dir(cfg, plan)
    if verify_stage(final) is None:
        return final
    launch_dir = cfg.run_dir / "launch"
    config_file, plan_file = launch_dir / f"{plan.dirname}.yaml", launch_dir / f"{plan.dirname}.plan.json"
    launch_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_file)
    atomic_write_text(plan_file, json.dumps(plan.to_dict()))
    _stream([*argv, "-m", "selpo_core.stages", "--plan", str(plan_file), "--config", str(config_file)])
    if (problem := verify_stage(final)) is not None:
        raise RuntimeError(f"the launched {plan.name} finished but {final} is not usable: {problem}")
    return final


def _stream(command: list[str]) -> None:
    logger = get_run_logger()
    logger.info("launching: %s", shlex.join(command))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=Path.cwd()) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            logger.info("%s", line.rstrip())
    if process.returncode:
        raise RuntimeError(f"{shlex.join(command)} exited with {process.returncode}:\n" + "\n".join(tail))

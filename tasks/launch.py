"""Multi-process stages: with SELPO_LAUNCHER set (e.g. "accelerate launch --multi_gpu --num_processes 4", or
"torchrun --nproc_per_node 4"), the training and scoring tasks start their stage as ranks of
`$SELPO_LAUNCHER -m selpo_core.stages <stage> --config <resolved config>`.

Prefect runs once, in the task; the ranks make no Prefect calls (a flow run launched on every rank would
report the same task runs N times). The ranks resolve the stage's inputs from the run directory (all complete:
the flow made them) and write the stage dir; the task streams their output into its log and returns the dir.
SELPO_LAUNCHER="python" runs a stage in a fresh single process (frees all memory when it ends).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from selpo_core.artifacts import is_complete
from selpo_core.config import save_config
from tasks.common import planned_stage_dir, run_config

LAUNCHER_ENV = "SELPO_LAUNCHER"
# Task (stage function) -> stage name of `python -m selpo_core.stages`.
CLI_STAGES = {"sft": "sft", "train_oracle": "oracle", "score_tokens": "score", "train_policy": "policy"}


def launcher() -> list[str]:
    argv = shlex.split(os.environ.get(LAUNCHER_ENV, ""))
    return [sys.executable] if argv == ["python"] else argv


def launched(stage: str, config: dict[str, Any], **params: Any) -> str | None:
    """Run `stage` under the launcher and return its dir; None when no launcher is set (run it in-process).

    The ranks rebuild the stage's inputs from the config (as `selpo_core.stages.run_upto` does), so what the
    stage CLI cannot name (the SFT of a separate policy model, a labelled policy) runs in-process, and a stage
    whose inputs are a user's own directories fails clearly after the launch.
    """
    argv = launcher()
    if not argv or stage not in CLI_STAGES or params.get("which", "reference") != "reference" or params.get("label"):
        return None
    params = {name: value for name, value in params.items() if name != "label"}
    planned = planned_stage_dir(stage, config, **params)
    if is_complete(planned):
        return str(planned)
    cfg = run_config(config)
    config_file = cfg.run_dir / "launch" / f"{planned.name}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_file)
    command = [*argv, "-m", "selpo_core.stages", CLI_STAGES[stage], "--config", str(config_file)]
    if "method" in params:
        command += ["--method", params["method"]]
    _stream(command)
    if not is_complete(planned):
        raise RuntimeError(f"{shlex.join(command)} finished but {planned} is not complete: the ranks resolved other "
                           "inputs than this task's (SELPO_LAUNCHER needs the run's own upstream stages)")
    return str(planned)


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

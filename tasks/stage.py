"""The one Prefect task of every stage: it takes the resolved config and a stage plan, runs that plan with
`selpo_core.stages.runner.execute` (or under SELPO_LAUNCHER), and returns the stage dir.

Its cache key is the plan's name and key (+ the store it lives in), so Prefect's cache and the artifact store
agree by construction and no flow-run id enters: a new run, a UI Retry or another run name with equal keys
reuses finished stages, which the UI shows as Cached. `prefect_run` is the graph's `run` inside a flow.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from selpo_core.config import RunConfig, from_dict, load_run_config, replace, to_dict
from selpo_core.stages.plan import StagePlan, store_dir
from selpo_core.stages.runner import execute, stage_dir, verify_stage
from tasks.launch import launched
from tasks.progress import stage_progress

log = logging.getLogger("selpo.tasks")
# PREFECT_LOGGING_EXTRA_LOGGERS=selpo gives the library's loggers Prefect's handlers (console + the run's logs in
# the UI) but not a level: unset, they inherit root's WARNING and every "stage: reusing/writing" line is lost.
if logging.getLogger("selpo").level == logging.NOTSET:
    logging.getLogger("selpo").setLevel(logging.INFO)


def run_config(config: dict[str, Any]) -> RunConfig:
    """The validated RunConfig of a task's `config` parameter (a ConfigError names the bad field)."""
    return from_dict(RunConfig, config)


def resolve_config(config_path: str | None, overrides: dict[str, Any] | None = None,
                   run_name: str | None = None) -> dict[str, Any]:
    """Load + override + validate once in the flow, then hand every task the same plain dict.

    `runs_dir` becomes absolute so that task results (paths) mean the same thing in any working directory, e.g.
    on a worker that starts in another folder.
    """
    cfg = load_run_config(config_path, overrides or None)
    if run_name:
        cfg = replace(cfg, name=run_name)
    cfg = replace(cfg, runs_dir=str(Path(cfg.runs_dir).expanduser().resolve()))
    return to_dict(cfg)


def plan_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """`<stage>-<key>-<store>`: the plan's own identity, plus which store holds it (a moved runs dir then runs
    the task again, which finds its stages there and reuses them)."""
    plan = parameters["plan"]
    store = str(store_dir(parameters["config"]["runs_dir"]))
    return f"{plan['name']}-{plan['key']}-{hashlib.sha256(store.encode()).hexdigest()[:8]}"


# Deterministic OSErrors: the same call fails the same way again, so retrying only delays the error.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def retry_on_io_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry transient I/O (network filesystems, hub downloads, a busy disk), never a config or code error."""
    try:
        state.result()
    except _PERMANENT_OS_ERRORS:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


@task(name="stage", cache_key_fn=plan_cache_key, persist_result=True, result_serializer="json", retries=2,
      retry_delay_seconds=[10, 60], retry_condition_fn=retry_on_io_error)
def run_stage(config: dict[str, Any], plan: dict[str, Any]) -> str:
    """Run one planned stage (or reuse it) and return its directory; a long loop shows a progress artifact."""
    cfg, stage_plan = run_config(config), StagePlan.from_dict(plan)
    with stage_progress(stage_plan.title):
        return str(launched(cfg, stage_plan) or execute(cfg, stage_plan))


CACHED_MARK = " · cached"
"""Ends the task-run name of a stage reused from the store: the UI's graph draws Cached in Completed's green."""


def task_run_title(plan: StagePlan, reused: bool) -> str:
    return plan.title + CACHED_MARK if reused else plan.title


def prefect_run(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> Callable[[StagePlan], Path]:
    """The graph's `run` in a flow: one task run per stage, named after it (" · cached" when reused); `records`
    gets {seconds, cached, state, dir, title} per stage (summary.json's "stages").

    A Prefect cache hit is honoured only while its stage dir verifies: after the dir was deleted or damaged the
    task runs with `refresh_cache=True`, so it recomputes and overwrites the stale cache record.
    """
    cfg = run_config(config)

    def run(plan: StagePlan) -> Path:
        # Known before submitting: a verified stage dir is reused (a Prefect cache hit, or the runner's own reuse).
        reused = verify_stage(stage_dir(cfg, plan)) is None
        stage_task = run_stage.with_options(name=plan.kind, task_run_name=task_run_title(plan, reused))
        if not reused:
            # Only ever force a refresh: leaving it unset keeps a global PREFECT_TASKS_REFRESH_CACHE=true working.
            stage_task = stage_task.with_options(refresh_cache=True)
        started = time.perf_counter()
        state = stage_task(config, plan.to_dict(), return_state=True)
        records[plan.name] = {"seconds": round(time.perf_counter() - started, 2),
                              "cached": reused or state.name == "Cached", "state": state.name,
                              "dir": str(stage_dir(cfg, plan)), "title": plan.title}
        path = Path(state.result())  # raises the stage's exception when the task failed
        if reused:
            # A Prefect cache hit runs no body, so nothing linked this run's view of the stage
            # (<run>/<stage>-<key>): for a verified stage, execute() only does that.
            execute(cfg, plan)
        return path

    return run

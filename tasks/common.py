"""Plumbing shared by the stage tasks: config from a dict, cache keys from planned stage dirs, the retry rule, and
`run_stage_task`, which flows use to run a stage task (recompute when its artifact is gone; record timings).

Convention that keeps every task a few lines and the cache key generic: a stage task function has the SAME name
as its `selpo_core.stages` function and the same parameters, except `config` (the resolved `RunConfig` as a
plain dict, so it shows and edits in the UI) instead of `cfg`, and paths as `str`. Parameters ending in `_dir`
are paths; a model "dir" may also be a hub id, which `Path()` leaves unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from selpo_core import stages
from selpo_core.artifacts import is_complete
from selpo_core.config import RunConfig, from_dict, load_run_config, replace, to_dict

log = logging.getLogger("selpo.tasks")
# PREFECT_LOGGING_EXTRA_LOGGERS=selpo gives the library's loggers Prefect's handlers (console + the run's logs in
# the UI) but not a level: unset, they inherit root's WARNING and every "stage: reusing/writing" line is lost.
if logging.getLogger("selpo").level == logging.NOTSET:
    logging.getLogger("selpo").setLevel(logging.INFO)

# The stage functions as imported, for planning only: cache keys and completeness checks must not count as
# stage calls (tests wrap `selpo_core.stages.<fn>` with counting spies; the task bodies look the functions up
# at call time, so the spies see every real execution and nothing else).
STAGE_NAMES = ("make_synthetic", "prepare_data", "sft", "train_oracle", "score_tokens", "select_tokens",
               "train_policy", "generate", "evaluate")
_PLAN_FNS: dict[str, Callable[..., Path]] = {name: getattr(stages, name) for name in STAGE_NAMES}


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


def as_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _stage_args(params: dict[str, Any]) -> dict[str, Any]:
    return {name: as_path(value) if name.endswith("_dir") else value for name, value in params.items()}


def planned_stage_dir(stage: str, config: dict[str, Any], **params: Any) -> Path:
    """Where `selpo_core.stages.<stage>` writes for these parameters, without running it."""
    return stages.planned_dir(_PLAN_FNS[stage], run_config(config), **_stage_args(params))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a stage task: task name + the planned stage dir.

    The dir's name is `<stage>-<key>`, key = stage config section + input fingerprints + code version, so the
    Prefect cache and the artifact directory agree by construction and no flow-run id enters (a new run with
    the same inputs reuses finished stages). The run dir is hashed in too: two runs with equal configs but
    different names/runs_dir each own their artifacts instead of one answering with the other's path.
    """
    params = {name: value for name, value in parameters.items() if name != "config"}
    planned = planned_stage_dir(context.task.fn.__name__, parameters["config"], **params)
    where = hashlib.sha256(str(planned.parent).encode()).hexdigest()[:8]
    return f"{slug(context.task.name)}-{planned.name}-{where}"


# Deterministic OSErrors: the same call fails the same way again, so retrying only delays the error.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def retry_on_io_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry transient I/O (network filesystems, hub downloads, a busy disk), never a config or code error.

    ConfigError/ValueError (bad field), InjectedFailure and any bug fail at once with their message.
    """
    try:
        state.result()
    except _PERMANENT_OS_ERRORS:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


# Options shared by every stage task. The results are small strings (a path): persisted as JSON under
# PREFECT_RESULTS_LOCAL_STORAGE_PATH (default $PREFECT_HOME/storage); no result_storage here so that tests and
# deployments can point that setting elsewhere.
STAGE_TASK_OPTIONS: dict[str, Any] = {
    "cache_key_fn": stage_cache_key,
    "persist_result": True,
    "result_serializer": "json",
    "retries": 2,
    "retry_delay_seconds": [10, 60],
    "retry_condition_fn": retry_on_io_error,
}


def run_stage_task(stage_task: Task[..., str], record_as: str, records: dict[str, dict[str, Any]],
                   config: dict[str, Any], **params: Any) -> str:
    """Run one stage task from a flow and return its stage dir; raise the stage's error if it failed.

    A Prefect cache hit is honoured only while the planned directory is complete: after the directory was
    deleted (or a crash left it incomplete) the task runs with `refresh_cache=True`, so it recomputes and
    overwrites the stale cache record. `records[record_as]` gets {seconds, cached, state, dir} for summary.json.
    """
    planned = planned_stage_dir(stage_task.fn.__name__, config, **params)
    if not is_complete(planned):
        # Only ever force a refresh: leaving it unset keeps a global PREFECT_TASKS_REFRESH_CACHE=true working.
        stage_task = stage_task.with_options(refresh_cache=True)
    started = time.perf_counter()
    state = stage_task(config, **params, return_state=True)
    records[record_as] = {"seconds": round(time.perf_counter() - started, 2), "cached": state.name == "Cached",
                          "state": state.name, "dir": str(planned)}
    result = state.result()  # raises the stage's exception when the task failed
    if Path(result) != planned:
        # Inputs changed between planning and running (e.g. selpo_core edited mid-run): the key no longer matches.
        log.warning("%s: wrote %s but its cache key names %s", record_as, result, planned)
    return result


__all__ = ["STAGE_TASK_OPTIONS", "as_path", "planned_stage_dir", "resolve_config",
           "retry_on_io_error", "run_config", "run_stage_task", "stage_cache_key"]

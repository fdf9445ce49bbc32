"""TSO tasks (selpo_core.tso): one task run per round and step, named like "TSO round 2 · build pairs".

Same caching as the stage tasks (tasks/common.py): the cache key is the task name + the planned stage dir, a cache
hit whose dir is gone recomputes, results are persisted paths. The TSO stages take a second config, `tso` (the
TSOConfig as a plain dict, shown and editable in the UI), so they get their own planner and runner here.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from selpo_core import stages
from selpo_core import tso as tso_core
from selpo_core.artifacts import is_complete
from selpo_core.config import from_dict, replace, to_dict
from tasks.common import STAGE_TASK_OPTIONS, as_path, run_config, slug

# The library functions as imported, for planning only: planning must not count as a stage call (tests wrap the
# module attributes with counting spies; the task bodies look the functions up at call time).
_PLAN = {"round_prompts": tso_core.round_prompts, "candidates": tso_core.candidates,
         "build_pairs": tso_core.build_pairs}
_TRAIN_POLICY = stages.train_policy


def tso_config(tso: dict[str, Any]) -> tso_core.TSOConfig:
    return from_dict(tso_core.TSOConfig, tso, where="tso")


def resolve_tso_config(config_path: str | None, overrides: dict[str, Any] | None = None,
                       run_name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run config, tso config) as plain dicts, validated once in the flow; runs_dir made absolute (as
    tasks.common.resolve_config does, which cannot read the `tso:` section)."""
    cfg, tso_cfg = tso_core.load_tso_run(config_path, overrides or None)
    if run_name:
        cfg = replace(cfg, name=run_name)
    cfg = replace(cfg, runs_dir=str(Path(cfg.runs_dir).expanduser().resolve()))
    return to_dict(cfg), to_dict(tso_cfg)


def planned_tso_dir(step: str, config: dict[str, Any], tso: dict[str, Any], round_index: int,
                    **params: Any) -> Path:
    """Where the TSO step `step` (a task's function name) writes for these parameters, without running it."""
    cfg, tso_cfg = run_config(config), tso_config(tso)
    args = {name: as_path(value) if name.endswith(("_dir", "_path")) else value for name, value in params.items()}
    if step == "train_round":
        train_args, kwargs = tso_core.train_round_args(tso_cfg, round_index, args["pairs_dir"], args["policy_dir"])
        return stages.planned_dir(_TRAIN_POLICY, cfg, *train_args, **kwargs)
    return stages.planned_dir(_PLAN[step], cfg, tso_cfg, round_index, **args)


def tso_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Task name + planned stage dir + a hash of the run dir: tasks.common.stage_cache_key for TSO steps."""
    params = {name: value for name, value in parameters.items() if name not in ("config", "tso", "round_index")}
    planned = planned_tso_dir(context.task.fn.__name__, parameters["config"], parameters["tso"],
                              parameters["round_index"], **params)
    where = hashlib.sha256(str(planned.parent).encode()).hexdigest()[:8]
    return f"{slug(context.task.name)}-{planned.name}-{where}"


TSO_TASK_OPTIONS: dict[str, Any] = {**STAGE_TASK_OPTIONS, "cache_key_fn": tso_cache_key}


def run_tso_task(tso_task: Task[..., str], record_as: str, records: dict[str, dict[str, Any]],
                 config: dict[str, Any], tso: dict[str, Any], round_index: int, **params: Any) -> str:
    """tasks.common.run_stage_task for TSO steps: recompute when the cached dir is gone, record the timing."""
    planned = planned_tso_dir(tso_task.fn.__name__, config, tso, round_index, **params)
    if not is_complete(planned):
        tso_task = tso_task.with_options(refresh_cache=True)
    started = time.perf_counter()
    state = tso_task(config, tso, round_index, **params, return_state=True)
    records[record_as] = {"seconds": round(time.perf_counter() - started, 2), "cached": state.name == "Cached",
                          "state": state.name, "dir": str(planned)}
    return state.result()  # raises the step's exception when it failed


@task(name="TSO prompts", task_run_name="TSO round {round_index} · prompts", **TSO_TASK_OPTIONS)
def round_prompts(config: dict[str, Any], tso: dict[str, Any], round_index: int, data_dir: str) -> str:
    """A fresh seeded slice of the training prompts -> the round's prompts dir."""
    return str(tso_core.round_prompts(run_config(config), tso_config(tso), round_index, Path(data_dir)))


@task(name="TSO candidates", task_run_name="TSO round {round_index} · candidates", **TSO_TASK_OPTIONS)
def candidates(config: dict[str, Any], tso: dict[str, Any], round_index: int, data_dir: str, policy_dir: str,
               prompts_path: str, initial_dir: str) -> str:
    """The model matrix (policy + generators) and human responses answer the prompts -> candidates dir."""
    return str(tso_core.candidates(run_config(config), tso_config(tso), round_index, Path(data_dir),
                                   as_path(policy_dir), Path(prompts_path), initial_dir=as_path(initial_dir)))


@task(name="TSO build pairs", task_run_name="TSO round {round_index} · build pairs", **TSO_TASK_OPTIONS)
def build_pairs(config: dict[str, Any], tso: dict[str, Any], round_index: int, candidates_dir: str, data_dir: str,
                policy_dir: str, reference_dir: str) -> str:
    """Judge ranks the candidates, pairs from the ranking, feedback correction counted -> the round's data dir."""
    return str(tso_core.build_pairs(run_config(config), tso_config(tso), round_index, Path(candidates_dir),
                                    Path(data_dir), as_path(policy_dir), as_path(reference_dir)))


@task(name="TSO train", task_run_name="TSO round {round_index} · train", **TSO_TASK_OPTIONS)
def train_round(config: dict[str, Any], tso: dict[str, Any], round_index: int, pairs_dir: str,
                policy_dir: str) -> str:
    """Dual-clip DPO on the round's pairs, anchored to the policy it starts from -> the new policy dir."""
    return str(tso_core.train_round(run_config(config), tso_config(tso), round_index, Path(pairs_dir),
                                    as_path(policy_dir)))


@task(name="publish TSO rounds", task_run_name="publish TSO rounds", cache_policy=NO_CACHE, persist_result=False)
def publish_tso(config: dict[str, Any], tso: dict[str, Any], rounds: list[dict[str, str]],
                stages_run: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """runs/<run>/tso_summary.json + a markdown artifact: per-round metrics and per-stage timings."""
    cfg = run_config(config)
    summary = tso_core.write_summary(cfg, tso_config(tso), rounds) | {"stages": stages_run}
    timings = "\n".join(f"| {name} | {row['seconds']} | {'yes' if row['cached'] else 'no'} | `{row['dir']}` |"
                        for name, row in stages_run.items())
    create_markdown_artifact(
        f"# TSO: run `{cfg.name}`\n\nPer round: pairs the judge built, how many of them the policy's own implicit "
        f"reward ordered the other way (corrected), and the policy's answers on the held-out prompts. Dual clip: "
        f"chosen reward <= {cfg.policy.tso_chosen_reward_max}, rejected reward >= "
        f"{cfg.policy.tso_rejected_reward_min} (selpo's reading of the paper, docs/TSO.md).\n\n"
        f"{tso_core.format_rounds(summary)}\n\n### Stages\n| stage | seconds | cached | dir |\n|---|---|---|---|\n"
        f"{timings}\n\nSummary: `{cfg.run_dir / 'tso_summary.json'}`\n",
        key=f"{slug(cfg.name)}-tso-rounds", description="TSO: per-round metrics")
    return summary


__all__ = ["TSO_TASK_OPTIONS", "build_pairs", "candidates", "planned_tso_dir", "publish_tso", "resolve_tso_config",
           "round_prompts", "run_tso_task", "train_round", "tso_cache_key", "tso_config"]

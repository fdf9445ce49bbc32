"""Running a planned stage: the store, one writer per stage, verified reuse, orphan cleanup, run views.

Every stage dir lives in `<runs_dir>/_stages/<name>-<key>/`, shared by all runs of the project: a run with
another name but equal keys reuses it. `<runs_dir>/<run>/<name>-<key>` is a relative link to it (the run's
view), next to the run's config.yaml and summary.json. A stage is written by one process at a time (a lock
file beside it; a second run waits and then reuses what the first wrote); temp dirs of processes that died
are removed by the next writer of that stage and by the sweep at the start of every run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from selpo_core import threads
from selpo_core.artifacts import PARTIAL_SUFFIX, TMP_MARK, StageOutput, stage_output, unique_suffix, verify_stage
from selpo_core.config import RunConfig, save_config
from selpo_core.stages import answers, dist, prepare, tokens, training, tso
from selpo_core.stages.plan import StagePlan, store_dir

log = logging.getLogger("selpo.stages")

Body = Callable[[RunConfig, StagePlan, dict[str, str], StageOutput], None]

BODIES: dict[str, Body] = {
    "synthetic": prepare.run_synthetic, "data": prepare.run_data,
    "sft": training.run_sft, "oracle": training.run_oracle, "policy": training.run_policy,
    "score": tokens.run_score, "select": tokens.run_select, "tis_weights": tokens.run_tis_weights,
    "generate": answers.run_generate, "evaluate": answers.run_evaluate,
    "tso_prompts": tso.run_prompts, "tso_candidates": tso.run_candidates, "tso_pairs": tso.run_pairs,
}
"""The body of each kind of stage (tests replace one with monkeypatch to make a stage fail on purpose)."""


def stage_dir(cfg: RunConfig, plan: StagePlan) -> Path:
    return store_dir(cfg.runs_dir) / plan.dirname


def execute(cfg: RunConfig, plan: StagePlan) -> Path:
    """Run `plan` into the store unless a verified copy is there; return the stage dir. Every rank calls it."""
    store = store_dir(cfg.runs_dir)
    final = store / plan.dirname
    rank, world = dist.rank_and_world()
    if world == 1 and verify_stage(final) is None:
        log.info("%s: reusing %s", plan.name, final)
        _link_into_run(cfg, final)
        return final
    if world > 1:  # the ranks decide together (rank 0 decides), so they never split on a race
        dist.init_distributed()
    store.mkdir(parents=True, exist_ok=True)
    with stage_lock(final, cfg.name) if rank == 0 else contextlib.nullcontext():
        problem = dist.agree(verify_stage(final) if rank == 0 else None)
        if problem is None:  # another process finished it while this one waited for the lock
            log.info("%s: reusing %s (written meanwhile)", plan.name, final)
        else:
            if rank == 0:
                _prepare_rewrite(plan, final, problem)
            _run_body(cfg, plan, store, final, main_process=rank == 0)
    dist.barrier()  # nobody reads the stage before it is published
    _link_into_run(cfg, final)
    return final


def _prepare_rewrite(plan: StagePlan, final: Path, problem: str) -> None:
    if final.exists():
        log.warning("%s: %s: %s; recomputing it", plan.name, final, problem)
    for orphan in final.parent.glob(f"{final.name}{TMP_MARK}*"):  # we hold the lock: their writers are gone
        shutil.rmtree(orphan, ignore_errors=True)


def _run_body(cfg: RunConfig, plan: StagePlan, store: Path, final: Path, *, main_process: bool) -> None:
    threads.apply_thread_policy()  # once per process: the Prefect task and notebooks get it here
    inputs = {name: value.resolve(store) for name, value in plan.inputs.items()}
    for name, value in plan.inputs.items():
        if value.stage and (problem := verify_stage(store / value.stage)) is not None:
            raise RuntimeError(f"{plan.name}: its input {name} ({store / value.stage}) is not usable: {problem}")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    log.info("%s: writing %s", plan.name, final)
    manifest = {"stage": plan.name, "kind": plan.kind, "key": plan.key, "title": plan.title,
                "config": plan.section, "inputs": {name: vars(value) for name, value in plan.inputs.items()}}
    with stage_output(final, manifest=manifest, main_process=main_process) as out:
        BODIES[plan.kind](cfg, plan, inputs, out)
        dist.barrier()  # every rank's part (shards, gradients) is done before the main process publishes


@contextlib.contextmanager
def stage_lock(final: Path, run_name: str) -> Iterator[None]:
    """One writer per stage dir, across processes and hosts sharing the runs dir (flock on `<dir>.lock`).

    A second writer logs who holds the lock and waits: the holder's result is then reused, not recomputed.
    """
    lock_path = final.with_name(final.name + ".lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            log.warning("%s: waiting for %s, which is writing it", final.name, handle.read().strip() or "another run")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run": run_name,
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_orphans(runs_dir: str | Path) -> list[Path]:
    """Temp dirs of writers that died (kill -9, power loss) and partial dirs of published stages: removed.

    A temp dir whose stage lock can be taken at once has no live writer (a live one holds the lock), so this
    never touches the work of a run in progress. Partial dirs of unpublished stages are resume state: kept.
    """
    store = store_dir(runs_dir)
    removed: list[Path] = []
    if not store.is_dir():
        return removed
    for path in sorted(store.iterdir()):
        if TMP_MARK in path.name and path.is_dir():
            stage = store / path.name.split(TMP_MARK)[0]
        elif path.name.endswith(PARTIAL_SUFFIX) and verify_stage(store / path.name[: -len(PARTIAL_SUFFIX)]) is None:
            stage = store / path.name[: -len(PARTIAL_SUFFIX)]
        else:
            continue
        with open(stage.with_name(stage.name + ".lock"), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            fcntl.flock(handle, fcntl.LOCK_UN)
    if removed:
        log.info("removed %d leftover temp dir(s) of interrupted runs: %s", len(removed),
                 ", ".join(p.name for p in removed[:5]))
    return removed


def _link_into_run(cfg: RunConfig, final: Path) -> None:
    """`<run>/<stage>-<key>` -> `../_stages/<stage>-<key>` (relative: the runs dir can move or be copied)."""
    if not dist.is_main_process():
        return
    view = cfg.run_dir / final.name
    if view.is_symlink() or view.exists():
        return
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = view.with_name(f".{view.name}{TMP_MARK}{unique_suffix()}")
    tmp.symlink_to(os.path.relpath(final, cfg.run_dir))
    os.replace(tmp, view)


class LocalRun:
    """`run(plan)` without Prefect: execute in this process, timing each stage and whether it was reused."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.records: dict[str, dict[str, Any]] = {}

    def __call__(self, plan: StagePlan) -> Path:
        cached = verify_stage(stage_dir(self.cfg, plan)) is None
        started = time.time()
        path = execute(self.cfg, plan)
        self.records[plan.name] = {"seconds": round(time.time() - started, 2), "cached": cached,
                                   "state": "Cached" if cached else "Completed", "dir": str(path)}
        return path

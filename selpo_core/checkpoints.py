"""Training checkpoints that are verified before use, fall back when damaged, and survive concurrent writers.

`checkpoint_dir/step-000123/` = `accelerator.save_state` (weights, optimizer, scheduler, RNG of every rank) +
`trainer_state.json` (step, data position, seed, metrics window, ...). trainer_state.json is written last and
records the size and SHA-256 of every other file plus a checksum of itself, so a checkpoint is trusted only
when every byte is as saved: a truncated `model.safetensors`, an edited RNG pickle or trainer state is found
before anything is loaded. A resume takes the newest intact checkpoint; each damaged newer one is named in a
warning and removed (it can never be resumed from, and would otherwise count against `keep_checkpoints`).

Saves go into a temp dir no other process uses (host, pid, random token: selpo_core/atomic.py) and are
renamed into place. Two processes that train the same run into one directory (which stage locks should
prevent, but must not crash) publish identical checkpoints by exact resume: whoever renames first wins and
the other discards its copy. Pruning and removal rename aside before deleting, so a kill mid-delete never
leaves a half checkpoint under a valid name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list

from selpo_core.artifacts import atomic_write_json
from selpo_core.atomic import remove_dead_leftovers, remove_tree, temp_path

log = logging.getLogger("selpo.train")

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"step-(\d{6,})")


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _state_checksum(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_problem(checkpoint: Path) -> str | None:
    """None when `checkpoint` is intact (every recorded file has its recorded size and SHA-256), else why not."""
    state_path = checkpoint / TRAINER_STATE
    if not state_path.is_file():
        return f"has no {TRAINER_STATE} (an interrupted save)"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"has an unreadable {TRAINER_STATE} ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        return f"has no file checksums in {TRAINER_STATE} (saved by an older selpo, or edited)"
    if state.get("checksum") != _state_checksum(state):
        return f"has an edited {TRAINER_STATE} (its checksum does not match)"
    for name, want in sorted(state["files"].items()):
        path = checkpoint / name
        try:
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"has {name} of {size} bytes, saved with {want['bytes']} (truncated or replaced)"
            if _sha256(path) != want["sha256"]:
                return f"has {name} whose content changed since it was saved (SHA-256 mismatch)"
        except FileNotFoundError:
            return f"lacks {name}"
        except OSError as err:
            return f"has an unreadable {name} ({err})"
    return None


def _by_step(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint dirs (complete or not) by ascending step."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(checkpoint_dir: Path, *, remove_damaged: bool = False) -> Path | None:
    """The newest intact checkpoint, or None. Every damaged newer one is named in a warning (and removed with
    `remove_damaged`); an older one is not even read."""
    damaged = False
    for checkpoint in reversed(_by_step(Path(checkpoint_dir))):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        if not checkpoint.exists():  # pruned by another process while we looked: not damage
            continue
        damaged = True
        action = "removing it" if remove_damaged else "skipping it"
        log.warning("checkpoint %s %s; %s (it cannot be resumed from)", checkpoint, problem, action)
        if remove_damaged:
            remove_tree(checkpoint)
    if damaged:
        log.warning("no intact checkpoint left in %s: training starts from step 0", checkpoint_dir)
    return None


def resumable_checkpoint(accelerator: Any, checkpoint_dir: Path) -> Path | None:
    """The checkpoint every rank resumes from: the main process verifies, cleans up and decides; the others
    get its answer (so all ranks load the same one and checksums are read once)."""
    choice: list[str | None] = [None]
    if accelerator.is_main_process:
        for leftover in remove_dead_leftovers(checkpoint_dir):
            log.info("removed %s, left by a process that died while saving", leftover)
        found = latest_checkpoint(checkpoint_dir, remove_damaged=True)
        choice = [found.name if found is not None else None]
    broadcast_object_list(choice)
    return Path(checkpoint_dir) / choice[0] if choice[0] is not None else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def save_checkpoint(accelerator: Any, checkpoint_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """save_state into a private temp dir, record checksums, rename into place, prune to the newest `keep`."""
    final = Path(checkpoint_dir) / f"step-{state['step']:06d}"
    name = [temp_path(final).name if accelerator.is_main_process else None]
    broadcast_object_list(name)  # every rank writes its RNG file into the main process's temp dir
    tmp = final.with_name(name[0])
    if accelerator.is_main_process:
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # rank 0 writes weights/optimizer/scheduler, every rank its RNG file
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        state = {**state, "files": files}
        atomic_write_json(tmp / TRAINER_STATE, {**state, "checksum": _state_checksum(state)})
        _publish(tmp, final)
        for old in _by_step(Path(checkpoint_dir))[:-keep]:
            remove_tree(old)
    accelerator.wait_for_everyone()  # no rank races ahead to a resume/read before the rename
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. An intact `final` (a concurrent writer of the same run was first: same bytes
    by exact resume) is kept and `tmp` dropped; a damaged or stale one is replaced."""
    if final.exists():
        if checkpoint_problem(final) is None:
            log.info("checkpoint %s was already saved by another process; keeping that copy", final)
            remove_tree(tmp)
            return
        remove_tree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        # Another process renamed its copy into place between our check and our rename.
        log.info("checkpoint %s was published by another process first; keeping that copy", final)
        remove_tree(tmp)
        return
    log.info("saved checkpoint %s", final)


__all__ = ["TRAINER_STATE", "checkpoint_problem", "latest_checkpoint", "resumable_checkpoint", "read_state",
           "save_checkpoint"]

"""Temp names no two processes share, removal that never leaves half a directory, and cleanup of the temp
files and dirs that dead processes left inside a stage's partial dir (checkpoints, scoring shards).

Temp names follow artifacts.atomic_write_text: `.<final name>.tmp-<host>-<pid>-<random>`, so a pid repeated by
another container or host never collides. Host and pid also tell a dead process's leftover from a live one's:
on this host, a pid that no longer exists wrote it. (Two containers that share a hostname and a directory
cannot be told apart this way; the stage lock keeps two writers out of one partial dir in the first place.)

Removal is rename-then-delete (`.<name>.trash-<host>-<pid>-<random>`), so a kill in the middle of deleting a
checkpoint never leaves a half-deleted directory under its real name.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

from selpo_core.artifacts import unique_suffix

_LEFTOVER = re.compile(r"\..+\.(?:tmp|trash)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8,}")


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `final` that no other process uses: `.<name>.<kind>-<host>-<pid>-<random>`."""
    return final.with_name(f".{final.name}.{kind}-{unique_suffix()}")


def remove_tree(path: Path) -> None:
    """Delete a directory (or file) by first renaming it aside; already gone (another process) is fine."""
    trash = temp_path(path, "trash")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def is_dead_leftover(path: Path) -> bool:
    """True for a temp or trash entry (named as `temp_path` names them) of an exited process of this host."""
    match = _LEFTOVER.fullmatch(path.name)
    if match is None or match["host"] != socket.gethostname():
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_dead_leftovers(directory: Path) -> list[Path]:
    """Remove the temp/trash entries of dead processes directly inside `directory`; returns what went."""
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if is_dead_leftover(entry):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


__all__ = ["temp_path", "remove_tree", "is_dead_leftover", "remove_dead_leftovers"]

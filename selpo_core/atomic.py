"""Temp names no two processes share, atomic writes and removals, and cleanup of dead processes' leftovers.

A temp name carries host, pid and a random token: `.<final name>.tmp-<host>-<pid>-<12 hex>`. pid alone is not
unique (two containers, or two hosts on one network filesystem, reuse pids), and a fixed name such as
`.step-000005.tmp` is shared by every process that writes the same thing. The host and pid let a later run
tell a dead process's leftover from a live one's: on the same host, a pid that no longer exists wrote it.
(Two containers that share both a hostname and a directory cannot be told apart this way; the leftover of a
live process there looks dead. Stage locks keep such processes from sharing a directory in the first place.)

Removal is rename-then-delete (`.<name>.trash-<token>`), so a kill in the middle of deleting a checkpoint or
shard never leaves a half-deleted directory under its real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

_LEFTOVER = re.compile(r"\..+\.(?:tmp|trash)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{12}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temp_token() -> str:
    """`<host>-<pid>-<12 random hex>`: unique across processes, hosts and containers."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `final` that no other process uses: `.<name>.<kind>-<host>-<pid>-<random>`."""
    return final.with_name(f".{final.name}.{kind}-{temp_token()}")


def write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so a reader sees the old file or the whole new one: unique temp file, fsync, rename.

    Two processes writing the same path at once both succeed; the last rename wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    write_bytes(path, json.dumps(value, indent=2, default=str).encode())


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
    """True for a temp or trash entry (named by `temp_path`) of a process of this host that has exited."""
    match = _LEFTOVER.fullmatch(path.name)
    if match is None or match["host"] != _host():
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


__all__ = ["temp_token", "temp_path", "write_bytes", "write_json", "remove_tree", "is_dead_leftover",
           "remove_dead_leftovers"]

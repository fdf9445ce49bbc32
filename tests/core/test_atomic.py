"""Temp names that no two processes share, and cleanup that removes only dead processes' leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selpo_core import atomic


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


def test_temp_names_differ_even_for_one_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # two containers: same pid, same final name
    final = tmp_path / "part-00000.parquet"
    names = {atomic.temp_path(final).name for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(".part-00000.parquet.tmp-") and "-4242-" in n for n in names)


def test_only_leftovers_of_dead_processes_on_this_host_are_removed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "step-000004"
    live = atomic.temp_path(final)  # this process: alive
    live.mkdir()
    monkeypatch.setattr(os, "getpid", _dead_pid)
    dead_dir, dead_file = atomic.temp_path(final), atomic.temp_path(tmp_path / "plan.json")
    dead_trash = atomic.temp_path(final, "trash")
    monkeypatch.undo()
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"half")
    dead_file.write_text("{")
    dead_trash.mkdir()
    other_host = tmp_path / f".step-000004.tmp-other-host-{_dead_pid()}-01234567"
    other_host.mkdir()
    unrelated = [tmp_path / "step-000002", tmp_path / ".plan.json.tmp-123", tmp_path / "notes.tmp-x-1-2"]
    unrelated[0].mkdir()
    for path in unrelated[1:]:
        path.write_text("")

    removed = atomic.remove_dead_leftovers(tmp_path)
    assert sorted(removed) == sorted([dead_dir, dead_file, dead_trash])
    assert not any(p.exists() for p in removed)
    assert live.is_dir() and other_host.is_dir() and all(p.exists() for p in unrelated)


def test_remove_tree_leaves_nothing_and_tolerates_a_vanished_path(tmp_path: Path) -> None:
    tree = tmp_path / "step-000001"
    (tree / "inner").mkdir(parents=True)
    (tree / "inner" / "model.safetensors").write_bytes(b"weights")
    atomic.remove_tree(tree)
    atomic.remove_tree(tree)  # already gone (as when another process pruned it first)
    assert list(tmp_path.iterdir()) == []

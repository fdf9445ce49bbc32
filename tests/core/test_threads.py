"""The thread policy: free cores from affinity and the load of other processes; a user's choice wins."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selpo_core import threads

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("cpus", "load", "expected"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 3.7, 1),
    (8, 0.0, 8), (8, 2.2, 6), (8, 2.6, 5), (1, 0.0, 1), (4, -1.0, 4),
])
def test_choose_threads_leaves_the_busy_cores(cpus: int, load: float, expected: int) -> None:
    assert threads.choose_threads(cpus, load) == expected


def test_choose_threads_rejects_no_cpus() -> None:
    with pytest.raises(ValueError, match="cpus must be >= 1"):
        threads.choose_threads(0, 0.0)


def test_other_load_excludes_this_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    running = iter([3, 4, 3, 2])
    monkeypatch.setattr(threads, "_procs_running", lambda: next(running))
    monkeypatch.setattr(threads, "_own_running_threads", lambda: 1)  # the sampling thread
    monkeypatch.setattr(threads.time, "sleep", lambda _: None)
    assert threads.other_load(samples=4) == pytest.approx((2 + 3 + 2 + 1) / 4)


def test_other_load_falls_back_to_the_load_average(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_procs_running", lambda: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.25, 0.5, 0.25))
    assert threads.other_load() == 1.25


def test_procs_running_reads_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 5\nprocs_blocked 0\n")
    assert threads._procs_running(stat) == 5
    stat.write_text("cpu  1 2 3\n")
    assert threads._procs_running(stat) is None


def test_own_running_threads_counts_state_r(tmp_path: Path) -> None:
    for tid, stat in (("1", "1 (python (x)) R 0 1"), ("2", "2 (pt_main thread) S 0 1"), ("3", "3 (omp) R 1")):
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "stat").write_text(stat)
    assert threads._own_running_threads(tmp_path) == 2


@pytest.fixture
def fresh_policy(monkeypatch: pytest.MonkeyPatch):
    """No applied choice yet, no user env, and torch's count restored afterwards (conftest pins 1 thread)."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_applied", None)
    for name in (*threads.USER_THREAD_ENV, "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(before)


def test_apply_uses_free_cores_once(monkeypatch: pytest.MonkeyPatch, fresh_policy: None) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "physical_cores", lambda: 2)
    monkeypatch.setattr(threads, "other_load", lambda: 1.0)
    torch.set_num_threads(2)  # torch's default on a 2-core machine: not a user's choice
    choice = threads.apply_thread_policy()
    assert (choice.threads, choice.cpus, choice.other_load, choice.source) == (1, 2, 1.0, "free cores")
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "other_load", lambda: 0.0)
    torch.set_num_threads(2)
    assert threads.apply_thread_policy() is choice  # once per process: the second call changes nothing
    assert torch.get_num_threads() == 2


def test_apply_keeps_a_users_environment(monkeypatch: pytest.MonkeyPatch, fresh_policy: None) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "physical_cores", lambda: 2)
    monkeypatch.setattr(threads, "other_load", lambda: 5.0)
    torch.set_num_threads(2)
    choice = threads.apply_thread_policy()
    assert (choice.threads, choice.source) == (2, "OMP_NUM_THREADS") and math.isnan(choice.other_load)
    assert torch.get_num_threads() == 2


def test_apply_keeps_torch_set_num_threads(monkeypatch: pytest.MonkeyPatch, fresh_policy: None) -> None:
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    monkeypatch.setattr(threads, "other_load", lambda: 0.0)
    torch.set_num_threads(3)  # not torch's default of 4: the user chose it
    choice = threads.apply_thread_policy()
    assert (choice.threads, choice.source) == (3, "torch.set_num_threads")
    assert torch.get_num_threads() == 3


def test_passive_wait_only_before_torch_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.set_passive_wait() is False  # torch is loaded in this process: too late for libgomp
    assert "OMP_WAIT_POLICY" not in threads.os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.set_passive_wait() is False
    assert threads.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_entry_point_sets_the_policy_before_torch_loads() -> None:
    """`python -m selpo_core.stages` sets PASSIVE at start, before anything loads torch (libgomp reads it then)."""
    code = ("import sys, runpy; sys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_module('selpo_core.stages', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "import os\nprint(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out[-2:] == ["PASSIVE", "True"]  # torch loaded by --help (the stage names), after PASSIVE was set


def test_physical_cores_is_at_least_one() -> None:
    assert threads.physical_cores() >= 1

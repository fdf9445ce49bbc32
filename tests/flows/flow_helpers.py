"""Helpers of the flow tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


def task_run_states(flow_run_id: UUID, expected: set[str] | None = None, timeout: float = 30) -> dict[str, str]:
    """{task run name: state name} of a flow run, read back through the Prefect client.

    Task-run states reach the API as events, processed a moment after the flow returns: poll until every run
    is final and the expected names are there (or, without `expected`, until two reads agree).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    previous: dict[str, str] | None = None
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = {run.name: run.state.name for run in runs if run.state is not None}
            final = all(run.state is not None and run.state.is_final() for run in runs)
            done = (expected is not None and expected <= set(states)) or (expected is None and states == previous)
            if (final and done) or time.monotonic() > deadline:
                return states
            previous = states
            time.sleep(0.3)


# ---------------------------------------------------------------- processes of the slow tests (server, serve)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Own session: stopping it stops its children too (the server's uvicorn, the flow-run subprocesses).
    with open(log, "wb") as handle:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)  # graceful first: serve pauses its schedules, the server closes the DB
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_until(check: Callable[[], object], what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"{what} not ready after {timeout} s\n{tails}")

"""A real Prefect server on 127.0.0.1, the deployments served from another process, one run triggered through
the client and followed to COMPLETED. Slow (a server, a serve process and a flow-run process start), but part of
`make test`: it is the only test of the path a UI user takes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flow_helpers import REPO

STARTUP_TIMEOUT = 120
RUN_TIMEOUT = 300


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


def wait_until(check: object, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # not up yet
            pass
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"{what} not ready after {timeout} s\n{tails}")


@pytest.fixture
def server_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "selpo",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   env, log)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, "prefect server",
                   STARTUP_TIMEOUT, [log])
        yield {**env, "PREFECT_API_URL": api}
    finally:
        stop(server)


@pytest.mark.slow
def test_served_deployment_runs_to_completion(server_env: dict[str, str], tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs_dir = tmp_path / "runs"
    log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "deployments.serve", "--config", "configs/tiny.yaml", "--set",
                   f"runs_dir={runs_dir}"], server_env, log)
    try:
        with temporary_settings({PREFECT_API_URL: server_env["PREFECT_API_URL"]}):
            def deployed() -> bool:
                with get_client(sync_client=True) as client:
                    return client.read_deployment_by_name("sepo-pipeline/tiny") is not None

            wait_until(deployed, "served deployment", STARTUP_TIMEOUT, [log])
            flow_run = run_deployment("sepo-pipeline/tiny", timeout=RUN_TIMEOUT, poll_interval=2, as_subflow=False)
        if not (flow_run.state and flow_run.state.is_completed()):
            pytest.fail(f"flow run ended in {flow_run.state!r}\n{log.read_text(errors='replace')[-6000:]}")
        summary = json.loads((runs_dir / "tiny" / "summary.json").read_text())
        assert set(summary["policy"]) == {"sepo", "dpo"}
        assert not any(row["cached"] for row in summary["stages"].values())
    finally:
        stop(serve)

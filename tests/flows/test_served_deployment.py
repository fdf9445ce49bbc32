"""A real Prefect server on 127.0.0.1, the deployments served from another process: one run triggered through
the client and followed to COMPLETED, and a schedule switched on that stays on when `selpo serve` restarts. Slow
(a server, a serve process and a flow-run process start), but part of `make test`. tests/browser drives the same
path through the UI itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flow_helpers import REPO, free_port, start, stop, wait_until

STARTUP_TIMEOUT = 120
RUN_TIMEOUT = 300
PIPELINE = "sepo-pipeline/SePO pipeline (tiny)"


@pytest.fixture
def server_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "selpo",
           # The scheduler makes a schedule's runs every 60 s by default: a switched-on schedule shows sooner.
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
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


def start_serve(env: dict[str, str], runs_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """`python -m deployments.serve` of the tiny config, its file server on a free port."""
    return start([sys.executable, "-m", "deployments.serve", "--config", "configs/tiny.yaml", "--set",
                  f"runs_dir={runs_dir}", "--files-port", str(free_port())], env, log)


@pytest.mark.slow
def test_served_deployment_runs_to_completion(server_env: dict[str, str], tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs_dir = tmp_path / "runs"
    log = tmp_path / "serve.log"
    serve = start_serve(server_env, runs_dir, log)
    try:
        with temporary_settings({PREFECT_API_URL: server_env["PREFECT_API_URL"]}):
            def deployed() -> bool:
                with get_client(sync_client=True) as client:
                    return client.read_deployment_by_name(PIPELINE) is not None

            wait_until(deployed, "served deployment", STARTUP_TIMEOUT, [log])
            flow_run = run_deployment(PIPELINE, timeout=RUN_TIMEOUT, poll_interval=2, as_subflow=False)
        if not (flow_run.state and flow_run.state.is_completed()):
            pytest.fail(f"flow run ended in {flow_run.state!r}\n{log.read_text(errors='replace')[-6000:]}")
        summary = json.loads((runs_dir / "tiny" / "summary.json").read_text())
        assert set(summary["policy"]) == {"sepo", "dpo"}
        assert not any(row["cached"] for row in summary["stages"].values())
    finally:
        stop(serve)


@pytest.mark.slow
def test_an_activated_schedule_stays_active_when_serve_restarts(server_env: dict[str, str], tmp_path: Path) -> None:
    """The nightly schedule is created inactive; once the user switches it on it stays on: stopping `selpo serve`
    neither pauses the deployment nor deletes its scheduled runs, and registering again keeps the switch."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs_dir, logs = tmp_path / "runs", [tmp_path / "serve-1.log", tmp_path / "serve-2.log"]

    def read() -> tuple[Any, Any, int]:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(PIPELINE)
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
        (schedule,) = deployment.schedules
        return deployment, schedule, len(scheduled)

    with temporary_settings({PREFECT_API_URL: server_env["PREFECT_API_URL"]}):
        serve = start_serve(server_env, runs_dir, logs[0])
        try:
            wait_until(lambda: read(), "served deployment", STARTUP_TIMEOUT, logs)
            deployment, schedule, _ = read()
            assert (schedule.slug, schedule.active, deployment.paused) == ("nightly", False, False)
            with get_client(sync_client=True) as client:  # what the schedule's switch in the UI does
                client.update_deployment_schedule(deployment.id, schedule.id, active=True)
            wait_until(lambda: read()[2] > 0, "the scheduler's nightly runs", STARTUP_TIMEOUT, logs)
        finally:
            stop(serve)
        deployment, schedule, scheduled = read()
        assert (schedule.active, deployment.paused) == (True, False) and scheduled > 0, "stopping serve paused it"

        serve = start_serve(server_env, runs_dir, logs[1])
        try:
            wait_until(lambda: read()[0].updated > deployment.updated, "re-registered deployment", STARTUP_TIMEOUT,
                       logs)
            again, schedule_again, _ = read()
            assert schedule_again.id == schedule.id  # the same schedule, updated in place (by its slug)
            assert (schedule_again.active, again.paused) == (True, False), "registering again switched it off"
            # Updating a deployment drops its not-yet-started scheduled runs; the scheduler makes them again.
            wait_until(lambda: read()[2] > 0, "the nightly runs after the restart", STARTUP_TIMEOUT, logs)
        finally:
            stop(serve)

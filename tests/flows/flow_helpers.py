"""Helpers of the flow tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

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

"""Helpers of the flow tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


class StageCalls(Counter):
    """How many times each selpo_core stage function really ran (cache hits never call it)."""

    def reset(self) -> None:
        self.clear()

    def ran(self) -> dict[str, int]:
        return {name: count for name, count in self.items() if count}


def install_stage_spies(patch: pytest.MonkeyPatch) -> StageCalls:
    """Wrap every stage function of selpo_core.stages with a counter (the tasks look them up at call time;
    cache keys plan with the unwrapped functions, so planning is never counted)."""
    from selpo_core import stages
    from tasks.common import STAGE_NAMES

    calls = StageCalls()
    for name in STAGE_NAMES:
        original = getattr(stages, name)

        def spy(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        patch.setattr(stages, name, spy)
    return calls


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

"""TSO through Prefect: 2 tiny rounds as subflows ("TSO round 2") of named, cached task runs; a run that fails in
round 2's training resumes there without re-running round 1; the per-round table is published as an artifact."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flow_helpers import TINY_CONFIG, StageCalls, install_stage_spies, task_run_states

TSO_STEPS = ("round_prompts", "candidates", "build_pairs")
ROUND_TASKS = ["prompts", "candidates", "build pairs", "train", "generate", "evaluate"]


@dataclass
class TSORuns:
    failed: Any
    failed_calls: dict[str, int]
    resumed: Any
    resumed_calls: dict[str, int]
    summary: dict[str, Any]


def install_tso_spies(patch: pytest.MonkeyPatch, calls: StageCalls) -> None:
    """Count the TSO library steps like the stage spies do (the tasks look them up at call time)."""
    from selpo_core import tso

    for name in TSO_STEPS:
        original = getattr(tso, name)

        def spy(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        patch.setattr(tso, name, spy)


@pytest.fixture(scope="module")
def tso_runs(prefect_harness: Path, tmp_path_factory: pytest.TempPathFactory) -> TSORuns:
    from flows.tso import tso_flow  # imported before the spies: the planners keep the unwrapped functions

    overrides = {"runs_dir": str(tmp_path_factory.mktemp("tso-flow-runs")), "tso.rounds": 2,
                 "tso.prompts_per_round": 12, "tso.generators": ["initial"]}
    with pytest.MonkeyPatch.context() as patch:
        calls = install_stage_spies(patch)
        install_tso_spies(patch, calls)
        failed = tso_flow(TINY_CONFIG, {**overrides, "tso.fail_round": 2}, return_state=True)
        failed_calls = calls.ran()
        calls.reset()
        resumed = tso_flow(TINY_CONFIG, overrides, return_state=True)
        resumed_calls = calls.ran()
    assert failed.is_failed(), failed
    assert resumed.is_completed(), resumed
    return TSORuns(failed, failed_calls, resumed, resumed_calls, resumed.result())


def round_task_states(flow_run_id: Any) -> dict[str, str]:
    """{task run name: state} of every "TSO round N" subflow of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        rounds = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    states: dict[str, str] = {}
    for run in rounds:
        assert run.name.startswith("TSO round ")
        expected = {f"{run.name} · {step}" for step in ROUND_TASKS} if run.state and run.state.is_completed() else None
        states |= task_run_states(run.id, expected)
    return states


def test_failed_round_two_resumes_without_rerunning_round_one(tso_runs: TSORuns) -> None:
    # Failing run: start + round 1 all ran; round 2 got as far as its training, which failed on purpose.
    assert tso_runs.failed_calls == {"make_synthetic": 1, "prepare_data": 1, "sft": 1, "round_prompts": 2,
                                     "candidates": 2, "build_pairs": 2, "train_policy": 2, "generate": 2,
                                     "evaluate": 1}
    failed = round_task_states(tso_runs.failed.state_details.flow_run_id)
    assert failed["TSO round 1 · evaluate"] == "Completed" and failed["TSO round 2 · train"] == "Failed"
    assert "TSO round 2 · generate" not in failed
    # Resumed run: only what round 2 had left ran; everything else came from Prefect's cache.
    assert tso_runs.resumed_calls == {"train_policy": 1, "generate": 1, "evaluate": 1}
    resumed = round_task_states(tso_runs.resumed.state_details.flow_run_id)
    assert {f"TSO round 1 · {step}" for step in ROUND_TASKS} <= set(resumed)
    assert {resumed[f"TSO round 1 · {step}"] for step in ROUND_TASKS} == {"Cached"}
    assert [resumed[f"TSO round 2 · {step}"] for step in ROUND_TASKS] == ["Cached"] * 3 + ["Completed"] * 3
    cached = {name: row["cached"] for name, row in tso_runs.summary["stages"].items()}
    assert cached["tso_round1_train"] and cached["tso_round2_pairs"] and not cached["tso_round2_train"]


def test_rounds_chain_and_the_table_is_published(tso_runs: TSORuns) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from selpo_core.artifacts import read_manifest

    rows = tso_runs.summary["rounds"]
    assert [row["round"] for row in rows] == [0, 1, 2]
    second = read_manifest(rows[2]["dirs"]["policy"])["inputs"]
    assert second["reference"]["path"] == second["policy_init"]["path"] == rows[1]["dirs"]["policy"]
    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["tiny-tso-rounds"])
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert artifacts, "no TSO rounds artifact"
    table = artifacts[0].data
    assert "| round | pairs | corrected | true reward |" in table and "| 2 | " in table

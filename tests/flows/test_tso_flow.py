"""TSO through Prefect: 2 tiny rounds of named, cached task runs ("TSO round 2 · build pairs"); a run that fails in
round 2's training resumes there without re-running round 1; the per-round table is published as an artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flow_helpers import TINY_CONFIG, task_run_states
from stage_spies import install_stage_spies

ROUND_TASKS = ["prompts", "candidates", "build pairs", "train", "generate", "evaluate"]
ROUND_STAGES = ["tso_round{r}_prompts", "tso_round{r}_candidates", "tso_round{r}_pairs", "policy_tso_round{r}",
                "generate_tso_round{r}", "evaluate_tso_round{r}"]


@dataclass
class TSORuns:
    failed: Any
    failed_calls: dict[str, int]
    resumed: Any
    resumed_calls: dict[str, int]
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def tso_runs(prefect_harness: Path, tmp_path_factory: pytest.TempPathFactory) -> TSORuns:
    from flows.tso import tso_flow

    overrides = {"runs_dir": str(tmp_path_factory.mktemp("tso-flow-runs")), "tso.rounds": 2,
                 "tso.prompts_per_round": 12, "tso.generators": ["initial"]}
    with pytest.MonkeyPatch.context() as patch:
        calls = install_stage_spies(patch, fail=lambda name: name == "policy_tso_round2")
        failed = tso_flow(TINY_CONFIG, overrides, return_state=True)
        failed_calls = calls.ran()
    with pytest.MonkeyPatch.context() as patch:
        calls = install_stage_spies(patch)
        resumed = tso_flow(TINY_CONFIG, overrides, return_state=True)
        resumed_calls = calls.ran()
    assert failed.is_failed(), failed
    assert resumed.is_completed(), resumed
    return TSORuns(failed, failed_calls, resumed, resumed_calls, resumed.result())


def test_failed_round_two_resumes_without_rerunning_round_one(tso_runs: TSORuns) -> None:
    # Failing run: start + round 1 all ran; round 2 got as far as its training, which failed on purpose.
    round1 = [name.format(r=1) for name in ROUND_STAGES]
    assert tso_runs.failed_calls == dict.fromkeys(["synthetic", "data", "sft_reference", "generate_reference",
                                                   *round1, *[n.format(r=2) for n in ROUND_STAGES[:4]]], 1)
    failed = task_run_states(tso_runs.failed.state_details.flow_run_id)
    assert failed["TSO round 1 · evaluate"] == "Completed" and failed["TSO round 2 · train"] == "Failed"
    assert "TSO round 2 · generate" not in failed
    # Resumed run: only what round 2 had left ran; everything else came from Prefect's cache.
    assert tso_runs.resumed_calls == dict.fromkeys([name.format(r=2) for name in ROUND_STAGES[3:]], 1)
    # Reused stages say so in their names (" · cached"): all of round 1, and round 2 up to its pairs.
    expected = {f"TSO round 1 · {step} · cached" for step in ROUND_TASKS}
    expected |= {f"TSO round 2 · {step}" + (" · cached" if i < 3 else "") for i, step in enumerate(ROUND_TASKS)}
    resumed = task_run_states(tso_runs.resumed.state_details.flow_run_id, expected | {"publish TSO rounds"})
    assert {resumed[f"TSO round 1 · {step} · cached"] for step in ROUND_TASKS} == {"Cached"}
    assert [resumed[f"TSO round 2 · {step} · cached"] for step in ROUND_TASKS[:3]] == ["Cached"] * 3
    assert [resumed[f"TSO round 2 · {step}"] for step in ROUND_TASKS[3:]] == ["Completed"] * 3
    cached = {name: row["cached"] for name, row in tso_runs.summary["stages"].items()}
    assert cached["policy_tso_round1"] and cached["tso_round2_pairs"] and not cached["policy_tso_round2"]


def test_rounds_chain_and_the_table_is_published(tso_runs: TSORuns) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from selpo_core.artifacts import read_manifest

    rows = tso_runs.summary["rounds"]
    assert [row["round"] for row in rows] == [0, 1, 2]
    second = read_manifest(rows[2]["dirs"]["policy"])["inputs"]
    assert second["anchor"]["stage"] == second["policy_init"]["stage"] == Path(rows[1]["dirs"]["policy"]).name
    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["tiny-tso-rounds"])
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert artifacts, "no TSO rounds artifact"
    table = artifacts[0].data
    assert "| round | pairs | corrected | true reward |" in table and "| 2 | " in table

"""The tiny pipeline through Prefect: a full run, resume after a failure, cache reuse and invalidation.

One module-scoped run (fail in `score`, then resume) is shared by the tests; each later test leaves the run's
base configuration complete, so they can run in any order after it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flow_helpers import TINY_CONFIG, task_run_states
from stage_spies import StageCalls, install_stage_spies

FAIL_AT = "score"
BEFORE = ["make synthetic task", "prepare data", "SFT reference", "train oracle"]
FROM_FAILED = ["score tokens", "select key tokens", "generate [reference]", "train policy [sepo]", "generate [sepo]",
               "evaluate [sepo]", "train policy [dpo]", "generate [dpo]", "evaluate [dpo]"]
CACHED = " · cached"  # the task-run name of a reused stage ends so (tasks/stage.py)
STAGE_RECORDS = ["synthetic", "data", "sft_reference", "oracle", "score", "select", "generate_reference", "policy_sepo",
                 "generate_sepo", "evaluate_sepo", "policy_dpo", "generate_dpo", "evaluate_dpo"]


@dataclass
class ResumedRun:
    runs_dir: Path
    overrides: dict[str, Any]
    failed_states: dict[str, str]
    failed_calls: dict[str, int]
    resumed_states: dict[str, str]
    resumed_calls: dict[str, int]
    summary: dict[str, Any]
    summary_file: dict[str, Any]
    flow_run_id: Any


def run_pipeline(overrides: dict[str, Any], **extra: Any) -> tuple[Any, dict[str, str]]:
    from flows import sepo_pipeline

    state = sepo_pipeline(TINY_CONFIG, overrides, return_state=True, **extra)
    return state, task_run_states(state.state_details.flow_run_id,
                                  expected={"write summary"} if state.is_completed() else None)


@pytest.fixture(scope="module")
def resumed_run(prefect_harness: Path, tmp_path_factory: pytest.TempPathFactory) -> ResumedRun:
    runs_dir = tmp_path_factory.mktemp("runs")
    overrides = {"runs_dir": str(runs_dir)}
    with pytest.MonkeyPatch.context() as patch:
        calls = install_stage_spies(patch, fail=lambda name: name == FAIL_AT)
        failed, failed_states = run_pipeline(overrides)
        failed_calls = calls.ran()
    with pytest.MonkeyPatch.context() as patch:
        calls = install_stage_spies(patch)
        resumed, resumed_states = run_pipeline(overrides)
        resumed_calls = calls.ran()
    assert failed.is_failed(), failed
    assert resumed.is_completed(), resumed
    summary = resumed.result()
    summary_file = json.loads((runs_dir / "tiny" / "summary.json").read_text())
    return ResumedRun(runs_dir, overrides, failed_states, failed_calls, resumed_states, resumed_calls, summary,
                      summary_file, resumed.state_details.flow_run_id)


def test_whole_pipeline_writes_summary_and_artifacts(resumed_run: ResumedRun) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    summary = resumed_run.summary_file
    assert summary == json.loads(json.dumps(resumed_run.summary))  # the flow returns what it wrote
    assert {"token_auroc", "selection_precision"} <= set(summary["oracle"])
    assert set(summary["policy"]) == {"sepo", "dpo"}
    for row in summary["policy"].values():
        assert {"reward_gain", "kl", "trained_token_fraction"} <= set(row)
    assert list(summary["stages"]) == STAGE_RECORDS
    for row in summary["stages"].values():
        assert isinstance(row["seconds"], float | int) and isinstance(row["cached"], bool)
        assert (Path(row["dir"]) / "manifest.json").is_file()

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[resumed_run.flow_run_id])))
    by_key = {artifact.key: artifact for artifact in artifacts if artifact.key}
    assert set(by_key) == {"tiny-results", "tiny-methods", "tiny-stages", "tiny-oracle", "tiny-dir",
                           "tiny-token-heatmap"}
    # Their place in the run's fixed order leads every description (the UI orders the cards by random ids).
    assert sorted(artifact.description[:3] for artifact in by_key.values()) == [f"{i}/6" for i in range(1, 7)]
    report = by_key["tiny-results"].data
    assert "| method | reward gain" in report and "| stage | seconds | cached |" in report
    assert (resumed_run.runs_dir / "tiny" / "report.md").read_text() == report
    assert (resumed_run.runs_dir / "tiny" / "metrics.svg").read_text().startswith("<svg")
    # Links go through the file server (http), never file://, to the run's own views of the stage dirs.
    assert "file://" not in report and "http://127.0.0.1:4201/tiny/metrics.svg" in report
    select_view = Path(resumed_run.summary["stages"]["select"]["dir"]).name
    assert f"http://127.0.0.1:4201/tiny/{select_view}/token_heatmap.html" in by_key["tiny-token-heatmap"].data
    assert "| pair | side | response |" in by_key["tiny-token-heatmap"].data  # the embedded excerpt
    assert "http://127.0.0.1:4201/tiny/" in by_key["tiny-dir"].data
    methods = {row["method"]: row for row in json.loads(by_key["tiny-methods"].data)}
    assert set(methods) == {"sepo", "dpo"} and "reward_gain" in methods["sepo"]
    stages = {row["stage"]: row for row in json.loads(by_key["tiny-stages"].data)}
    assert [stages[name]["cached"] for name in BEFORE + FROM_FAILED] == ["yes"] * 4 + ["no"] * 9
    assert all(row["directory"].startswith("http://127.0.0.1:4201/tiny/") for row in stages.values())
    assert {row["metric"] for row in json.loads(by_key["tiny-oracle"].data)} >= {"token_auroc", "selection_precision"}
    # Training and scoring showed their progress; reused stages (no body ran) added none.
    progress = [artifact for artifact in artifacts if artifact.type == "progress"]
    assert sorted(artifact.description.split(":")[0] for artifact in progress) == [
        "score tokens", "train policy [dpo]", "train policy [sepo]"]
    assert all(artifact.data == 100.0 for artifact in progress)


def test_failed_run_resumes_at_the_failed_stage(resumed_run: ResumedRun) -> None:
    # The failing run: the stages before `score` completed, `score` failed, nothing after it started.
    assert {name: resumed_run.failed_states.get(name) for name in BEFORE} == dict.fromkeys(BEFORE, "Completed")
    assert resumed_run.failed_states["score tokens"] == "Failed"
    assert not set(FROM_FAILED[1:]) & set(resumed_run.failed_states)
    assert resumed_run.failed_calls == {"synthetic": 1, "data": 1, "sft_reference": 1, "oracle": 1, "score": 1}
    # The re-run: stages < k come from the cache (never called), stages >= k run, each once.
    assert {name: resumed_run.resumed_states[name + CACHED] for name in BEFORE} == dict.fromkeys(BEFORE, "Cached")
    assert {name: resumed_run.resumed_states[name] for name in FROM_FAILED} == dict.fromkeys(FROM_FAILED, "Completed")
    assert resumed_run.resumed_calls == dict.fromkeys(STAGE_RECORDS[4:], 1)
    cached = {name: row["cached"] for name, row in resumed_run.summary["stages"].items()}
    assert cached == {name: name in ("synthetic", "data", "sft_reference", "oracle") for name in STAGE_RECORDS}


def test_new_run_with_same_inputs_reuses_everything(resumed_run: ResumedRun, stage_calls: StageCalls) -> None:
    state, states = run_pipeline(resumed_run.overrides)
    assert state.is_completed()
    assert stage_calls.ran() == {}
    assert {name: states[name + CACHED] for name in BEFORE + FROM_FAILED} == dict.fromkeys(BEFORE + FROM_FAILED,
                                                                                          "Cached")
    assert all(row["cached"] for row in state.result()["stages"].values())


def test_another_run_name_reuses_every_stage_from_the_store(resumed_run: ResumedRun, stage_calls: StageCalls) -> None:
    """Equal stage keys, whatever the run's name: the new run's dir holds links to the same stage dirs."""
    state, states = run_pipeline(resumed_run.overrides, run_name="tiny-again")
    assert state.is_completed()
    assert stage_calls.ran() == {}
    assert all(states[name + CACHED] == "Cached" for name in BEFORE + FROM_FAILED)
    summary = state.result()
    assert [row["dir"] for row in summary["stages"].values()] == [
        row["dir"] for row in resumed_run.summary["stages"].values()]
    run_dir = resumed_run.runs_dir / "tiny-again"
    for row in summary["stages"].values():
        view = run_dir / Path(row["dir"]).name
        assert view.is_symlink() and view.resolve() == Path(row["dir"]).resolve()


def test_changing_policy_beta_reruns_exactly_the_dependent_stages(resumed_run: ResumedRun,
                                                                  stage_calls: StageCalls) -> None:
    state, states = run_pipeline({**resumed_run.overrides, "policy.beta": 0.25})
    assert state.is_completed()
    # beta is a parameter of dpo's loss, not of sepo's: only dpo and what reads its policy re-run.
    assert stage_calls.ran() == {"policy_dpo": 1, "generate_dpo": 1, "evaluate_dpo": 1}
    rerun = {"train policy [dpo]", "generate [dpo]", "evaluate [dpo]"}
    assert {name for name in BEFORE + FROM_FAILED if name in states} == rerun
    assert {states[name] for name in rerun} == {"Completed"}
    assert {states[name + CACHED] for name in BEFORE + FROM_FAILED if name not in rerun} == {"Cached"}


def test_deleting_a_cached_artifact_recomputes_it(resumed_run: ResumedRun, stage_calls: StageCalls) -> None:
    oracle_dir = Path(resumed_run.summary["stages"]["oracle"]["dir"])
    weights = (oracle_dir / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(oracle_dir)
    state, states = run_pipeline(resumed_run.overrides)
    assert state.is_completed()
    assert (oracle_dir / "manifest.json").is_file()
    assert states["train oracle"] == "Completed" and stage_calls["oracle"] == 1
    assert [states[name + CACHED] for name in BEFORE[:3]] == ["Cached"] * 3
    # Same config and inputs -> same key, same directory, the same bytes: what depends on the oracle is still
    # valid and stays cached.
    assert (oracle_dir / "model" / "model.safetensors").read_bytes() == weights
    assert stage_calls.ran() == {"oracle": 1}


def test_incomplete_artifact_recomputes(resumed_run: ResumedRun, stage_calls: StageCalls) -> None:
    """A directory that lost a file (crash, manual edit) is not complete: the cached result is not trusted."""
    selection_dir = Path(resumed_run.summary["stages"]["select"]["dir"])
    (selection_dir / "selection.parquet").unlink()
    state, states = run_pipeline(resumed_run.overrides)
    assert state.is_completed()
    assert states["select key tokens"] == "Completed"
    assert stage_calls.ran() == {"select": 1}
    assert (selection_dir / "selection.parquet").is_file()


def test_stage_flow_reuses_upstream_and_accepts_own_artifacts(resumed_run: ResumedRun,
                                                              stage_calls: StageCalls) -> None:
    from flows import score_flow, select_flow

    stages = resumed_run.summary["stages"]
    assert score_flow(TINY_CONFIG, resumed_run.overrides) == stages["score"]["dir"]
    given = score_flow(TINY_CONFIG, resumed_run.overrides, oracle_dir=stages["oracle"]["dir"],
                       reference_dir=stages["sft_reference"]["dir"], data_dir=stages["data"]["dir"])
    assert given == stages["score"]["dir"]
    assert select_flow(TINY_CONFIG, resumed_run.overrides) == stages["select"]["dir"]
    assert stage_calls.ran() == {}


def test_compare_methods_shares_oracle_and_scores(resumed_run: ResumedRun, stage_calls: StageCalls) -> None:
    from flows import compare_methods

    summary = compare_methods(TINY_CONFIG, resumed_run.overrides, methods=["dpo", "ipo"])
    assert set(summary["policy"]) == {"dpo", "ipo"}
    assert stage_calls.ran() == {"policy_ipo": 1, "generate_ipo": 1, "evaluate_ipo": 1}
    assert summary["stages"]["score"]["cached"] and summary["stages"]["policy_dpo"]["cached"]


def test_cli_run_stage_and_report(resumed_run: ResumedRun, capsys: pytest.CaptureFixture[str]) -> None:
    from deployments.cli import main

    runs = f"runs_dir={resumed_run.runs_dir}"
    assert main(["run", TINY_CONFIG, "--set", runs]) == 0
    assert "| method | reward gain" in capsys.readouterr().out
    assert main(["stage", "oracle", TINY_CONFIG, "--set", runs]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == resumed_run.summary["stages"]["oracle"]["dir"]
    assert main(["report", str(resumed_run.runs_dir / "tiny")]) == 0
    assert "| oracle | token AUROC" in capsys.readouterr().out
    assert main(["run", TINY_CONFIG, "--set", runs, "--set", "policy.beta=-1"]) == 1
    assert "policy.beta" in capsys.readouterr().err


def test_launcher_runs_the_stage_in_fresh_processes(resumed_run: ResumedRun, stage_calls: StageCalls,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SELPO_LAUNCHER (accelerate launch / torchrun on a GPU host; plain python here) runs the stage outside the
    flow's process; the task only streams its output and returns the finished dir."""
    from flows import oracle_flow

    oracle_dir = Path(resumed_run.summary["stages"]["oracle"]["dir"])
    shutil.rmtree(oracle_dir)
    monkeypatch.setenv("SELPO_LAUNCHER", "python")
    assert oracle_flow(TINY_CONFIG, resumed_run.overrides) == str(oracle_dir)
    assert (oracle_dir / "manifest.json").is_file()
    assert stage_calls.ran() == {}  # not in this process

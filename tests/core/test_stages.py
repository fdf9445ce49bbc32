"""The library pipeline without Prefect: every stage runs, re-runs reuse, a changed field re-runs dependents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selpo_core import stages
from selpo_core.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_run_config(ROOT / "configs/tiny.yaml", {"runs_dir": str(runs), "name": "lib"})
    return stages.run_pipeline(cfg), runs / "lib"


def test_pipeline_writes_every_stage_and_the_summary(tiny_run: tuple[dict, Path]) -> None:
    summary, run_dir = tiny_run
    assert json.loads((run_dir / "summary.json").read_text())["policy"].keys() == {"sepo", "dpo"}
    assert 0.0 <= summary["oracle"]["token_auroc"] <= 1.0
    assert 0.0 <= summary["oracle"]["selection_precision"] <= 1.0
    for method in ("sepo", "dpo"):
        row = summary["policy"][method]
        assert {"reward_gain", "kl", "trained_token_fraction"} <= row.keys()
    assert summary["policy"]["dpo"]["trained_token_fraction"] == 1.0
    assert 0 < summary["policy"]["sepo"]["trained_token_fraction"] < 0.5
    assert not any(record["cached"] for name, record in summary["stages"].items() if name != "sft_policy_model")
    scores = next(run_dir.glob("score-*"))
    assert sorted(p.name for p in (scores / "scores").iterdir())[0] == "part-00000.parquet"
    assert (next(run_dir.glob("select-*")) / "token_heatmap.html").is_file()
    # DPO reads the reference log-probs from the scores instead of running the reference.
    dpo = json.loads((next(run_dir.glob("policy_dpo-*")) / "manifest.json").read_text())
    assert dpo["metrics"]["reads_ref_logps_from_scores"] is True


def test_rerun_reuses_everything_and_a_changed_field_reruns_only_dependents(tiny_run: tuple[dict, Path]) -> None:
    _, run_dir = tiny_run
    cfg = load_run_config(ROOT / "configs/tiny.yaml", {"runs_dir": str(run_dir.parent), "name": "lib"})
    again = stages.run_pipeline(cfg)
    assert all(record["cached"] for record in again["stages"].values())
    changed = load_run_config(ROOT / "configs/tiny.yaml",
                              {"runs_dir": str(run_dir.parent), "name": "lib", "select.k_chosen": 0.5})
    rerun = stages.run_pipeline(changed)
    recomputed = {name for name, record in rerun["stages"].items() if not record["cached"]}
    # sepo trains on the selection; dpo, the oracle and the scores do not depend on k.
    assert recomputed == {"select", "policy_sepo", "generate_sepo", "evaluate_sepo"}


def test_injected_failure_leaves_no_complete_dir(tmp_path: Path) -> None:
    cfg = load_run_config(ROOT / "configs/tiny.yaml", {"runs_dir": str(tmp_path), "name": "fail",
                                                       "fail_stage": "oracle"})
    with pytest.raises(stages.InjectedFailure):
        stages.run_upto(cfg, "oracle", "sepo")
    assert not list((tmp_path / "fail").glob("oracle-*[0-9a-f]"))
    assert list((tmp_path / "fail").glob("sft_reference-*[0-9a-f]"))

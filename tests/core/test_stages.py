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


@pytest.mark.slow
def test_scoring_under_torchrun_with_two_ranks_matches_one_process(tmp_path: Path) -> None:
    """Every rank scores its own shards; the main process publishes; the table equals a 1-process run."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from selpo_core.scoring import read_scores

    overrides = [f"runs_dir={tmp_path}", "score.shard_rows=40", "score.precision=fp32"]
    cfg = load_run_config(ROOT / "configs/tiny.yaml", overrides)
    stages.run_upto(cfg, "oracle", "sepo")  # the same oracle and reference for both scorings
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "selpo_core.stages", "score", "--config", str(ROOT / "configs/tiny.yaml"),
               *[arg for override in overrides for arg in ("--set", override)]]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    score_dir = Path(result.stdout.strip().splitlines()[-1])
    assert len(list((score_dir / "scores").glob("part-*.parquet"))) >= 2
    two_ranks = read_scores(score_dir / "scores")
    shutil.rmtree(score_dir)
    assert stages.run_upto(cfg, "score", "sepo") == score_dir
    one_rank = read_scores(score_dir / "scores")
    for column in ("example_id", "side", "token_ids", "offset_start", "offset_end", "text"):
        assert one_rank.column(column).equals(two_ranks.column(column))
    # Thread counts differ between the runs (1 per rank vs the default), so sums may differ in the last bits.
    for column in ("oracle_logps", "ref_logps", "rewards"):
        one = [value for row in one_rank.column(column).to_pylist() for value in row]
        two = [value for row in two_ranks.column(column).to_pylist() for value in row]
        assert one == pytest.approx(two, abs=1e-5)


def test_weak_to_strong_policy_larger_than_the_oracle(tmp_path: Path) -> None:
    cfg = load_run_config(ROOT / "configs/tiny.yaml", {"runs_dir": str(tmp_path), "name": "w2s",
                                                       "policy_model.tiny_hidden_size": 32,
                                                       "policy_model.tiny_layers": 2})
    sepo_dir = stages.run_upto(cfg, "policy", "sepo")
    dpo_dir = stages.run_upto(cfg, "policy", "dpo")
    sepo = json.loads((sepo_dir / "manifest.json").read_text())
    dpo = json.loads((dpo_dir / "manifest.json").read_text())
    oracle = json.loads((next((tmp_path / "w2s").glob("oracle-*[0-9a-f]")) / "manifest.json").read_text())
    assert sepo["metrics"]["parameters"] > 2 * oracle["metrics"]["parameters"]
    # The larger policy starts from its own SFT; DPO anchors on it, so it cannot reuse the small model's scores.
    assert "sft_policy_model" in sepo["inputs"]["policy_init"]["path"]
    assert dpo["metrics"]["reads_ref_logps_from_scores"] is False
    assert dpo["inputs"]["reference"]["path"] == dpo["inputs"]["policy_init"]["path"]

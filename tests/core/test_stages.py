"""The library pipeline without Prefect: the one stage graph, its keys, the store, reuse and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from stage_spies import InjectedFailure, install_stage_spies

from selpo_core import artifacts
from selpo_core.config import ConfigError, RunConfig, load_run_config
from selpo_core.stages import graph as stage_graph
from selpo_core.stages.graph import plan_graph, run_pipeline, run_upto
from selpo_core.stages.plan import STORE

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny.yaml"


def tiny(runs: Path, **overrides: object) -> RunConfig:
    return load_run_config(TINY, {"runs_dir": str(runs), **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    runs = tmp_path_factory.mktemp("runs")
    return run_pipeline(tiny(runs, name="lib")), runs


def test_pipeline_writes_every_stage_and_the_summary(tiny_run: tuple[dict, Path]) -> None:
    summary, runs = tiny_run
    run_dir = runs / "lib"
    assert json.loads((run_dir / "summary.json").read_text())["policy"].keys() == {"sepo", "dpo"}
    assert 0.0 <= summary["oracle"]["token_auroc"] <= 1.0
    assert 0.0 <= summary["oracle"]["selection_precision"] <= 1.0
    for method in ("sepo", "dpo"):
        assert {"reward_gain", "kl", "trained_token_fraction"} <= summary["policy"][method].keys()
    assert summary["policy"]["dpo"]["trained_token_fraction"] == 1.0
    assert 0 < summary["policy"]["sepo"]["trained_token_fraction"] < 0.5
    # Every record is a real stage (no phantom rows), in pipeline order, none cached in a first run.
    assert list(summary["stages"]) == ["synthetic", "data", "sft_reference", "oracle", "score", "select",
                                       "generate_reference", "policy_sepo", "generate_sepo", "evaluate_sepo",
                                       "policy_dpo", "generate_dpo", "evaluate_dpo"]
    assert not any(record["cached"] for record in summary["stages"].values())
    # Stages live in the store; the run dir holds relative links to them.
    scores = next(run_dir.glob("score-*"))
    assert scores.is_symlink() and scores.resolve().parent == (runs / STORE).resolve()
    assert not Path(str(scores.readlink())).is_absolute()
    assert sorted(p.name for p in (scores / "scores").iterdir())[0] == "part-00000.parquet"
    assert (next(run_dir.glob("select-*")) / "token_heatmap.html").is_file()
    # DPO reads the reference log-probs from the scores instead of running the reference.
    dpo = artifacts.read_manifest(next(run_dir.glob("policy_dpo-*")))
    assert dpo["metrics"]["reads_ref_logps_from_scores"] is True
    assert set(dpo["inputs"]) == {"data", "policy_init", "ref_logps"}


def test_rerun_and_another_run_name_reuse_everything(tiny_run: tuple[dict, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, runs = tiny_run
    calls = install_stage_spies(monkeypatch)
    again = run_pipeline(tiny(runs, name="lib"))
    assert all(record["cached"] for record in again["stages"].values())
    other = run_pipeline(tiny(runs, name="another-name"))
    assert calls.ran() == {}
    assert all(record["cached"] for record in other["stages"].values())
    assert {p.name for p in (runs / "another-name").iterdir() if p.is_symlink()} == \
        {p.name for p in (runs / "lib").iterdir() if p.is_symlink()}


def test_a_copied_or_moved_runs_dir_is_fully_reused(tiny_run: tuple[dict, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, runs = tiny_run
    copy = tmp_path / "elsewhere" / "runs"
    shutil.copytree(runs, copy, symlinks=True)
    calls = install_stage_spies(monkeypatch)
    summary = run_pipeline(tiny(copy, name="lib"))
    assert calls.ran() == {}
    assert all(record["cached"] for record in summary["stages"].values())
    assert summary == {**summary, "policy": run_pipeline(tiny(runs, name="lib"))["policy"]}


# Which stages each field family re-runs: read from the plans, so every field is cheap to check. The run-based
# test below shows that a re-run recomputes exactly the stages whose keys changed.
SEPO = {"policy_sepo", "generate_sepo", "evaluate_sepo"}
DPO = {"policy_dpo", "generate_dpo", "evaluate_dpo"}


@pytest.mark.parametrize(("override", "changed"), [
    ({"policy.beta": 0.25}, DPO),  # sepo is reference-free: beta is not one of its parameters
    ({"policy.sepo_gamma": 2.0}, SEPO),
    ({"policy.label_smoothing": 0.1}, DPO),
    ({"policy.simpo_beta": 3.0}, set()),  # simpo is not trained in this run
    ({"oracle.subset_fraction": 0.25}, {"oracle", "score", "select", *SEPO}),  # dpo reads only reference log-probs
    ({"score.beta": 2.0}, {"score", "select", *SEPO}),
    ({"select.k_chosen": 0.5}, {"select", *SEPO}),
    ({"sft.train.log_every": 1}, set()),
    ({"sft.train.save_every": 1}, set()),
    ({"policy.train.report_to": "tensorboard"}, set()),
    ({"policy.train.lr": 1e-3}, SEPO | DPO),
    ({"generate.temperature": 0.5}, {"generate_reference", "evaluate_sepo", "evaluate_dpo", "generate_sepo",
                                     "generate_dpo"}),
    ({"evaluate.batch_size": 4}, {"evaluate_sepo", "evaluate_dpo"}),
    ({"generate.vllm_python": "/elsewhere/python"}, set()),
    ({"runs_dir": "/some/other/place"}, set()),
    ({"name": "other"}, set()),
])
def test_a_changed_field_changes_exactly_the_keys_that_read_it(tmp_path: Path, override: dict,
                                                               changed: set[str]) -> None:
    base = plan_graph(tiny(tmp_path)).plans
    other = plan_graph(load_run_config(TINY, {"runs_dir": str(tmp_path), **override})).plans
    assert base.keys() == other.keys()
    assert {name for name in base if base[name].key != other[name].key} == changed


def test_rerun_after_a_change_recomputes_exactly_the_changed_keys(tiny_run: tuple[dict, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, runs = tiny_run
    calls = install_stage_spies(monkeypatch)
    rerun = run_pipeline(tiny(runs, name="lib", **{"oracle.subset_fraction": 0.25}))
    assert calls.ran() == dict.fromkeys(["oracle", "score", "select", *SEPO], 1)
    assert {name for name, row in rerun["stages"].items() if not row["cached"]} == {"oracle", "score", "select",
                                                                                  *SEPO}


def test_plans_are_made_once_and_user_model_dirs_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              word_tokenizer: object) -> None:
    from selpo_core import models
    from selpo_core.config import ModelConfig

    model = tmp_path / "my-sft"
    models.save_model_dir(models.build_tiny_model(ModelConfig(tiny_hidden_size=16, tiny_layers=1, tiny_heads=2),
                                                  word_tokenizer), word_tokenizer, model)
    hashed: list[Path] = []
    digest = artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda path: hashed.append(Path(path)) or digest(path))
    cfg = tiny(tmp_path, **{"reference.path": str(model), "policy_model.path": str(model), "sft.enabled": False})
    graph = plan_graph(cfg)
    plan_graph(cfg)  # e.g. a flow and the CLI in one process
    files = sorted(p.name for p in model.rglob("*") if p.is_file())
    assert sorted(p.name for p in hashed) == files  # each file of the user's model once, in all
    assert graph.plans["oracle"].inputs["reference"].path == str(model)


def test_a_failed_stage_leaves_no_complete_dir_and_resumes_there(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(tmp_path, name="fail")
    with pytest.MonkeyPatch.context() as patch:
        calls = install_stage_spies(patch, fail=lambda name: name == "oracle")
        with pytest.raises(InjectedFailure):
            run_upto(cfg, "score", "sepo")
    assert calls.ran() == {"synthetic": 1, "data": 1, "sft_reference": 1, "oracle": 1}
    store = tmp_path / STORE
    assert not [p for p in store.glob("oracle-*") if artifacts.is_complete(p)]
    assert not list(store.glob("*.tmp-*"))  # the failed attempt's temp dir is gone
    calls = install_stage_spies(monkeypatch)
    run_upto(cfg, "score", "sepo")
    assert calls.ran() == {"oracle": 1, "score": 1}


def test_a_damaged_stage_is_recomputed_and_nothing_else(tiny_run: tuple[dict, Path], monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    _, runs = tiny_run
    shard = runs / STORE / plan_graph(tiny(runs)).plans["score"].dirname / "scores" / "part-00000.parquet"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, one bit pattern flipped
    shard.write_bytes(bytes(content))
    monkeypatch.setattr(artifacts, "_VERIFIED", {})  # as in a new process
    calls = install_stage_spies(monkeypatch)
    with caplog.at_level("WARNING", logger="selpo.stages"):
        run_pipeline(tiny(runs, name="lib"))
    assert calls.ran() == {"score": 1}
    assert any("does not match its checksum" in r.message and "recomputing" in r.message for r in caplog.records)
    assert artifacts.is_complete(shard.parent.parent)


def test_orphaned_temp_dirs_are_removed_but_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    import subprocess
    import sys

    from selpo_core.stages.runner import remove_orphans

    store = tmp_path / STORE
    (store / "oracle-abc.tmp-host-123-dead").mkdir(parents=True)
    (store / "score-def.tmp-host-456-live").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(store / 'score-def.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        removed = remove_orphans(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in removed] == ["oracle-abc.tmp-host-123-dead"]
    assert (store / "score-def.tmp-host-456-live").is_dir()


@pytest.mark.slow
def test_two_runs_at_once_on_one_runs_dir(tmp_path: Path) -> None:
    """Both finish; each stage is written once (the second run waits on the first's lock, then reuses)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "selpo_core.stages", "oracle", "--config", str(TINY), "--set",
               f"runs_dir={tmp_path}"]
    runs = [subprocess.Popen([*command, "--set", f"name=run{i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].strip() == outputs[1][0].strip()
    written = [line for _, err in outputs for line in err.splitlines() if ": writing " in line]
    assert sorted(line.split(": writing")[0].split()[-1] for line in written) == \
        ["data", "oracle", "sft_reference", "synthetic"]


@pytest.mark.slow
def test_scoring_under_torchrun_with_two_ranks_matches_one_process(tmp_path: Path) -> None:
    """Every rank scores its own shards; the main process publishes and alone prints; the table equals a
    1-process run."""
    import os
    import socket
    import subprocess
    import sys

    from selpo_core.scoring import read_scores

    overrides = [f"runs_dir={tmp_path}", "score.shard_rows=40", "score.precision=fp32"]
    cfg = load_run_config(TINY, overrides)
    run_upto(cfg, "oracle", "sepo")  # the same oracle and reference for both scorings
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "selpo_core.stages", "score", "--config", str(TINY),
               *[arg for override in overrides for arg in ("--set", override)]]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout  # rank 0 alone prints the stage dir
    score_dir = Path(result.stdout.strip())
    assert len(list((score_dir / "scores").glob("part-*.parquet"))) >= 2
    two_ranks = read_scores(score_dir / "scores")
    shutil.rmtree(score_dir)
    assert run_upto(cfg, "score", "sepo") == score_dir
    one_rank = read_scores(score_dir / "scores")
    for column in ("example_id", "side", "token_ids", "offset_start", "offset_end", "text"):
        assert one_rank.column(column).equals(two_ranks.column(column))
    # Thread counts differ between the runs (1 per rank vs the default), so sums may differ in the last bits.
    for column in ("oracle_logps", "ref_logps", "rewards"):
        one = [value for row in one_rank.column(column).to_pylist() for value in row]
        two = [value for row in two_ranks.column(column).to_pylist() for value in row]
        assert one == pytest.approx(two, abs=1e-5)


def test_weak_to_strong_policy_larger_than_the_oracle(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, name="w2s", **{"policy_model.tiny_hidden_size": 32, "policy_model.tiny_layers": 2})
    graph = plan_graph(cfg, methods=["sepo", "dpo"])
    assert "sft_policy_model" in graph.plans
    sepo_dir, dpo_dir = run_upto(cfg, "policy", "sepo"), run_upto(cfg, "policy", "dpo")
    sepo, dpo = artifacts.read_manifest(sepo_dir), artifacts.read_manifest(dpo_dir)
    oracle = artifacts.read_manifest(next((tmp_path / STORE).glob("oracle-*[0-9a-f]")))
    assert sepo["metrics"]["parameters"] > 2 * oracle["metrics"]["parameters"]
    # The larger policy starts from its own SFT; DPO anchors on it, so it cannot reuse the small model's scores.
    assert sepo["inputs"]["policy_init"]["stage"].startswith("sft_policy_model-")
    assert dpo["metrics"]["reads_ref_logps_from_scores"] is False
    assert dpo["inputs"]["anchor"] == dpo["inputs"]["policy_init"]


def test_cli_prints_one_line_for_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from selpo_core.stages.__main__ import main

    missing = tmp_path / "no-such-pairs.jsonl"
    assert main(["data", "--config", str(TINY), "--set", f"runs_dir={tmp_path}", "--set", f"data.path={missing}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"selpo: ConfigError: data.path={str(missing)!r}: no such file ({missing})",
                   "reference.path is empty: set it to your model (a tiny model is built only for the synthetic "
                   "task with sft.enabled)",
                   "policy_model.path is empty: set it to your model (a tiny model is built only for the synthetic "
                   "task with sft.enabled)"]
    assert main(["oracle", "--set", "policy.beta=-1"]) == 1
    assert capsys.readouterr().err.strip() == "selpo: ConfigError: policy.beta=-1.0 must be > 0"
    with pytest.raises(ConfigError, match="no-such-pairs"):
        main(["data", "--config", str(TINY), "--set", f"runs_dir={tmp_path}", "--set", f"data.path={missing}",
              "--debug"])


def test_each_method_reads_the_stored_logps_of_its_own_anchor(tmp_path: Path) -> None:
    plans = plan_graph(tiny(tmp_path, **{"policy.methods": ["dpo", "selective_dpo", "tdpo2", "sepo"]})).plans
    dpo, sdpo = plans["policy_dpo"], plans["policy_selective_dpo"]
    assert dpo.section["ref_logps_column"] == "ref_logps" and "anchor" not in dpo.inputs
    # Selective-DPO is scored and anchored by the oracle (a DPO-aligned model), read from the same Parquet.
    assert sdpo.section["ref_logps_column"] == "oracle_logps"
    assert sdpo.inputs["ref_logps"].stage == dpo.inputs["ref_logps"].stage == plans["score"].dirname
    assert plans["policy_tdpo2"].inputs["anchor"] == plans["policy_tdpo2"].inputs["policy_init"]  # full vocab KL
    assert "anchor" not in plans["policy_sepo"].inputs and "ref_logps" not in plans["policy_sepo"].inputs


def test_token_weighted_methods_read_the_stored_oracle_scores(tmp_path: Path) -> None:
    assert "oracle_reverse" not in plan_graph(tiny(tmp_path)).plans  # trained only for TIS-DPO
    cfg = tiny(tmp_path, **{"policy.methods": ["tgdpo", "tis_dpo", "sepo_dpo", "confpo"], "score.beta": 2.0})
    plans = plan_graph(cfg).plans
    tgdpo, tis, sepo_dpo, confpo = (plans[f"policy_{m}"] for m in ("tgdpo", "tis_dpo", "sepo_dpo", "confpo"))
    # TGDPO: the oracle's raw token log-ratio on the policy's tokens (the selection's rewards / score.beta).
    assert tgdpo.inputs["token_values"].stage == plans["select"].dirname
    assert (tgdpo.section["token_values_column"], tgdpo.section["token_values_scale"]) == ("rewards", 0.5)
    # TIS-DPO: weights from the oracle and a reverse oracle, both scored.
    assert tis.inputs["token_values"].stage == plans["tis_weights"].dirname
    assert plans["oracle_reverse"].section["reverse"] and not plans["oracle"].section["reverse"]
    assert plans["score_reverse"].inputs["oracle"].stage == plans["oracle_reverse"].dirname
    assert {"selection", "ref_logps"} <= set(sepo_dpo.inputs) and "ref_logps" in tgdpo.inputs
    assert set(confpo.inputs) == {"data", "policy_init"}  # no oracle, no reference: the oracle-free baseline


def test_tis_dpo_trains_on_weights_of_the_two_oracles(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    cfg = tiny(tmp_path, **{"policy.methods": ["tis_dpo"]})
    policy = run_upto(cfg, "policy", "tis_dpo")
    weights_dir = tmp_path / STORE / plan_graph(cfg).plans["tis_weights"].dirname
    rows = pq.read_table(weights_dir / "weights.parquet").to_pylist()
    weights = [w for row in rows for w in row["weights"][:-1]]  # EOS (last) aside
    assert min(weights) == pytest.approx(0.7) and max(weights) == pytest.approx(1.3)
    assert all(row["weights"][-1] == 0.0 for row in rows)  # special tokens get no weight
    assert artifacts.read_manifest(policy)["metrics"]["steps"] > 0


def test_stage_nodes_name_planned_stages(tmp_path: Path) -> None:
    plans = plan_graph(tiny(tmp_path)).plans
    for stage, node in stage_graph.STAGE_NODES.items():
        assert node.format(method="sepo") in plans, stage

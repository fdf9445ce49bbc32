"""The whole pipeline on real-looking data: a dialogue preference file of our own (multi-turn, empty replies, long
prompts, mixed lengths, duplicates) in every TRL format, two different BPE tokenizers trained in-process,
weak-to-strong with either tokenizer as the oracle's; every dropped or cut row accounted for at the data stage,
every later stage on exactly its pairs, and a summary that means something without a true reward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import real_data_helpers as helpers

from selpo_core import artifacts
from selpo_core.config import RunConfig, load_run_config
from selpo_core.report import format_table
from selpo_core.stages.graph import plan_graph, run_pipeline
from selpo_core.stages.plan import STORE

N_ROWS = 160
STEPS = {"max_steps": 2, "batch_size": 8, "warmup_steps": 0, "save_every": 0, "log_every": 1, "report_to": "none"}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("real-pipeline")
    dialogues = helpers.dialogues(N_ROWS, seed=1)
    corpus = helpers.corpus(dialogues)
    tokenizers = {"bytelevel": helpers.bytelevel_tokenizer(corpus), "metaspace": helpers.metaspace_tokenizer(corpus)}
    models = {"bytelevel-small": helpers.make_model_dir(root / "bytelevel-small", tokenizers["bytelevel"]),
              "metaspace-large": helpers.make_model_dir(root / "metaspace-large", tokenizers["metaspace"], hidden=64,
                                                        layers=2, seed=1),
              "metaspace-small": helpers.make_model_dir(root / "metaspace-small", tokenizers["metaspace"]),
              "bytelevel-large": helpers.make_model_dir(root / "bytelevel-large", tokenizers["bytelevel"], hidden=64,
                                                        layers=2, seed=1)}
    files = {fmt: helpers.write_rows(root / f"{fmt}.jsonl.gz", helpers.rows(dialogues, fmt))
             for fmt in ("standard", "conversational", "implicit")}
    return {"root": root, "models": models, "files": files}


def config(real: dict[str, Any], fmt: str, oracle: str, policy: str, **extra: Any) -> RunConfig:
    return load_run_config(None, {
        "runs_dir": str(real["root"] / "runs"), "name": f"{fmt}-{oracle}-{policy}",
        "data": {"path": str(real["files"][fmt]), "max_length": 160, "max_prompt_length": 96,
                 "on_bad_row": "skip", "heldout_fraction": 0.15},
        "reference": {"path": str(real["models"][oracle])}, "policy_model": {"path": str(real["models"][policy])},
        "sft": {"enabled": False}, "oracle": {"train": STEPS}, "policy": {"methods": ["sepo", "dpo"], "train": STEPS},
        "generate": {"backend": "transformers", "max_new_tokens": 6, "batch_size": 8}, "evaluate": {"batch_size": 8},
        **extra})


def manifest(cfg: RunConfig, name: str) -> dict[str, Any]:
    return artifacts.read_manifest(Path(cfg.runs_dir) / STORE / plan_graph(cfg).plans[name].dirname)


@pytest.mark.parametrize(("oracle", "policy"), [("bytelevel-small", "metaspace-large"),
                                                ("metaspace-small", "bytelevel-large")])
def test_weak_to_strong_across_tokenizers_in_both_directions(real: dict[str, Any], oracle: str, policy: str) -> None:
    cfg = config(real, "standard", oracle, policy)
    summary = run_pipeline(cfg)
    data = manifest(cfg, "data")["metrics"]
    # Rows accounted for: read = kept + skipped, for both tokenizers at once; nothing dropped for length.
    assert data["data/n_rows"] == data["data/n_kept"] + data["data/n_skipped"] == N_ROWS
    assert data["data/skipped/empty_response"] > 0 and data["data/skipped/duplicate"] > 0
    assert data["n_train"] + data["n_heldout"] == data["data/n_kept"]
    assert any(key.startswith("data/truncated/reference/") for key in data)
    assert any(key.startswith("data/truncated/policy/") for key in data)
    skipped = [json.loads(line) for line in
               (Path(cfg.runs_dir) / STORE / plan_graph(cfg).plans["data"].dirname / "skipped.jsonl").open()]
    assert len(skipped) == data["data/n_skipped"] and all(r["source"] == str(real["files"]["standard"])
                                                           for r in skipped)
    # Every later stage saw exactly the data stage's pairs, in its own tokens.
    score = manifest(cfg, "score")["metrics"]
    assert score["n_responses"] == 2 * data["n_train"]
    selection = manifest(cfg, "select")["metrics"]
    assert selection["responses_without_selection"] >= 0
    assert manifest(cfg, "policy_dpo")["metrics"]["reads_ref_logps_from_scores"] is False  # another model
    # A summary without a true reward: held-out accuracy with its count and interval, KL, length, EOS rate.
    for row in summary["policy"].values():
        assert row["reward_gain"] is None and row["implicit_n"] == data["n_heldout"]
        low, high = row["implicit_ci95"]
        assert 0 <= low <= row["implicit_accuracy"] <= high <= 1
        assert row["kl"] is not None and row["answer_tokens"] > 0 and 0 <= row["eos_rate"] <= 1
    assert summary["oracle"]["heldout_n"] == data["n_heldout"]
    table = format_table(summary)
    assert "held-out implicit acc" in table and f"(n={data['n_heldout']}," in table
    assert "reward gain" not in table and "token AUROC" not in table
    assert not [name for name in summary["stages"] if name.startswith(("synthetic", "sft_"))]  # no phantom rows


@pytest.mark.parametrize("fmt", ["conversational", "implicit"])
def test_every_format_gives_the_same_pairs_and_accounting(real: dict[str, Any], fmt: str) -> None:
    from selpo_core.stages.graph import run_upto

    standard = config(real, "standard", "bytelevel-small", "metaspace-large")
    other = config(real, fmt, "bytelevel-small", "metaspace-large")
    run_upto(standard, "data", "sepo")
    run_upto(other, "data", "sepo")
    # The held-out split hashes each pair's content as written, so it differs between formats; the accounting
    # of rows does not.
    counts = {key: value for key, value in manifest(standard, "data")["metrics"].items()
              if key.startswith(("data/n_", "data/skipped/"))}
    other_counts = {key: value for key, value in manifest(other, "data")["metrics"].items()
                    if key.startswith(("data/n_", "data/skipped/"))}
    assert other_counts == counts and counts["data/n_kept"] < N_ROWS

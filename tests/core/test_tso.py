"""TSO (selpo_core.tso): config, pairs from a ranking, feedback-correction flags, and a 2-round tiny run that
fails in round 2, resumes without redoing round 1, chains the references and reuses everything when run again."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stage_spies import InjectedFailure, install_stage_spies

from selpo_core import artifacts, losses, tso, tso_judge
from selpo_core.config import ConfigError, RunConfig, TSOConfig, load_run_config
from selpo_core.data import read_examples
from selpo_core.stages import tso as tso_stages
from selpo_core.stages.checks import problems
from selpo_core.stages.plan import StageInput, external
from selpo_core.stages.runner import execute
from selpo_core.tso_judge import pairs_from_ranking

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


# ------------------------------------------------------------------------------------------------- config


def test_config_names_the_bad_field_and_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"tso\.judge='oracle' .* truth, reward_model, labels"):
        TSOConfig(judge="oracle")
    with pytest.raises(ConfigError, match=r"tso\.pairing='best' .* best_vs_worst, all_adjacent"):
        TSOConfig(pairing="best")
    with pytest.raises(ConfigError, match=r"tso\.judge='labels' needs tso\.judge_path"):
        TSOConfig(judge="labels")
    with pytest.raises(ConfigError, match=r"tso\.rounds=0 must be > 0"):
        TSOConfig(rounds=0)


def test_tso_section_loads_from_the_run_yaml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text() + "tso:\n  rounds: 4\n  generators: [initial, some/hub-model]\n")
    cfg = load_run_config(path, {"tso.pairing": "all_adjacent", "policy.beta": 0.2})
    assert problems(cfg, cfg.policy.methods, tso=True) == []
    assert isinstance(cfg, RunConfig) and cfg.policy.beta == 0.2 and cfg.name == "tiny"
    assert (cfg.tso.rounds, cfg.tso.generators, cfg.tso.pairing) == (4, ("initial", "some/hub-model"), "all_adjacent")
    with pytest.raises(ConfigError, match=r"unknown config key tso\.roundz"):
        load_run_config(path, ["tso.roundz=2"])
    real = load_run_config(path, {"data.path": str(tmp_path / "pairs.jsonl")})
    assert any("judge='truth' needs the synthetic task" in line for line in problems(real, ["dpo"], tso=True))


# -------------------------------------------------------------------------------------------------- pairs


def test_pairs_from_a_ranking() -> None:
    scores = [1.0, 3.0, 2.0, 3.0, 0.0]  # ranking (stable on ties): 1, 3, 2, 0, 4
    assert pairs_from_ranking(scores, "best_vs_worst", 1) == [(1, 4)]
    assert pairs_from_ranking(scores, "best_vs_worst", 5) == [(1, 4), (3, 0)]
    # Adjacent pairs by judge margin, largest first; the tie (1, 3) never becomes a pair.
    assert pairs_from_ranking([0.0, 3.0, 1.0, 3.0], "all_adjacent", 5) == [(3, 2), (2, 0)]
    assert pairs_from_ranking(scores, "all_adjacent", 2) == [(3, 2), (2, 0)]
    assert pairs_from_ranking([2.0, 2.0, 2.0], "best_vs_worst", 3) == []
    assert pairs_from_ranking([5.0], "all_adjacent", 3) == []


def write_hand_round(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Candidates of two prompts, a label file (one candidate unlabeled), and a data dir with held-out pairs."""
    candidates_dir, data_dir = tmp_path / "candidates", tmp_path / "data"
    candidates_dir.mkdir()
    data_dir.mkdir()
    rows = [
        {"id": "p1", "prompt": "tell me about it", "candidates": [
            {"text": "good answer", "source": "policy", "ended": True},
            {"text": "bad answer", "source": "policy", "ended": True},
            {"text": "great answer", "source": "human", "ended": True},
            {"text": "unlabeled answer", "source": "g1", "ended": False}]},
        {"id": "p2", "prompt": "what is this", "candidates": [
            {"text": "yes", "source": "policy", "ended": True},
            {"text": "no", "source": "g1", "ended": True}]},
    ]
    (candidates_dir / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = [("tell me about it", "good answer", 1.0), ("tell me about it", "bad answer", -1.0),
              ("tell me about it", "great answer", 2.0), ("what is this", "yes", 0.5), ("what is this", "no", 0.0)]
    label_file = tmp_path / "labels.jsonl"
    label_file.write_text("".join(json.dumps({"prompt": p, "response": t, "score": s}) + "\n" for p, t, s in labels))
    heldout = {"example_id": "h", "prompt": "q", "chosen": "a", "rejected": "b", "row": 0}
    (data_dir / "heldout.jsonl").write_text(json.dumps(heldout) + "\n")
    return candidates_dir, data_dir, label_file


def test_feedback_correction_flags_pairs_the_policy_orders_the_other_way(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    candidates_dir, data_dir, label_file = write_hand_round(tmp_path)
    # The policy's implicit reward (chosen, rejected) by chosen text: it prefers the judge's rejected answer in
    # "great answer" vs "bad answer", and ties on "yes" vs "no" (a tie is not a disagreement).
    implicit = {"great answer": (-0.5, 0.25), "yes": (0.0, 0.0)}
    seen: dict[str, Any] = {}

    def fake_implicit_rewards(cfg: RunConfig, policy_path: str, anchor_path: str | None, examples: list[Any],
                              prompt_template: str | None = None) -> dict[str, tuple[float, float]]:
        seen.update(policy=policy_path, anchor=anchor_path)
        return {e.example_id: implicit[e.chosen] for e in examples}

    monkeypatch.setattr(tso_judge, "policy_implicit_rewards", fake_implicit_rewards)
    cfg = load_run_config(None, {"runs_dir": str(tmp_path / "runs"), "tso.judge": "labels",
                                 "tso.judge_path": str(label_file), "tso.pairing": "best_vs_worst",
                                 "tso.pairs_per_prompt": 2})
    policy, anchor = StageInput("fp-policy", path="policy-round1"), StageInput("fp-ref", path="reference-round1")
    plan = tso_stages.plan_pairs(cfg, 2, external(str(candidates_dir)), external(str(data_dir)), policy, anchor)
    out = execute(cfg, plan)

    assert seen == {"policy": "policy-round1", "anchor": "reference-round1"}
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    flags = {(j["chosen"], j["rejected"]): (j["corrected"], j["policy_tie"]) for j in judged}
    # p1 ranking: great 2 > good 1 > bad -1 (the unlabeled one is left out): pairs great/bad, then nothing (3 // 2).
    assert flags == {("great answer", "bad answer"): (True, False), ("yes", "no"): (False, True)}
    metrics = artifacts.read_manifest(out)["metrics"]
    assert (metrics["n_pairs"], metrics["n_corrected"], metrics["corrected_fraction"]) == (2, 1, 0.5)
    assert (metrics["n_policy_ties"], metrics["n_unlabeled"], metrics["n_candidates"]) == (1, 1, 6)
    assert metrics["chosen_from/human"] == 1 and metrics["rejected_from/g1"] == 1
    # TRL standard format, and a data dir the policy stage reads (held-out pairs carried over for evaluation).
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    assert [e.chosen for e in read_examples(out / "train.jsonl")] == ["great answer", "yes"]
    assert (out / "heldout.jsonl").read_bytes() == (data_dir / "heldout.jsonl").read_bytes()
    # A policy that is its own reference (round 1) has no implicit reward to compare: the anchor is not loaded.
    same = tso_stages.plan_pairs(load_run_config(None, {"runs_dir": str(tmp_path / "runs2"), "tso.judge": "labels",
                                                        "tso.judge_path": str(label_file)}),
                                 1, external(str(candidates_dir)), external(str(data_dir)), policy, policy)
    execute(load_run_config(None, {"runs_dir": str(tmp_path / "runs2"), "tso.judge": "labels",
                                   "tso.judge_path": str(label_file)}), same)
    assert seen["anchor"] is None


def test_generator_matrix_always_has_the_policy_once(tmp_path: Path) -> None:
    policy = StageInput("fp-initial", stage="sft_reference-abc", sub="model")
    matrix = tso_stages.generator_matrix(TSOConfig(generators=("initial", "org/model-7b")), policy, policy)
    assert [(name, value.path or value.stage) for name, value in matrix] == [
        ("policy", "sft_reference-abc"), ("g1-model-7b", "org/model-7b")]  # initial IS the policy here
    moved = StageInput("fp-round1", stage="policy_tso_round1-def", sub="model")
    matrix = tso_stages.generator_matrix(TSOConfig(generators=("initial",)), moved, policy)
    assert [name for name, _ in matrix] == ["policy", "initial"]


# ------------------------------------------------------------------------------------------ 2 tiny rounds


@dataclass
class TinyRuns:
    run_dir: Path
    failed: BaseException
    failed_stages: Counter[str]
    resumed: dict[str, Any]
    resumed_stages: Counter[str]
    again: dict[str, Any]
    again_stages: Counter[str]
    clip_calls: list[dict[str, Any]]


CLIP = {"policy.tso_chosen_reward_max": 0.5, "policy.tso_rejected_reward_min": -0.25}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    runs_dir = tmp_path_factory.mktemp("tso-runs")
    overrides = {"runs_dir": str(runs_dir), "tso.rounds": 2, "tso.prompts_per_round": 12, "tso.samples_per_model": 2,
                 "tso.generators": ["initial"], **CLIP}
    clip_calls: list[dict[str, Any]] = []
    original_loss = losses.tso_dual_clip_loss

    def loss_spy(*args: Any, **kwargs: Any) -> Any:
        clip_calls.append(kwargs)
        return original_loss(*args, **kwargs)

    cfg = load_run_config(TINY, overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "tso_dual_clip_loss", loss_spy)
        failing = install_stage_spies(patch, fail=lambda name: name == "policy_tso_round2")
        with pytest.raises(InjectedFailure) as failed:
            tso.run_tso(cfg)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "tso_dual_clip_loss", loss_spy)
        resuming = install_stage_spies(patch)
        resumed = tso.run_tso(cfg)
        resumed_stages = Counter(resuming.ran())
        resuming.reset()
        again = tso.run_tso(cfg)
        again_stages = Counter(resuming.ran())
    return TinyRuns(cfg.run_dir, failed.value, Counter(failing.ran()), resumed, resumed_stages, again, again_stages,
                    clip_calls)


def test_round_two_fails_on_purpose_after_round_one_finished(tiny_runs: TinyRuns) -> None:
    assert "policy_tso_round2" in str(tiny_runs.failed)
    assert {"tso_round1_pairs", "policy_tso_round1", "evaluate_tso_round1", "tso_round2_pairs",
            "policy_tso_round2"} <= set(tiny_runs.failed_stages)
    assert "evaluate_tso_round2" not in tiny_runs.failed_stages


def test_resume_runs_only_what_round_two_had_left(tiny_runs: TinyRuns) -> None:
    assert dict(tiny_runs.resumed_stages) == {"policy_tso_round2": 1, "generate_tso_round2": 1,
                                              "evaluate_tso_round2": 1}
    assert tiny_runs.again_stages == Counter()  # a third run reuses both rounds entirely
    assert tiny_runs.again == tiny_runs.resumed


def stage_of(stage_dir: str) -> str:
    return Path(stage_dir).name


def test_each_round_is_anchored_to_the_previous_policy(tiny_runs: TinyRuns) -> None:
    rows = tiny_runs.resumed["rounds"]
    assert [row["round"] for row in rows] == [0, 1, 2]
    round1, round2 = rows[1]["dirs"], rows[2]["dirs"]
    first = artifacts.read_manifest(round1["policy"])["inputs"]
    second = artifacts.read_manifest(round2["policy"])["inputs"]
    sft_stage = first["policy_init"]["stage"]
    assert sft_stage.startswith("sft_reference-") and first["anchor"]["stage"] == sft_stage
    assert second["anchor"]["stage"] == second["policy_init"]["stage"] == stage_of(round1["policy"])
    assert second["data"]["stage"] == stage_of(round2["pairs"])
    # Feedback correction of round 2 reads round 1's policy against the reference it was trained from.
    pairs_inputs = artifacts.read_manifest(round2["pairs"])["inputs"]
    assert (pairs_inputs["policy"]["stage"], pairs_inputs["anchor"]["stage"]) == (stage_of(round1["policy"]),
                                                                                  sft_stage)
    # The round-2 candidates come from the matrix: the moving policy and the fixed initial model.
    assert artifacts.read_manifest(round2["candidates"])["config"]["generators"] == ["policy", "initial"]
    for row in rows[1:]:
        assert row["n_pairs"] > 0 and 0 <= row["n_corrected"] <= row["n_pairs"]
        assert isinstance(row["true_reward"], float) and isinstance(row["kl_to_initial"], float)
    assert rows[1]["n_policy_ties"] == rows[1]["n_pairs"]  # round 1: the policy is its own reference
    summary = json.loads((tiny_runs.run_dir / "tso_summary.json").read_text())
    assert summary == json.loads(json.dumps(tiny_runs.resumed))


def test_dual_clip_bounds_come_from_the_config(tiny_runs: TinyRuns) -> None:
    assert tiny_runs.clip_calls, "the rounds did not train with the dual-clip loss"
    assert {(c["chosen_reward_max"], c["rejected_reward_min"]) for c in tiny_runs.clip_calls} == {(0.5, -0.25)}
    policy = artifacts.read_manifest(tiny_runs.resumed["rounds"][2]["dirs"]["policy"])["config"]
    assert policy["method"] == "tso"
    assert policy["loss_params"] == {"beta": 0.1, "tso_chosen_reward_max": 0.5, "tso_rejected_reward_min": -0.25}
    assert tiny_runs.resumed["clip"] == {"chosen_reward_max": 0.5, "rejected_reward_min": -0.25}
    assert "| 2 |" in tso.format_rounds(tiny_runs.resumed)

"""Fail fast: every problem of a run named at once, one line each with its config field, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from selpo_core.config import ConfigError, load_run_config
from selpo_core.stages.checks import CHECKPOINT_FACTOR, problems
from selpo_core.stages.graph import plan_graph


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(text)
    return path


def test_every_mistake_of_a_real_data_run_is_named_with_its_field(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\0" * 10)
    (tmp_path / "empty.jsonl").write_text("")
    config = write_config(tmp_path / "cfg", f"""
data: {{path: no-such-pairs.jsonl.gz}}
reference: {{path: models/my-sft}}
policy_model: {{path: {pickled}}}
generate: {{prompts: {tmp_path / 'empty.jsonl'}}}
evaluate: {{reward_model: someorg/reward-model-not-cached}}
sft: {{enabled: false}}
""")
    (tmp_path / "models").mkdir()  # the folder exists: `models/my-sft` is a local typo, not a hub id
    with pytest.raises(ConfigError) as info:
        plan_graph(load_run_config(config))
    lines = str(info.value).splitlines()
    assert [line.split(" ", 1)[0].split("=")[0] for line in lines] == [
        "data.path", "generate.prompts", "reference.path", "policy_model.path", "evaluate.reward_model"]
    assert "no such file" in lines[0] and "the file is empty" in lines[1]
    assert "no such local directory" in lines[2]
    assert "pytorch_model.bin" in lines[3] or "pickle" in lines[3]
    assert "cache" in lines[4]


def test_relative_paths_in_a_config_file_mean_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    config = write_config(project, "data: {path: data/pairs.jsonl}\nreference: {path: org/hub-model}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_run_config(config)
    assert cfg.data.path == str(project / "data" / "pairs.jsonl")
    assert cfg.reference.path == "org/hub-model"  # not a folder next to the config: a hub id, as written
    # An override on the command line means the working directory, as typed.
    assert load_run_config(config, {"data.path": "data/pairs.jsonl"}).data.path == "data/pairs.jsonl"


def test_the_demo_and_the_tiny_run_have_no_problems() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("demo", "tiny", "tso_demo"):
        cfg = load_run_config(root / "configs" / f"{name}.yaml")
        assert problems(cfg, cfg.policy.methods, tso=True) == []


def test_disk_space_for_checkpoints_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    cfg = load_run_config(None, {"runs_dir": str(tmp_path / "runs"), "reference.path": str(model),
                                 "policy_model.path": str(model), "sft.enabled": False, "data.path": "org/data"})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 0, 1000))
    (line,) = [p for p in problems(cfg, cfg.policy.methods) if p.startswith("runs_dir")]
    assert "GiB free" in line and "checkpoints" in line
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 1000 * (10 + CHECKPOINT_FACTOR)))
    assert not [p for p in problems(cfg, cfg.policy.methods) if p.startswith("runs_dir")]


def test_selective_dpo_anchor_must_share_the_policy_tokenizer(tmp_path: Path, make_word_tokenizer) -> None:
    from selpo_core import models
    from selpo_core.config import ModelConfig

    tiny = ModelConfig(tiny_hidden_size=16, tiny_layers=1, tiny_heads=2)
    dirs = {}
    for name, words in (("a", ["x", "y", "z"]), ("b", ["p", "q"])):
        tokenizer = make_word_tokenizer(words)
        dirs[name] = models.save_model_dir(models.build_tiny_model(tiny, tokenizer), tokenizer, tmp_path / name)
    base = {"data.path": "org/data", "sft.enabled": False, "policy.methods": ["selective_dpo"]}
    same = load_run_config(None, {**base, "reference.path": str(dirs["a"]), "policy_model.path": str(dirs["a"])})
    assert problems(same, ["selective_dpo"]) == []
    other = load_run_config(None, {**base, "reference.path": str(dirs["a"]), "policy_model.path": str(dirs["b"])})
    (line,) = problems(other, ["selective_dpo"])
    assert line.startswith("policy.sdpo_reference: selective_dpo's scorer and anchor, the oracle")
    fixed = load_run_config(None, {**base, "reference.path": str(dirs["a"]), "policy_model.path": str(dirs["b"]),
                                   "policy.sdpo_reference": str(dirs["b"])})
    assert problems(fixed, ["selective_dpo"]) == []

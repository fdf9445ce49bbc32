from __future__ import annotations

from pathlib import Path

import pytest

from selpo_core.config import ConfigError, RunConfig, load_run_config, parse_overrides, save_config


def test_defaults_are_valid_and_round_trip_yaml(tmp_path: Path) -> None:
    cfg = RunConfig()
    save_config(cfg, tmp_path / "c.yaml")
    assert load_run_config(tmp_path / "c.yaml") == cfg


def test_overrides_nest_and_parse_values() -> None:
    cfg = load_run_config(None, ["policy.methods=[sepo, tdpo2]", "policy.beta=0.25", "oracle.train.max_steps=7"])
    assert cfg.policy.methods == ("sepo", "tdpo2")
    assert cfg.policy.beta == 0.25
    assert cfg.oracle.train.max_steps == 7
    # A partial section keeps the section's own defaults, not the class defaults.
    assert cfg.oracle.train.batch_size == RunConfig().oracle.train.batch_size != 8


def test_dict_overrides_from_ui() -> None:
    assert parse_overrides({"select.k_chosen": 0.1}) == {"select": {"k_chosen": 0.1}}
    assert load_run_config(None, {"select.k_chosen": 0.1}).select.k_chosen == 0.1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("policy.methods=[sepo, nope]", "policy.methods='nope' is not allowed; choose one of sepo, dpo"),
        ("select.k_chosen=1.5", "select.k_chosen=1.5 must be in (0, 1]"),
        ("train.precision=fp16", "unknown config key train"),
        ("oracle.train.precision=fp16", "oracle.train.precision='fp16' is not allowed; choose one of auto, bf16, fp32"),
        ("data.on_bad_row=ignore", "data.on_bad_row='ignore' is not allowed; choose one of error, skip"),
        ("oracle.beta=abc", "oracle.beta must be a number"),
        ("data.max_prompt_length=1024", "data.max_prompt_length=1024 must be < data.max_length=1024"),
        ("fail_stage=oracle", "unknown config key fail_stage"),
        ("oracle.simpo_beta=0", "oracle.simpo_beta=0.0 must be > 0"),
        ("name=_stages", "must be a non-empty name"),
    ],
)
def test_bad_values_name_the_field_and_allowed_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [override])
    assert message in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("policy: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


def test_oracle_and_policy_carry_their_own_loss_params() -> None:
    from selpo_core.config import LossParams

    cfg = load_run_config(None, ["oracle.loss=simpo", "oracle.simpo_beta=3.0", "policy.simpo_beta=5.0"])
    assert isinstance(cfg.oracle, LossParams) and isinstance(cfg.policy, LossParams)
    # The oracle's SimPO scale is its own field, no longer its DPO beta (whose default is the oracle's own).
    assert (cfg.oracle.simpo_beta, cfg.oracle.beta, cfg.policy.simpo_beta) == (3.0, 1.0, 5.0)
    assert cfg.policy.beta == 0.1


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML reads `3e-5` as a string (YAML 1.1 wants `3.0e-5`): a learning rate written so must still load.
    (tmp_path / "run.yaml").write_text("policy:\n  train:\n    lr: 3e-5\n")
    cfg = load_run_config(tmp_path / "run.yaml", ["oracle.train.lr=2e-4"])
    assert (cfg.policy.train.lr, cfg.oracle.train.lr) == (3e-5, 2e-4)
    with pytest.raises(ConfigError, match="policy.train.lr must be a number"):
        load_run_config(None, ["policy.train.lr=fast"])

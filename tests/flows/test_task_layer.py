"""The task layer without a Prefect server: naming convention, cache keys, retry rule."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flow_helpers import TINY_CONFIG

STAGE_TASKS = ["make_synthetic", "prepare_data", "sft", "train_oracle", "score_tokens", "select_tokens",
               "train_policy", "generate", "evaluate"]


def config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    from tasks.common import resolve_config

    return resolve_config(TINY_CONFIG, {"runs_dir": str(tmp_path), **overrides})


@pytest.mark.parametrize("name", STAGE_TASKS)
def test_stage_task_mirrors_its_stage_function(name: str) -> None:
    """The generic cache key relies on it: same function name, same parameters (config for cfg)."""
    import tasks
    from selpo_core import stages
    from tasks.common import STAGE_NAMES, STAGE_TASK_OPTIONS

    task = getattr(tasks, name)
    assert name in STAGE_NAMES and task.fn.__name__ == name
    task_params = list(inspect.signature(task.fn).parameters)
    stage_params = list(inspect.signature(getattr(stages, name)).parameters)
    assert task_params == ["config", *stage_params[1:]]
    assert task.persist_result is True and task.cache_key_fn is STAGE_TASK_OPTIONS["cache_key_fn"]
    assert task.retries == 2 and task.retry_condition_fn is STAGE_TASK_OPTIONS["retry_condition_fn"]


def key(task: Any, parameters: dict[str, Any]) -> str:
    from tasks.common import stage_cache_key

    return stage_cache_key(SimpleNamespace(task=task), parameters)


def test_cache_key_is_task_plus_planned_dir_and_ignores_the_flow_run(tmp_path: Path) -> None:
    import tasks
    from tasks.common import planned_stage_dir

    cfg = config(tmp_path)
    params = {"config": cfg, "data_dir": str(tmp_path / "data"), "reference_dir": str(tmp_path / "ref")}
    planned = planned_stage_dir("train_oracle", cfg, data_dir=params["data_dir"], reference_dir=params["reference_dir"])
    first = key(tasks.train_oracle, params)
    assert first.startswith("train-oracle-") and planned.name in first
    assert key(tasks.train_oracle, params) == first  # deterministic: no run id, no time
    # A field outside the stage's config section (or the failure-injection aid) does not change the key...
    assert key(tasks.train_oracle, {**params, "config": config(tmp_path, **{"policy.beta": 0.3})}) == first
    assert key(tasks.train_oracle, {**params, "config": config(tmp_path, fail_stage="oracle")}) == first
    # ...a field of its section does, and so does another run directory.
    assert key(tasks.train_oracle, {**params, "config": config(tmp_path, **{"oracle.beta": 0.3})}) != first
    assert key(tasks.train_oracle, {**params, "config": config(tmp_path / "elsewhere")}) != first


def test_equal_inputs_of_different_tasks_never_collide(tmp_path: Path) -> None:
    import tasks

    cfg = config(tmp_path)
    gen = {"config": cfg, "data_dir": str(tmp_path / "d"), "model_dir": str(tmp_path / "m")}
    assert key(tasks.generate, {**gen, "label": "sepo"}) != key(tasks.generate, {**gen, "label": "dpo"})
    assert key(tasks.sft, {"config": cfg, "data_dir": "d", "task_dir": None, "which": "reference"}) != key(
        tasks.sft, {"config": cfg, "data_dir": "d", "task_dir": None, "which": "policy_model"})


def failed(exc: BaseException) -> Any:
    from prefect.states import Failed

    return Failed(data=exc)


@pytest.mark.parametrize(("exc", "retry"), [
    (OSError("stale file handle"), True),
    (ConnectionError("hub unreachable"), True),
    (TimeoutError("slow disk"), True),
    (FileNotFoundError("no such file"), False),
    (PermissionError("denied"), False),
    (ValueError("bad value"), False),
    (RuntimeError("a bug"), False),
])
def test_retries_only_transient_io_errors(exc: BaseException, retry: bool) -> None:
    from tasks.common import retry_on_io_error

    assert retry_on_io_error(None, None, failed(exc)) is retry  # type: ignore[arg-type]


def test_config_errors_and_injected_failures_are_not_retried() -> None:
    from selpo_core.config import ConfigError
    from selpo_core.stages import InjectedFailure
    from tasks.common import retry_on_io_error

    for exc in (ConfigError("policy.beta=-1 must be > 0"), InjectedFailure("fail_stage")):
        assert retry_on_io_error(None, None, failed(exc)) is False  # type: ignore[arg-type]


def test_resolve_config_validates_and_makes_runs_dir_absolute(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from selpo_core.config import ConfigError
    from tasks.common import resolve_config

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(TINY_CONFIG, {"runs_dir": "relative", "policy.methods": ["dpo"]}, run_name="other")
    assert cfg["runs_dir"] == str(tmp_path / "relative") and cfg["name"] == "other"
    assert cfg["policy"]["methods"] == ["dpo"]
    with pytest.raises(ConfigError, match="oracle.loss"):
        resolve_config(TINY_CONFIG, {"oracle.loss": "nope"})
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve_config(TINY_CONFIG, {"policy.betta": 0.1})


def test_heatmap_excerpt_marks_selected_tokens(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.report import heatmap_excerpt

    rows = [{"example_id": "abc123456789", "side": "chosen", "offset_start": [0, 5, 8], "offset_end": [4, 8, 8],
             "text": "good cat", "rewards": [1.5, -0.25, 0.0], "selected": [True, False, False]}]
    path = tmp_path / "selection.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    excerpt = heatmap_excerpt(path)
    assert "| abc12345 | chosen | **good** cat | good (+1.50) |" in excerpt

"""The task layer without a Prefect server: naming convention, cache keys, retry rule."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flow_helpers import TINY_CONFIG


def config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    from tasks.stage import resolve_config

    return resolve_config(TINY_CONFIG, {"runs_dir": str(tmp_path), **overrides})


def key(plan: Any, cfg: dict[str, Any]) -> str:
    from tasks.stage import plan_cache_key

    return plan_cache_key(SimpleNamespace(), {"config": cfg, "plan": plan.to_dict()})


def plans(cfg: dict[str, Any]) -> dict[str, Any]:
    from selpo_core.stages.graph import plan_graph
    from tasks.stage import run_config

    return plan_graph(run_config(cfg)).plans


def test_one_task_runs_every_stage_with_the_plan_as_its_cache_key(tmp_path: Path) -> None:
    from tasks.stage import plan_cache_key, retry_on_io_error, run_stage

    assert run_stage.persist_result is True and run_stage.cache_key_fn is plan_cache_key
    assert run_stage.retries == 2 and run_stage.retry_condition_fn is retry_on_io_error
    assert list(inspect.signature(run_stage.fn).parameters) == ["config", "plan"]
    cfg = config(tmp_path)
    oracle = plans(cfg)["oracle"]
    first = key(oracle, cfg)
    assert first.startswith(f"oracle-{oracle.key}-")
    assert key(oracle, cfg) == first  # deterministic: no run id, no time
    # A field outside what the oracle reads does not change its key; a field it reads does.
    assert key(plans(config(tmp_path, **{"policy.beta": 0.3}))["oracle"], cfg) == first
    assert key(plans(config(tmp_path, **{"oracle.beta": 0.3}))["oracle"], cfg) != first
    # Another run name shares the store (and the cache record); another runs dir holds its own store.
    other_name = config(tmp_path, name="other")
    assert key(plans(other_name)["oracle"], other_name) == first
    elsewhere = config(tmp_path / "elsewhere")
    assert key(plans(elsewhere)["oracle"], elsewhere) != first


def test_equal_inputs_of_different_stages_never_collide(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"policy.methods": ["sepo", "dpo", "ipo"]})
    all_plans = plans(cfg)
    keys = [key(plan, cfg) for plan in all_plans.values()]
    assert len(set(keys)) == len(keys) == len(all_plans)


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
    from tasks.stage import retry_on_io_error

    assert retry_on_io_error(None, None, failed(exc)) is retry  # type: ignore[arg-type]


def test_config_errors_and_injected_failures_are_not_retried() -> None:
    from selpo_core.config import ConfigError
    from selpo_core.data import DataError
    from tasks.stage import retry_on_io_error

    for exc in (ConfigError("policy.beta=-1 must be > 0"), DataError("pairs.jsonl row 3 field 'chosen': empty")):
        assert retry_on_io_error(None, None, failed(exc)) is False  # type: ignore[arg-type]


def test_resolve_config_validates_and_makes_runs_dir_absolute(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from selpo_core.config import ConfigError
    from tasks.stage import resolve_config

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


def test_stage_progress_creates_one_artifact_and_rate_limits_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    from selpo_core import progress
    from tasks import progress as task_progress

    calls: list[tuple[str, float, str]] = []
    monkeypatch.setattr(task_progress, "create_progress_artifact",
                        lambda percent, description: calls.append(("create", percent, description)) or "id-1")
    monkeypatch.setattr(task_progress, "update_progress_artifact",
                        lambda artifact_id, percent, description: calls.append(("update", percent, description)))
    progress.report("nobody listens", 1, 2)  # no listener: nothing happens
    with task_progress.stage_progress("train oracle") as listener:
        listener.every = 3600.0  # only the first report, the last step and the end get through
        for step in range(1, 121):
            progress.report("oracle", step, 120)
    progress.report("oracle", 1, 120)  # after the block: not listened to any more
    assert calls[0] == ("create", 100 / 120, "train oracle: oracle 1/120")
    assert calls[1:] == [("update", 100.0, "train oracle: oracle 120/120")] * 2
    assert listener.artifact_id == "id-1"


def test_a_stage_without_progress_reports_adds_no_artifact(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import progress as task_progress

    monkeypatch.setattr(task_progress, "create_progress_artifact", lambda *a, **k: pytest.fail("created"))
    with task_progress.stage_progress("prepare data") as listener:
        pass
    assert listener.artifact_id is None


def test_metrics_plot_marks_every_method_with_numbers() -> None:
    from tasks.plots import metrics_svg

    svg = metrics_svg({"sepo": {"reward_gain": 2.5, "kl": 10.0}, "dpo": {"reward_gain": 0.5, "kl": 1.5},
                       "ipo": {"reward_gain": None, "kl": 1.0}, "<x>": {"reward_gain": 1.0, "kl": float("nan")}},
                      "run <tiny>")
    assert svg is not None and svg.startswith("<svg") and svg.count("<circle") == 2
    assert ">sepo</text>" in svg and ">dpo</text>" in svg and "ipo" not in svg and "run &lt;tiny&gt;" in svg
    assert metrics_svg({"sepo": {"reward_gain": None, "kl": None}}, "t") is None

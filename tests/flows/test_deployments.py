"""deployments/: prefect.yaml loads and every entrypoint resolves; serve.py builds its deployments; CLI parsing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from flow_helpers import REPO, TINY_CONFIG

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def load_flow(entrypoint: str) -> Any:
    from prefect.flows import load_flow_from_entrypoint

    path, _ = entrypoint.split(":")
    assert (REPO / path).is_file(), entrypoint
    return load_flow_from_entrypoint(str(REPO / entrypoint))


def check_deployment(deployment: dict[str, Any]) -> None:
    import inspect

    flow = load_flow(deployment["entrypoint"])
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
    config_path = deployment.get("parameters", {}).get("config_path")
    if config_path:
        assert (REPO / config_path).is_file(), config_path


def test_prefect_yaml_loads_and_every_entrypoint_resolves() -> None:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    try:  # the CLI's own schema, where this Prefect version has it
        from prefect.cli.deploy._models import PrefectYamlModel
    except ImportError:
        PrefectYamlModel = None  # noqa: N806
    if PrefectYamlModel is not None:
        PrefectYamlModel.model_validate(spec)
    flows = {load_flow(d["entrypoint"]).name for d in spec["deployments"]}
    assert flows == {"sepo-pipeline", "compare-methods", "tso"}
    for deployment in spec["deployments"]:
        check_deployment(deployment)
        assert deployment["work_pool"]["name"] == "selpo-local"
        for schedule in deployment.get("schedules", []):
            assert schedule["active"] is False  # an example, off until switched on


def test_commented_gpu_example_is_valid() -> None:
    """The GPU pool example is commented out; uncommented it must still be a valid deployment."""
    text = PREFECT_YAML.read_text()
    block = text[text.index("  # - name: gpu"):]
    lines = [re.sub(r"^  # ?", "  ", line) for line in block.splitlines() if line.startswith("  #")]
    (deployment,) = yaml.safe_load("\n".join(lines))
    assert deployment["work_pool"]["name"] == "selpo-gpu"
    assert "accelerate launch" in deployment["work_pool"]["job_variables"]["env"]["SELPO_LAUNCHER"]
    check_deployment(deployment)


def test_serve_builds_every_deployment_with_an_inactive_schedule() -> None:
    from deployments.serve import build_deployments
    from flows import STAGE_FLOWS

    deployments = build_deployments("configs/tiny.yaml", {"policy.beta": 0.2})
    assert [d.name for d in deployments] == ["tiny", "tiny", "tso-demo"] + ["tiny"] * len(STAGE_FLOWS)
    assert deployments[2].flow_name == "tso"
    pipeline = deployments[0]
    assert pipeline.flow_name == "sepo-pipeline"
    assert pipeline.parameters == {"config_path": "configs/tiny.yaml", "overrides": {"policy.beta": 0.2},
                                   "run_name": None}
    assert [schedule.active for schedule in pipeline.schedules] == [False]
    assert deployments[1].parameters["methods"]


def test_parse_sets_reads_yaml_values() -> None:
    from deployments.cli import parse_sets

    assert parse_sets(["policy.beta=0.2", "policy.methods=[sepo, dpo]", "name=x", "data.path="]) == {
        "policy.beta": 0.2, "policy.methods": ["sepo", "dpo"], "name": "x", "data.path": ""}
    with pytest.raises(SystemExit):
        parse_sets(["policy.beta"])


def test_report_of_a_missing_run_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deployments.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "summary.json does not exist" in capsys.readouterr().err


def test_tiny_config_is_valid() -> None:
    from selpo_core.config import load_run_config

    cfg = load_run_config(TINY_CONFIG)
    assert cfg.policy.methods == ("sepo", "dpo") and cfg.generate.max_new_tokens == 8


def test_serve_without_a_reachable_server_explains_how_to_start_one(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.cli import main

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        assert main(["serve"]) == 1
    assert "prefect server start --host 127.0.0.1" in capsys.readouterr().err

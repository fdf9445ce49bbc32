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
    names = [d.name for d in deployments]
    assert names[:3] == ["SePO pipeline (tiny)", "compare methods (tiny)", "TSO rounds (tso_demo)"]
    assert names[3:] == [f"stage {i}: {what} (tiny)" for i, what in enumerate(
        ["data", "SFT", "train oracle", "score tokens", "select key tokens", "train policy", "generate", "evaluate"],
        start=1)]
    assert len(set(names)) == len(names) == 3 + len(STAGE_FLOWS)  # no two deployments look alike in the UI
    assert deployments[2].flow_name == "tso"
    pipeline = deployments[0]
    assert pipeline.flow_name == "sepo-pipeline"
    assert pipeline.parameters == {"config_path": "configs/tiny.yaml", "overrides": {"policy.beta": 0.2},
                                   "run_name": ""}
    assert [(schedule.active, schedule.slug) for schedule in pipeline.schedules] == [(False, "nightly")]
    assert deployments[1].parameters["methods"]
    for deployment in deployments:  # a one-paragraph description; the parameters' own are in the form
        assert deployment.description and "Args:" not in deployment.description, deployment.name


def test_parameter_forms_have_types_defaults_and_plain_descriptions() -> None:
    """What Prefect's UI draws: every parameter has a type and a default (no anyOf/null), the policy methods are a
    select, and no description holds <...>, which the UI's markdown reads as HTML and drops."""
    from prefect.utilities.callables import parameter_schema

    from flows import STAGE_FLOWS, compare_methods, sepo_pipeline, tso_flow
    from selpo_core.config import POLICY_METHODS

    for flow in [sepo_pipeline, compare_methods, tso_flow, *STAGE_FLOWS.values()]:
        properties = parameter_schema(flow.fn).model_dump_for_openapi()["properties"]
        for name, prop in properties.items():
            assert "type" in prop and "default" in prop, (flow.name, name, prop)
            assert prop.get("description"), (flow.name, name)
            assert "<" not in prop["description"], (flow.name, name, prop["description"])
        assert properties["config_path"] == {**properties["config_path"], "type": "string", "default": ""}
        assert properties["overrides"]["type"] == "object" and properties["overrides"]["default"] == {}
    policy = parameter_schema(STAGE_FLOWS["policy"].fn).model_dump_for_openapi()["properties"]["method"]
    assert policy["enum"] == list(POLICY_METHODS) and policy["default"] == "sepo"
    methods = parameter_schema(compare_methods.fn).model_dump_for_openapi()["properties"]["methods"]
    assert methods["type"] == "array" and methods["items"]["enum"] == list(POLICY_METHODS)


def test_parameters_accept_the_old_none_values() -> None:
    """Older calls pass None for "not given": still valid for the typed parameters."""
    from flows import compare_methods, sepo_pipeline

    assert sepo_pipeline.validate_parameters({"config_path": None, "overrides": None, "run_name": None}) == {
        "config_path": "", "overrides": {}, "run_name": ""}
    assert compare_methods.validate_parameters({"methods": ["sepo", "dpo"]})["methods"] == ("sepo", "dpo")
    with pytest.raises(Exception, match="methods.0: Input should be .sepo."):
        compare_methods.validate_parameters({"methods": ["nope"]})


def test_default_overrides_cannot_be_changed_by_one_call() -> None:
    from flows.params import NO_OVERRIDES

    with pytest.raises(TypeError, match="read-only"):
        NO_OVERRIDES["policy.beta"] = 0.2  # type: ignore[index]
    assert dict(NO_OVERRIDES) == {}


@pytest.mark.parametrize(("current", "run_name", "expected"), [
    ("witty-penguin", "", "tiny · sepo-pipeline · witty-penguin"),  # Prefect's own name: made readable
    ("Handmade-Collie", "beta02", "beta02 · sepo-pipeline · Handmade-Collie"),  # the UI form's made-up name
    ("my beta sweep", "", "my beta sweep"),  # typed by the user: kept
    ("beta_0.2", "beta02", "beta_0.2"),
    ("tiny · sepo-pipeline · witty-penguin", "", "tiny · sepo-pipeline · witty-penguin"),  # a Retry: unchanged
])
def test_flow_run_names_keep_a_typed_name_and_stay_unique(monkeypatch: pytest.MonkeyPatch, current: str,
                                                          run_name: str, expected: str) -> None:
    from flows import params

    fake = type("Runtime", (), {"name": current, "flow_name": "sepo-pipeline",
                                "parameters": {"config_path": "configs/tiny.yaml", "run_name": run_name}})
    monkeypatch.setattr(params, "flow_run", fake)
    assert params.flow_run_label() == expected


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

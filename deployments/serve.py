"""Serve selpo's deployments from ONE long-lived process on one box: no work pool, no worker.

    prefect server start --host 127.0.0.1                                   # terminal 1: API + UI (port 4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api selpo serve                   # terminal 2: this script
    # or: PREFECT_API_URL=... python -m deployments.serve [--config configs/demo.yaml]

Then open http://127.0.0.1:4200, Deployments -> "SePO pipeline (demo)" -> Run (edit parameters if you like).
Flow runs start as subprocesses of this process, in its working directory: start it from the repository root
(config paths and runs/ are relative to it). When CPU and GPU hosts are separate, use prefect.yaml's work pools
instead (see deployments/README.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.files import default_port, serving_runs
from deployments.settings import apply_env_defaults, parse_sets

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CONFIG = "configs/demo.yaml"
DEFAULT_METHODS = ["sepo", "dpo", "ipo", "tdpo2"]
# Every night at 03:00 UTC, created INACTIVE: switch it on in the UI (deployment -> Schedules) if you want it.
# The slug names the schedule across restarts: `selpo serve` keeps the on/off the user chose (keep_user_choices).
NIGHTLY = "0 3 * * *"
NIGHTLY_SLUG = "nightly"

TSO_CONFIG = "configs/tso_demo.yaml"

# What each deployment runs, as the UI lists it (the flow's name is shown under it): "stage 4: score tokens
# (demo)". The UI sorts them A to Z, capitals first: the pipeline comes first, the stages in pipeline order.
PIPELINE_TITLE = "SePO pipeline"
COMPARE_TITLE = "compare methods"
TSO_TITLE = "TSO rounds"
STAGE_TITLES = {"data": "stage 1: data", "sft": "stage 2: SFT", "oracle": "stage 3: train oracle",
                "score": "stage 4: score tokens", "select": "stage 5: select key tokens",
                "policy": "stage 6: train policy", "generate": "stage 7: generate", "evaluate": "stage 8: evaluate"}


def deployment_name(title: str, config_path: str) -> str:
    return f"{title} ({Path(config_path).stem})"


def summary_line(description: str | None) -> str:
    """A flow's description for its deployment: the docstring's first paragraph (its Args are in the form)."""
    return (description or "").split("\n\n")[0].replace("\n", " ").strip()


def build_deployments(config_path: str | None = DEFAULT_CONFIG,
                      overrides: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The pipeline, the method comparison, TSO, and one deployment per stage flow, named after what they run
    and the config they run it on."""
    from prefect.schedules import Cron

    from flows import STAGE_FLOWS, compare_methods, sepo_pipeline, tso_flow

    config_path = config_path or DEFAULT_CONFIG
    base = {"config_path": config_path, "overrides": overrides or {}}
    deployments = [
        sepo_pipeline.to_deployment(
            name=deployment_name(PIPELINE_TITLE, config_path), parameters={**base, "run_name": ""}, tags=["selpo"],
            schedules=[Cron(NIGHTLY, timezone="UTC", active=False, slug=NIGHTLY_SLUG)],
            description="The whole pipeline: sft -> oracle -> score -> select -> policy/generate/evaluate per method. "
                        "Finished stages are cached: Retry on a failed run (after fixing its cause) resumes at the "
                        "failed stage; Copy to new run to change parameters."),
        compare_methods.to_deployment(
            name=deployment_name(COMPARE_TITLE, config_path),
            parameters={**base, "methods": DEFAULT_METHODS, "run_name": ""}, tags=["selpo"],
            description="Several policy methods from the same cached oracle, scores and selection."),
        tso_flow.to_deployment(
            name=deployment_name(TSO_TITLE, TSO_CONFIG),
            parameters={"config_path": TSO_CONFIG, "overrides": {}, "run_name": ""}, tags=["selpo", "tso"],
            description="TSO: rounds of model-matrix generation, judging with feedback correction and dual-clip "
                        "DPO; each round's stages cached, a failed round resumes."),
    ]
    deployments += [flow.to_deployment(name=deployment_name(STAGE_TITLES[stage], config_path),
                                       parameters=dict(base), tags=["selpo", "stage"],
                                       description=summary_line(flow.description))
                    for stage, flow in STAGE_FLOWS.items()]
    return deployments


def keep_user_choices(deployments: list[RunnerDeployment]) -> None:
    """Registering again must not undo what the user chose in the UI: a schedule that is already on the server
    (same deployment, same slug) keeps its active flag. Without this every restart of `selpo serve` switched
    the nightly run off again."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                existing = client.read_deployment_by_name(deployment.full_name)
            except ObjectNotFound:
                continue
            active = {schedule.slug: schedule.active for schedule in existing.schedules or [] if schedule.slug}
            deployment.schedules = [schedule.model_copy(update={"active": active[schedule.slug]})
                                    if schedule.slug in active else schedule for schedule in deployment.schedules or []]


def serve_deployments(config_path: str | None = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None,
                      limit: int | None = 1, files_port: int | None = None) -> None:
    """Register the deployments and run their flow runs until interrupted (blocks), with the runs dir of
    `config_path` served over HTTP on `files_port` for the artifacts' links (deployments/files.py)."""
    from prefect import serve

    from selpo_core.config import load_run_config

    deployments = build_deployments(config_path, overrides)
    keep_user_choices(deployments)
    runs_dir = load_run_config(config_path or DEFAULT_CONFIG, overrides or None).runs_dir
    with serving_runs(runs_dir, files_port or default_port()):
        # limit=1 by default: two pipelines training at once on one box would fight for the same cores/GPU.
        # pause_on_shutdown=False: stopping (or restarting) this process leaves the schedules as the user set
        # them; Prefect's default pauses every deployment and deletes its scheduled runs.
        serve(*deployments, limit=limit, pause_on_shutdown=False)


def main(argv: list[str] | None = None) -> None:
    apply_env_defaults()
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="default config_path of the deployments")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="default overrides")
    parser.add_argument("--limit", type=int, default=int(os.environ.get("SELPO_SERVE_LIMIT", "1")),
                        help="flow runs at a time")
    parser.add_argument("--files-port", type=int, default=default_port(), help="port of the runs dir's file server")
    args = parser.parse_args(argv)
    serve_deployments(args.config, parse_sets(args.set), args.limit, args.files_port)


if __name__ == "__main__":
    main()

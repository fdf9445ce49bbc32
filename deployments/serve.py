"""Serve selpo's deployments from ONE long-lived process on one box: no work pool, no worker.

    prefect server start --host 127.0.0.1                                   # terminal 1: API + UI (port 4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api selpo serve                   # terminal 2: this script
    # or: PREFECT_API_URL=... python -m deployments.serve [--config configs/demo.yaml]

Then open http://127.0.0.1:4200, Deployments -> "sepo-pipeline/demo" -> Run (edit parameters if you like).
Flow runs start as subprocesses of this process, in its working directory: start it from the repository root
(config paths and runs/ are relative to it). When CPU and GPU hosts are separate, use prefect.yaml's work pools
instead (see deployments/README.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.settings import apply_env_defaults, parse_sets

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CONFIG = "configs/demo.yaml"
DEFAULT_METHODS = ["sepo", "dpo", "ipo", "tdpo2"]
# Every night at 03:00 UTC, created INACTIVE: switch it on in the UI (Deployments -> Schedules) if you want it.
NIGHTLY = "0 3 * * *"


TSO_CONFIG = "configs/tso_demo.yaml"


def build_deployments(config_path: str | None = DEFAULT_CONFIG,
                      overrides: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The pipeline, the method comparison, and one deployment per stage flow, all named after the config."""
    from prefect.schedules import Cron

    from flows import STAGE_FLOWS, compare_methods, sepo_pipeline, tso_flow

    config_path = config_path or DEFAULT_CONFIG
    name = Path(config_path).stem
    base = {"config_path": config_path, "overrides": overrides or {}}
    deployments = [
        sepo_pipeline.to_deployment(
            name=name, parameters={**base, "run_name": None}, tags=["selpo"],
            schedules=[Cron(NIGHTLY, timezone="UTC", active=False)],
            description="The whole pipeline: sft -> oracle -> score -> select -> policy/generate/evaluate per method. "
                        "Finished stages are cached: Retry on a failed run resumes at the failed stage."),
        compare_methods.to_deployment(
            name=name, parameters={**base, "methods": DEFAULT_METHODS, "run_name": None}, tags=["selpo"],
            description="Several policy methods from the same cached oracle, scores and selection."),
        tso_flow.to_deployment(
            name="tso-demo", parameters={"config_path": TSO_CONFIG, "overrides": {}, "run_name": None},
            tags=["selpo", "tso"],
            description="TSO: rounds of model-matrix generation, judging with feedback correction and dual-clip "
                        "DPO; each round's stages cached, a failed round resumes."),
    ]
    deployments += [stage_flow.to_deployment(name=name, parameters=dict(base), tags=["selpo", "stage"],
                                             description=stage_flow.description)
                    for stage_flow in STAGE_FLOWS.values()]
    return deployments


def serve_deployments(config_path: str | None = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None,
                      limit: int | None = 1) -> None:
    """Register the deployments and run their flow runs until interrupted (blocks)."""
    from prefect import serve

    # limit=1 by default: two pipelines training at once on one box would fight for the same cores/GPU.
    serve(*build_deployments(config_path, overrides), limit=limit)


def main(argv: list[str] | None = None) -> None:
    apply_env_defaults()
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="default config_path of the deployments")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="default overrides")
    parser.add_argument("--limit", type=int, default=int(os.environ.get("SELPO_SERVE_LIMIT", "1")),
                        help="flow runs at a time")
    args = parser.parse_args(argv)
    serve_deployments(args.config, parse_sets(args.set), args.limit)


if __name__ == "__main__":
    main()

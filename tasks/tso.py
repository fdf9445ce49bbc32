"""TSO's reporting task: runs/<run>/tso_summary.json and the per-round table as an artifact. The rounds' stages
themselves are ordinary stage tasks (tasks/stage.py), named like "TSO round 2 · build pairs"."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from selpo_core import tso as tso_core
from tasks.report import slug
from tasks.stage import run_config


@task(name="publish TSO rounds", task_run_name="publish TSO rounds", cache_policy=NO_CACHE, persist_result=False)
def publish_tso(config: dict[str, Any], rounds: list[dict[str, str]],
                stages_run: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """runs/<run>/tso_summary.json + a markdown artifact: per-round metrics and per-stage timings."""
    cfg = run_config(config)
    summary = tso_core.write_summary(cfg, rounds) | {"stages": stages_run}
    timings = "\n".join(f"| {name} | {row['seconds']} | {'yes' if row['cached'] else 'no'} | `{row['dir']}` |"
                        for name, row in stages_run.items())
    create_markdown_artifact(
        f"# TSO: run `{cfg.name}`\n\nPer round: pairs the judge built, how many of them the policy's own implicit "
        f"reward ordered the other way (corrected), and the policy's answers on the held-out prompts. Dual clip: "
        f"chosen reward <= {cfg.policy.tso_chosen_reward_max}, rejected reward >= "
        f"{cfg.policy.tso_rejected_reward_min} (selpo's reading of the paper, docs/TSO.md).\n\n"
        f"{tso_core.format_rounds(summary)}\n\n### Stages\n| stage | seconds | cached | dir |\n|---|---|---|---|\n"
        f"{timings}\n\nSummary: `{cfg.run_dir / 'tso_summary.json'}`\n",
        key=f"{slug(cfg.name)}-tso-rounds", description="TSO: per-round metrics")
    return summary

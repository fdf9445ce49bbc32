"""The whole pipeline as Prefect flows: `sepo_pipeline` and `compare_methods`.

sft? -> oracle -> score -> select -> generate[reference] -> (train policy -> generate -> evaluate) per method,
then summary.json and the results artifacts. The stages and their order come from the one stage graph
(selpo_core.stages.graph); every stage is a cached task run, so a re-run, a UI "Retry" or a new run with the
same config skips finished stages and resumes at the first one that is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import NO_OVERRIDES, Overrides, PolicyMethod, Text, flow_run_label, resolve
from selpo_core.stages.graph import plan_graph, run_graph
from tasks.report import format_table, write_summary
from tasks.stage import prefect_run, run_config


def run_all(config: dict[str, Any], title: str) -> dict[str, Any]:
    """Run (or reuse) every stage of the pipeline, then write summary.json and publish the artifacts."""
    graph = plan_graph(run_config(config))
    records: dict[str, dict[str, Any]] = {}
    dirs = run_graph(graph, graph.pipeline_targets(), prefect_run(config, records))
    evaluations = {method: str(dirs[f"evaluate_{method}"]) for method in graph.methods}
    summary = write_summary(config, str(dirs["score"]), str(dirs["select"]), evaluations, records, title=title)
    get_run_logger().info("%s: %s\n%s", title, Path(config["runs_dir"]) / config["name"], format_table(summary))
    return summary


@flow(name="sepo-pipeline", flow_run_name=flow_run_label)
def sepo_pipeline(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, run_name: Text = "") -> dict[str, Any]:
    """The whole selpo pipeline for one config; returns the summary (also in runs/RUN/summary.json).

    Args:
        config_path: run config YAML, relative to the directory `selpo serve` runs in; empty: the built-in
            synthetic demo.
        overrides: config fields to change, e.g. {"policy.beta": 0.2, "policy.methods": ["sepo", "dpo"]}.
        run_name: the run's name (empty: the config's name); its results go to the folder of that name in runs_dir.
    """
    return run_all(resolve(config_path, overrides, run_name), title="sepo pipeline")


@flow(name="compare-methods", flow_run_name=flow_run_label)
def compare_methods(config_path: Text = "", overrides: Overrides = NO_OVERRIDES,
                    methods: tuple[PolicyMethod, ...] = (), run_name: Text = "") -> dict[str, Any]:
    """Train several policy methods from the SAME oracle, scores and selection, and compare them.

    The oracle, scoring and selection do not depend on the methods, so they come from the cache when the run
    has them; each method's policy is its own cached stage too (adding a method trains only that one).

    Args:
        config_path: run config YAML, relative to the directory `selpo serve` runs in; empty: the built-in
            synthetic demo.
        overrides: config fields to change, e.g. {"policy.beta": 0.2}.
        methods: policy methods to train and compare, e.g. ["sepo", "dpo", "ipo"] (empty: the config's
            policy.methods).
        run_name: the run's name (empty: the config's name); its results go to the folder of that name in runs_dir.
    """
    changed = {**(overrides or {}), **({"policy.methods": list(methods)} if methods else {})}
    return run_all(resolve(config_path, changed, run_name), title="method comparison")

"""TSO as a Prefect flow: the pipeline's start (data, SFT, the reference's answers), then each round's stages as
task runs named "TSO round 2 · build pairs", "TSO round 2 · train"... from the one stage graph. Every stage is
a cached task, so a re-run or a UI Retry reuses finished rounds and resumes the failed one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import NO_OVERRIDES, Overrides, Text, flow_run_label, resolve
from selpo_core.stages.graph import plan_graph, run_graph
from selpo_core.tso import format_rounds, round_dirs
from tasks.stage import prefect_run, run_config
from tasks.tso import publish_tso


@flow(name="tso", flow_run_name=flow_run_label)
def tso_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, run_name: Text = "") -> dict[str, Any]:
    """TSO self-training: rounds of model-matrix candidates, judged pairs and dual-clip DPO (docs/TSO.md).

    Args:
        config_path: run config YAML with an optional `tso:` section; empty: the synthetic demo, TSO defaults.
        overrides: fields to change, e.g. {"tso.rounds": 2, "tso.generators": ["initial"], "policy.beta": 0.2}.
        run_name: the run's name (empty: the config's name); its results go to the folder of that name in runs_dir.
    """
    config = resolve(config_path, overrides, run_name)
    cfg = run_config(config)
    graph = plan_graph(cfg, tso=True)
    records: dict[str, dict[str, Any]] = {}
    dirs = run_graph(graph, graph.tso_targets(), prefect_run(config, records))
    summary = publish_tso(config, round_dirs(dirs, cfg.tso.rounds), records)
    get_run_logger().info("TSO %s: %s\n%s", cfg.name, Path(cfg.runs_dir) / cfg.name, format_rounds(summary))
    return summary

"""Reporting tasks: summary.json and the Prefect artifacts a run shows in the UI. Never cached: timings and
"cached" flags differ on every run.

A pipeline run publishes, in this order: `<run>-results` (the report: every table, links to the run's files
through the file server, the metrics plot, the heatmap excerpt; also written to runs/<run>/report.md),
`<run>-methods`, `<run>-stages` and `<run>-oracle` (table artifacts), `<run>-dir` (a link to the run directory)
and `<run>-token-heatmap`. Prefect 3.8's flow-run Artifacts tab orders its cards by artifact id, a random
uuid4, so each card's description starts with its place in this order ("1/6 ...").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from selpo_core import report
from selpo_core.artifacts import atomic_write_text, read_manifest
from selpo_core.config import RunConfig
from selpo_core.report import format_table, input_dir, load_summary
from tasks.links import file_url, files_url, md_link, run_view
from tasks.plots import metrics_svg
from tasks.stage import run_config

HEATMAP = "token_heatmap.html"
PLOT = "metrics.svg"
REPORT = "report.md"
EXCERPT_RESPONSES = 6  # chosen + rejected of the first 3 pairs: enough to see what gets selected
RUN_ARTIFACTS = 6

__all__ = ["format_table", "heatmap_excerpt", "load_summary", "publish_stage", "slug", "write_summary"]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@task(name="write summary", task_run_name="write summary", cache_policy=NO_CACHE, persist_result=False)
def write_summary(config: dict[str, Any], scores_dir: str, selection_dir: str, evaluations: dict[str, str],
                  stages: dict[str, dict[str, Any]], title: str = "selpo results") -> dict[str, Any]:
    """Write runs/<run>/summary.json (+ report.md, metrics.svg) and publish the run's artifacts."""
    cfg = run_config(config)
    summary = report.write_summary(cfg, scores_dir=scores_dir, selection_dir=selection_dir,
                                   evaluations=evaluations, stages=stages)
    publish_run(cfg, summary, run_view(selection_dir, cfg.run_dir), evaluations, title)
    return summary


def publish_run(cfg: RunConfig, summary: dict[str, Any], selection_dir: Path, evaluations: dict[str, str],
                title: str) -> None:
    key, runs_dir = slug(cfg.name), cfg.runs_dir
    svg = metrics_svg(summary["policy"], f"{title}: run {cfg.name}")
    if svg:
        atomic_write_text(cfg.run_dir / PLOT, svg)
    text = report_markdown(cfg, summary, selection_dir, evaluations, title, plotted=svg is not None)
    atomic_write_text(cfg.run_dir / REPORT, text)
    create_markdown_artifact(text, key=f"{key}-results", description=f"1/{RUN_ARTIFACTS} · start here: {title}, "
                             "results, links to the heatmap, answers and reports, the plot")
    create_table_artifact(method_rows(summary), key=f"{key}-methods",
                          description=f"2/{RUN_ARTIFACTS} · per-method metrics (reward gain, KL, ...)")
    create_table_artifact(stage_rows(cfg, summary), key=f"{key}-stages",
                          description=f"3/{RUN_ARTIFACTS} · stages: cached (reused) or ran, seconds, directory")
    create_table_artifact([{"metric": name, "value": _number(value)} for name, value in summary["oracle"].items()],
                          key=f"{key}-oracle", description=f"4/{RUN_ARTIFACTS} · oracle quality")
    publish_run_dir(cfg.run_dir, runs_dir, key, f"5/{RUN_ARTIFACTS} · ")
    publish_heatmap(selection_dir, runs_dir, key, f"6/{RUN_ARTIFACTS} · ")


def report_markdown(cfg: RunConfig, summary: dict[str, Any], selection_dir: Path, evaluations: dict[str, str],
                    title: str, plotted: bool) -> str:
    runs_dir, run_dir = cfg.runs_dir, cfg.run_dir
    files = " · ".join([md_link("run directory", run_dir, runs_dir),
                        md_link("summary.json", run_dir / "summary.json", runs_dir),
                        md_link("config.yaml", run_dir / "config.yaml", runs_dir),
                        md_link("token heatmap", selection_dir / HEATMAP, runs_dir)])
    per_method = "\n".join(
        f"- **{method}**: " + " · ".join([
            md_link("answers", run_view(input_dir(eval_dir, "generations"), run_dir) / "generations.jsonl", runs_dir),
            md_link("evaluation", run_view(eval_dir, run_dir) / REPORT, runs_dir),
            md_link("model", run_view(input_dir(eval_dir, "model"), run_dir), runs_dir)])
        for method, eval_dir in evaluations.items())
    plot_url = file_url(run_dir / PLOT, runs_dir) if plotted else None
    plot = f"## Reward gain vs KL\n\n![reward gain vs KL per method]({plot_url})\n\n" if plot_url else ""
    return (f"# {title}: run `{cfg.name}`\n\n{files}\n\n{per_method}\n\n"
            f"Files are served by the selpo file server at {files_url()} (started by `selpo serve`; "
            f"or `selpo files --runs-dir {runs_dir}`).\n\n"
            f"## Results\n\n{format_table(summary)}\n\n{plot}"
            f"## Token heatmap (excerpt)\n\nSelected key tokens in **bold**, with their oracle rewards.\n\n"
            f"{heatmap_excerpt(selection_dir / 'selection.parquet')}\n")


def method_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"method": method, **{name: _number(value) for name, value in row.items()}}
            for method, row in summary["policy"].items()]


def stage_rows(cfg: RunConfig, summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"stage": row.get("title", name), "cached": "yes" if row["cached"] else "no", "state": row["state"],
             "seconds": row["seconds"],
             "directory": file_url(run_view(row["dir"], cfg.run_dir), cfg.runs_dir) or row["dir"]}
            for name, row in summary["stages"].items()]


@task(name="publish stage", task_run_name="publish stage artifacts", cache_policy=NO_CACHE, persist_result=False)
def publish_stage(config: dict[str, Any], stage_dir: str) -> dict[str, Any]:
    """Artifacts of a single-stage flow: its manifest metrics, a link to its dir, the heatmap if it has one."""
    cfg = run_config(config)
    manifest = read_manifest(stage_dir)
    key = f"{slug(cfg.name)}-{slug(manifest['stage'])}"
    directory = run_view(stage_dir, cfg.run_dir)
    rows = "\n".join(f"| {name} | {_cell(value)} |" for name, value in manifest.get("metrics", {}).items())
    create_markdown_artifact(
        f"# {manifest.get('title') or manifest['stage']}: run `{cfg.name}`\n\n"
        f"{md_link('directory', directory, cfg.runs_dir)} ({manifest.get('seconds', '?')} s)\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n", key=f"{key}-metrics", description=f"{manifest['stage']} metrics")
    publish_run_dir(directory, cfg.runs_dir, key)
    publish_heatmap(directory, cfg.runs_dir, key)
    return manifest.get("metrics", {})


def publish_run_dir(directory: Path, runs_dir: str | Path, key: str, place: str = "") -> None:
    url = file_url(directory, runs_dir)
    description = f"{place}the files of this run: stage dirs, manifests, summary.json (served by `selpo files`)"
    if url:
        create_link_artifact(url, link_text=str(directory), key=f"{key}-dir", description=description)
    else:  # a dir the file server does not serve: its path, to copy
        create_markdown_artifact(f"`{directory}`", key=f"{key}-dir", description=description)


def publish_heatmap(selection_dir: Path, runs_dir: str | Path, key: str, place: str = "") -> None:
    """A markdown artifact linking token_heatmap.html (through the file server), with a markdown excerpt of it."""
    heatmap = selection_dir / HEATMAP
    if not heatmap.is_file():
        return
    excerpt = heatmap_excerpt(selection_dir / "selection.parquet")
    create_markdown_artifact(
        f"# Token heatmap\n\n{md_link('open ' + HEATMAP, heatmap, runs_dir)}\n\n"
        f"Excerpt: selected key tokens in **bold**, with their oracle rewards.\n\n{excerpt}\n",
        key=f"{key}-token-heatmap", description=f"{place}key tokens chosen by the oracle's token rewards")


def heatmap_excerpt(selection_parquet: Path, responses: int = EXCERPT_RESPONSES) -> str:
    if not selection_parquet.is_file():
        return "(no selection.parquet)"
    import pyarrow.parquet as pq

    rows = pq.read_table(selection_parquet).slice(0, responses).to_pylist()
    lines = ["| pair | side | response | selected (reward) |", "|---|---|---|---|"]
    for row in rows:
        spans = list(zip(row["offset_start"], row["offset_end"], row["rewards"], row["selected"]))
        picked = ", ".join(f"{_escape(row['text'][s:e]) or 'EOS'} ({r:+.2f})" for s, e, r, sel in spans if sel)
        lines.append(f"| {row['example_id'][:8]} | {row['side']} | {_marked_text(row['text'], spans)} | "
                     f"{picked or '-'} |")
    return "\n".join(lines)


def _marked_text(text: str, spans: list[tuple[int, int, float, bool]]) -> str:
    out, pos = [], 0
    for start, end, _reward, selected in spans:
        out.append(_escape(text[pos:start]))
        token = _escape(text[start:end])
        out.append(f"**{token}**" if selected and token.strip() else token)
        pos = max(pos, end)
    out.append(_escape(text[pos:]))
    return "".join(out).replace("\n", " ")


def _escape(text: str) -> str:
    for char in "\\|*_`[]<>":
        text = text.replace(char, "\\" + char)
    return text


def _number(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _escape(json.dumps(value) if isinstance(value, dict | list) else str(value))

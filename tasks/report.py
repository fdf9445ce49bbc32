"""Reporting tasks: summary.json and the Prefect artifacts a run shows in the UI (results table, run-dir link,
token heatmap). Never cached: timings and "cached" flags differ on every run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from selpo_core import report
from selpo_core.artifacts import read_manifest
from selpo_core.report import format_table, load_summary
from tasks.stage import run_config

HEATMAP = "token_heatmap.html"
EXCERPT_RESPONSES = 6  # chosen + rejected of the first 3 pairs: enough to see what gets selected

__all__ = ["format_table", "heatmap_excerpt", "load_summary", "publish_stage", "slug", "write_summary"]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@task(name="write summary", task_run_name="write summary", cache_policy=NO_CACHE, persist_result=False)
def write_summary(config: dict[str, Any], scores_dir: str, selection_dir: str, evaluations: dict[str, str],
                  stages: dict[str, dict[str, Any]], title: str = "selpo results") -> dict[str, Any]:
    """Write runs/<run>/summary.json and publish the results table, the run dir and the heatmap as artifacts."""
    cfg = run_config(config)
    summary = report.write_summary(cfg, scores_dir=scores_dir, selection_dir=selection_dir,
                                   evaluations=evaluations, stages=stages)
    key = slug(cfg.name)
    stage_dirs = "\n".join(f"- `{name}`: `{row['dir']}`" for name, row in stages.items() if row.get("dir"))
    create_markdown_artifact(
        f"# {title}: run `{cfg.name}`\n\n{format_table(summary)}\n\n"
        f"Run directory: `{cfg.run_dir}` (summary.json, config.yaml)\n\n### Stage directories\n{stage_dirs}\n",
        key=f"{key}-results", description=f"{title}: oracle quality, per-method metrics, per-stage timings")
    publish_run_dir(cfg.run_dir, key)
    publish_heatmap(Path(selection_dir), key)
    return summary


@task(name="publish stage", task_run_name="publish stage artifacts", cache_policy=NO_CACHE, persist_result=False)
def publish_stage(config: dict[str, Any], stage_dir: str) -> dict[str, Any]:
    """Artifacts of a single-stage flow: its manifest metrics, a link to its dir, the heatmap if it has one."""
    cfg = run_config(config)
    manifest = read_manifest(stage_dir)
    key = f"{slug(cfg.name)}-{slug(manifest['stage'])}"
    rows = "\n".join(f"| {name} | {_cell(value)} |" for name, value in manifest.get("metrics", {}).items())
    create_markdown_artifact(
        f"# {manifest['stage']}: run `{cfg.name}`\n\nDirectory: `{stage_dir}` ({manifest.get('seconds', '?')} s)\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n", key=f"{key}-metrics", description=f"{manifest['stage']} metrics")
    publish_run_dir(Path(stage_dir), key)
    publish_heatmap(Path(stage_dir), key)
    return manifest.get("metrics", {})


def publish_run_dir(directory: Path, key: str) -> None:
    # A file:// link: the UI runs in a browser on this machine (server bound to 127.0.0.1); elsewhere the path
    # shown as text is what matters.
    create_link_artifact(Path(directory).resolve().as_uri(), link_text=str(directory), key=f"{key}-dir",
                         description="Artifacts of this run (stage dirs, manifests, summary.json)")


def publish_heatmap(selection_dir: Path, key: str) -> None:
    """A markdown artifact linking token_heatmap.html, with a markdown excerpt of it (artifacts are markdown; the
    self-contained HTML file stays in the selection dir)."""
    heatmap = selection_dir / HEATMAP
    if not heatmap.is_file():
        return
    excerpt = heatmap_excerpt(selection_dir / "selection.parquet")
    create_markdown_artifact(
        f"# Token heatmap\n\n[open {HEATMAP}]({heatmap.resolve().as_uri()}) (`{heatmap}`)\n\n"
        f"Excerpt: selected key tokens in **bold**, with their oracle rewards.\n\n{excerpt}\n",
        key=f"{key}-token-heatmap", description="Key tokens chosen by the oracle's token rewards")


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


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _escape(json.dumps(value) if isinstance(value, dict | list) else str(value))

"""The data stages: the built-in synthetic task, and the validated, split preference data every later stage reads.

The data stage writes train.jsonl / heldout.jsonl (normalised pairs with example_id and the user's row),
sft.jsonl (the synthetic corpus, or prompt + chosen of the training pairs), prompts.jsonl (what generation
answers, when the run has its own) and the metrics of what was read, kept and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selpo_core.artifacts import StageOutput
from selpo_core.config import ConfigError, RunConfig, to_dict
from selpo_core.stages.plan import StageInput, StagePlan, external

TASK_FILES = ("sft.jsonl", "prompts.jsonl", "task.json", "truth.jsonl")


def plan_synthetic(cfg: RunConfig) -> StagePlan:
    return StagePlan("synthetic", "synthetic", "make synthetic task", {"synthetic": to_dict(cfg.synthetic)}, {})


def run_synthetic(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    from selpo_core import synthetic

    out.metrics.update(synthetic.write_task(cfg.synthetic, out.work_dir))


def plan_data(cfg: RunConfig, task: StageInput | None) -> StagePlan:
    """The user's file (by content, not by path) or the synthetic task's pairs."""
    section = {"data": {k: v for k, v in to_dict(cfg.data).items() if k != "path"}}
    inputs: dict[str, StageInput] = {}
    if cfg.data.path:
        if looks_local(cfg.data.path) and not Path(cfg.data.path).expanduser().exists():
            raise ConfigError(f"data.path={cfg.data.path!r}: no such file")
        inputs["pairs"] = external(cfg.data.path)
    elif task is None:
        raise ValueError("data.path is empty and no synthetic task was planned: set data.path")
    else:
        inputs["task"] = task
    return StagePlan("data", "data", "prepare data", section, inputs)


def looks_local(path: str) -> bool:
    """A path, not a hub id: absolute, relative with ./ or ~, or a file name with a data suffix."""
    return path.startswith(("/", ".", "~")) or path.endswith((".json", ".jsonl", ".parquet", ".gz"))


def run_data(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    from dataclasses import replace

    from selpo_core import data

    task_dir = Path(inputs["task"]) if "task" in inputs else None
    data_cfg = cfg.data if task_dir is None else replace(cfg.data, path=str(task_dir / "pairs.jsonl"),
                                                          format="standard")
    examples, report = data.load_preference_data(data_cfg)
    train, heldout = data.split_heldout(examples, data_cfg.heldout_fraction, data_cfg.seed)
    write_examples(out.file("train.jsonl"), train)
    write_examples(out.file("heldout.jsonl"), heldout)
    if task_dir is not None:
        for name in TASK_FILES:
            out.file(name).write_bytes((task_dir / name).read_bytes())
    else:
        with open(out.file("sft.jsonl"), "w") as handle:
            for row in data.sft_rows_from_examples(train):
                handle.write(json.dumps(row) + "\n")
    out.metrics.update({"n_train": len(train), "n_heldout": len(heldout), **_report_metrics(report)})


def write_examples(path: Path, examples: list[Any]) -> None:
    with open(path, "w") as handle:
        for example in examples:
            # The source row travels along so tokenize-time errors still name it.
            handle.write(json.dumps({"example_id": example.example_id, "prompt": example.prompt,
                                     "chosen": example.chosen, "rejected": example.rejected,
                                     "row": example.row}) + "\n")


def read_examples(path: Path) -> list[Any]:
    from selpo_core.data import PreferenceExample

    with open(path) as handle:
        return [PreferenceExample(**json.loads(line)) for line in handle if line.strip()]


def tokenized_pairs(cfg: RunConfig, data_dir: str | Path, tokenizer: Any, split: str = "train") -> list[Any]:
    """The data stage's pairs of `split` in `tokenizer`'s ids (every later stage reads them through this)."""
    from selpo_core import data

    path = Path(data_dir) / f"{split}.jsonl"
    pairs, _report = data.tokenize_pairs(read_examples(path), tokenizer, cfg.data, source=str(path))
    return pairs


def _report_metrics(report: Any) -> dict[str, Any]:
    metrics = {"data/n_rows": report.n_rows, "data/n_kept": report.n_kept, "data/format": report.format}
    metrics.update({f"data/skipped/{reason}": count for reason, count in report.skipped.items()})
    return metrics

"""The data stages: the built-in synthetic task, and the validated, split preference data every later stage reads.

The data stage writes train.jsonl / heldout.jsonl (normalised pairs with example_id and the user's row),
sft.jsonl (the synthetic corpus, or prompt + chosen of the training pairs), prompts.jsonl (what generation
answers, when the run has its own) and the metrics of what was read, kept and skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selpo_core.artifacts import StageOutput
from selpo_core.config import RunConfig, to_dict
from selpo_core.stages.plan import StageInput, StagePlan, external

log = logging.getLogger("selpo.stages")

TASK_FILES = ("sft.jsonl", "prompts.jsonl", "task.json", "truth.jsonl")
SYNTHETIC_SOURCE = "synthetic task pairs.jsonl"


def plan_synthetic(cfg: RunConfig) -> StagePlan:
    return StagePlan("synthetic", "synthetic", "make synthetic task", {"synthetic": to_dict(cfg.synthetic)}, {})


def run_synthetic(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    from selpo_core import synthetic

    out.metrics.update(synthetic.write_task(cfg.synthetic, out.work_dir))


def plan_data(cfg: RunConfig, task: StageInput | None, tokenizers: dict[str, StageInput]) -> StagePlan:
    """The user's file (by content, not by path) or the synthetic task's pairs, checked against the length rule
    with every tokenizer the run uses (`tokenizers`: name -> model or task), so every stage sees the same pairs."""
    section = {"data": {k: v for k, v in to_dict(cfg.data).items() if k not in ("path", "sft_path")}}
    inputs: dict[str, StageInput] = {f"tokenizer_{name}": value for name, value in tokenizers.items()}
    if cfg.data.path:
        inputs["pairs"] = external(cfg.data.path)
    elif task is None:
        raise ValueError("data.path is empty and no synthetic task was planned: set data.path")
    else:
        inputs["task"] = task
    if cfg.data.sft_path:
        inputs["sft"] = external(cfg.data.sft_path)
    return StagePlan("data", "data", "prepare data", section, inputs)


def load_tokenizer_input(path: str) -> Any:
    """A tokenizer input of the data stage: a model dir or hub id, or the synthetic task (its tokenizer/)."""
    from selpo_core import models

    task_tokenizer = Path(path) / "tokenizer"
    return models.load_tokenizer(str(task_tokenizer) if (Path(path) / "task.json").is_file() else path)


def run_data(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    from dataclasses import replace

    from selpo_core import data

    task_dir = Path(inputs["task"]) if "task" in inputs else None
    data_cfg = cfg.data if task_dir is None else replace(cfg.data, path=str(task_dir / "pairs.jsonl"),
                                                          format="standard")
    tokenizers = {name.removeprefix("tokenizer_"): load_tokenizer_input(path) for name, path in inputs.items()
                  if name.startswith("tokenizer_")}
    examples, loaded = data.load_preference_data(data_cfg)
    if task_dir is not None:  # name the task's file, not where this store happens to keep it
        examples = [replace(e, source=SYNTHETIC_SOURCE) for e in examples]
        loaded.source = SYNTHETIC_SOURCE
    kept, checked = data.check_lengths(examples, tokenizers, data_cfg)
    report = loaded.merge(checked)
    log.info("data: %s", report.summary())
    train, heldout = data.split_heldout(kept, data_cfg.heldout_fraction, data_cfg.seed)
    data.write_examples(out.file("train.jsonl"), train)
    data.write_examples(out.file("heldout.jsonl"), heldout)
    with open(out.file("skipped.jsonl"), "w", encoding="utf-8") as handle:
        for record in report.skipped_records():
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    if task_dir is not None:
        for name in TASK_FILES:
            out.file(name).write_bytes((task_dir / name).read_bytes())
    else:
        _write_sft(cfg, inputs, train, tokenizers, report.prompt_template, out)
        _write_prompts(heldout, out)
    out.metrics.update({"n_train": len(train), "n_heldout": len(heldout), **report.metrics()})


def _write_sft(cfg: RunConfig, inputs: dict[str, str], train: list[Any], tokenizers: dict[str, Any],
               prompt_template: str, out: StageOutput) -> None:
    """sft.jsonl: data.sft_path (any TRL SFT format), or prompt + chosen of the training pairs."""
    from selpo_core import data

    if "sft" in inputs:
        rows = data.load_sft_data(inputs["sft"], on_bad_row=cfg.data.on_bad_row, split=cfg.data.split)
    else:
        rows = data.sft_rows_from_examples(train)
    rows, report = data.check_sft_lengths(rows, tokenizers, cfg.data, prompt_template=prompt_template)
    with open(out.file("sft.jsonl"), "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.metrics.update({f"sft/{key.removeprefix('data/')}": value for key, value in report.metrics().items()})


def _write_prompts(heldout: list[Any], out: StageOutput) -> None:
    """prompts.jsonl: the held-out pairs' prompts, what generation answers when generate.prompts is empty (one row
    per distinct prompt; a conversation keeps its turns in `messages`, `prompt` is its last user turn)."""
    seen: set[str] = set()
    with open(out.file("prompts.jsonl"), "w", encoding="utf-8") as handle:
        for example in heldout:
            key = json.dumps(example.prompt, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            row: dict[str, Any] = {"id": example.example_id, "prompt": example.prompt}
            if not isinstance(example.prompt, str):
                users = [m["content"] for m in example.prompt if m["role"] == "user"]
                row = {"id": example.example_id, "prompt": users[-1] if users else "", "messages": example.prompt}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.metrics["n_prompts"] = len(seen)


def tokenized_pairs(cfg: RunConfig, data_dir: str | Path, tokenizer: Any, split: str = "train", *,
                    name: str = "") -> list[Any]:
    """The data stage's pairs of `split` in `tokenizer`'s ids, rendered as the data stage decided. Every later
    stage reads them through this, and sees exactly the data stage's pairs (or a DataError naming the row)."""
    from selpo_core import data

    metrics = data_metrics(data_dir)
    path = Path(data_dir) / f"{split}.jsonl"
    pairs, _report = data.tokenize_pairs(data.read_examples(path), tokenizer, cfg.data, source=str(path),
                                         prompt_template=metrics.get("data/prompt_template"), name=name)
    expected = metrics.get(f"n_{split}")
    if expected is not None and len(pairs) != expected:
        raise RuntimeError(f"{path}: {len(pairs)} pairs, but the data stage kept {expected}")
    return pairs


def data_metrics(data_dir: str | Path) -> dict[str, Any]:
    """What the data stage decided (counts, data/prompt_template); empty for a user's own data dir without one."""
    from selpo_core.artifacts import read_manifest

    return read_manifest(data_dir)["metrics"] if (Path(data_dir) / "manifest.json").is_file() else {}

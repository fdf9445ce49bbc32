"""The answer-file format checks every generation test applies (tests/core and tests/vllm_engine alike).

`check_answer_files(out_dir, benchmark, question_rows, model_name, n_samples)` reads what `generate_answers`
wrote in `out_dir` and checks each file field by field against the question rows it answered:
generations.jsonl always, plus alpaca_eval.json, arena_hard.jsonl (v0.1 or v2.0 rows, following the
question file) or mt_bench.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selpo_core.benchmarks_io import GenerationRecord, read_generations

GENERATION_KEYS = {"id", "category", "turns", "outputs", "answers", "n_tokens", "finish_reasons", "generator", "source"}
V01_KEYS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}
V2_KEYS = {"uid", "ans_id", "model", "messages", "tstamp", "metadata"}
V2_METADATA_KEYS = {"token_len", "header_count", "list_count", "bold_count"}


def check_answer_files(out_dir: Path, benchmark: str, rows: list[dict[str, Any]], model_name: str,
                       n_samples: int) -> list[GenerationRecord]:
    """Assert the files of `out_dir` answer `rows` in `benchmark`'s format; return generations.jsonl's records."""
    records = read_generations(out_dir / "generations.jsonl")
    lines = [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]
    n_turns = 2 if benchmark == "mt_bench" else 1
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        assert set(line) == GENERATION_KEYS
        assert line["generator"] == model_name and line["source"] == row
        assert len(line["answers"]) == n_samples and all(len(sample) == n_turns for sample in line["answers"])
        assert line["outputs"] == [sample[-1] for sample in line["answers"]]
        assert all(r in ("eos", "stop", "length") for s in line["finish_reasons"] for r in s)
        assert all(isinstance(n, int) and n >= 1 for s in line["n_tokens"] for n in s)
    if benchmark == "alpaca_eval":
        outputs = json.loads((out_dir / "alpaca_eval.json").read_text())
        assert isinstance(outputs, list) and len(outputs) == len(rows)
        for entry, row, record in zip(outputs, rows, records, strict=True):
            assert set(entry) == {"instruction", "output", "generator", "dataset"}
            assert entry["instruction"] == row.get("instruction", row.get("prompt"))  # a plain file's prompt too
            assert entry["dataset"] == row.get("dataset", "selpo")
            assert entry["output"] == record.answers[0][0] and entry["generator"] == model_name
    elif benchmark in ("arena_hard", "mt_bench"):
        answers = [json.loads(line) for line in (out_dir / f"{benchmark}.jsonl").read_text().splitlines()]
        assert len(answers) == len(rows)
        for entry, row, record in zip(answers, rows, records, strict=True):
            if "uid" in row:
                _check_arena_hard_v2(entry, row, record, model_name)
            else:
                _check_choices(entry, row, record, model_name, benchmark)
    else:
        assert benchmark == "plain" and sorted(p.name for p in out_dir.iterdir()) == ["generations.jsonl"]
    return records


def _check_choices(entry: dict[str, Any], row: dict[str, Any], record: GenerationRecord, model_name: str,
                   benchmark: str) -> None:
    """FastChat MT-Bench and Arena-Hard v0.1: one row per question, one choice per sample."""
    assert set(entry) == V01_KEYS
    assert entry["question_id"] == row["question_id"]  # original type: int for MT-Bench
    assert type(entry["question_id"]) is type(row["question_id"])
    assert entry["model_id"] == model_name and isinstance(entry["tstamp"], float)
    assert isinstance(entry["answer_id"], str) and len(entry["answer_id"]) == 22
    assert [c["index"] for c in entry["choices"]] == list(range(len(record.answers)))
    for choice, sample, counts in zip(entry["choices"], record.answers, record.n_tokens, strict=True):
        assert set(choice) == {"index", "turns"}
        if benchmark == "arena_hard":
            assert choice["turns"] == [{"content": a, "token_len": n} for a, n in zip(sample, counts, strict=True)]
        else:
            assert choice["turns"] == sample and len(sample) == 2


def _check_arena_hard_v2(entry: dict[str, Any], row: dict[str, Any], record: GenerationRecord,
                         model_name: str) -> None:
    """arena-hard-auto v2.0's gen_answer.py row: messages with {answer}, markdown metadata, sample 0."""
    assert set(entry) == V2_KEYS
    assert entry["uid"] == row["uid"] and entry["model"] == model_name
    assert isinstance(entry["ans_id"], str) and len(entry["ans_id"]) == 22 and isinstance(entry["tstamp"], float)
    assert entry["messages"] == [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": {"answer": record.answers[0][0]}},
    ]
    meta = entry["metadata"]
    assert set(meta) == V2_METADATA_KEYS and meta["token_len"] == record.n_tokens[0][0]
    assert set(meta["header_count"]) == {f"h{k}" for k in range(1, 7)}
    assert set(meta["list_count"]) == {"ordered", "unordered"} and set(meta["bold_count"]) == {"**", "__"}
    assert all(isinstance(v, int) for group in ("header_count", "list_count", "bold_count")
               for v in meta[group].values())

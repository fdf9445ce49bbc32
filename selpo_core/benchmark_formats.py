"""The evaluators' answer files and MT-Bench's sampling temperatures, field by field as their projects write them.

Written atomically (temp file + rename), with the field names those projects document:
- AlpacaEval `model_outputs.json`: a JSON list of `{instruction, output, generator, dataset}`.
- Arena-Hard `model_answer/<model>.jsonl`, in the format of the question file's version:
  - v0.1 questions (`question_id` + `turns`): `{question_id, answer_id, model_id, choices: [{index, turns:
    [{content, token_len}]}], tstamp}`, one choice per sample.
  - v2.0 questions (`uid` + `prompt`; arena-hard-auto's current gen_answer.py): `{uid, ans_id, model,
    messages: [{role: user, content: prompt}, {role: assistant, content: {answer}}], tstamp, metadata:
    {token_len, header_count: {h1..h6}, list_count: {ordered, unordered}, bold_count: {"**", "__"}}}`,
    sample 0 only (v2 has one answer per question). The markdown counts use arena-hard-auto's regexes on
    the answer with the contents of ``` code blocks removed (show_result.py's style control reads them).
  `token_len` counts the policy tokenizer's tokens, EOS included (arena-hard-auto counts tiktoken tokens;
  it only enters length statistics and style control).
- MT-Bench (FastChat `model_answer/<model>.jsonl`): `{question_id, answer_id, model_id, choices: [{index,
  turns: [answer_turn1, answer_turn2]}], tstamp}`.
`answer_id` / `ans_id` is a content hash instead of a random shortuuid, so equal answers give equal files
(bar tstamp).

MT-Bench sampling: `MT_BENCH_TEMPERATURES` is FastChat's `temperature_config` (fastchat/llm_judge/common.py);
gen_model_answer.py uses 0.7 for a category not in it and greedy decoding below 1e-4.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from selpo_core.artifacts import atomic_write_text
from selpo_core.benchmarks_io import BENCHMARK_FILES, BENCHMARKS, GenerationRecord

MT_BENCH_TEMPERATURES: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7
"""FastChat's temperature for a category its table does not list."""


# -------------------------------------------------------------------------------------------- MT-Bench


def mt_bench_temperature(category: str) -> float:
    """FastChat's sampling temperature for an MT-Bench question category (0 means greedy)."""
    return MT_BENCH_TEMPERATURES.get(category, MT_BENCH_DEFAULT_TEMPERATURE)


# ----------------------------------------------------------------------------------------------- files


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _answer_id(model_id: str, question_id: Any, answers: Any) -> str:
    payload = json.dumps([model_id, question_id, answers], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:22]  # shortuuid's length


def write_alpaca_eval(records: Sequence[GenerationRecord], path: str | Path, generator: str) -> Path:
    """AlpacaEval `model_outputs.json`: [{instruction, output, generator, dataset}], sample 0 per prompt."""
    rows = []
    for r in records:
        if len(r.turns) != 1:
            raise ValueError(f"alpaca_eval is single-turn; prompt {r.id!r} has {len(r.turns)} turns")
        rows.append(
            {
                "instruction": r.source.get("instruction", r.turns[0]),
                "output": r.answers[0][0],
                "generator": generator,
                "dataset": r.source.get("dataset", r.category or "selpo"),
            }
        )
    path = Path(path)
    atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    return path


def _question_id(r: GenerationRecord) -> Any:
    """The id with its original JSON type (int for MT-Bench, str for Arena-Hard), as the judges match it."""
    for key in ("question_id", "uid"):
        if key in r.source:
            return r.source[key]
    return r.id


def write_arena_hard(records: Sequence[GenerationRecord], path: str | Path, model_id: str) -> Path:
    """Arena-Hard model answers JSONL (see module doc): v2.0 rows for `uid` questions, else v0.1 rows."""
    rows = [_arena_hard_v2(r, model_id) if "uid" in r.source else _arena_hard_v01(r, model_id) for r in records]
    path = Path(path)
    atomic_write_text(path, _jsonl(rows))
    return path


def _arena_hard_v01(r: GenerationRecord, model_id: str) -> dict[str, Any]:
    choices = [
        {"index": j, "turns": [{"content": a, "token_len": n} for a, n in zip(sample, r.n_tokens[j], strict=True)]}
        for j, sample in enumerate(r.answers)
    ]
    qid = _question_id(r)
    return {
        "question_id": qid,
        "answer_id": _answer_id(model_id, qid, r.answers),
        "model_id": model_id,
        "choices": choices,
        "tstamp": time.time(),
    }


_CODE_BLOCK = re.compile("```([^`]*)```")


def markdown_counts(answer: str) -> dict[str, dict[str, int]]:
    """arena-hard-auto's `count_markdown_elements` of the answer with code-block contents removed."""
    for block in _CODE_BLOCK.findall(answer):  # as its remove_pattern: the contents go, the fences stay
        answer = answer.replace(block, "")

    def count(pattern: str, flags: int = 0) -> int:
        return len(re.findall(pattern, answer, flags))

    return {
        "header_count": {f"h{k}": count(rf"^#{{{k}}}\s", re.MULTILINE) for k in range(1, 7)},
        "list_count": {
            "ordered": count(r"^\s*\d+\.\s", re.MULTILINE),
            "unordered": count(r"^\s*[-*+]\s", re.MULTILINE),
        },
        "bold_count": {"**": count(r"\*\*[^*\n]+\*\*"), "__": count(r"__[^_\n]+__")},
    }


def _arena_hard_v2(r: GenerationRecord, model_id: str) -> dict[str, Any]:
    if len(r.turns) != 1:
        raise ValueError(f"Arena-Hard v2 is single-turn; prompt {r.id!r} has {len(r.turns)} turns")
    answer, uid = r.answers[0][0], r.source["uid"]
    return {
        "uid": uid,
        "ans_id": _answer_id(model_id, uid, answer),
        "model": model_id,
        "messages": [
            {"role": "user", "content": r.source.get("prompt", r.turns[0])},
            {"role": "assistant", "content": {"answer": answer}},
        ],
        "tstamp": time.time(),
        "metadata": {"token_len": r.n_tokens[0][0], **markdown_counts(answer)},
    }


def write_mt_bench(records: Sequence[GenerationRecord], path: str | Path, model_id: str) -> Path:
    """FastChat MT-Bench model answers JSONL (see module doc); one choice per sample, turns as strings."""
    rows = []
    for r in records:
        qid = _question_id(r)
        choices = [{"index": j, "turns": list(sample)} for j, sample in enumerate(r.answers)]
        rows.append(
            {
                "question_id": qid,
                "answer_id": _answer_id(model_id, qid, r.answers),
                "model_id": model_id,
                "choices": choices,
                "tstamp": time.time(),
            }
        )
    path = Path(path)
    atomic_write_text(path, _jsonl(rows))
    return path


__all__ = [
    "MT_BENCH_TEMPERATURES",
    "MT_BENCH_DEFAULT_TEMPERATURE",
    "mt_bench_temperature",
    "markdown_counts",
    "write_alpaca_eval",
    "write_arena_hard",
    "write_mt_bench",
]


def write_benchmark_file(
    benchmark: str, records: Sequence[GenerationRecord], out_dir: str | Path, model_name: str
) -> Path | None:
    """The benchmark's answer file in `out_dir` (`BENCHMARK_FILES`; formats: benchmark_formats.py); None for plain."""
    if benchmark == "plain":
        return None
    writers = {"alpaca_eval": write_alpaca_eval, "arena_hard": write_arena_hard, "mt_bench": write_mt_bench}
    if benchmark not in writers:
        raise ValueError(f"benchmark={benchmark!r} is not one of {', '.join(BENCHMARKS)}")
    return writers[benchmark](records, Path(out_dir) / BENCHMARK_FILES[benchmark], model_name)

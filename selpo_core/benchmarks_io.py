"""Benchmark prompts in, answers out: the file formats of AlpacaEval, Arena-Hard and MT-Bench, and ours.

Reading (`load_prompts`): a local JSON / JSONL / Parquet file or a hub dataset id, one row per prompt, with
the field names each benchmark's own question files use:

| benchmark   | required fields                                       | id from              | category from |
|-------------|-------------------------------------------------------|----------------------|---------------|
| plain       | `prompt` (str)                                        | `id`, else row index | `category`    |
| alpaca_eval | `instruction` (str; else a plain `prompt`); `dataset` | `id`, else row index | `dataset`     |
| arena_hard  | v0.1 `question_id` + `turns: [{"content": str}, ...]` | `question_id`/`uid`  | `category`    |
|             | or v2.0 `uid` + `prompt` (str)                        |                      |               |
| mt_bench    | `question_id` + `turns: [str, ...]` (FastChat)        | `question_id`        | `category`    |

The whole original row is kept as `BenchmarkPrompt.source`, so writers return ids with their original type
(FastChat looks MT-Bench answers up by the integer `question_id`) and AlpacaEval's `dataset` unchanged.

Writing, atomically (temp file + rename): `generations.jsonl` (ours, every benchmark; see
`write_generations`) here, and each evaluator's answer file (`benchmark_formats.write_benchmark_file`) in
selpo_core/benchmark_formats.py, which documents those formats and MT-Bench's sampling temperatures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selpo_core.artifacts import atomic_write_text

BENCHMARKS = ("plain", "alpaca_eval", "arena_hard", "mt_bench")
BENCHMARK_FILES = {
    "alpaca_eval": "alpaca_eval.json",
    "arena_hard": "arena_hard.jsonl",
    "mt_bench": "mt_bench.jsonl",
}
GENERATIONS_FILE = "generations.jsonl"
FINISH_REASONS = ("eos", "stop", "length")


class PromptFileError(ValueError):
    """A prompt file or row is malformed; the one-line message names the file, row and field."""


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One benchmark question: its user turns (1 for most, 2 for MT-Bench) and the row it came from."""

    id: str
    turns: list[str]
    category: str = ""
    source: dict[str, Any] = field(default_factory=dict)

    def first_conversation(self) -> list[dict[str, str]]:
        """What turn 1 answers: the row's own conversation (`messages`, a plain row from a data stage's held-out
        multi-turn prompt: earlier turns as the data has them), else the first user turn alone."""
        messages = self.source.get("messages")
        return list(messages) if messages else [{"role": "user", "content": self.turns[0]}]


@dataclass(frozen=True)
class GenerationRecord:
    """The answers to one prompt. `answers[j][k]` is sample j's answer to user turn k (sample-major, like
    FastChat's `choices[j].turns[k]`); `n_tokens` and `finish_reasons` are shaped the same way."""

    id: str
    turns: list[str]
    answers: list[list[str]]
    n_tokens: list[list[int]]
    finish_reasons: list[list[str]]
    """eos: the model ended the answer; stop: a stop string cut it; length: max_new_tokens was reached."""
    category: str = ""
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def outputs(self) -> list[str]:
        """The last-turn answer of each sample: what single-turn evaluation reads."""
        return [sample[-1] for sample in self.answers]


# ------------------------------------------------------------------------------------------------ reading


def _read_rows(path_or_hub_id: str, split: str | None) -> tuple[str, list[tuple[int, Any]]]:
    """(name for messages, [(row number, row)]) from a local file or a hub dataset."""
    path = Path(path_or_hub_id).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise PromptFileError(f"{path} row {number}: not valid JSON ({err.msg})") from None
            return str(path), rows
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
            if not isinstance(data, list):
                raise PromptFileError(
                    f"{path}: a JSON prompt file must hold a list of rows, got {type(data).__name__}"
                )
            return str(path), list(enumerate(data, start=1))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return str(path), list(enumerate(pq.read_table(path).to_pylist(), start=1))
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r}; use .json, .jsonl or .parquet")
    if (
        path.exists()
        or suffix in (".json", ".jsonl", ".parquet")
        or path_or_hub_id.startswith(("/", ".", "~"))
    ):
        raise PromptFileError(f"{path_or_hub_id}: no such prompt file")
    return path_or_hub_id, list(enumerate(_hub_rows(path_or_hub_id, split), start=1))


def _hub_rows(hub_id: str, split: str | None) -> list[dict[str, Any]]:
    import datasets

    loaded = datasets.load_dataset(hub_id, split=split) if split else datasets.load_dataset(hub_id)
    if isinstance(loaded, datasets.DatasetDict):
        # Benchmarks publish one evaluation split under varying names; take the only one or the usual ones.
        names = list(loaded)
        chosen = (
            names[0] if len(names) == 1 else next((s for s in ("eval", "test", "train") if s in loaded), None)
        )
        if chosen is None:
            raise PromptFileError(f"{hub_id}: several splits ({', '.join(names)}); pass split=")
        loaded = loaded[chosen]
    return list(loaded)


def _text(where: str, row: dict[str, Any], name: str, benchmark: str) -> str:
    if name not in row or row[name] is None:
        raise PromptFileError(f"{where}: field {name!r} is missing ({benchmark} prompts need it)")
    value = row[name]
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}")
    return value


def _turn_list(where: str, row: dict[str, Any], benchmark: str, *, dict_turns: bool) -> list[str]:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise PromptFileError(
            f"{where}: field 'turns' must be a non-empty list ({benchmark} prompts need it)"
        )
    texts = []
    for k, turn in enumerate(turns):
        text = turn.get("content") if dict_turns and isinstance(turn, dict) else turn
        if not isinstance(text, str) or not text.strip():
            shape = '{"content": str}' if dict_turns else "a non-empty string"
            raise PromptFileError(f"{where}: field 'turns[{k}]' must be {shape}, got {turn!r:.60}")
        texts.append(text)
    return texts


def _parse_row(where: str, index: int, row: Any, benchmark: str) -> BenchmarkPrompt:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: a row must be an object, got {type(row).__name__}")
    if benchmark == "plain":
        turns = [_text(where, row, "prompt", benchmark)]
        ident, category = row.get("id", index), row.get("category", "")
        _check_messages(where, row.get("messages"))
    elif benchmark == "alpaca_eval":
        # A plain {"prompt"} file (the synthetic task's) can be answered in AlpacaEval's format too.
        name = "prompt" if "instruction" not in row and "prompt" in row else "instruction"
        turns = [_text(where, row, name, benchmark)]
        ident, category = row.get("id", index), row.get("dataset", "")
    elif benchmark == "arena_hard":
        if "question_id" in row:  # v0.1 question.jsonl
            turns, ident = _turn_list(where, row, benchmark, dict_turns=True), row["question_id"]
        elif "uid" in row:  # v2.0 question.jsonl
            turns, ident = [_text(where, row, "prompt", benchmark)], row["uid"]
        else:
            raise PromptFileError(
                f"{where}: field 'question_id' (v0.1) or 'uid' (v2.0) is missing (arena_hard)"
            )
        category = row.get("category", "")
    elif benchmark == "mt_bench":
        if "question_id" not in row:
            raise PromptFileError(f"{where}: field 'question_id' is missing (mt_bench prompts need it)")
        turns, ident, category = (
            _turn_list(where, row, benchmark, dict_turns=False),
            row["question_id"],
            row.get("category", ""),
        )
    else:
        raise ValueError(f"benchmark={benchmark!r} is not one of {', '.join(BENCHMARKS)}")
    if ident is None or str(ident) == "":
        raise PromptFileError(f"{where}: the prompt id is empty")
    return BenchmarkPrompt(id=str(ident), turns=turns, category=str(category or ""), source=dict(row))


def _check_messages(where: str, messages: Any) -> None:
    """A plain row's optional `messages`: {role, content} turns ending with the user turn to answer."""
    if messages is None:
        return
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                              and isinstance(m.get("content"), str) for m in messages)):
        raise PromptFileError(f"{where}: field 'messages' must be a list of {{role, content}} turns")
    if messages[-1]["role"] != "user":
        raise PromptFileError(f"{where}: field 'messages' must end with a user turn, got {messages[-1]['role']!r}")


def load_prompts(
    path_or_hub_id: str | Path, *, benchmark: str, split: str | None = None
) -> list[BenchmarkPrompt]:
    """Prompts of `benchmark` (plain, alpaca_eval, arena_hard, mt_bench) from a file or hub id (module doc).

    A malformed row stops with a one-line `PromptFileError` naming file, row (1-based) and field; ids must be
    unique (they key every answer file and the evaluation joins).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark={benchmark!r} is not one of {', '.join(BENCHMARKS)}")
    if not str(path_or_hub_id):
        raise PromptFileError("no prompt file given (generate.prompts is empty)")
    name, rows = _read_rows(str(path_or_hub_id), split)
    prompts: list[BenchmarkPrompt] = []
    first_row: dict[str, int] = {}
    for index, (number, row) in enumerate(rows):
        where = f"{name} row {number}"
        prompt = _parse_row(where, index, row, benchmark)
        if prompt.id in first_row:
            raise PromptFileError(
                f"{where}: id {prompt.id!r} repeats row {first_row[prompt.id]}; ids must be unique"
            )
        first_row[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{name}: no prompts")
    return prompts


# ------------------------------------------------------------------------------------------------ writing


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_generations(records: Sequence[GenerationRecord], path: str | Path, *, generator: str) -> Path:
    """`generations.jsonl`, one line per prompt:

    `{"id", "category", "turns": [user turn, ...], "outputs": [last-turn answer of each sample],
    "answers": [[sample 0's answer to each turn], ...], "n_tokens": same shape, "finish_reasons": same shape
    ("eos" | "stop" | "length"), "generator", "source": the original prompt row}`.
    `outputs` is `answers[j][-1]`, written out so single-turn readers need no indexing.
    """
    rows = []
    for r in records:
        row = {"id": r.id, "category": r.category, "turns": r.turns, "outputs": r.outputs}
        row |= {"answers": r.answers, "n_tokens": r.n_tokens, "finish_reasons": r.finish_reasons}
        rows.append(row | {"generator": generator, "source": r.source})
    path = Path(path)
    atomic_write_text(path, _jsonl(rows))
    return path


def read_generations(path: str | Path) -> list[GenerationRecord]:
    """The records of a `generations.jsonl` (see `write_generations`)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records.append(
                    GenerationRecord(
                        id=str(row["id"]),
                        turns=row["turns"],
                        answers=row["answers"],
                        n_tokens=row["n_tokens"],
                        finish_reasons=row["finish_reasons"],
                        category=row.get("category", ""),
                        source=row.get("source", {}),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise PromptFileError(f"{path} row {number}: not a generations.jsonl row ({err!r})") from None
    return records


def prompt_to_dict(prompt: BenchmarkPrompt) -> dict[str, Any]:
    return asdict(prompt)


__all__ = [
    "BENCHMARKS",
    "BENCHMARK_FILES",
    "GENERATIONS_FILE",
    "FINISH_REASONS",
    "PromptFileError",
    "BenchmarkPrompt",
    "GenerationRecord",
    "load_prompts",
    "write_generations",
    "read_generations",
    "prompt_to_dict",
]

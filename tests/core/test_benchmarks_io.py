"""Benchmark prompt loading (every accepted shape, every malformed row named) and the answer-file writers,
checked field by field against the formats AlpacaEval, Arena-Hard and FastChat document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selpo_core.benchmark_formats import (
    MT_BENCH_TEMPERATURES,
    markdown_counts,
    mt_bench_temperature,
    write_alpaca_eval,
    write_arena_hard,
    write_benchmark_file,
    write_mt_bench,
)
from selpo_core.benchmarks_io import (
    GenerationRecord,
    PromptFileError,
    load_prompts,
    read_generations,
    write_generations,
)


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -------------------------------------------------------------------------------------------- loading


def test_plain_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"id": 3, "prompt": "a b"}, {"id": "x", "prompt": "c", "category": "k"}]
    for path in (jsonl(tmp_path / "p.jsonl", rows), tmp_path / "p.parquet"):
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist([{"prompt": "a b"}, {"prompt": "c"}]), path)
        prompts = load_prompts(path, benchmark="plain")
        assert [p.turns for p in prompts] == [["a b"], ["c"]]
    assert [p.id for p in load_prompts(tmp_path / "p.jsonl", benchmark="plain")] == ["3", "x"]
    assert [p.id for p in prompts] == ["0", "1"]  # parquet rows without ids: the row index


def test_alpaca_eval_json_keeps_dataset(tmp_path: Path) -> None:
    path = tmp_path / "alpaca_eval.json"
    path.write_text(
        json.dumps([{"instruction": "Why?", "dataset": "helpful_base", "output": "ref", "generator": "g"}])
    )
    (prompt,) = load_prompts(path, benchmark="alpaca_eval")
    assert prompt.turns == ["Why?"] and prompt.category == "helpful_base" and prompt.id == "0"
    assert prompt.source["dataset"] == "helpful_base"


def test_alpaca_eval_takes_plain_prompt_rows(tmp_path: Path) -> None:
    # The synthetic task's prompts.jsonl ({"id", "prompt"}) answered in AlpacaEval's format (make demo).
    (prompt,) = load_prompts(jsonl(tmp_path / "p.jsonl", [{"id": 3, "prompt": "tell me"}]), benchmark="alpaca_eval")
    assert (prompt.id, prompt.turns, prompt.category) == ("3", ["tell me"], "")
    (entry,) = json.loads(write_alpaca_eval([record(3, [["answer"]], id=3, prompt="tell me")], tmp_path / "a.json",
                                            "m").read_text())
    assert entry == {"instruction": "turn 0", "output": "answer", "generator": "m", "dataset": "cat"}


def test_arena_hard_v01_and_v2(tmp_path: Path) -> None:
    v01 = jsonl(
        tmp_path / "v01.jsonl",
        [
            {
                "question_id": "328c1",
                "category": "arena-hard-v0.1",
                "cluster": "c",
                "turns": [{"content": "Hi?"}],
            },
        ],
    )
    v2 = jsonl(
        tmp_path / "v2.jsonl",
        [{"uid": "ab12", "category": "hard_prompt", "subcategory": "s", "prompt": "Q?"}],
    )
    (a,), (b,) = load_prompts(v01, benchmark="arena_hard"), load_prompts(v2, benchmark="arena_hard")
    assert (a.id, a.turns, a.category) == ("328c1", ["Hi?"], "arena-hard-v0.1")
    assert (b.id, b.turns, b.category) == ("ab12", ["Q?"], "hard_prompt")


def test_mt_bench_two_turns(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "question.jsonl",
        [
            {"question_id": 81, "category": "writing", "turns": ["Compose a blog.", "Rewrite it."]},
            {
                "question_id": 101,
                "category": "reasoning",
                "turns": ["A race?", "And now?"],
                "reference": ["x", "y"],
            },
        ],
    )
    prompts = load_prompts(path, benchmark="mt_bench")
    assert [(p.id, p.category, p.turns) for p in prompts] == [
        ("81", "writing", ["Compose a blog.", "Rewrite it."]),
        ("101", "reasoning", ["A race?", "And now?"]),
    ]
    assert prompts[0].source["question_id"] == 81  # the int survives for writing back


@pytest.mark.parametrize(
    ("bench", "rows", "row", "field"),
    [
        ("plain", [{"prompt": "ok"}, {"text": "no prompt"}], 2, "'prompt'"),
        ("plain", [{"prompt": ""}], 1, "'prompt'"),
        ("alpaca_eval", [{"text": "wrong field"}], 1, "'instruction'"),
        ("arena_hard", [{"question_id": "q", "turns": [{"text": "x"}]}], 1, "'turns[0]'"),
        ("arena_hard", [{"category": "c", "prompt": "no id"}], 1, "'question_id'"),
        ("mt_bench", [{"question_id": 1, "turns": []}], 1, "'turns'"),
        ("mt_bench", [{"question_id": 1, "turns": ["a", 5]}], 1, "'turns[1]'"),
        ("mt_bench", [{"turns": ["a"]}], 1, "'question_id'"),
        ("plain", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], 2, "repeats row 1"),
        ("plain", ["just a string"], 1, "must be an object"),
    ],
)
def test_malformed_rows_name_file_row_and_field(
    tmp_path: Path, bench: str, rows: list[Any], row: int, field: str
) -> None:
    path = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PromptFileError) as err:
        load_prompts(path, benchmark=bench)
    message = str(err.value)
    assert f"{path} row {row}" in message and field in message and "\n" not in message


def test_unreadable_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(PromptFileError, match=r"broken.jsonl row 3: not valid JSON"):
        load_prompts(broken, benchmark="plain")
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    with pytest.raises(PromptFileError, match="must hold a list"):
        load_prompts(tmp_path / "obj.json", benchmark="plain")
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompts(tmp_path / "missing.jsonl", benchmark="plain")
    (tmp_path / "p.csv").write_text("prompt\na\n")
    with pytest.raises(PromptFileError, match="unknown prompt file type"):
        load_prompts(tmp_path / "p.csv", benchmark="plain")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(tmp_path / "empty.jsonl", benchmark="plain")
    with pytest.raises(ValueError, match="benchmark"):
        load_prompts(broken, benchmark="mmlu")


# -------------------------------------------------------------------------------------------- writing


def record(qid: Any, answers: list[list[str]], **source: Any) -> GenerationRecord:
    turns = [f"turn {k}" for k in range(len(answers[0]))]
    return GenerationRecord(
        id=str(qid),
        turns=turns,
        answers=answers,
        n_tokens=[[len(a.split()) + 1 for a in s] for s in answers],
        finish_reasons=[["eos"] * len(s) for s in answers],
        category="cat",
        source=source,
    )


def test_alpaca_eval_writer(tmp_path: Path) -> None:
    records = [
        record(0, [["first answer"], ["other sample"]], instruction="Why?", dataset="helpful_base"),
        record(1, [["x"]], prompt="plain prompt"),
    ]
    path = write_alpaca_eval(records, tmp_path / "model_outputs.json", "my-model")
    assert json.loads(path.read_text()) == [
        {"instruction": "Why?", "output": "first answer", "generator": "my-model", "dataset": "helpful_base"},
        {"instruction": "turn 0", "output": "x", "generator": "my-model", "dataset": "cat"},
    ]
    with pytest.raises(ValueError, match="single-turn"):
        write_alpaca_eval([record(2, [["a", "b"]])], tmp_path / "x.json", "m")


def test_arena_hard_v01_writer(tmp_path: Path) -> None:
    records = [
        record("328c1", [["a b c"], ["d"]], question_id="328c1"),
        record("99", [["e f"]], question_id="99"),
    ]
    path = write_arena_hard(records, tmp_path / "answers.jsonl", "my-model")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"question_id", "answer_id", "model_id", "choices", "tstamp"}] * 2
    assert [r["question_id"] for r in rows] == ["328c1", "99"] and rows[0]["model_id"] == "my-model"
    assert rows[0]["choices"] == [
        {"index": 0, "turns": [{"content": "a b c", "token_len": 4}]},
        {"index": 1, "turns": [{"content": "d", "token_len": 2}]},
    ]
    assert isinstance(rows[0]["tstamp"], float) and len(rows[0]["answer_id"]) == 22
    again = [
        json.loads(line)
        for line in write_arena_hard(records, tmp_path / "b.jsonl", "my-model").read_text().splitlines()
    ]
    assert [r["answer_id"] for r in again] == [r["answer_id"] for r in rows]  # content hash, not random
    other = write_arena_hard(records, tmp_path / "c.jsonl", "another-model").read_text().splitlines()
    assert json.loads(other[0])["answer_id"] != rows[0]["answer_id"]


def test_arena_hard_v2_writer_field_by_field(tmp_path: Path) -> None:
    """arena-hard-auto v2.0 gen_answer.py: {uid, ans_id, model, messages, tstamp, metadata}, sample 0."""
    answer = "# Title\n## Part\n1. one\n2. two\n- dash\n* star\n**bold** and __under__\n```\n# not a header\n```"
    v2 = record("ab12", [[answer], ["second sample"]], uid="ab12", category="hard_prompt", prompt="Q?")
    path = write_arena_hard([v2], tmp_path / "answers.jsonl", "my-model")
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(row) == ["uid", "ans_id", "model", "messages", "tstamp", "metadata"]
    assert row["uid"] == "ab12" and row["model"] == "my-model"
    assert isinstance(row["ans_id"], str) and len(row["ans_id"]) == 22 and isinstance(row["tstamp"], float)
    assert row["messages"] == [
        {"role": "user", "content": "Q?"},  # the question's own prompt text
        {"role": "assistant", "content": {"answer": answer}},  # judges read messages[-1]["content"]["answer"]
    ]
    assert row["metadata"] == {
        "token_len": len(answer.split()) + 1,  # the record's n_tokens of sample 0
        "header_count": {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0},  # the code block's '#' not
        "list_count": {"ordered": 2, "unordered": 2},
        "bold_count": {"**": 1, "__": 1},
    }
    again = json.loads(write_arena_hard([v2], tmp_path / "b.jsonl", "my-model").read_text())
    assert again["ans_id"] == row["ans_id"]  # content hash, not random
    with pytest.raises(ValueError, match="single-turn"):
        write_arena_hard([record("x", [["a", "b"]], uid="x", prompt="p")], tmp_path / "c.jsonl", "m")


def test_markdown_counts_follow_arena_hard_auto() -> None:
    empty = {"header_count": {f"h{k}": 0 for k in range(1, 7)}, "list_count": {"ordered": 0, "unordered": 0},
             "bold_count": {"**": 0, "__": 0}}
    assert markdown_counts("plain words") == empty
    counts = markdown_counts("### three\n###### six\n#not a header\n  3. indented\n+ plus\n**a**b**")
    assert counts["header_count"] == {"h1": 0, "h2": 0, "h3": 1, "h4": 0, "h5": 0, "h6": 1}
    assert counts["list_count"] == {"ordered": 1, "unordered": 1} and counts["bold_count"] == {"**": 1, "__": 0}


def test_mt_bench_temperatures_are_fastchats_table() -> None:
    """fastchat/llm_judge/common.py temperature_config, field by field; gen_model_answer.py's 0.7 otherwise."""
    assert MT_BENCH_TEMPERATURES == {
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
    assert [mt_bench_temperature(c) for c in ("writing", "math", "stem", "arena-hard-200")] == [0.7, 0.0, 0.1, 0.0]
    assert mt_bench_temperature("unlisted") == 0.7 and mt_bench_temperature("") == 0.7


def test_mt_bench_writer(tmp_path: Path) -> None:
    records = [record(81, [["one", "two"], ["three", "four"]], question_id=81, category="writing")]
    path = write_mt_bench(records, tmp_path / "m.jsonl", "my-model")
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert row["question_id"] == 81 and isinstance(row["question_id"], int)  # FastChat matches the int id
    assert row["choices"] == [{"index": 0, "turns": ["one", "two"]}, {"index": 1, "turns": ["three", "four"]}]


def test_writers_are_atomic_and_generations_round_trip(tmp_path: Path) -> None:
    records = [record(81, [["one", "two"]], question_id=81), record(82, [["x", "y"]], question_id=82)]
    target = tmp_path / "mt_bench.jsonl"
    target.write_text("old content")
    assert write_benchmark_file("mt_bench", records, tmp_path, "m") == target
    assert "old content" not in target.read_text()
    assert write_benchmark_file("plain", records, tmp_path, "m") is None
    write_generations(records, tmp_path / "generations.jsonl", generator="m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "generations.jsonl",
        "mt_bench.jsonl",
    ]  # no temp files
    assert read_generations(tmp_path / "generations.jsonl") == records
    line = json.loads((tmp_path / "generations.jsonl").read_text().splitlines()[0])
    assert line["outputs"] == ["two"] and line["generator"] == "m"

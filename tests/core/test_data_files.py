"""Reading users' files: gzip, bad bytes, empty and unreadable files, each named with its row; the report of
every skipped and cut row; pipeline-internal copies that still name the user's file and row; SFT formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selpo_core.config import DataConfig
from selpo_core.data import (
    DataError,
    DataReport,
    load_preference_data,
    read_examples,
    read_sft_data,
    tokenize_pairs,
    write_examples,
)

ROWS = [
    {"prompt": "hello how are", "chosen": " good", "rejected": " bad"},
    {"prompt": "what is the color of the sky", "chosen": " blue", "rejected": " red"},
    {"prompt": "tell me about the cat", "chosen": " the cat sat", "rejected": " no"},
]


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def load(path: Path, **changes: Any) -> tuple[list[Any], DataReport]:
    return load_preference_data(DataConfig(path=str(path), **changes))


def test_gzipped_json_lines_and_json_read_like_plain(tmp_path):
    plain, _ = load(_write(tmp_path / "p.jsonl", jsonl(ROWS)))
    lines, _ = load(_write(tmp_path / "p.jsonl.gz", gzip.compress(jsonl(ROWS))))
    document, _ = load(_write(tmp_path / "p.json.gz", gzip.compress(json.dumps(ROWS).encode())))
    assert plain == lines == document and len(plain) == 3
    assert lines[0].source == str(tmp_path / "p.jsonl.gz")
    with pytest.raises(DataError, match=r"p2.jsonl.gz: not a readable gzip file"):
        load(_write(tmp_path / "p2.jsonl.gz", jsonl(ROWS)))  # not compressed at all
    with pytest.raises(DataError, match=r"cut.jsonl.gz: not a readable gzip file"):
        whole = gzip.compress(jsonl(ROWS * 50))
        load(_write(tmp_path / "cut.jsonl.gz", whole[: len(whole) // 2]))  # a truncated download


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_bad_byte_names_its_row_and_line(tmp_path):
    bad = b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}'
    path = _write(tmp_path / "p.jsonl", jsonl(ROWS[:2]) + b"\n" + bad + b"\n" + jsonl(ROWS[2:]))
    with pytest.raises(DataError) as info:
        load(path)
    assert str(info.value) == f"{path} row 3 (line 4): not valid UTF-8 (byte 0xe9 at byte 15 of the line)"
    examples, report = load(path, on_bad_row="skip")
    assert [e.row for e in examples] == [0, 1, 4] and report.skipped == {"invalid_utf8": 1}  # line 3 is blank
    document = _write(tmp_path / "d.json", json.dumps(ROWS, indent=1).encode().replace(b"sky", b"sk\xff"))
    with pytest.raises(DataError, match=r"d.json: not valid UTF-8 on line \d+ \(byte 0xff\)"):
        load(document)


def test_empty_and_unreadable_files_are_named(tmp_path):
    for name in ("e.jsonl", "e.json", "e.parquet", "e.jsonl.gz"):
        with pytest.raises(DataError, match=rf"^{tmp_path / name}: empty file \(0 bytes\)$"):
            load(_write(tmp_path / name, b""))
    with pytest.raises(DataError, match=r"^.*junk.parquet: not a readable Parquet file \("):
        load(_write(tmp_path / "junk.parquet", b"this is not parquet at all"))
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS * 100), good)
    data = good.read_bytes()
    with pytest.raises(DataError, match=r"^.*cut.parquet: not a readable Parquet file"):
        load(_write(tmp_path / "cut.parquet", data[: len(data) // 2]))
    with pytest.raises(DataError, match="file not found"):
        load(tmp_path / "nope.jsonl.gz")
    with pytest.raises(DataError, match="unsupported file type"):
        load(_write(tmp_path / "p.csv", b"prompt,chosen,rejected\n"))


def test_internal_copies_keep_the_users_row_and_file(tmp_path, word_tokenizer):
    user = _write(tmp_path / "mine.jsonl", jsonl([ROWS[0], {"prompt": "hi"}, ROWS[1], ROWS[2]]))
    examples, _ = load(user, on_bad_row="skip")
    internal = tmp_path / "runs" / "data-abc" / "train.jsonl"
    internal.parent.mkdir(parents=True)
    write_examples(internal, examples)
    again = read_examples(internal)
    assert again == examples and [(e.row, e.source) for e in again] == [(0, str(user)), (2, str(user)), (3, str(user))]
    cfg = DataConfig(max_length=5, max_prompt_length=3, on_too_long="skip")
    with pytest.raises(DataError) as info:  # a later stage's error names the user's file and row
        tokenize_pairs(again, word_tokenizer, cfg, source=str(internal))
    assert str(info.value).startswith(f"{user} row 2 (line 3) field 'prompt': too long")


def test_report_accounts_for_every_row(tmp_path):
    rows = [ROWS[0], {"prompt": "hi", "chosen": " ", "rejected": " b"}, ROWS[1], "[1]", ROWS[0], ROWS[2],
            {"prompt": "x", "chosen": " a", "rejected": " a"}]
    path = _write(tmp_path / "p.jsonl", b"".join(
        (r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows))
    examples, report = load(path, on_bad_row="skip")
    assert report.n_rows == 7 and report.n_kept == len(examples) == 3
    assert report.skipped == {"empty_response": 1, "not_an_object": 1, "duplicate": 1, "identical_responses": 1}
    assert [(r["row"], r["reason"], r["field"]) for r in report.skipped_records()] == [
        (1, "empty_response", "chosen"), (3, "not_an_object", None), (4, "duplicate", None),
        (6, "identical_responses", "rejected")]
    assert report.metrics() == {"data/n_rows": 7, "data/n_kept": 3, "data/n_skipped": 4, "data/n_truncated": 0,
                                "data/format": "standard", "data/skipped/duplicate": 1,
                                "data/skipped/empty_response": 1, "data/skipped/identical_responses": 1,
                                "data/skipped/not_an_object": 1}
    assert report.summary() == (
        f"{path}: kept 3 of 7 rows; skipped 1 duplicate (rows 4); skipped 1 empty_response (rows 1); "
        "skipped 1 identical_responses (rows 6); skipped 1 not_an_object (rows 3)")
    many = DataReport("f.jsonl", truncated={"oracle/prompt": list(range(10, 0, -1))})
    assert many.first_rows() == {"truncated/oracle/prompt": [1, 2, 3, 4, 5]}
    assert "cut 10 prompts for the oracle tokenizer (rows 1, 2, 3, 4, 5, ...)" in many.summary()


# ------------------------------------------------------------------------------------------------------ SFT


def test_sft_in_each_trl_format(tmp_path):
    user, assistant = {"role": "user", "content": "hello"}, {"role": "assistant", "content": "I am fine"}
    formats = {
        "prompt_completion.jsonl": [{"prompt": "hello", "completion": " I am fine"}],
        "conversational.jsonl": [{"prompt": [user], "completion": [assistant]}],
        "messages.jsonl.gz": [{"messages": [{"role": "system", "content": "be kind"}, user, assistant]}],
    }
    got = {}
    for name, rows in formats.items():
        data = jsonl(rows)
        path = _write(tmp_path / name, gzip.compress(data) if name.endswith(".gz") else data)
        (row,), report = read_sft_data(path)
        got[name] = (row["prompt"], row["completion"], row["row"], row["source"] == str(path), report.format)
    assert got == {
        "prompt_completion.jsonl": ("hello", " I am fine", 0, True, "prompt_completion"),
        "conversational.jsonl": ([user], "I am fine", 0, True, "prompt_completion"),
        "messages.jsonl.gz": ([{"role": "system", "content": "be kind"}, user], "I am fine", 0, True, "messages"),
    }
    bad = _write(tmp_path / "bad.jsonl", jsonl([{"messages": [user, assistant]}, {"messages": [user]},
                                                {"messages": [assistant, user]}]))
    with pytest.raises(DataError, match=r"bad.jsonl row 1 \(line 2\) field 'messages': expected turns ending"):
        read_sft_data(bad)
    rows, report = read_sft_data(bad, on_bad_row="skip")
    assert len(rows) == 1 and report.skipped == {"wrong_format": 2}
    text = _write(tmp_path / "text.jsonl", jsonl([{"text": "just some text"}]))
    with pytest.raises(DataError, match="field 'text': text-only rows"):
        read_sft_data(text)

"""A real-looking dialogue preference file (multi-turn, empty replies, long prompts, mixed lengths, duplicates) in
all three TRL formats, with two different BPE tokenizers trained in-process: the same pairs and the same row
accounting from every format, and the length rule applied once so weak-to-strong selection works with either
tokenizer as the oracle's."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import real_data_helpers as helpers

from selpo_core.config import DataConfig
from selpo_core.data import (
    DataError,
    check_lengths,
    kept_chars,
    load_preference_data,
    response_text,
    split_implicit_prompt,
    tokenize_pairs,
)

N_ROWS = 240


@pytest.fixture(scope="module")
def dialogues() -> list[helpers.Dialogue]:
    return helpers.dialogues(N_ROWS, seed=0)


@pytest.fixture(scope="module")
def tokenizers(dialogues) -> dict[str, Any]:
    corpus = helpers.corpus(dialogues)
    return {"bytelevel": helpers.bytelevel_tokenizer(corpus), "metaspace": helpers.metaspace_tokenizer(corpus)}


@pytest.fixture(scope="module")
def files(dialogues, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    return {fmt: helpers.write_rows(root / f"{fmt}.jsonl.gz", helpers.rows(dialogues, fmt))
            for fmt in ("standard", "conversational", "implicit")}


def expected_skips(dialogues: list[helpers.Dialogue]) -> dict[int, str]:
    """row -> reason, from the generator's own record of what each row is."""
    out, seen = {}, set()
    for row, d in enumerate(dialogues):
        key = (tuple(d.turns), d.chosen, d.rejected)
        if not d.chosen or not d.rejected:
            out[row] = "empty_response"
        elif key in seen:
            out[row] = "duplicate"
        seen.add(key)
    return out


def load(path: Path, **changes: Any) -> tuple[list[Any], Any]:
    return load_preference_data(DataConfig(path=str(path), on_bad_row="skip", **changes))


def test_every_format_keeps_the_same_pairs_and_names_the_same_skipped_rows(dialogues, files):
    skips = expected_skips(dialogues)
    assert {"empty_response", "duplicate"} <= set(skips.values())  # the fixture holds both kinds
    loaded = {fmt: load(path) for fmt, path in files.items()}
    for fmt, (examples, report) in loaded.items():
        assert report.format == fmt and report.n_rows == N_ROWS
        assert {r["row"]: r["reason"] for r in report.skipped_records()} == skips, fmt
        assert [e.row for e in examples] == [row for row in range(N_ROWS) if row not in skips]
    # The implicit split finds exactly the standard pairs: shared reply starts ("I", "I'm") and replies that
    # are a prefix of the other stay in the responses.
    standard, implicit = loaded["standard"][0], loaded["implicit"][0]
    assert [e.example_id for e in implicit] == [e.example_id for e in standard]
    conversational = loaded["conversational"][0]
    assert [response_text(e.chosen) for e in conversational] == [e.chosen[1:] for e in standard]
    shared = [d for d in dialogues if "shared_start" in d.kind or "prefix" in d.kind]
    assert len(shared) > 30
    # TRL's common-prefix rule would have moved the shared start into the prompt (or lost the row).
    raw_prefix_moved = 0
    for d in shared:
        row = helpers.rows([d], "implicit")[0]
        prompt, _, _ = split_implicit_prompt(row["chosen"], row["rejected"])
        n = 0
        while n < min(len(row["chosen"]), len(row["rejected"])) and row["chosen"][n] == row["rejected"][n]:
            n += 1
        raw_prefix_moved += n > len(prompt) + 1
        assert prompt.endswith("\n\nAssistant:")
    assert raw_prefix_moved == len(shared)


def test_parquet_and_plain_json_read_like_gzipped_lines(dialogues, files, tmp_path):
    gz, _ = load(files["conversational"])
    rows = helpers.rows(dialogues, "conversational")
    for name in ("c.parquet", "c.json", "c.jsonl"):
        again, _ = load(helpers.write_rows(tmp_path / name, rows))
        assert again == gz and [e.row for e in again] == [e.row for e in gz]


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_truncation_keeps_every_pair_and_counts_cuts_per_tokenizer(dialogues, files, tokenizers, fmt):
    examples, _ = load(files[fmt])
    cfg = DataConfig(path=str(files[fmt]))  # defaults: 1024 / 512, keep_end, truncate
    kept, report = check_lengths(examples, tokenizers, cfg)
    assert kept == examples and report.skipped == {}
    assert report.prompt_template == ("raw" if fmt == "standard" else "chat")
    long_rows = {row for row, d in enumerate(dialogues) if "long_prompt" in d.kind}
    for name in tokenizers:
        assert 0 < len(report.truncated[f"{name}/prompt"]) and set(report.truncated[f"{name}/prompt"]) <= long_rows
        assert len(report.truncated[f"{name}/response"]) > 0
    for name, tokenizer in tokenizers.items():
        pairs, _ = tokenize_pairs(kept, tokenizer, cfg, prompt_template=report.prompt_template, name=name)
        assert [p.example_id for p in pairs] == [e.example_id for e in examples]
        assert max(p.length for p in pairs) <= cfg.max_length
        assert max(len(p.prompt_ids) for p in pairs if p.length == cfg.max_length) <= cfg.max_prompt_length


def _score_rows(oracle_pairs: list[Any], seed: int) -> dict[tuple[str, str], dict[str, Any]]:
    """What the score stage stores per response: the oracle's tokens, offsets, text and token rewards."""
    rng = random.Random(seed)
    rows = {}
    for pair in oracle_pairs:
        for side in ("chosen", "rejected"):
            ids, offsets = getattr(pair, f"{side}_ids"), getattr(pair, f"{side}_offsets")
            rows[(pair.example_id, side)] = {
                "token_ids": ids, "offset_start": [s for s, _ in offsets], "offset_end": [e for _, e in offsets],
                "text": getattr(pair, f"{side}_text"), "rewards": [rng.uniform(-1, 1) for _ in ids]}
    return rows


@pytest.mark.parametrize("on_too_long", ["truncate", "skip"])
@pytest.mark.parametrize("oracle", ["bytelevel", "metaspace"])
def test_weak_to_strong_selection_sees_the_same_pairs_in_both_directions(files, tokenizers, oracle, on_too_long):
    from selpo_core.selection_stage import _policy_rows

    policy = next(name for name in tokenizers if name != oracle)
    examples, _ = load(files["standard"])
    cfg = DataConfig(path=str(files["standard"]), max_length=256, max_prompt_length=128, on_too_long=on_too_long)
    kept, report = check_lengths(examples, {"policy": tokenizers[policy], "oracle": tokenizers[oracle]}, cfg)
    alone = [{e.example_id for e in check_lengths(examples, {n: tokenizers[n]}, cfg)[0]} for n in (policy, oracle)]
    assert {e.example_id for e in kept} == alone[0] & alone[1]
    if on_too_long == "skip":
        assert alone[0] != alone[1] and report.skipped["too_long"] == len(examples) - len(kept) > 0
    oracle_pairs, _ = tokenize_pairs(kept, tokenizers[oracle], cfg)
    policy_pairs, _ = tokenize_pairs(kept, tokenizers[policy], cfg)
    scores = _score_rows(oracle_pairs, seed=0)
    rows = _policy_rows(scores, policy_pairs)  # raised "scores were computed on other data" before the fix
    assert len(rows) == 2 * len(kept)
    by_key = {(p.example_id, side): p for p in oracle_pairs for side in ("chosen", "rejected")}
    for row in rows:
        oracle_offsets = getattr(by_key[(row["example_id"], row["side"])], f"{row['side']}_offsets")
        kept = kept_chars(oracle_offsets)
        beyond = [end > start >= kept for start, end in zip(row["offset_start"], row["offset_end"])]
        assert all(r == 0.0 for r, out in zip(row["rewards"], beyond) if out)  # no oracle token there: neutral


def test_too_long_as_an_error_names_the_users_file_and_row(files, tokenizers):
    examples, _ = load(files["implicit"])
    cfg = DataConfig(path=str(files["implicit"]), on_too_long="error")
    with pytest.raises(DataError) as info:
        check_lengths(examples, tokenizers, cfg)
    _, skipping = check_lengths(examples, tokenizers, dataclasses.replace(cfg, on_too_long="skip"))
    first = skipping.skipped_records()[0]
    assert str(info.value) == first["message"].replace("on_too_long=skip", "on_too_long=error")
    assert str(info.value).startswith(f"{files['implicit']} row {first['row']} (line {first['row'] + 1}) field ")

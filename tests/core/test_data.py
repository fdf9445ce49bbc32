"""selpo_core.data / batching: TRL formats from JSONL and Parquet, one-line row errors, stable ids and splits,
tokenization with offsets and masks, truncation, length bucketing and pair collation."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selpo_core.config import DataConfig
from selpo_core.data import (
    DataError,
    DataReport,
    PreferenceExample,
    TokenizedPair,
    TokenizedSFT,
    collate_pairs,
    collate_sft,
    example_id,
    length_bucketed_batches,
    load_preference_data,
    load_sft_data,
    pad_fraction,
    sft_rows_from_examples,
    split_heldout,
    split_implicit_prompt,
    token_budget_batches,
    tokenize_pairs,
    tokenize_sft,
)

QUESTION = "what is the color of the sky"
STANDARD = [
    {"prompt": f"Human: {QUESTION} Assistant:", "chosen": " blue", "rejected": " red"},
    {"prompt": "Human: what is two plus two Assistant:", "chosen": " four", "rejected": " five very good"},
    {"prompt": "Human: tell me about the cat Assistant:", "chosen": " the cat sat on it", "rejected": " no"},
]


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONAL = [
    {"prompt": [turn("user", QUESTION)],
     "chosen": [turn("assistant", "blue")], "rejected": [turn("assistant", "red")]},
    {"prompt": [turn("system", "be good"), turn("user", "what is two plus two")],
     "chosen": [turn("assistant", "four")], "rejected": [turn("assistant", "five")]},
]
HH = "\n\nHuman: what is two plus two\n\nAssistant:"
HH_SKY = f"\n\nHuman: {QUESTION}\n\nAssistant:"
IMPLICIT = [
    {"chosen": HH + " four", "rejected": HH + " three"},
    {"chosen": HH_SKY + " blue", "rejected": HH_SKY + " no"},
]
# (rows, expected prompt, expected chosen text, expected rejected text) of each format's first row
EXPECTED = {
    "standard": (STANDARD, f"Human: {QUESTION} Assistant:", " blue", " red"),
    "conversational": (CONVERSATIONAL, f"user: {QUESTION} assistant:", "blue", "red"),
    "implicit": (IMPLICIT, HH, " four", " three"),
}


def write_rows(path: Path, rows: list[Any]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cfg(path: Path | str, **changes: Any) -> DataConfig:
    return DataConfig(path=str(path), **changes)


def words(text: str) -> str:
    return " ".join(text.split())  # what the whitespace word tokenizer decodes a text to


# ------------------------------------------------------------------------------------------ formats and files


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", ["standard", "conversational", "implicit"])
def test_each_format_round_trips_from_file(tmp_path, word_tokenizer, fmt, suffix):
    rows, prompt, chosen, rejected = EXPECTED[fmt]
    path = write_rows(tmp_path / f"pairs{suffix}", rows)
    examples, report = load_preference_data(cfg(path))
    assert report.format == fmt and report.n_rows == report.n_kept == len(rows) and not report.skipped
    pairs, tok_report = tokenize_pairs(examples, word_tokenizer, cfg(path), source=str(path))
    assert tok_report.n_kept == len(rows) and tok_report.n_truncated == 0
    pair = pairs[0]
    eos = word_tokenizer.eos_token_id
    assert word_tokenizer.decode(pair.prompt_ids) == words(prompt)
    for ids, text, offsets, expected in (
        (pair.chosen_ids, pair.chosen_text, pair.chosen_offsets, chosen),
        (pair.rejected_ids, pair.rejected_text, pair.rejected_offsets, rejected),
    ):
        assert text == expected
        assert ids[-1] == eos and eos not in ids[:-1]
        assert word_tokenizer.decode(ids[:-1]) == words(text)
        assert offsets[-1] == (len(text), len(text))  # EOS: empty span at the end
        assert [text[s:e] for s, e in offsets[:-1]] == word_tokenizer.convert_ids_to_tokens(ids[:-1])


def test_same_ids_from_jsonl_and_parquet(tmp_path):
    a, _ = load_preference_data(cfg(write_rows(tmp_path / "p.jsonl", CONVERSATIONAL)))
    b, _ = load_preference_data(cfg(write_rows(tmp_path / "p.parquet", CONVERSATIONAL)))
    assert [e.example_id for e in a] == [e.example_id for e in b]
    assert a == b


def test_json_list_and_wrapped_list(tmp_path):
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(STANDARD))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": STANDARD}))
    lines = write_rows(tmp_path / "lines.json", STANDARD)  # JSON lines under a .json name (datasets' to_json)
    ids = [[e.example_id for e in load_preference_data(cfg(p))[0]] for p in (plain, wrapped, lines)]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 3
    one = write_rows(tmp_path / "one.json", STANDARD[:1])  # a single row is one JSON object
    assert [e.example_id for e in load_preference_data(cfg(one))[0]] == ids[0][:1]
    # U+2028 inside a string is valid JSON (ensure_ascii=False writes it raw); it must not split the line.
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({**STANDARD[0], "chosen": " blue\u2028sky"}, ensure_ascii=False) + "\n")
    assert load_preference_data(cfg(odd))[0][0].chosen == " blue\u2028sky"
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
        load_preference_data(cfg(tmp_path / "pairs.csv"))


def test_implicit_prompt_splits_at_the_last_shared_assistant_marker():
    assert split_implicit_prompt(HH + " four", HH + " three") == (HH, " four", " three")
    # A shared response start stays in the responses: the boundary is the marker, not the common prefix.
    assert split_implicit_prompt(HH + " four", HH + " five") == (HH, " four", " five")
    assert split_implicit_prompt(HH + " I'm sure", HH + " I'm not") == (HH, " I'm sure", " I'm not")
    # A rejected reply that is a prefix of the chosen one keeps both responses.
    assert split_implicit_prompt(HH + " I can help", HH + " I can") == (HH, " I can help", " I can")
    # Multi-turn: the last marker both share, not an earlier turn's.
    two = HH + " four\n\nHuman: and three plus three\n\nAssistant:"
    assert split_implicit_prompt(two + " six", two + " seven") == (two, " six", " seven")
    chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert split_implicit_prompt(chatml + "I am", chatml + "I was") == (chatml, "I am", "I was")
    # Without any marker: TRL's common prefix, moved back to a word start and over one space.
    assert split_implicit_prompt("abcX", "abcY") == ("abc", "X", "Y")  # no word start to move back to
    assert split_implicit_prompt("Q: I think A", "Q: I think B") == ("Q: I think", " A", " B")
    assert split_implicit_prompt("Q: four", "Q: five") == ("Q:", " four", " five")


def test_implicit_conversational_and_full_conversation_responses(tmp_path):
    user, blue, red = turn("user", QUESTION), turn("assistant", "blue"), turn("assistant", "red")
    implicit, _ = load_preference_data(cfg(write_rows(tmp_path / "i.jsonl", [{"chosen": [user, blue],
                                                                               "rejected": [user, red]}])))
    assert implicit[0].prompt == [user] and implicit[0].chosen == [blue] and implicit[0].rejected == [red]
    # UltraFeedback-style: a string prompt and whole conversations in chosen/rejected.
    ultra, report = load_preference_data(cfg(write_rows(tmp_path / "u.jsonl", [{
        "prompt": QUESTION, "chosen": [user, blue], "rejected": [user, red]}])))
    assert report.format == "conversational"
    assert (ultra[0].prompt, ultra[0].chosen, ultra[0].rejected) == ([user], [blue], [red])
    assert ultra[0].example_id == implicit[0].example_id  # same pair, same id


# ----------------------------------------------------------------------------------------- malformed rows

GOOD_ROWS = {"standard": STANDARD, "conversational": CONVERSATIONAL, "implicit": IMPLICIT}
ASSISTANT = {"role": "assistant", "content": "red"}
MALFORMED = {
    # name: (format of the good rows around it, the bad row, field or None, reason, words of the message)
    "missing": ("standard", {"prompt": "hi", "chosen": " blue"}, "rejected", "missing_field", "missing"),
    "null": ("standard", {"prompt": None, "chosen": " a", "rejected": " b"}, "prompt", "missing_field",
             "missing"),
    "empty": ("standard", {"prompt": "hi", "chosen": "  ", "rejected": " no"}, "chosen", "empty_response",
              "empty response"),
    "identical": ("standard", {"prompt": "hi", "chosen": " a", "rejected": " a"}, "rejected",
                  "identical_responses", "identical"),
    "number": ("standard", {"prompt": "hi", "chosen": 3, "rejected": " no"}, "chosen", "wrong_type", "int"),
    "empty_prompt": ("standard", {"prompt": " ", "chosen": " a", "rejected": " b"}, "prompt", "empty_prompt",
                     "empty prompt"),
    "no_role": ("conversational", {"prompt": "hi", "chosen": [{"content": "blue"}], "rejected": [ASSISTANT]},
                "chosen", "wrong_type", "message 0 has no string 'role'"),
    "two_turns": ("conversational", {"prompt": "hi", "chosen": [ASSISTANT] * 2, "rejected": [ASSISTANT]},
                  "chosen", "wrong_format", "one assistant message"),
    "other_format": ("implicit", STANDARD[1], "prompt", "wrong_format", "implicit"),
    "conversational_row_in_standard": ("standard", CONVERSATIONAL[1], "prompt", "wrong_type", "got list"),
    "implicit_prefix": ("implicit", {"chosen": "Q: a", "rejected": "Q: a b"}, "chosen", "empty_response",
                        "empty response"),
    "invalid_json": ("standard", '{"prompt": "hi", "chosen":', None, "invalid_json", "invalid JSON"),
    "invalid_utf8": ("standard", b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}', None, "invalid_utf8",
                     "not valid UTF-8 (byte 0xe9 at byte 15 of the line)"),
    "not_object": ("standard", "[1, 2]", None, "not_an_object", "expected an object, got list"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_row_is_one_line_error_or_counted_skip(tmp_path, name):
    fmt, bad, field, reason, detail = MALFORMED[name]
    good = GOOD_ROWS[fmt]
    path = tmp_path / "pairs.jsonl"
    bad_bytes = bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode()
    path.write_bytes(b"\n".join([json.dumps(good[0]).encode(), bad_bytes, json.dumps(good[1]).encode(), b""]))
    with pytest.raises(DataError) as info:
        load_preference_data(cfg(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path} row 1 (line 2)")
    assert (f"field {field!r}" in message) if field else "field" not in message
    assert detail in message
    examples, report = load_preference_data(cfg(path, on_bad_row="skip"))
    assert report.skipped == {reason: 1} and report.format == fmt
    assert report.n_rows == 3 and report.n_kept == len(examples) == 2
    assert report.skipped_rows == [{"row": 1, "reason": reason, "field": field, "message": message}]
    assert [e.row for e in examples] == [0, 2] and {e.source for e in examples} == {str(path)}


def test_missing_file_and_all_rows_bad(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_preference_data(cfg(tmp_path / "nope.jsonl"))
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "hi"}])
    with pytest.raises(DataError, match="no usable rows"):
        load_preference_data(cfg(bad, on_bad_row="skip"))


def test_duplicates_are_skipped_and_counted(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [STANDARD[0], STANDARD[1], STANDARD[0]])
    examples, report = load_preference_data(cfg(path))  # even with on_bad_row=error
    assert len(examples) == 2 and report.skipped == {"duplicate": 1} and report.n_rows == 3


# ---------------------------------------------------------------------------------------- ids and splitting


def test_example_id_is_stable_content_hash(tmp_path):
    forward, _ = load_preference_data(cfg(write_rows(tmp_path / "a.jsonl", STANDARD)))
    backward, _ = load_preference_data(cfg(write_rows(tmp_path / "b.jsonl", STANDARD[::-1])))
    assert {e.prompt: e.example_id for e in forward} == {e.prompt: e.example_id for e in backward}
    first = forward[0]
    assert first.example_id == example_id(first.prompt, first.chosen, first.rejected)
    assert len(first.example_id) == 16 and int(first.example_id, 16) >= 0
    assert len({e.example_id for e in forward}) == 3
    assert example_id("p", " a", " b") != example_id("p", " b", " a")  # chosen/rejected order matters


def _examples(n: int, start: int = 0) -> list[PreferenceExample]:
    prompts = [f"p{i}" for i in range(start, start + n)]
    return [PreferenceExample(example_id(p, "a", "b"), p, "a", "b") for p in prompts]


def test_heldout_split_is_stable_under_reorder_and_additions():
    examples = _examples(400)
    train, heldout = split_heldout(examples, 0.2, seed=0)
    assert {e.example_id for e in train}.isdisjoint(e.example_id for e in heldout)
    assert len(train) + len(heldout) == 400 and 40 <= len(heldout) <= 120
    shuffled = examples[::-1] + _examples(100, start=400)
    _, heldout2 = split_heldout(shuffled, 0.2, seed=0)
    original = {e.example_id for e in examples}
    assert {e.example_id for e in heldout2 if e.example_id in original} == {e.example_id for e in heldout}
    _, other_seed = split_heldout(examples, 0.2, seed=1)
    assert {e.example_id for e in other_seed} != {e.example_id for e in heldout}
    assert split_heldout(examples, 0.0, seed=0) == (examples, [])


# ------------------------------------------------------------------------------------ tokenization and masks


def test_loss_mask_covers_exactly_response_and_eos(tmp_path, word_tokenizer):
    path = write_rows(tmp_path / "p.jsonl", STANDARD)
    pairs, _ = tokenize_pairs(load_preference_data(cfg(path))[0], word_tokenizer, cfg(path), source=str(path))
    batch = collate_pairs(pairs, word_tokenizer.pad_token_id)
    n = len(pairs)
    assert batch["loss_mask"].dtype == torch.bool and batch["input_ids"].shape[0] == 2 * n
    for row in range(2 * n):
        pair = pairs[row % n]
        response = pair.chosen_ids if row < n else pair.rejected_ids
        start, end = len(pair.prompt_ids), len(pair.prompt_ids) + len(response)
        assert batch["loss_mask"][row].nonzero().flatten().tolist() == list(range(start, end))
        assert batch["input_ids"][row, end - 1] == word_tokenizer.eos_token_id
        assert batch["attention_mask"][row].tolist() == [1] * end + [0] * (batch["input_ids"].shape[1] - end)
        assert batch["input_ids"][row, :end].tolist() == pair.prompt_ids + response


def test_truncation_cuts_the_response_at_the_end(tmp_path, word_tokenizer):
    long = " " + " ".join(f"w{i}" for i in range(10))
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": "hello how are", "chosen": long, "rejected": " no"}])
    data_cfg = cfg(path, max_length=8, max_prompt_length=4)
    pairs, report = tokenize_pairs(load_preference_data(data_cfg)[0], word_tokenizer, data_cfg)
    pair = pairs[0]
    assert word_tokenizer.decode(pair.prompt_ids) == "hello how are"  # 3 <= max_prompt_length: kept whole
    assert word_tokenizer.convert_ids_to_tokens(pair.chosen_ids) == ["w0", "w1", "w2", "w3", "w4"]  # no EOS
    assert len(pair.chosen_offsets) == 5 and pair.chosen_text == long
    assert pair.rejected_ids == [word_tokenizer.convert_tokens_to_ids("no"), word_tokenizer.eos_token_id]
    assert report.n_truncated == 1 and report.n_kept == 1 and report.truncated == {"tokenizer/response": [0]}


def test_too_long_pair_errors_or_is_refused_after_the_data_stage(tmp_path, word_tokenizer):
    rows = [{"prompt": "hi", "chosen": " a", "rejected": " b"},
            {"prompt": "w1 w2 w3 w4 w5 w6", "chosen": " yes", "rejected": " no"}]
    path = write_rows(tmp_path / "long.jsonl", rows)
    examples, _ = load_preference_data(cfg(path))
    # A long prompt whose pair fits max_length is never touched, whatever max_prompt_length says.
    fits, report = tokenize_pairs(examples, word_tokenizer, cfg(path, max_length=8, max_prompt_length=5))
    assert len(fits[1].prompt_ids) == 6 and report.n_truncated == 0
    strict = cfg(path, max_length=7, max_prompt_length=5, on_too_long="skip")
    with pytest.raises(DataError) as info:
        tokenize_pairs(examples, word_tokenizer, strict)
    assert str(info.value) == (
        f"{path} row 1 (line 2) field 'prompt': too long: prompt 6 + chosen 2 tokens "
        "(EOS included) > data.max_length=7 (data.on_too_long=skip), yet the data stage kept it: the data stage "
        "must check lengths with every tokenizer the run uses (tokenization.check_lengths)")
    # Without a file row (e.g. examples rebuilt by hand), the example id names the pair.
    bare = [PreferenceExample(e.example_id, e.prompt, e.chosen, e.rejected) for e in examples]
    with pytest.raises(DataError, match=f"^s example {bare[1].example_id} field 'prompt'"):
        tokenize_pairs(bare, word_tokenizer, strict, source="s")


def test_bos_follows_the_tokenizer_convention(make_word_tokenizer):
    with_bos = make_word_tokenizer(bos=True)
    bos = with_bos.bos_token_id
    example = PreferenceExample("x", "hello how are", " good", " bad")
    doubled = PreferenceExample("y", "<bos> hello", " good", " bad")
    pairs, _ = tokenize_pairs([example, doubled], with_bos, DataConfig(), source="s")
    assert pairs[0].prompt_ids[0] == bos and pairs[0].prompt_ids.count(bos) == 1
    assert pairs[1].prompt_ids.count(bos) == 1  # a prompt that already starts with BOS gets no second one
    assert bos not in pairs[0].chosen_ids
    no_bos, _ = tokenize_pairs([example], make_word_tokenizer(), DataConfig(), source="s")
    assert len(no_bos[0].prompt_ids) == 3


def test_tokenizer_requirements(word_tokenizer):
    chat = PreferenceExample("x", [turn("user", "hi")], [turn("assistant", "a")], [turn("assistant", "b")])
    word_tokenizer.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        tokenize_pairs([chat], word_tokenizer, DataConfig(), source="s")
    slow = types.SimpleNamespace(is_fast=False, eos_token_id=1)
    with pytest.raises(DataError, match="not a fast tokenizer"):
        tokenize_pairs([chat], slow, DataConfig(), source="s")


def test_report_merge():
    load = DataReport("f", n_rows=10, n_kept=8, skipped={"duplicate": 2}, format="standard",
                      skipped_rows=[{"row": 3, "reason": "duplicate", "field": None, "message": "m3"},
                                    {"row": 7, "reason": "duplicate", "field": None, "message": "m7"}])
    tok = DataReport("f", n_rows=8, n_kept=7, skipped={"too_long": 1}, truncated={"policy/response": [1, 4, 5]},
                     skipped_rows=[{"row": 5, "reason": "too_long", "field": "prompt", "message": "m5"}],
                     prompt_template="raw")
    merged = load.merge(tok)
    assert (merged.n_rows, merged.n_kept, merged.n_truncated, merged.prompt_template) == (10, 7, 3, "raw")
    assert merged.skipped == {"duplicate": 2, "too_long": 1} and merged.format == "standard"
    assert [r["row"] for r in merged.skipped_records()] == [3, 5, 7]


# ------------------------------------------------------------------------------------------------------ SFT


def test_sft_load_tokenize_collate(tmp_path, word_tokenizer):
    path = tmp_path / "sft.jsonl"
    good = {"prompt": "hello how are", "completion": " I am fine"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path} row 1 \(line 2\) field 'completion': missing$"):
        load_sft_data(path)
    rows = load_sft_data(path, on_bad_row="skip")
    assert [(r["prompt"], r["completion"]) for r in rows] == [(good["prompt"], good["completion"])]
    items = tokenize_sft(rows, word_tokenizer, DataConfig())
    assert word_tokenizer.decode(items[0].prompt_ids) == "hello how are"
    assert word_tokenizer.decode(items[0].completion_ids) == "I am fine <eos>"
    batch = collate_sft([items[0], TokenizedSFT([5], [6, 1])], pad_token_id=0)
    assert batch["input_ids"].tolist()[1] == [5, 6, 1, 0, 0, 0, 0]
    assert batch["loss_mask"].tolist()[1] == [False, True, True, False, False, False, False]
    assert batch["loss_mask"][0].sum() == 4 and batch["attention_mask"][0].sum() == 7


def test_sft_rows_from_examples(tmp_path):
    examples, _ = load_preference_data(cfg(write_rows(tmp_path / "c.jsonl", CONVERSATIONAL)))
    rows = sft_rows_from_examples(examples)
    assert rows[0] == {"prompt": CONVERSATIONAL[0]["prompt"], "completion": "blue", "row": 0,
                       "source": str(tmp_path / "c.jsonl")}


# ---------------------------------------------------------------------------------------------- batching


def skewed_lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(200, 400) if rng.random() < 0.1 else rng.randint(5, 20) for _ in range(n)]


def test_bucketed_batches_cover_once_and_pad_less_than_random():
    lengths = skewed_lengths()
    batches = length_bucketed_batches(lengths, 16, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert sum(len(b) != 16 for b in batches) <= 1  # windows are whole batches: only one may be partial
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    random_batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    bucketed, plain = pad_fraction(batches, lengths), pad_fraction(random_batches, lengths)
    assert bucketed < 0.15 and plain > 0.6, (bucketed, plain)
    assert batches == length_bucketed_batches(lengths, 16, seed=0)
    assert batches != length_bucketed_batches(lengths, 16, seed=1)
    # Batch order is random, not by length (also not within one window of 50 batches).
    firsts = [lengths[b[0]] for b in batches[:50]]
    assert firsts != sorted(firsts)


def test_unshuffled_batches_are_sorted():
    lengths = [5, 1, 4, 2, 3]
    assert length_bucketed_batches(lengths, 2, seed=0, shuffle=False) == [[1, 3], [4, 2], [0]]


def test_token_budget_batches():
    lengths = [10, 3, 50, 7, 7, 200]
    batches = token_budget_batches(lengths, 40)
    assert batches == [[5], [2], [0, 3, 4, 1]]  # longest first; over-budget rows go alone
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 40
    assert pad_fraction([[0, 1]], [2, 4]) == 0.25 and pad_fraction([], []) == 0.0


# ------------------------------------------------------------------------------------------------- collate


def hand_pairs() -> list[TokenizedPair]:
    a = TokenizedPair("a", [5, 6], [7, 1], [8, 9, 1], "x", "y z", [(0, 1), (1, 1)], [(0, 1), (2, 3), (3, 3)])
    b = TokenizedPair("b", [5], [10, 1], [11, 1], "p", "q", [(0, 1), (1, 1)], [(0, 1), (1, 1)])
    return [a, b]


def test_collate_pairs_hand_case():
    batch = collate_pairs(
        hand_pairs(), 0,
        chosen_selected=[[True, False], [False, True]],
        rejected_selected=[[False, True, False], [True, False]],
        chosen_ref_logps=[[-1, -2], [-3, -4]], rejected_ref_logps=[[-5, -6, -7], [-8, -9]],
    )
    assert batch["example_ids"] == ["a", "b"]
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 1, 0], [5, 10, 1, 0, 0], [5, 6, 8, 9, 1], [5, 11, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1] * 5, [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].int().tolist() == [
        [0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["selected_mask"].int().tolist() == [
        [0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
    assert batch["ref_per_token_logps"].tolist() == [
        [0, 0, -1, -2, 0], [0, -3, -4, 0, 0], [0, 0, -5, -6, -7], [0, -8, -9, 0, 0]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == batch["selected_mask"].dtype == torch.bool
    assert batch["ref_per_token_logps"].dtype == torch.float32
    assert not (batch["selected_mask"] & ~batch["loss_mask"]).any()
    plain = collate_pairs(hand_pairs(), 0)
    assert set(plain) == {"input_ids", "attention_mask", "loss_mask", "example_ids"}


def test_collate_pairs_rejects_misaligned_extras():
    with pytest.raises(ValueError, match="example a: 1 values for 2 response tokens"):
        collate_pairs(hand_pairs(), 0, chosen_selected=[[True], [True, True]],
                      rejected_selected=[[True] * 3, [True] * 2])
    with pytest.raises(ValueError, match="give both"):
        collate_pairs(hand_pairs(), 0, chosen_ref_logps=[[0.0, 0.0], [0.0, 0.0]])

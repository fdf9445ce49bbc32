"""The synthetic task: determinism, ground truth consistency, prompt hygiene, and the tokenizer contract."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from selpo_core.config import ConfigError, SyntheticConfig, load_run_config
from selpo_core.synthetic import (
    EOS,
    PAD,
    THINGS,
    GroundTruth,
    make_prompts,
    make_vocabulary,
    write_task,
)

SMALL = SyntheticConfig(
    seed=3, n_filler=60, n_positive=6, n_negative=6, n_sft=300, n_pairs=200, n_heldout_prompts=16
)
FILES = ("sft.jsonl", "pairs.jsonl", "truth.jsonl", "prompts.jsonl", "task.json", "tokenizer/tokenizer.json")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("task")
    return out, write_task(SMALL, out)


def test_layout_matches_contract(task: tuple[Path, dict]) -> None:
    out, counts = task
    for name in ("sft.jsonl", "pairs.jsonl", "truth.jsonl", "prompts.jsonl", "task.json", "tokenizer"):
        assert (out / name).exists(), name
    assert set(_rows(out / "sft.jsonl")[0]) == {"prompt", "completion"}
    assert set(_rows(out / "pairs.jsonl")[0]) == {"prompt", "chosen", "rejected"}
    assert set(_rows(out / "prompts.jsonl")[0]) == {"id", "prompt"}
    task_json = json.loads((out / "task.json").read_text())
    assert task_json["counts"] == counts
    assert counts["n_sft"] == len(_rows(out / "sft.jsonl")) == SMALL.n_sft
    # Ties are dropped and counted: written + dropped = requested.
    assert counts["n_pairs"] == len(_rows(out / "pairs.jsonl")) == len(_rows(out / "truth.jsonl"))
    assert counts["n_pairs"] + counts["n_ties_dropped"] == SMALL.n_pairs
    assert 0 < counts["n_ties_dropped"] < SMALL.n_pairs // 2


def test_same_seed_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    write_task(SMALL, tmp_path / "a")
    write_task(SMALL, tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) >= 8  # 5 files + tokenizer files
    assert all(a[name] == b[name] for name in a)
    write_task(dataclasses.replace(SMALL, seed=SMALL.seed + 1), tmp_path / "c")
    c = _files(tmp_path / "c")
    for name in FILES:
        assert c[name] != a[name], name


def test_ground_truth_agrees_with_truth_file(task: tuple[Path, dict]) -> None:
    out, _ = task
    truth = GroundTruth.load(out)
    pairs, truths = _rows(out / "pairs.jsonl"), _rows(out / "truth.jsonl")
    for pair, t in zip(pairs, truths, strict=True):
        assert pair["prompt"] == t["prompt"]
        for side in ("chosen", "rejected"):
            spans = truth.token_rewards(pair[side])
            assert [r for _, _, r in spans] == t[f"{side}_word_rewards"]
            assert [pair[side][s:e] for s, e, _ in spans] == pair[side].split(" ")
            assert truth.reward(pair[side]) == t[f"{side}_reward"] == sum(t[f"{side}_word_rewards"])
        assert t["chosen_reward"] > t["rejected_reward"]


def test_heldout_prompts_disjoint_from_training(task: tuple[Path, dict]) -> None:
    out, counts = task
    heldout = _rows(out / "prompts.jsonl")
    assert len(heldout) == counts["n_heldout_prompts"] == SMALL.n_heldout_prompts
    assert len({r["id"] for r in heldout}) == len({r["prompt"] for r in heldout}) == len(heldout)
    training = {r["prompt"] for name in ("sft.jsonl", "pairs.jsonl") for r in _rows(out / name)}
    assert not training & {r["prompt"] for r in heldout}
    # Held-out prompts are new combinations, never new topics: every topic keeps training prompts.
    train_prompts, _ = make_prompts(SMALL)
    assert {p.thing for p in train_prompts} == set(THINGS)


def test_vocabulary_distinct_lowercase_words() -> None:
    vocab = make_vocabulary(SMALL)
    words = vocab.filler + vocab.positive + vocab.negative
    assert len(words) == len(set(words)) == SMALL.n_filler + SMALL.n_positive + SMALL.n_negative
    assert all(w.isalpha() and w.islower() for w in words)
    assert not set(words) & set(vocab.prompt_words)
    assert len(vocab.tokens) == len(set(vocab.tokens))


def test_corpus_statistics_follow_config(task: tuple[Path, dict]) -> None:
    out, _ = task
    vocab, truth = make_vocabulary(SMALL), GroundTruth.load(out)
    rows = _rows(out / "sft.jsonl")
    words = [w for r in rows for w in r["completion"].split(" ")]
    lengths = [len(r["completion"].split(" ")) for r in rows]
    assert min(lengths) >= SMALL.min_words and max(lengths) <= SMALL.max_words
    signs = Counter(truth.word_reward(w) for w in words)
    assert abs((signs[1.0] + signs[-1.0]) / len(words) - SMALL.p_key) < 0.03
    assert 0.8 < signs[1.0] / signs[-1.0] < 1.25
    # The topic carries signal: fillers come mostly from the topic's preferred subset (chance is 1/8).
    topic_of = {p.text: p.thing for p in make_prompts(SMALL)[0]}
    hits = total = 0
    for r in rows:
        preferred = set(vocab.topic_fillers[topic_of[r["prompt"]]])
        fillers = [w for w in r["completion"].split(" ") if truth.word_reward(w) == 0.0]
        hits, total = hits + sum(w in preferred for w in fillers), total + len(fillers)
    assert hits / total > 0.7


def test_tokenizer_reloads_and_round_trips_with_word_offsets(task: tuple[Path, dict]) -> None:
    out, counts = task
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.is_fast and len(tok) == counts["vocab_size"]
    assert tok.pad_token == PAD and tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id
    response = _rows(out / "pairs.jsonl")[0]["chosen"]
    enc = tok(response, return_offsets_mapping=True, add_special_tokens=True)
    spans = [(s, e) for s, e, _ in GroundTruth.load(out).token_rewards(response)]
    assert [tuple(o) for o in enc["offset_mapping"]] == spans  # token i = word i (no BOS prepended)
    assert tok.unk_token_id not in enc["input_ids"]
    assert tok.decode(enc["input_ids"]) == response
    assert tok.decode(enc["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == response


def test_chat_template_renders_user_message_as_raw_text(task: tuple[Path, dict]) -> None:
    out, _ = task
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    prompt = _rows(out / "prompts.jsonl")[0]["prompt"]
    messages = [{"role": "user", "content": prompt}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert list(ids["input_ids"]) == tok(prompt)["input_ids"]
    # Conversational pairs render to "prompt response", the same text as the standard format's concatenation.
    turn = [*messages, {"role": "assistant", "content": "foo bar"}]
    assert tok.apply_chat_template(turn, tokenize=False) == prompt + " foo bar"


def test_key_labels_from_any_tokenizer_offsets(task: tuple[Path, dict]) -> None:
    out, _ = task
    truth = GroundTruth.load(out)
    vocab = make_vocabulary(SMALL)
    pos, neg, fill = vocab.positive[0], vocab.negative[0], vocab.filler[0]
    text = f"{fill} {pos} {neg} {fill}"
    word_spans = [(s, e) for s, e, _ in truth.token_rewards(text)]
    eos = (len(text), len(text))
    assert truth.key_labels([*word_spans, eos], text) == [0, 1, -1, 0, 0]
    # A subword tokenizer: 2-character pieces, the first piece of each word carrying the leading space.
    pieces, start = [], 0
    while start < len(text):
        pieces.append((start, min(start + 2, len(text))))
        start += 2
    expected = []
    for s, e in pieces:
        words = truth.token_rewards(text)
        overlaps = [(min(e, we) - max(s, ws), r) for ws, we, r in words if min(e, we) > max(s, ws)]
        expected.append(int(max(overlaps, key=lambda o: o[0])[1]) if overlaps else 0)
    assert truth.key_labels(pieces, text) == expected
    assert 1 in expected and -1 in expected
    assert truth.key_labels([(0, 0), (len(fill), len(fill) + 1)], text) == [0, 0]  # empty span, lone space
    # A span across two words takes the word it overlaps most: the tail of the filler, all of the key word.
    p = len(fill) + 1
    assert truth.key_labels([(len(fill) - 1, p + len(pos)), (p + 1, p + len(pos) + 2)], text) == [1, 1]
    assert truth.key_labels([(p + len(pos) - 1, p + len(pos) + 2 + len(neg))], text) == [-1]


def test_default_config_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    counts = write_task(SyntheticConfig(), tmp_path)
    assert time.perf_counter() - start < 3.0
    assert counts["n_sft"] == 4000 and counts["n_pairs"] > 1500


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_heldout_prompts"):
        write_task(SyntheticConfig(n_heldout_prompts=10_000), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"task\.json"):
        GroundTruth.load(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------- graded rewards

GRADED = dataclasses.replace(SMALL, positive_rewards=(0.25, 1.0, 3.0), negative_rewards=(-0.5, -2.0), p_key=0.3)


def test_graded_rewards_spread_evenly_over_key_words(tmp_path: Path) -> None:
    counts = write_task(GRADED, tmp_path)
    truth, vocab = GroundTruth.load(tmp_path), make_vocabulary(GRADED)
    # 6 positive words over 3 values -> 2 each; 6 negative words over 2 values -> 3 each; fillers worth 0.
    assert Counter(truth.word_reward(w) for w in vocab.positive) == {0.25: 2, 1.0: 2, 3.0: 2}
    assert Counter(truth.word_reward(w) for w in vocab.negative) == {-0.5: 3, -2.0: 3}
    assert all(truth.word_reward(w) == 0.0 for w in vocab.filler)
    # The same on-disk format: per-word truth beside every pair, sums consistent, chosen strictly better.
    pairs, truths = _rows(tmp_path / "pairs.jsonl"), _rows(tmp_path / "truth.jsonl")
    assert len(pairs) == counts["n_pairs"] and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    for pair, t in zip(pairs, truths, strict=True):
        for side in ("chosen", "rejected"):
            assert [r for _, _, r in truth.token_rewards(pair[side])] == t[f"{side}_word_rewards"]
            assert truth.reward(pair[side]) == pytest.approx(t[f"{side}_reward"])
        assert t["chosen_reward"] > t["rejected_reward"]
    # Key labels stay signs whatever the magnitude.
    text = f"{vocab.filler[0]} {vocab.positive[2]} {vocab.negative[1]}"
    assert truth.key_labels([(s, e) for s, e, _ in truth.token_rewards(text)], text) == [0, 1, -1]


def test_graded_task_has_its_own_key_density(tmp_path: Path) -> None:
    write_task(GRADED, tmp_path)
    truth = GroundTruth.load(tmp_path)
    words = [w for r in _rows(tmp_path / "sft.jsonl") for w in r["completion"].split(" ")]
    key_share = sum(truth.word_reward(w) != 0.0 for w in words) / len(words)
    assert abs(key_share - GRADED.p_key) < 0.03 and abs(key_share - SMALL.p_key) > 0.1
    # Magnitudes are drawn uniformly among a sign's key words: each graded value occurs.
    assert {truth.word_reward(w) for w in words} == {0.0, 0.25, 1.0, 3.0, -0.5, -2.0}


def test_graded_options_leave_the_default_draws_alone(tmp_path: Path) -> None:
    # The reward values only relabel words: the same seed draws the same corpus, so the text is identical.
    write_task(SMALL, tmp_path / "default")
    write_task(dataclasses.replace(SMALL, positive_rewards=(2.0, 5.0), negative_rewards=(-3.0,)), tmp_path / "g")
    assert (tmp_path / "default" / "sft.jsonl").read_bytes() == (tmp_path / "g" / "sft.jsonl").read_bytes()
    assert SyntheticConfig().positive_rewards == (1.0,) and SyntheticConfig().negative_rewards == (-1.0,)


def test_graded_reward_values_are_validated() -> None:
    with pytest.raises(ConfigError, match="positive_rewards"):
        SyntheticConfig(positive_rewards=(1.0, -1.0))
    with pytest.raises(ConfigError, match="negative_rewards"):
        SyntheticConfig(negative_rewards=())
    cfg = load_run_config(None, ["synthetic.positive_rewards=[0.25, 1, 3]", "synthetic.negative_rewards=[-2]"])
    assert cfg.synthetic.positive_rewards == (0.25, 1.0, 3.0) and cfg.synthetic.negative_rewards == (-2.0,)

"""selpo_core.tokenization: one prompt rendering for every stage, TRL-like truncation, the length rule applied
once with several tokenizers, and tokenizing that never drops a pair the data stage kept."""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest
from conftest import build_word_tokenizer

from selpo_core.config import DataConfig, SyntheticConfig
from selpo_core.data import DataError, PreferenceExample, check_lengths, check_sft_lengths, tokenize_pairs
from selpo_core.tokenization import (
    cut_prompt,
    kept_chars,
    render_prompt,
    render_prompts,
    resolve_prompt_template,
    tokenize_sft,
)

TEN = " ".join(f"w{i}" for i in range(10))


def char_tokenizer() -> Any:
    """One token per character (spaces included): much longer sequences than the word tokenizer's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 :?."))
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def pair(prompt: Any, chosen: str, rejected: str, row: int, source: str = "user.jsonl") -> PreferenceExample:
    return PreferenceExample(f"id{row}", prompt, chosen, rejected, row=row, source=source)


def words_of(tokenizer: Any, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


# ------------------------------------------------------------------------------------------------ rendering


def test_render_modes(word_tokenizer):
    tok = word_tokenizer
    conversation = [{"role": "user", "content": "hello"}]
    assert words_of(tok, render_prompt("hello how are", tok, "raw")) == ["hello", "how", "are"]
    assert words_of(tok, render_prompt("hello how are", tok, "auto")) == ["hello", "how", "are"]
    assert words_of(tok, render_prompt("hello", tok, "chat")) == ["user:", "hello", "assistant:"]
    assert render_prompt(conversation, tok, "auto") == render_prompt("hello", tok, "chat")
    with pytest.raises(DataError, match="cannot be rendered as raw text"):
        render_prompt(conversation, tok, "raw")
    tok.chat_template = None
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        render_prompt("hello", tok, "chat")
    assert resolve_prompt_template("auto", ["a", "b"]) == "raw"
    assert resolve_prompt_template("auto", ["a", conversation]) == "chat"
    assert resolve_prompt_template("raw", [conversation]) == "raw"
    with pytest.raises(ValueError, match="choose one of auto, raw, chat"):
        resolve_prompt_template("template", ["a"])


def test_render_adds_bos_by_the_tokenizer_convention(make_word_tokenizer):
    tok = make_word_tokenizer(bos=True)
    bos = tok.bos_token_id
    assert render_prompt("hello", tok, "raw")[0] == bos
    assert render_prompt("<bos> hello", tok, "raw").count(bos) == 1  # no second BOS
    assert bos not in render_prompt("hello", tok, "chat")  # the template decides; this one writes none


UNK_TEMPLATE = "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}<|assistant|>"


def test_unknown_tokens_in_rendered_prompts_warn(word_tokenizer, caplog):
    word_tokenizer.chat_template = UNK_TEMPLATE  # markers the word vocabulary cannot spell
    with caplog.at_level(logging.WARNING, logger="selpo_core.tokenization"):
        ids = render_prompts(["hello", "hi"], word_tokenizer, "chat", what="prompts.json")
    assert all(row.count(word_tokenizer.unk_token_id) == 2 for row in ids)
    assert "prompts.json: 2 of 2 prompts rendered (prompt_template=chat) hold the unknown token '<unk>'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selpo_core.tokenization"):
        render_prompts(["hello", "hi"], word_tokenizer, "raw")
    assert caplog.text == ""


def _generate_rendering(tokenizer: Any, prompt: str) -> list[int]:
    from selpo_core.generate import TransformersBackend

    return TransformersBackend.encode(types.SimpleNamespace(tokenizer=tokenizer), [{"role": "user", "content": prompt}])


def _evaluate_rendering(tokenizer: Any, prompt: str) -> list[int]:
    from selpo_core.evaluate import encode_answer

    return encode_answer(tokenizer, prompt, "fine")[0]


@pytest.mark.xfail(strict=True, reason="generate.TransformersBackend.encode and evaluate.encode_answer still apply the "
                   "chat template to standard-format prompts; they must call tokenization.render_prompts")
@pytest.mark.parametrize("stage", [_generate_rendering, _evaluate_rendering])
def test_generation_and_evaluation_render_prompts_like_training(word_tokenizer, stage):
    """Standard-format data is trained on raw prompts (prompt_template auto -> raw): generation and evaluation
    must condition on exactly those ids, not on a template whose markers become <unk>."""
    word_tokenizer.chat_template = UNK_TEMPLATE
    mode = resolve_prompt_template("auto", ["hello how are"])
    trained_on = render_prompt("hello how are", word_tokenizer, mode)
    assert stage(word_tokenizer, "hello how are") == trained_on


def test_synthetic_task_renders_the_same_raw_or_through_its_template():
    """The built-in task's template renders a prompt unchanged, so switching generation to raw rendering
    leaves the demo's ids (and so its results) bit-identical."""
    from selpo_core.synthetic import build_tokenizer, make_prompts, make_vocabulary

    cfg = SyntheticConfig()
    tok = build_tokenizer(make_vocabulary(cfg))
    train, heldout = make_prompts(cfg)
    prompts = [p.text for p in train[:50] + heldout]
    assert render_prompts(prompts, tok, "raw") == [_generate_rendering(tok, p) for p in prompts]


# ----------------------------------------------------------------------------------------------- truncation


def test_prompt_cut_keeps_its_end_or_start_then_responses_get_the_room(word_tokenizer, make_word_tokenizer):
    long_reply = " " + " ".join(f"w{i}" for i in range(50, 60))
    examples = [pair(TEN, " yes", long_reply, 0)]
    keep_end = DataConfig(max_length=8, max_prompt_length=4)
    (cut,), report = tokenize_pairs(examples, word_tokenizer, keep_end, name="policy")
    assert words_of(word_tokenizer, cut.prompt_ids) == ["w6", "w7", "w8", "w9"]
    assert words_of(word_tokenizer, cut.rejected_ids) == ["w50", "w51", "w52", "w53"]  # EOS dropped
    assert words_of(word_tokenizer, cut.chosen_ids) == ["yes", "<eos>"]
    assert cut.rejected_text == long_reply and cut.rejected_offsets[-1] == (13, 16)  # text whole, tokens cut
    assert report.truncated == {"policy/prompt": [0], "policy/response": [0]}
    keep_start = DataConfig(max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    (start,), _ = tokenize_pairs(examples, word_tokenizer, keep_start)
    assert words_of(word_tokenizer, start.prompt_ids) == ["w0", "w1", "w2", "w3"]
    # BOS stays first when the end is kept: the model always saw it there.
    with_bos = make_word_tokenizer(bos=True)
    (bos_cut,), _ = tokenize_pairs(examples, with_bos, keep_end)
    assert words_of(with_bos, bos_cut.prompt_ids) == ["<bos>", "w7", "w8", "w9"]
    # A prompt fed alone (generation) is cut the same way.
    rendered = render_prompt(TEN, with_bos, "raw")
    assert cut_prompt(rendered, with_bos, keep_end) == bos_cut.prompt_ids
    assert cut_prompt(rendered[:4], with_bos, keep_end) == rendered[:4]
    # A pair that fits is never touched, even with a prompt longer than max_prompt_length.
    (whole,), report = tokenize_pairs([pair(TEN, " yes", " no", 0)], word_tokenizer, keep_end.__class__(
        max_length=12, max_prompt_length=4))
    assert len(whole.prompt_ids) == 10 and report.n_truncated == 0


def test_cut_responses_keep_different_characters_per_tokenizer_and_transfer_works(word_tokenizer):
    from selpo_core.selection import transfer_rewards

    reply = " w1 w2 w3 w4 w5 w6"
    examples = [pair("hi", reply, " no", 0)]
    cfg = DataConfig(max_length=8, max_prompt_length=4)
    (words,), _ = tokenize_pairs(examples, word_tokenizer, cfg)
    (chars,), _ = tokenize_pairs(examples, char_tokenizer(), cfg)
    assert words.chosen_text == chars.chosen_text == reply  # both index the same whole text
    assert kept_chars(words.chosen_offsets) == 18 and kept_chars(chars.chosen_offsets) == 6
    # Oracle on characters (kept " w1 w2"), policy on words (kept all six words and EOS).
    oracle_rewards = [1.0] * len(chars.chosen_ids)
    policy = transfer_rewards(chars.chosen_offsets, oracle_rewards, words.chosen_offsets)
    assert len(policy) == len(words.chosen_ids)
    beyond = [s >= kept_chars(chars.chosen_offsets) for s, _ in words.chosen_offsets]
    assert policy == [0.0 if out else 1.0 for out in beyond] and sum(beyond) == 5  # w3..w6 and EOS: neutral
    # And the other way round: every character token inside the words' range gets its word's reward.
    back = transfer_rewards(words.chosen_offsets, [float(i) for i in range(len(words.chosen_ids))],
                            chars.chosen_offsets)
    assert back == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # " w1" -> word 0; " w2" -> word 1 (spaces: uncovered)


# ---------------------------------------------------------------------------------- the rule, applied once


def two_tokenizers() -> dict[str, Any]:
    return {"policy": build_word_tokenizer(), "oracle": char_tokenizer()}


LENGTH_ROWS = [
    pair("hi", " yes", " no", 3),
    pair("what is the color of the sky", " blue", " red", 7),  # 7 words, 28 characters
    pair("hi", " w1 w2 w3 w4 w5 w6", " no", 9),  # a long response: 19 characters with EOS
]


def test_truncate_drops_nothing_and_counts_per_tokenizer():
    cfg = DataConfig(max_length=20, max_prompt_length=10)
    kept, report = check_lengths(LENGTH_ROWS, two_tokenizers(), cfg)
    assert kept == LENGTH_ROWS and report.skipped == {}
    assert report.truncated == {"oracle/prompt": [7], "oracle/response": [9]}
    assert report.metrics()["data/truncated/oracle/prompt"] == 1 and report.n_truncated == 2
    assert report.prompt_template == "raw" and report.source == "user.jsonl"


def test_skip_drops_a_pair_too_long_under_any_tokenizer_for_every_stage():
    cfg = DataConfig(max_length=20, max_prompt_length=10, on_too_long="skip")
    for order in (two_tokenizers(), dict(reversed(two_tokenizers().items()))):
        kept, report = check_lengths(LENGTH_ROWS, order, cfg)
        assert [e.row for e in kept] == [3] and report.skipped == {"too_long": 2}
    record = report.skipped_records()[0]
    assert record == {"source": "user.jsonl", "row": 7, "reason": "too_long", "field": "prompt", "message": (
        "user.jsonl row 7 (line 8) field 'prompt': too long for the oracle tokenizer: prompt 28 + chosen 6 tokens "
        "(EOS included) > data.max_length=20 (data.on_too_long=skip)")}
    # Each tokenizer alone keeps the dropped pair or not; together they keep the intersection.
    alone = {name: {e.row for e in check_lengths(LENGTH_ROWS, {name: tok}, cfg)[0]}
             for name, tok in two_tokenizers().items()}
    assert alone == {"policy": {3, 7, 9}, "oracle": {3}}
    # Later stages tokenize the kept pairs with either tokenizer; a dropped pair is refused, not dropped.
    for tokenizer in two_tokenizers().values():
        assert [p.example_id for p in tokenize_pairs(kept, tokenizer, cfg)[0]] == ["id3"]
    with pytest.raises(DataError, match=r"^user.jsonl row 7 \(line 8\) field 'prompt': too long: .*data stage kept"):
        tokenize_pairs(LENGTH_ROWS, char_tokenizer(), cfg)


def test_error_names_the_users_file_row_field_and_tokenizer():
    cfg = DataConfig(max_length=20, max_prompt_length=10, on_too_long="error")
    with pytest.raises(DataError) as info:
        check_lengths(LENGTH_ROWS, two_tokenizers(), cfg)
    assert str(info.value).startswith("user.jsonl row 7 (line 8) field 'prompt': too long for the oracle tokenizer")


def test_conversational_prompts_need_a_template_under_every_tokenizer():
    conversation = [pair([{"role": "user", "content": "hi"}], "yes", "no", 0)]
    with pytest.raises(DataError, match=r"^user.jsonl \(oracle tokenizer\): rendering prompts with the chat template"):
        check_lengths(conversation, two_tokenizers(), DataConfig())
    kept, report = check_lengths(conversation, {"policy": build_word_tokenizer()}, DataConfig())
    assert kept == conversation and report.prompt_template == "chat"


def test_sft_rows_follow_the_same_rule(word_tokenizer):
    rows = [{"prompt": "hi", "completion": " yes", "row": 0, "source": "sft.jsonl"},
            {"prompt": TEN, "completion": " w1 w2 w3 w4", "row": 4, "source": "sft.jsonl"}]
    cfg = DataConfig(max_length=8, max_prompt_length=4, on_too_long="skip")
    kept, report = check_sft_lengths(rows, {"policy": word_tokenizer}, cfg)
    assert kept == rows[:1] and report.skipped_rows[0]["row"] == 4 and report.skipped_rows[0]["field"] == "prompt"
    with pytest.raises(DataError, match=r"^sft.jsonl row 4 \(line 5\) field 'prompt': too long"):
        tokenize_sft(rows, word_tokenizer, cfg)
    items = tokenize_sft(rows, word_tokenizer, DataConfig(max_length=8, max_prompt_length=4))
    assert words_of(word_tokenizer, items[1].prompt_ids) == ["w6", "w7", "w8", "w9"]
    assert words_of(word_tokenizer, items[1].completion_ids) == ["w1", "w2", "w3", "w4"]


def test_the_data_stage_names_rows_whose_prompts_hold_unknown_tokens(caplog):
    examples = [pair("hello how are", " good", " bad", 2), pair("hello zebra", " good", " bad", 5)]
    with caplog.at_level(logging.WARNING, logger="selpo_core.tokenization"):
        _, report = check_lengths(examples, {"policy": build_word_tokenizer()}, DataConfig())
    assert report.unknown_tokens == {"policy": [5]} and report.metrics()["data/unknown_tokens/policy"] == 1
    assert "user.jsonl: 1 of 2 prompts hold the policy tokenizer's unknown token '<unk>'" in caplog.text
    assert "rows [5]" in caplog.text

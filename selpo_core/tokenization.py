"""Prompts rendered one way everywhere, the length rule applied once, and pairs / SFT rows as token ids.

Prompt rendering (`render_prompts`, `data.prompt_template`): `raw` tokenizes a string prompt as it is
(with BOS when the tokenizer itself prepends it to plain text); `chat` renders the prompt as a conversation
through the tokenizer's chat template with the generation prompt (a string is one user message); `auto` is
raw for string prompts and chat for message lists, as TRL treats standard vs conversational data. Training,
scoring, generation and evaluation must all call `render_prompts` with the mode the data stage resolved
(`DataReport.prompt_template`), so a model is never asked to answer in a format it was not trained on.

Length rule (as TRL's DPOTrainer up to 0.19, `truncation_mode` for the prompt): a pair whose prompt plus
longer response (EOS included) fits `data.max_length` is never touched. Otherwise, with `on_too_long:
truncate`, a prompt over `max_prompt_length` is cut to it first (`keep_end` keeps its end, the turn being
answered, and BOS if it starts with one; `keep_start` its start), then the responses are cut at the end to
the room the prompt leaves (EOS dropped). Unlike TRL, a response keeps all that room, not only
`max_length - max_prompt_length`. With `skip` or `error` such a pair is dropped or is an error.

The rule is applied ONCE, at the data stage, with every tokenizer the run uses (`check_lengths`): a pair too
long under any of them is dropped for all, so every later stage sees exactly the same pairs. Later stages
tokenize with `tokenize_pairs` / `tokenize_sft`, which cut the same way but never drop: a pair the rule
would drop is an error there (the data stage did not check that tokenizer).

Across tokenizers, truncation keeps different character ranges of a response: the text is never cut, only
tokens are dropped, so offsets of every tokenizer index the same whole text and selection transfer works.
Policy tokens (non-empty spans) beyond the characters the oracle's kept tokens cover (`kept_chars`) overlap
no scored token and get reward 0.0 from `selection.transfer_rewards` (neutral), as does the policy's EOS when
the oracle's copy was cut (no oracle EOS to match); mask them if they must never be selected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from selpo_core.config import DataConfig
from selpo_core.data_files import DataError, DataReport, row_message
from selpo_core.examples import Content, PreferenceExample, TokenizedPair, TokenizedSFT, response_text

log = logging.getLogger(__name__)

PROMPT_TEMPLATES = ("auto", "raw", "chat")


# ------------------------------------------------------------------------------------------- prompts


def check_tokenizer(tokenizer: Any) -> int:
    """The EOS id of a fast tokenizer (offsets are needed); a DataError for anything else."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; selpo needs offset mappings "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no eos_token; responses must end with EOS")
    return int(tokenizer.eos_token_id)


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer itself prepends BOS to plain text (Llama-style), else [] (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def resolve_prompt_template(mode: str, prompts: Sequence[Content]) -> str:
    """raw or chat for a data set: `auto` is chat when its prompts are conversations, else raw.

    The data stage records the result; later stages render every prompt (generation prompts included,
    which may be plain strings for conversational training data) with that one mode.
    """
    if mode not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt_template={mode!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
    if mode != "auto":
        return mode
    return "chat" if any(not isinstance(p, str) for p in prompts) else "raw"


def render_prompts(prompts: Sequence[Content], tokenizer: Any, mode: str, *, what: str = "prompts") -> list[list[int]]:
    """Token ids of each prompt as every stage must feed it to a model (see the module docstring).

    Warns once when rendered prompts hold the tokenizer's unknown token (a template marker or text the
    vocabulary cannot spell): the model would be conditioned on `<unk>`s. `what` names the prompts in
    messages (e.g. the data file).
    """
    out = _render(prompts, tokenizer, mode, what)
    unknown = unknown_token_rows(out, tokenizer)
    if unknown:
        log.warning("%s: %d of %d prompts rendered (prompt_template=%s) hold the unknown token %r (first: prompt "
                    "%d of these); the model sees <unk> there", what, len(unknown), len(out), mode,
                    tokenizer.unk_token, unknown[0])
    return out


def _render(prompts: Sequence[Content], tokenizer: Any, mode: str, what: str) -> list[list[int]]:
    if mode not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt_template={mode!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
    texts, templated = [], []
    for prompt in prompts:
        as_chat = mode == "chat" or (mode == "auto" and not isinstance(prompt, str))
        if not as_chat:
            if not isinstance(prompt, str):
                raise DataError(f"{what}: a conversation cannot be rendered as raw text "
                                "(data.prompt_template=raw); use chat or auto")
            texts.append(prompt)
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{what}: rendering prompts with the chat template (data.prompt_template={mode}) "
                                f"needs a tokenizer with a chat template; {type(tokenizer).__name__} has none")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        templated.append(as_chat)
    bos = bos_prefix(tokenizer)
    out = []
    for as_chat, (ids, _) in zip(templated, _batched(tokenizer, texts, offsets=False)):
        # The template writes its own special tokens (BOS included); raw text gets BOS by the tokenizer's
        # convention, but not a second one when the text already starts with it.
        out.append(ids if as_chat or ids[:1] == bos else bos + ids)
    return out


def render_prompt(prompt: Content, tokenizer: Any, mode: str) -> list[int]:
    """One prompt's ids: `render_prompts([prompt], tokenizer, mode)[0]`."""
    return render_prompts([prompt], tokenizer, mode)[0]


def unknown_token_rows(ids: Sequence[Sequence[int]], tokenizer: Any) -> list[int]:
    """Indices of the id lists holding the tokenizer's unknown token (none for byte-level tokenizers)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return [] if unk is None else [i for i, row in enumerate(ids) if unk in row]


def _batched(tokenizer: Any, texts: Sequence[str], *, offsets: bool) -> list[tuple[list[int], list[Any]]]:
    out: list[tuple[list[int], list[Any]]] = []
    for start in range(0, len(texts), 1024):  # bounded memory on large datasets, still batched for speed
        chunk = list(texts[start : start + 1024])
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=offsets)
        maps = enc["offset_mapping"] if offsets else [[]] * len(chunk)
        out.extend((list(ids), [tuple(s) for s in spans]) for ids, spans in zip(enc["input_ids"], maps))
    return out


def _encode_responses(texts: Sequence[str], tokenizer: Any, eos: int) -> list[tuple[list[int], list[Any]]]:
    """Response ids without special tokens, EOS appended with the empty span (len, len)."""
    encoded = _batched(tokenizer, texts, offsets=True)
    return [([*ids, eos], [*spans, (len(t), len(t))]) for t, (ids, spans) in zip(texts, encoded)]


def kept_chars(offsets: Sequence[tuple[int, int]]) -> int:
    """Characters of the response text its (possibly truncated) tokens cover: the end of the last non-empty
    span (EOS and other empty spans cover nothing)."""
    return max((end for start, end in offsets if end > start), default=0)


# ---------------------------------------------------------------------------------------------- lengths


def _cut_prompt(prompt: list[int], bos: list[int], cfg: DataConfig) -> list[int]:
    if cfg.truncation_mode == "keep_start":
        return prompt[: cfg.max_prompt_length]
    keep_bos = bos if bos and prompt[:1] == bos else []  # the model always saw BOS first: keep it there
    return keep_bos + prompt[len(prompt) - (cfg.max_prompt_length - len(keep_bos)) :]


def cut_prompt(prompt_ids: list[int], tokenizer: Any, cfg: DataConfig) -> list[int]:
    """A rendered prompt cut to max_prompt_length the way training cuts one (truncation_mode, BOS kept), for a
    stage that feeds prompts alone (generation); unchanged when it is not longer."""
    if len(prompt_ids) <= cfg.max_prompt_length:
        return list(prompt_ids)
    return _cut_prompt(list(prompt_ids), bos_prefix(tokenizer), cfg)


def _fit(prompt: list[int], longest: int, bos: list[int], cfg: DataConfig) -> tuple[list[int], int] | None:
    """(prompt ids, response token budget), or None when the pair is too long and may not be cut."""
    if len(prompt) + longest <= cfg.max_length:
        return prompt, longest
    if cfg.on_too_long != "truncate":
        return None
    if len(prompt) > cfg.max_prompt_length:
        prompt = _cut_prompt(prompt, bos, cfg)
    return prompt, cfg.max_length - len(prompt)  # >= 1: the config guarantees max_prompt_length < max_length


def _too_long(prompt: int, responses: dict[str, int], name: str, cfg: DataConfig) -> tuple[str, str]:
    """(field, detail) of a too-long record under tokenizer `name`."""
    side, longest = max(responses.items(), key=lambda item: item[1])
    field_name = "prompt" if prompt > cfg.max_prompt_length else side
    whose = f" for the {name} tokenizer" if name else ""
    detail = (f"too long{whose}: prompt {prompt} + {side} {longest} tokens (EOS included) "
              f"> data.max_length={cfg.max_length} (data.on_too_long={cfg.on_too_long})")
    return field_name, detail


def _message(source: str, row: int, key: str, field_name: str, detail: str) -> str:
    if row < 0:
        return f"{source or 'data'} example {key} field {field_name!r}: {detail}"
    return row_message(source, row, field_name, detail)


class _Encoded:
    """One tokenizer's view of records: rendered prompt ids, response ids (+EOS) and offsets per side."""

    def __init__(self, prompts: Sequence[Content], sides: dict[str, Sequence[str]], tokenizer: Any, mode: str,
                 what: str) -> None:
        eos = check_tokenizer(tokenizer)
        self.bos = bos_prefix(tokenizer)
        self.prompts = _render(prompts, tokenizer, mode, what)  # unknown tokens: reported by row, not here
        self.sides = {side: _encode_responses(texts, tokenizer, eos) for side, texts in sides.items()}
        self.unknown = unknown_token_rows(self.prompts, tokenizer)

    def fit(self, i: int, cfg: DataConfig) -> tuple[list[int], int] | None:
        return _fit(self.prompts[i], max(len(s[i][0]) for s in self.sides.values()), self.bos, cfg)

    def lengths(self, i: int) -> dict[str, int]:
        return {side: len(encoded[i][0]) for side, encoded in self.sides.items()}


def _check(prompts: Sequence[Content], sides: dict[str, Sequence[str]], rows: Sequence[tuple[str, int, str]],
           tokenizers: Mapping[str, Any], cfg: DataConfig, mode: str) -> tuple[list[int], DataReport]:
    """Indices of the records kept under the length rule for all tokenizers, and the report."""
    if not tokenizers:
        raise ValueError("check_lengths needs at least one tokenizer")
    source = rows[0][0] if rows else ""
    report = DataReport(source=source, n_rows=len(prompts), prompt_template=resolve_prompt_template(mode, prompts))
    too_long: dict[int, tuple[str, str]] = {}
    for name, tokenizer in tokenizers.items():
        encoded = _Encoded(prompts, sides, tokenizer, report.prompt_template, f"{source} ({name} tokenizer)")
        if encoded.unknown:
            report.unknown_tokens[name] = [rows[i][1] for i in encoded.unknown]
            log.warning("%s: %d of %d prompts hold the %s tokenizer's unknown token %r after rendering "
                        "(prompt_template=%s), rows %s; the model sees <unk> there", source, len(encoded.unknown),
                        len(prompts), name, tokenizer.unk_token, report.prompt_template,
                        report.unknown_tokens[name][:5])
        for i in range(len(prompts)):
            fitted = encoded.fit(i, cfg)
            if fitted is None:
                if i not in too_long:  # the first tokenizer to find it names it
                    too_long[i] = _too_long(len(encoded.prompts[i]), encoded.lengths(i), name, cfg)
                continue
            prompt, room = fitted
            if len(prompt) < len(encoded.prompts[i]):
                report.truncated.setdefault(f"{name}/prompt", []).append(rows[i][1])
            if any(n > room for n in encoded.lengths(i).values()):
                report.truncated.setdefault(f"{name}/response", []).append(rows[i][1])
    for i in sorted(too_long):
        src, row, key = rows[i]
        field_name, detail = too_long[i]
        message = _message(src, row, key, field_name, detail)
        if cfg.on_too_long == "error":
            raise DataError(message)
        report.skip(row, "too_long", field_name, message)
    kept = [i for i in range(len(prompts)) if i not in too_long]
    report.n_kept = len(kept)
    return kept, report


def check_lengths(examples: Sequence[PreferenceExample], tokenizers: Mapping[str, Any], cfg: DataConfig, *,
                  prompt_template: str | None = None) -> tuple[list[PreferenceExample], DataReport]:
    """The pairs the length rule keeps under EVERY tokenizer in `tokenizers` (name -> tokenizer, e.g.
    {"policy": ..., "oracle": ...}), and a report: truncated rows per tokenizer and part, too-long rows
    skipped (on_too_long=skip; an error with `error`), rows whose prompt holds an unknown token, and the
    resolved prompt template. With on_too_long=truncate nothing is dropped."""
    rows = [(e.source, e.row, e.example_id) for e in examples]
    sides = {"chosen": [response_text(e.chosen) for e in examples],
             "rejected": [response_text(e.rejected) for e in examples]}
    kept, report = _check([e.prompt for e in examples], sides, rows, tokenizers, cfg,
                          prompt_template or cfg.prompt_template)
    return [examples[i] for i in kept], report


def check_sft_lengths(rows: Sequence[dict[str, Any]], tokenizers: Mapping[str, Any], cfg: DataConfig, *,
                      prompt_template: str | None = None) -> tuple[list[dict[str, Any]], DataReport]:
    """`check_lengths` for SFT rows {prompt, completion, row, source} (from `data.load_sft_data`)."""
    where = [(r.get("source", ""), r.get("row", -1), str(i)) for i, r in enumerate(rows)]
    kept, report = _check([r["prompt"] for r in rows], {"completion": [r["completion"] for r in rows]}, where,
                          tokenizers, cfg, prompt_template or cfg.prompt_template)
    return [rows[i] for i in kept], report


# ------------------------------------------------------------------------------------------ tokenizing


def _never_dropped(detail: str) -> str:
    return (f"{detail}, yet the data stage kept it: the data stage must check lengths with every tokenizer "
            "the run uses (tokenization.check_lengths)")


def tokenize_pairs(
    examples: Sequence[PreferenceExample], tokenizer: Any, cfg: DataConfig, *, source: str = "",
    prompt_template: str | None = None, name: str = "",
) -> tuple[list[TokenizedPair], DataReport]:
    """Token ids and offsets of every pair, cut by the length rule; never drops one (a pair the rule would
    drop is a DataError). The report counts cut rows under `name` (default 'tokenizer'), which messages
    also name. `source` names pairs that carry none."""
    mode = prompt_template or cfg.prompt_template
    sides = {"chosen": [response_text(e.chosen) for e in examples],
             "rejected": [response_text(e.rejected) for e in examples]}
    what = examples[0].source if examples and examples[0].source else source
    encoded = _Encoded([e.prompt for e in examples], sides, tokenizer, mode, what)
    report = DataReport(source=what, n_rows=len(examples), prompt_template=resolve_prompt_template(
        mode, [e.prompt for e in examples]))
    pairs: list[TokenizedPair] = []
    for i, example in enumerate(examples):
        fitted = encoded.fit(i, cfg)
        src = example.source or source
        if fitted is None:
            field_name, detail = _too_long(len(encoded.prompts[i]), encoded.lengths(i), name, cfg)
            raise DataError(_message(src, example.row, example.example_id, field_name, _never_dropped(detail)))
        prompt, room = fitted
        (c_ids, c_spans), (r_ids, r_spans) = encoded.sides["chosen"][i], encoded.sides["rejected"][i]
        if len(prompt) < len(encoded.prompts[i]):
            report.truncated.setdefault(f"{name or 'tokenizer'}/prompt", []).append(example.row)
        if len(c_ids) > room or len(r_ids) > room:
            report.truncated.setdefault(f"{name or 'tokenizer'}/response", []).append(example.row)
        pairs.append(TokenizedPair(example.example_id, prompt, c_ids[:room], r_ids[:room], sides["chosen"][i],
                                   sides["rejected"][i], c_spans[:room], r_spans[:room]))
    report.n_kept = len(pairs)
    return pairs, report


def tokenize_sft(
    rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, *, source: str = "sft",
    prompt_template: str | None = None,
) -> list[TokenizedSFT]:
    """Prompt and completion ids (completion + EOS) of every row, cut by the length rule; never drops one."""
    mode = prompt_template or cfg.prompt_template
    completions = [r["completion"] for r in rows]
    encoded = _Encoded([r["prompt"] for r in rows], {"completion": completions}, tokenizer, mode, source)
    items: list[TokenizedSFT] = []
    n_cut = 0
    for i, row in enumerate(rows):
        fitted = encoded.fit(i, cfg)
        src, row_number = row.get("source") or source, row.get("row", -1)
        if fitted is None:
            field_name, detail = _too_long(len(encoded.prompts[i]), encoded.lengths(i), "", cfg)
            raise DataError(_message(src, row_number, str(i), field_name, _never_dropped(detail)))
        prompt, room = fitted
        ids = encoded.sides["completion"][i][0]
        n_cut += len(prompt) < len(encoded.prompts[i]) or len(ids) > room
        items.append(TokenizedSFT(prompt, ids[:room]))
    if n_cut:
        log.info("%s: cut %d of %d SFT rows to data.max_length=%d", source, n_cut, len(rows), cfg.max_length)
    return items


__all__ = [
    "PROMPT_TEMPLATES", "bos_prefix", "check_lengths", "check_sft_lengths", "check_tokenizer", "cut_prompt",
    "kept_chars",
    "render_prompt", "render_prompts", "resolve_prompt_template", "tokenize_pairs", "tokenize_sft",
    "unknown_token_rows",
]

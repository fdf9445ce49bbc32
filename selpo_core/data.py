"""Preference data: read TRL-format pairs, validate every row, hash, split, tokenize with offsets.

Formats (TRL's names): standard {prompt, chosen, rejected} strings; conversational, where the prompt is a
message list (or a string, read as one user message) and chosen/rejected are lists holding the assistant
turn; implicit prompt {chosen, rejected} only, strings or message lists, the prompt being their common
prefix. Every malformed row is a `DataError` with a one-line message naming file, row and field, or with
`on_bad_row: skip` a count in `DataReport.skipped`, never a silent drop.

Local files are read here, not through `datasets`: its JSON loader reports a bad line as an Arrow error
without the line number and casts column types, which would hide exactly the rows this module must name.
Hub ids go through `datasets.load_dataset`. Batching and collation live in `batching.py` (re-exported).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selpo_core.batching import (  # re-exported: callers import everything data-related from here
    collate_pairs,
    collate_sft,
    length_bucketed_batches,
    pad_fraction,
    token_budget_batches,
)
from selpo_core.config import DataConfig

log = logging.getLogger(__name__)

Message = dict[str, str]
Content = str | list[Message]
"""A prompt or response: plain text, or a list of {role, content} messages (conversational)."""

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


class DataError(ValueError):
    """A data row (or file) is unusable; the message is one line naming file, row and field."""


@dataclass(frozen=True)
class PreferenceExample:
    example_id: str
    prompt: Content
    chosen: Content
    rejected: Content
    row: int = field(default=-1, compare=False)
    """0-based row in the source file (-1: unknown); only for error messages, not part of the identity."""


@dataclass(frozen=True)
class TokenizedPair:
    example_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    """Response ids with EOS appended (EOS absent only when the response was truncated)."""
    rejected_ids: list[int]
    chosen_text: str
    """The response text that `chosen_offsets` index."""
    rejected_text: str
    chosen_offsets: list[tuple[int, int]]
    """(start, end) characters of `chosen_text` per token; EOS is (len, len)."""
    rejected_offsets: list[tuple[int, int]]

    @property
    def length(self) -> int:
        """Padded row width this pair needs (prompt + longer response): the bucketing length."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class TokenizedSFT:
    prompt_ids: list[int]
    completion_ids: list[int]
    """Completion ids with EOS appended (absent only when truncated)."""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class DataReport:
    """What happened to the rows of one source: kept, skipped (per reason), truncated."""

    source: str
    n_rows: int = 0
    n_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """reason -> count: invalid_json, not_an_object, missing_field, wrong_type, wrong_format, empty_prompt,
    empty_response, identical_responses, duplicate, prompt_too_long."""
    n_truncated: int = 0
    """Pairs (or SFT rows) whose response was cut at max_length."""
    format: str = ""
    """The format read (detected with format=auto)."""
    first_skips: list[str] = field(default_factory=list)
    """The first few skip messages, so a skip run still says why."""

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.first_skips) < 5:
            self.first_skips.append(message)

    def merge(self, later: DataReport) -> DataReport:
        """This (loading) report followed by a later stage's (tokenizing) report of the kept rows."""
        skipped = dict(self.skipped)
        for reason, count in later.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        truncated = self.n_truncated + later.n_truncated
        return DataReport(self.source, self.n_rows, later.n_kept, skipped, truncated,
                          self.format or later.format, (self.first_skips + later.first_skips)[:5])


class _BadRow(Exception):
    """Internal: a row failed a check. Turned into a DataError or a skip count by `_reject`."""

    def __init__(self, reason: str, field_name: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field_name, self.detail = reason, field_name, detail


def _reject(bad: _BadRow, source: str, where: str, on_bad_row: str, report: DataReport) -> None:
    named = f" field {bad.field_name!r}" if bad.field_name else ""
    # One line, whatever the data held: row contents never enter the message, but be safe about newlines.
    message = f"{source} {where}{named}: {bad.detail}".replace("\n", "\\n")
    if on_bad_row == "error":
        raise DataError(message) from None
    report.skip(bad.reason, message)
    log.debug("skipped: %s", message)


# ------------------------------------------------------------------------------------------------- reading


def _read_rows(path: str, split: str) -> Iterator[tuple[int, Any]]:
    """(row index, row object or _BadRow) for a local JSON/JSONL/Parquet file or a hub dataset id."""
    local = Path(path)
    if local.is_file() or local.suffix in LOCAL_SUFFIXES:
        if not local.is_file():
            raise DataError(f"{path}: file not found")
        if local.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type; use {'/'.join(LOCAL_SUFFIXES)} or a hub id")
        if local.suffix == ".parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(local).iter_batches(batch_size=4096):
                for item in batch.to_pylist():
                    yield row, item
                    row += 1
            return
        if local.suffix == ".json":
            text = local.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                yield from _json_lines(text.split("\n"))  # not one document: JSON lines, which name the line
                return
            yield from enumerate(_json_records(path, data))
            return
        with open(local, encoding="utf-8") as handle:  # streamed; splits on newlines only, never on U+2028
            yield from _json_lines(handle)
        return
    import datasets  # heavy import, only for hub ids

    yield from enumerate(datasets.load_dataset(path, split=split))


def _json_records(path: str, data: Any) -> list[Any]:
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the records under one key; else one row
        values = list(data.values())
        data = values[0] if len(values) == 1 and isinstance(values[0], list) else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON lines), got {type(data).__name__}")
    return data


def _json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    row = 0
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines are not rows (a trailing newline is common)
        try:
            yield row, json.loads(line)
        except json.JSONDecodeError as err:
            detail = f"invalid JSON on line {line_no}: {err.msg} at column {err.colno}"
            yield row, _BadRow("invalid_json", None, detail)
        row += 1


# ---------------------------------------------------------------------------------------------- validation


def _field(item: dict[str, Any], name: str) -> Any:
    value = item.get(name)
    if value is None:  # absent, JSON null and a Parquet null all mean the same thing
        raise _BadRow("missing_field", name, "missing")
    return value


def _text(value: Any, name: str, fmt: str) -> str:
    if not isinstance(value, str):
        raise _BadRow("wrong_type", name, f"expected a string ({fmt} format), got {type(value).__name__}")
    return value


def _messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise _BadRow("wrong_type", name, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _BadRow("empty_response" if name != "prompt" else "empty_prompt", name, "empty message list")
    out = []
    for i, message in enumerate(value):
        for key in ("role", "content"):
            if not isinstance(message, dict) or not isinstance(message.get(key), str):
                raise _BadRow("wrong_type", name, f"message {i} has no string {key!r}")
        out.append({"role": message["role"], "content": message["content"]})  # other keys are not used
    return out


def _assistant_turn(prompt: list[Message], turns: list[Message], name: str) -> list[Message]:
    """The one assistant message a response list holds, after the prompt when it repeats the prompt."""
    if len(turns) > len(prompt) and turns[: len(prompt)] == prompt:
        turns = turns[len(prompt) :]  # full conversations in chosen/rejected (UltraFeedback-style)
    if not turns:
        raise _BadRow("empty_response", name, "empty response")
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = [turn["role"] for turn in turns]
        raise _BadRow("wrong_format", name, f"expected one assistant message after the prompt, got {roles}")
    return turns


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) split at the first differing character, as TRL's `extract_prompt`.

    The split moves back over one space so the responses keep their leading space ("Assistant:" | " A"),
    which is how the text would be tokenized after the prompt. Responses that share a start lose it to the
    prompt (a limitation of the implicit format, also in TRL).
    """
    n, limit = 0, min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def response_text(response: Content) -> str:
    """The text a response stands for: the string itself, or the (last) assistant message's content."""
    return response if isinstance(response, str) else response[-1]["content"]


def detect_format(item: dict[str, Any]) -> str:
    """standard / conversational / implicit, from one row (TRL's rules: a prompt field, message lists)."""
    if item.get("prompt") is None:
        return "implicit"
    if isinstance(item.get("prompt"), list) or isinstance(item.get("chosen"), list):
        return "conversational"
    return "standard"


def _parse_row(item: Any, fmt: str) -> tuple[Content, Content, Content]:
    if fmt == "implicit":
        if item.get("prompt") is not None:
            raise _BadRow("wrong_format", "prompt", "a prompt in implicit-prompt data (format is per file)")
        chosen, rejected = _field(item, "chosen"), _field(item, "rejected")
        if chosen == rejected:
            raise _BadRow("identical_responses", "rejected", "identical to chosen")
        if isinstance(chosen, str):
            prompt, chosen, rejected = split_implicit_prompt(chosen, _text(rejected, "rejected", "implicit"))
        elif not isinstance(chosen, list):
            what = f"expected a string or a message list, got {type(chosen).__name__}"
            raise _BadRow("wrong_type", "chosen", what)
        else:
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt = chosen[:n]
            chosen = _assistant_turn([], chosen[n:], "chosen")
            rejected = _assistant_turn([], rejected[n:], "rejected")
    elif fmt == "standard":
        prompt = _text(_field(item, "prompt"), "prompt", fmt)
        chosen = _text(_field(item, "chosen"), "chosen", fmt)
        rejected = _text(_field(item, "rejected"), "rejected", fmt)
    else:
        raw = _field(item, "prompt")
        prompt = [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")
        chosen = _assistant_turn(prompt, _messages(_field(item, "chosen"), "chosen"), "chosen")
        rejected = _assistant_turn(prompt, _messages(_field(item, "rejected"), "rejected"), "rejected")
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        what = "no common prefix of chosen and rejected" if fmt == "implicit" else "empty prompt"
        raise _BadRow("empty_prompt", "prompt", what)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response_text(response).strip():
            raise _BadRow("empty_response", name, "empty response")
    if response_text(chosen) == response_text(rejected):
        raise _BadRow("identical_responses", "rejected", "identical to chosen")
    return prompt, chosen, rejected


def example_id(prompt: Content, chosen: Content, rejected: Content) -> str:
    """Stable content hash of a pair: sha1 of canonical JSON, first 16 hex characters."""
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    canonical = json.dumps(pair, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def _checked_rows(path: str, split: str, on_bad_row: str, report: DataReport) -> Iterator[tuple[int, dict]]:
    """(row, object) for every row that parses as an object; other rows become a DataError or a skip."""
    for row, item in _read_rows(path, split):
        report.n_rows += 1
        if isinstance(item, dict):
            yield row, item
            continue
        if not isinstance(item, _BadRow):
            item = _BadRow("not_an_object", None, f"expected an object, got {type(item).__name__}")
        _reject(item, path, f"row {row}", on_bad_row, report)


def load_preference_data(cfg: DataConfig) -> tuple[list[PreferenceExample], DataReport]:
    """Read, validate and hash the pairs of `cfg.path`; duplicates are always skipped (reason 'duplicate')."""
    if not cfg.path:
        raise DataError("data.path is empty: give a file or hub id (the pipeline uses the synthetic pairs)")
    report = DataReport(source=cfg.path)
    fmt = None if cfg.format == "auto" else cfg.format
    examples: list[PreferenceExample] = []
    seen: set[str] = set()
    for row, item in _checked_rows(cfg.path, cfg.split, cfg.on_bad_row, report):
        fmt = fmt or detect_format(item)  # the first object decides for the whole file
        try:
            prompt, chosen, rejected = _parse_row(item, fmt)
        except _BadRow as bad:
            _reject(bad, cfg.path, f"row {row}", cfg.on_bad_row, report)
            continue
        key = example_id(prompt, chosen, rejected)
        if key in seen:
            report.skip("duplicate", f"{cfg.path} row {row}: duplicate of an earlier pair")
            continue
        seen.add(key)
        examples.append(PreferenceExample(key, prompt, chosen, rejected, row=row))
    report.n_kept, report.format = len(examples), fmt or ""
    if not examples:
        raise DataError(f"{cfg.path}: no usable rows ({report.n_rows} read, skipped {report.skipped})")
    return examples, report


def split_heldout(
    examples: Sequence[PreferenceExample], fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, heldout): an example is held out when the hash of (seed, example_id) falls below `fraction`.

    Decided per example, so membership never changes when rows are reordered or new rows are added; the
    held-out count is therefore about, not exactly, fraction * len(examples).
    """
    train: list[PreferenceExample] = []
    heldout: list[PreferenceExample] = []
    for example in examples:
        digest = hashlib.sha1(f"{seed}:{example.example_id}".encode()).hexdigest()[:15]
        (heldout if int(digest, 16) / 16**15 < fraction else train).append(example)
    return train, heldout


# -------------------------------------------------------------------------------------------- tokenization


def _check_tokenizer(tokenizer: Any) -> int:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; selpo needs offset mappings "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no eos_token; responses must end with EOS")
    return int(tokenizer.eos_token_id)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer itself prepends BOS to plain text (Llama-style), else [] (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def _encode_prompts(prompts: Sequence[Content], tokenizer: Any, source: str) -> list[list[int]]:
    """Strings as-is (+ BOS by the tokenizer's convention); message lists through the chat template."""
    texts = []
    for prompt in prompts:
        if isinstance(prompt, str):
            texts.append(prompt)
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{source}: conversational prompts need a tokenizer with a chat template")
        # The template writes its own special tokens (BOS included), so no special tokens are added below.
        texts.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
    bos = _bos_prefix(tokenizer)
    encoded = _batched(tokenizer, texts, offsets=False)
    out = []
    for prompt, (ids, _) in zip(prompts, encoded):
        # No second BOS when the text already starts with it.
        out.append((bos if isinstance(prompt, str) and ids[:1] != bos else []) + ids)
    return out


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


def _fit(prompt: list[int], where: str, cfg: DataConfig, source: str, report: DataReport) -> int | None:
    """Tokens left for a response, or None when the prompt is too long (then an error, or a counted skip)."""
    if len(prompt) <= cfg.max_prompt_length:
        return cfg.max_length - len(prompt)  # >= 1: the config guarantees max_prompt_length < max_length
    detail = f"prompt has {len(prompt)} tokens > data.max_prompt_length={cfg.max_prompt_length}"
    _reject(_BadRow("prompt_too_long", "prompt", detail), source, where, cfg.on_bad_row, report)
    return None


def tokenize_pairs(
    examples: Sequence[PreferenceExample], tokenizer: Any, cfg: DataConfig, *, source: str
) -> tuple[list[TokenizedPair], DataReport]:
    """Token ids and offsets of each pair. A prompt over max_prompt_length is an error or a skip (never cut);
    a prompt+response over max_length loses the end of the response (EOS then absent, counted n_truncated)."""
    eos = _check_tokenizer(tokenizer)
    report = DataReport(source=source, n_rows=len(examples))
    prompts = _encode_prompts([e.prompt for e in examples], tokenizer, source)
    chosen = _encode_responses([response_text(e.chosen) for e in examples], tokenizer, eos)
    rejected = _encode_responses([response_text(e.rejected) for e in examples], tokenizer, eos)
    pairs: list[TokenizedPair] = []
    for example, prompt, (c_ids, c_spans), (r_ids, r_spans) in zip(examples, prompts, chosen, rejected):
        where = f"row {example.row}" if example.row >= 0 else f"example {example.example_id}"
        room = _fit(prompt, where, cfg, source, report)
        if room is None:
            continue
        report.n_truncated += len(c_ids) > room or len(r_ids) > room
        c_text, r_text = response_text(example.chosen), response_text(example.rejected)
        pairs.append(TokenizedPair(example.example_id, prompt, c_ids[:room], r_ids[:room], c_text, r_text,
                                   c_spans[:room], r_spans[:room]))
    report.n_kept = len(pairs)
    return pairs, report


# --------------------------------------------------------------------------------------------------- SFT


def load_sft_data(
    path: str | Path, *, on_bad_row: str = "error", split: str = "train"
) -> list[dict[str, Any]]:
    """{prompt, completion} rows (prompt: string or message list; completion: string), validated like pairs.

    Each returned dict also carries `row` (its 0-based row in the file) for later error messages.
    """
    path = str(path)
    report = DataReport(source=path)
    rows: list[dict[str, Any]] = []
    for row, item in _checked_rows(path, split, on_bad_row, report):
        try:
            raw = _field(item, "prompt")
            prompt = raw if isinstance(raw, str) else _messages(raw, "prompt")
            if isinstance(prompt, str) and not prompt.strip():
                raise _BadRow("empty_prompt", "prompt", "empty prompt")
            completion = _text(_field(item, "completion"), "completion", "sft")
            if not completion.strip():
                raise _BadRow("empty_response", "completion", "empty completion")
        except _BadRow as bad:
            _reject(bad, path, f"row {row}", on_bad_row, report)
            continue
        rows.append({"prompt": prompt, "completion": completion, "row": row})
    if report.skipped:
        log.warning("%s: skipped %s of %d rows: %s", path, report.skipped, report.n_rows, report.first_skips)
    if not rows:
        raise DataError(f"{path}: no usable rows ({report.n_rows} read, skipped {report.skipped})")
    return rows


def sft_rows_from_examples(examples: Sequence[PreferenceExample]) -> list[dict[str, Any]]:
    """SFT rows (prompt + chosen response) for users without an SFT corpus, as in the DPO papers' SFT step."""
    return [{"prompt": e.prompt, "completion": response_text(e.chosen)} for e in examples]


def tokenize_sft(
    rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, *, source: str = "sft"
) -> list[TokenizedSFT]:
    """Prompt and completion ids (completion + EOS), with the same length rules as `tokenize_pairs`."""
    eos = _check_tokenizer(tokenizer)
    report = DataReport(source=source, n_rows=len(rows))
    prompts = _encode_prompts([r["prompt"] for r in rows], tokenizer, source)
    completions = _encode_responses([r["completion"] for r in rows], tokenizer, eos)
    items: list[TokenizedSFT] = []
    for index, (row, prompt, (ids, _)) in enumerate(zip(rows, prompts, completions)):
        room = _fit(prompt, f"row {row.get('row', index)}", cfg, source, report)
        if room is None:
            continue
        report.n_truncated += len(ids) > room
        items.append(TokenizedSFT(prompt, ids[:room]))
    if report.skipped or report.n_truncated:
        log.warning("%s: skipped %s, truncated %d of %d rows", source, report.skipped, report.n_truncated,
                    len(rows))
    return items


__all__ = [
    "Content", "DataError", "DataReport", "Message", "PreferenceExample", "TokenizedPair", "TokenizedSFT",
    "collate_pairs", "collate_sft", "detect_format", "example_id", "length_bucketed_batches",
    "load_preference_data", "load_sft_data", "pad_fraction", "response_text", "sft_rows_from_examples",
    "split_heldout", "split_implicit_prompt", "token_budget_batches", "tokenize_pairs", "tokenize_sft",
]

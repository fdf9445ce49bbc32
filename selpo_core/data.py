"""Preference and SFT data: read TRL-format rows, validate every row, hash, split; the data-facing API.

Formats (TRL's names): standard {prompt, chosen, rejected} strings; conversational, where the prompt is a
message list (or a string, read as one user message) and chosen/rejected are lists holding the assistant
turn; implicit prompt {chosen, rejected} only, strings or message lists. An implicit message list splits at
the last shared message; an implicit string at the last assistant-turn marker the two share (Anthropic HH's
"\\n\\nAssistant:", ChatML, Llama, Gemma, Alpaca markers), so a shared response start ("I", "I'm") stays in
the responses; only without any marker does it fall back to the common prefix (TRL's rule), at a word start.

Every malformed row is a `DataError` with a one-line message naming the user's file, row and field, or
with `on_bad_row: skip` a counted, listed skip in the `DataReport`, never a silent drop. Lengths are not
checked here but by `check_lengths` with the run's tokenizers (`tokenization.py`). Reading files and the
report live in `data_files.py`, tokenizing in `tokenization.py`, batching in `batching.py`; their public
names are re-exported here so callers import everything data-related from one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from selpo_core.batching import (  # re-exported
    collate_pairs,
    collate_sft,
    length_bucketed_batches,
    pad_fraction,
    token_budget_batches,
)
from selpo_core.config import DataConfig
from selpo_core.data_files import LOCAL_SUFFIXES, BadRow, DataError, DataReport, read_rows, reject
from selpo_core.examples import (
    Content,
    Message,
    PreferenceExample,
    TokenizedPair,
    TokenizedSFT,
    response_text,
)
from selpo_core.tokenization import (  # re-exported
    check_lengths,
    check_sft_lengths,
    kept_chars,
    render_prompt,
    render_prompts,
    resolve_prompt_template,
    tokenize_pairs,
    tokenize_sft,
)

log = logging.getLogger(__name__)

# Where an assistant turn starts in rendered dialogue text; an implicit string prompt ends after the last one
# the two responses share. "\n\nAssistant:" is Anthropic HH's; the others are common chat templates'.
ASSISTANT_MARKER = re.compile(
    r"(?:^|\n)[ \t]*(?:Assistant|assistant|ASSISTANT):"
    r"|<\|im_start\|>assistant\n"
    r"|<\|start_header_id\|>assistant<\|end_header_id\|>\n\n"
    r"|<start_of_turn>model\n"
    r"|<\|assistant\|>\n?"
    r"|\[/INST\]"
    r"|### Response:\n?"
)


# ---------------------------------------------------------------------------------------------- validation


def _field(item: dict[str, Any], name: str) -> Any:
    value = item.get(name)
    if value is None:  # absent, JSON null and a Parquet null all mean the same thing
        raise BadRow("missing_field", name, "missing")
    return value


def _text(value: Any, name: str, fmt: str) -> str:
    if not isinstance(value, str):
        raise BadRow("wrong_type", name, f"expected a string ({fmt} format), got {type(value).__name__}")
    return value


def _messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise BadRow("wrong_type", name, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise BadRow("empty_prompt" if name in ("prompt", "messages") else "empty_response", name,
                     "empty message list")
    out = []
    for i, message in enumerate(value):
        for key in ("role", "content"):
            if not isinstance(message, dict) or not isinstance(message.get(key), str):
                raise BadRow("wrong_type", name, f"message {i} has no string {key!r}")
        out.append({"role": message["role"], "content": message["content"]})  # other keys are not used
    return out


def _assistant_turn(prompt: list[Message], turns: list[Message], name: str) -> list[Message]:
    """The one assistant message a response list holds, after the prompt when it repeats the prompt."""
    if len(turns) > len(prompt) and turns[: len(prompt)] == prompt:
        turns = turns[len(prompt) :]  # full conversations in chosen/rejected (UltraFeedback-style)
    if not turns:
        raise BadRow("empty_response", name, "empty response")
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = [turn["role"] for turn in turns]
        raise BadRow("wrong_format", name, f"expected one assistant message after the prompt, got {roles}")
    return turns


def implicit_boundary(chosen: str, rejected: str) -> tuple[int, bool]:
    """(characters of the shared prompt, whether an assistant marker placed the boundary).

    With a marker: right after the last one inside the common prefix. Without: the common prefix, moved
    back to a word start when it ends inside a word ("four"/"five" share "f") and back over one space so the
    responses keep their leading space, as they would be tokenized after the prompt.
    """
    n, limit = 0, min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    marker_end = max((m.end() for m in ASSISTANT_MARKER.finditer(chosen, 0, n)), default=0)
    if marker_end:
        return marker_end, True
    mid_word = 0 < n and not chosen[n - 1].isspace() and any(len(t) > n and not t[n].isspace()
                                                            for t in (chosen, rejected))
    if mid_word:
        space = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n))
        n = space + 1 if space >= 0 else n  # no word start at all: keep the raw common prefix
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    return n, False


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of an implicit-prompt string pair, split at `implicit_boundary`."""
    n, _ = implicit_boundary(chosen, rejected)
    return chosen[:n], chosen[n:], rejected[n:]


def detect_format(item: dict[str, Any]) -> str:
    """standard / conversational / implicit, from one row (TRL's rules: a prompt field, message lists)."""
    if item.get("prompt") is None:
        return "implicit"
    if isinstance(item.get("prompt"), list) or isinstance(item.get("chosen"), list):
        return "conversational"
    return "standard"


def _parse_implicit(item: dict[str, Any]) -> tuple[Content, Content, Content, bool]:
    if item.get("prompt") is not None:
        raise BadRow("wrong_format", "prompt", "a prompt in implicit-prompt data (format is per file)")
    chosen, rejected = _field(item, "chosen"), _field(item, "rejected")
    if chosen == rejected:
        raise BadRow("identical_responses", "rejected", "identical to chosen")
    if isinstance(chosen, str):
        n, marked = implicit_boundary(chosen, _text(rejected, "rejected", "implicit"))
        return chosen[:n], chosen[n:], rejected[n:], marked
    if not isinstance(chosen, list):
        raise BadRow("wrong_type", "chosen", f"expected a string or a message list, got {type(chosen).__name__}")
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prompt = chosen[:n]
    return prompt, _assistant_turn([], chosen[n:], "chosen"), _assistant_turn([], rejected[n:], "rejected"), True


def _parse_row(item: dict[str, Any], fmt: str) -> tuple[Content, Content, Content, bool]:
    """(prompt, chosen, rejected, boundary known); the flag is False only for a marker-less implicit split."""
    marked = True
    if fmt == "implicit":
        prompt, chosen, rejected, marked = _parse_implicit(item)
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
        raise BadRow("empty_prompt", "prompt", what)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response_text(response).strip():
            raise BadRow("empty_response", name, "empty response")
    if response_text(chosen) == response_text(rejected):
        raise BadRow("identical_responses", "rejected", "identical to chosen")
    return prompt, chosen, rejected, marked


def example_id(prompt: Content, chosen: Content, rejected: Content) -> str:
    """Stable content hash of a pair: sha1 of canonical JSON, first 16 hex characters."""
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    canonical = json.dumps(pair, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def _object_rows(path: str, split: str, on_bad_row: str, report: DataReport) -> Iterator[tuple[int, dict]]:
    """(row, object) for every row that parses as an object; other rows become a DataError or a skip."""
    for row, item in read_rows(path, split):
        report.n_rows += 1
        if isinstance(item, dict):
            yield row, item
            continue
        if not isinstance(item, BadRow):
            item = BadRow("not_an_object", None, f"expected an object, got {type(item).__name__}")
        reject(item, path, row, on_bad_row, report)


def load_preference_data(cfg: DataConfig) -> tuple[list[PreferenceExample], DataReport]:
    """Read, validate and hash the pairs of `cfg.path`; duplicates are always skipped (reason 'duplicate').

    Each example carries its row and `source` (cfg.path), so every later message names the user's file.
    """
    if not cfg.path:
        raise DataError("data.path is empty: give a file or hub id (the pipeline uses the synthetic pairs)")
    report = DataReport(source=cfg.path)
    fmt = None if cfg.format == "auto" else cfg.format
    examples: list[PreferenceExample] = []
    seen: set[str] = set()
    unmarked: list[int] = []
    for row, item in _object_rows(cfg.path, cfg.split, cfg.on_bad_row, report):
        fmt = fmt or detect_format(item)  # the first object decides for the whole file
        try:
            prompt, chosen, rejected, marked = _parse_row(item, fmt)
        except BadRow as bad:
            reject(bad, cfg.path, row, cfg.on_bad_row, report)
            continue
        key = example_id(prompt, chosen, rejected)
        if key in seen:
            reject(BadRow("duplicate", None, "duplicate of an earlier pair"), cfg.path, row, "skip", report)
            continue
        seen.add(key)
        unmarked += [] if marked else [row]
        examples.append(PreferenceExample(key, prompt, chosen, rejected, row=row, source=cfg.path))
    report.n_kept, report.format = len(examples), fmt or ""
    if not examples:
        raise DataError(f"{cfg.path}: no usable rows ({report.n_rows} read, skipped {report.skipped})")
    if unmarked:
        log.warning("%s: %d implicit-prompt rows have no assistant-turn marker; their prompt is the common "
                    "prefix of chosen and rejected (rows %s)", cfg.path, len(unmarked), unmarked[:5])
    return examples, report


def split_heldout(
    examples: Sequence[PreferenceExample], fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, heldout): an example is held out when the hash of (seed, example_id) falls below `fraction`.

    Decided per example, so membership never changes when rows are reordered, added or dropped; the
    held-out count is therefore about, not exactly, fraction * len(examples).
    """
    train: list[PreferenceExample] = []
    heldout: list[PreferenceExample] = []
    for example in examples:
        digest = hashlib.sha1(f"{seed}:{example.example_id}".encode()).hexdigest()[:15]
        (heldout if int(digest, 16) / 16**15 < fraction else train).append(example)
    return train, heldout


def write_examples(path: str | Path, examples: Sequence[PreferenceExample]) -> None:
    """A pipeline-internal JSON-lines copy of pairs that keeps each pair's user row and source file."""
    with open(path, "w", encoding="utf-8") as handle:
        for e in examples:
            handle.write(json.dumps({"example_id": e.example_id, "prompt": e.prompt, "chosen": e.chosen,
                                     "rejected": e.rejected, "row": e.row, "source": e.source},
                                    ensure_ascii=False) + "\n")


def read_examples(path: str | Path) -> list[PreferenceExample]:
    """The pairs `write_examples` wrote, with their user rows and sources."""
    with open(path, encoding="utf-8") as handle:
        return [PreferenceExample(**json.loads(line)) for line in handle if line.strip()]


# --------------------------------------------------------------------------------------------------- SFT


def _sft_row(item: dict[str, Any], fmt: str) -> tuple[Content, str]:
    if fmt == "messages":
        messages = _messages(_field(item, "messages"), "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            roles = [m["role"] for m in messages]
            raise BadRow("wrong_format", "messages", f"expected turns ending with an assistant turn, got {roles}")
        prompt, completion = messages[:-1], messages[-1]["content"]
    else:
        raw = _field(item, "prompt")
        prompt = raw if isinstance(raw, str) else _messages(raw, "prompt")
        raw_completion = _field(item, "completion")
        if isinstance(raw_completion, list):  # conversational prompt-completion: the assistant message
            raw_completion = _assistant_turn([], _messages(raw_completion, "completion"), "completion")[0]["content"]
        completion = _text(raw_completion, "completion", "sft")
    if isinstance(prompt, str) and not prompt.strip():
        raise BadRow("empty_prompt", "prompt", "empty prompt")
    if not completion.strip():
        raise BadRow("empty_response", "completion" if fmt != "messages" else "messages", "empty completion")
    return prompt, completion


def read_sft_data(path: str | Path, *, on_bad_row: str = "error", split: str = "train"
                  ) -> tuple[list[dict[str, Any]], DataReport]:
    """{prompt, completion, row, source} rows from a file in a TRL SFT format, and the report.

    Formats (the first row decides): prompt/completion (prompt a string or messages; completion a string
    or the assistant message), or `messages` ending with the assistant turn (the earlier turns are the
    prompt; loss on the last turn only). TRL's text-only language-modelling rows have no prompt: refused.
    A row that carries `row` and `source` (a pipeline-internal copy) keeps them, so messages name the
    user's file.
    """
    path = str(path)
    report = DataReport(source=path)
    rows: list[dict[str, Any]] = []
    fmt = ""
    for row, item in _object_rows(path, split, on_bad_row, report):
        fmt = fmt or ("messages" if "messages" in item else "prompt_completion")
        try:
            if fmt == "prompt_completion" and "prompt" not in item and "text" in item:
                raise BadRow("wrong_format", "text", "text-only rows (language modelling) have no prompt; "
                             "give prompt/completion or messages")
            prompt, completion = _sft_row(item, fmt)
        except BadRow as bad:
            reject(bad, path, row, on_bad_row, report)
            continue
        origin = isinstance(item.get("row"), int) and isinstance(item.get("source"), str)
        rows.append({"prompt": prompt, "completion": completion, "row": item["row"] if origin else row,
                     "source": item["source"] if origin else path})
    report.n_kept, report.format = len(rows), fmt
    if not rows:
        raise DataError(f"{path}: no usable rows ({report.n_rows} read, skipped {report.skipped})")
    return rows, report


def load_sft_data(
    path: str | Path, *, on_bad_row: str = "error", split: str = "train"
) -> list[dict[str, Any]]:
    """The rows of `read_sft_data`, with a warning naming the skipped rows (for pipeline-internal files)."""
    rows, report = read_sft_data(path, on_bad_row=on_bad_row, split=split)
    if report.skipped:
        log.warning("%s", report.summary())
    return rows


def sft_rows_from_examples(examples: Sequence[PreferenceExample]) -> list[dict[str, Any]]:
    """SFT rows (prompt + chosen response) for users without an SFT corpus, as in the DPO papers' SFT step."""
    return [{"prompt": e.prompt, "completion": response_text(e.chosen), "row": e.row, "source": e.source}
            for e in examples]


__all__ = [
    "ASSISTANT_MARKER", "LOCAL_SUFFIXES", "Content", "DataError", "DataReport", "Message", "PreferenceExample",
    "TokenizedPair", "TokenizedSFT", "check_lengths", "check_sft_lengths", "collate_pairs", "collate_sft",
    "detect_format", "example_id", "implicit_boundary", "kept_chars", "length_bucketed_batches",
    "load_preference_data", "load_sft_data", "pad_fraction", "read_examples", "read_sft_data",
    "render_prompt", "render_prompts", "resolve_prompt_template", "response_text", "sft_rows_from_examples",
    "split_heldout", "split_implicit_prompt", "token_budget_batches", "tokenize_pairs", "tokenize_sft",
    "write_examples",
]

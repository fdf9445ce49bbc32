"""What every generation backend shares: the sampling spec, one completion, the backend protocol.

A backend turns conversations into answers: `backend.generate(conversations, spec) -> completions`, one list
of `spec.n` `Completion`s per conversation, the conversation ending with a user turn and rendered with the
tokenizer's chat template (add_generation_prompt=True). A `SamplingSpec` means the same in every backend:
temperature 0 is greedy (n > 1 then repeats the one greedy answer), `top_p` is nucleus mass with no hidden
top-k or repetition penalty (a checkpoint's generation_config.json cannot add one), a stop string cuts the
answer before it, and `seed` makes sampling reproducible for the same backend, prompts and batch size.
Answer text is always the model tokenizer's `decode(answer tokens, skip_special_tokens=True)`, so two
backends that generate the same tokens write the same text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from selpo_core.config import GenerateConfig

Conversation = list[dict[str, str]]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the one-line message says what to do."""


log = logging.getLogger("selpo.generate")


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters with one meaning in every backend (see the module docstring)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"invalid sampling spec {self}")

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> SamplingSpec:
        return cls(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            n=cfg.n,
            seed=cfg.seed,
            stop=tuple(cfg.stop),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SamplingSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Completion:
    """One answer: its text, the tokens generated for it (EOS included), why it ended (eos, stop, length).

    Backends return these rather than bare strings: token counts give tokens/s and Arena-Hard's token_len,
    and whether the model ended the answer decides if evaluation scores an EOS after it. `token_ids` are the
    generated ids (EOS included, cut after the token that completed a stop string): what "the same answer"
    means when two backends are compared.
    """

    text: str
    n_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()


class Backend(Protocol):
    name: str

    def generate(self, conversations: list[Conversation], spec: SamplingSpec) -> list[list[Completion]]:
        """`spec.n` completions per conversation, in input order."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def merge_eos_ids(eos: Any, tokenizer: Any, where: str) -> list[int]:
    """Every id that ends an answer: the model's generation config (int or list) plus the tokenizer's EOS."""
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if not eos_ids:
        raise BackendUnavailable(f"{where} defines no eos token; answers could never end")
    return sorted(eos_ids)


def encode_conversation(tokenizer: Any, conversation: Conversation, prompt_template: str = "chat") -> list[int]:
    """Prompt ids of a conversation ending with a user turn, as every backend feeds them to the model: rendered
    as training rendered the prompts (`prompt_template`, the data stage's raw or chat; tokenization.py).

    Raw text has no rendering for a conversation of several turns (MT-Bench's turn 2, a multi-turn prompt):
    those go through the chat template, with a warning, since the model never saw anything else for them.
    """
    from selpo_core.tokenization import render_prompt

    single = len(conversation) == 1 and conversation[0]["role"] == "user"
    if prompt_template == "raw" and single:
        return render_prompt(conversation[0]["content"], tokenizer, "raw")
    if prompt_template == "raw" and not _WARNED:
        _WARNED.append(True)
        log.warning("the model was trained on raw-text prompts (data.prompt_template raw, or auto with string "
                    "prompts); a multi-turn conversation has no raw rendering, so it goes through the chat template "
                    "(train with data.prompt_template=chat to match)")
    return render_prompt(conversation, tokenizer, "chat")


_WARNED: list[bool] = []


__all__ = [
    "Conversation",
    "BackendUnavailable",
    "SamplingSpec",
    "Completion",
    "Backend",
    "cut_at_stop",
    "merge_eos_ids",
    "encode_conversation",
]

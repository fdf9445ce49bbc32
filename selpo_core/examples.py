"""The data types every stage shares: a preference pair as read, and pairs / SFT rows as token ids.

A module of plain types with no imports from the rest of selpo_core, so reading (`data`), tokenizing
(`tokenization`) and batching (`batching`) all import from here and never from each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]
Content = str | list[Message]
"""A prompt or response: plain text, or a list of {role, content} messages (conversational)."""


def response_text(response: Content) -> str:
    """The text a response stands for: the string itself, or the (last) assistant message's content."""
    return response if isinstance(response, str) else response[-1]["content"]


@dataclass(frozen=True)
class PreferenceExample:
    example_id: str
    prompt: Content
    chosen: Content
    rejected: Content
    row: int = field(default=-1, compare=False)
    """0-based row in the user's file (-1: unknown); only for messages, not part of the identity."""
    source: str = field(default="", compare=False)
    """The user's file (or hub id) the row came from, so any later stage's message names it."""


@dataclass(frozen=True)
class TokenizedPair:
    example_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    """Response ids with EOS appended (EOS absent only when the response was truncated)."""
    rejected_ids: list[int]
    chosen_text: str
    """The whole response text that `chosen_offsets` index (never cut: truncation drops tokens, not text)."""
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


__all__ = ["Content", "Message", "PreferenceExample", "TokenizedPair", "TokenizedSFT", "response_text"]

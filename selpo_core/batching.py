"""Batch composition and collation: which rows go together, and how they become padded tensors.

Kept apart from `data.py` (reading and tokenizing) because trainers and the scorer import only this.
Index-level functions (`length_bucketed_batches`, `token_budget_batches`, `pad_fraction`) work on plain
lengths so they serve pairs, SFT rows and scoring alike. Collation follows docs/CONTRACTS.md: right padding,
chosen rows 0..B-1, rejected rows B..2B-1, boolean masks (never padding detected from values).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selpo_core.examples import TokenizedPair, TokenizedSFT  # plain types: no import back into data.py


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, shuffle: bool = True, window_batches: int = 50
) -> list[list[int]]:
    """Batches of indices whose lengths are close, so little of each padded batch is padding.

    shuffle=True: shuffle all indices, sort by length inside windows of `window_batches * batch_size`, cut
    into batches, shuffle the batch order. Sorting only within random windows keeps batch contents random
    (not the same neighbours every epoch) while the length spread inside a batch stays small. Pass a
    different seed per epoch for a new order. shuffle=False: one global sort by length, batches in ascending
    length order (evaluation). Every index appears exactly once; only the last batch may be smaller.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])  # stable: ties keep index order
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    window = max(1, window_batches) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Batches whose padded size (rows * longest row) stays <= max_tokens; a longer row goes alone.

    Longest rows come first, so an out-of-memory error shows in the first batch, not hours into scoring.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens} must be > 0")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in order:
        # Descending order: the first row of a batch is its longest, so it fixes the padded width.
        if batch and (len(batch) + 1) * lengths[batch[0]] > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


def pad_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Pad tokens / padded tokens over all batches (0.0 for no batches)."""
    padded = real = 0
    for batch in batches:
        if batch:
            padded += len(batch) * max(lengths[i] for i in batch)
            real += sum(lengths[i] for i in batch)
    return (padded - real) / padded if padded else 0.0


def _both_sides(
    name: str, chosen: Sequence[Sequence[Any]] | None, rejected: Sequence[Sequence[Any]] | None, n: int
) -> list[Sequence[Any]] | None:
    """Chosen then rejected per-response lists, in batch row order; None when neither side is given."""
    if chosen is None and rejected is None:
        return None
    # One side without the other would silently leave the other side's rows all-False / zero.
    if chosen is None or rejected is None:
        raise ValueError(f"give both chosen_{name} and rejected_{name}, or neither")
    if len(chosen) != n or len(rejected) != n:
        raise ValueError(
            f"chosen_{name}/rejected_{name}: {len(chosen)}/{len(rejected)} entries for {n} pairs"
        )
    return [*chosen, *rejected]


def _aligned(values: Sequence[Any], response: Sequence[int], name: str, example_id: str) -> Sequence[Any]:
    if len(values) != len(response):
        raise ValueError(
            f"{name} of example {example_id}: {len(values)} values for {len(response)} response tokens"
        )
    return values


def right_pad(
    rows: Sequence[Sequence[Any]],
    fill: bool | int | float,
    dtype: torch.dtype,
    *,
    width: int | None = None,
    starts: Sequence[int] | None = None,
) -> Tensor:
    """[len(rows), width] of `fill`, row i's values at columns `starts[i]` (default 0) onward.

    `width` defaults to the longest `start + len(row)`, at least 1 (so an all-empty batch still has a column).
    """
    offsets = list(starts) if starts is not None else [0] * len(rows)
    if len(offsets) != len(rows):
        raise ValueError(f"right_pad: {len(offsets)} starts for {len(rows)} rows")
    needed = max((start + len(row) for start, row in zip(offsets, rows)), default=0)
    width = max(needed, 1) if width is None else width
    if needed > width:
        raise ValueError(f"right_pad: a row needs {needed} columns, width is {width}")
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, (start, row) in enumerate(zip(offsets, rows)):
        if len(row):
            out[i, start:start + len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    chosen_selected: Sequence[Sequence[bool]] | None = None,
    rejected_selected: Sequence[Sequence[bool]] | None = None,
    chosen_ref_logps: Sequence[Sequence[float]] | None = None,
    rejected_ref_logps: Sequence[Sequence[float]] | None = None,
    chosen_values: Sequence[Sequence[float]] | None = None,
    rejected_values: Sequence[Sequence[float]] | None = None,
    packed: bool = False,
) -> dict[str, Any]:
    """The pair batch of CONTRACTS.md, padded to the batch's longest row, plus `example_ids: list[str]`.

    Per-response lists (`*_selected`, `*_ref_logps`, `*_values`: stored per-token values such as TGDPO's
    oracle rewards or TIS-DPO's weights, batch key `token_values`) are aligned with that response's tokens (EOS
    included) and are placed at its positions in the row; everything else in those tensors is False / 0.

    `packed=True` adds `batch["packed"]`: the same 2B sequences without padding between them (`pack_rows`),
    which `logps` runs the model on where the model can isolate packed sequences; every per-token tensor of the
    batch keeps the padded [2B, T] layout the losses read.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    n = len(pairs)
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    prompts = [p.prompt_ids for p in pairs] * 2
    ids = [p.example_id for p in pairs] * 2
    starts = [len(prompt) for prompt in prompts]
    full = [[*prompt, *resp] for prompt, resp in zip(prompts, responses)]
    input_ids = right_pad(full, pad_token_id, torch.long)
    width = input_ids.shape[1]
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": right_pad([[1] * len(row) for row in full], 0, torch.long, width=width),
        "loss_mask": right_pad([[True] * len(resp) for resp in responses], False, torch.bool, width=width,
                               starts=starts),
    }
    for key, name, chosen, rejected, dtype in (
        ("selected_mask", "selected", chosen_selected, rejected_selected, torch.bool),
        ("ref_per_token_logps", "ref_logps", chosen_ref_logps, rejected_ref_logps, torch.float32),
        ("token_values", "values", chosen_values, rejected_values, torch.float32),
    ):
        both = _both_sides(name, chosen, rejected, n)
        if both is not None:
            aligned = [_aligned(values, resp, name, example_id)
                       for values, resp, example_id in zip(both, responses, ids)]
            batch[key] = right_pad(aligned, 0, dtype, width=width, starts=starts)
    batch["example_ids"] = [p.example_id for p in pairs]
    if packed:
        batch["packed"] = pack_rows(input_ids, batch["attention_mask"], pad_token_id)
    return batch


def collate_sft(items: Sequence[TokenizedSFT], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded SFT batch; `loss_mask` is True on completion tokens (EOS included), else False."""
    if not items:
        raise ValueError("collate_sft needs at least one item")
    full = [[*item.prompt_ids, *item.completion_ids] for item in items]
    input_ids = right_pad(full, pad_token_id, torch.long)
    width = input_ids.shape[1]
    return {"input_ids": input_ids,
            "attention_mask": right_pad([[1] * len(row) for row in full], 0, torch.long, width=width),
            "loss_mask": right_pad([[True] * len(item.completion_ids) for item in items], False, torch.bool,
                                   width=width, starts=[len(item.prompt_ids) for item in items])}


# ------------------------------------------------------------------------------------------------- packing

PACK_MAX_PAD = 0.05
"""`pack_rows` keeps the pad share of the packed rows at or under this (when any packing can)."""

@dataclass(frozen=True)
class PackedRows:
    """The sequences of a right-padded [N, T] batch laid end to end in R rows of width W (padding-free).

    `position_ids` restart at 0 at each sequence start, so transformers (masking_utils, `attention_mask=None`)
    builds a block-diagonal causal mask: no token attends across a sequence boundary. The slots after a row's
    last sequence hold `pad_token_id` and count 0, 1, ... as a sequence of their own (never attended to by a
    real token, which sits earlier in the row). Sequence i of the padded batch is `input_ids[row[i],
    start[i]:start[i] + length[i]]`.
    """

    input_ids: Tensor
    """[R, W] long: the packed tokens."""
    position_ids: Tensor
    """[R, W] long: 0 at each sequence start, +1 per token inside it."""
    row: Tensor
    """[N] long: the packed row of each padded row's sequence."""
    start: Tensor
    """[N] long: the column where it starts."""
    length: Tensor
    """[N] long: its number of real tokens."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedRows:
        """A copy on `device` (accelerate's send_to_device calls this)."""
        return PackedRows(*(t.to(device, non_blocking=non_blocking) for t in (
            self.input_ids, self.position_ids, self.row, self.start, self.length)))

    @property
    def pad_fraction(self) -> float:
        """Pad slots / all slots of the packed rows: the padding the model computes on."""
        return 1.0 - int(self.length.sum()) / max(1, self.input_ids.numel())

    def slots(self, batch_idx: Tensor, time_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(packed row, packed column) of the padded positions (batch_idx, time_idx), which must be real tokens."""
        return self.row[batch_idx], self.start[batch_idx] + time_idx


def _balanced_rows(lengths: Sequence[int], n_rows: int) -> list[list[int]]:
    """Longest first, each sequence into the least-loaded of `n_rows` rows (LPT): loads within ~1 sequence."""
    loads = [(0, r) for r in range(n_rows)]
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heapq.heappop(loads)
        rows[r].append(index)
        heapq.heappush(loads, (load + lengths[index], r))
    return [row for row in rows if row]


def packing_plan(lengths: Sequence[int], max_pad: float = PACK_MAX_PAD) -> list[list[int]]:
    """Sequence indices per packed row: the most rows whose padding is <= `max_pad` (else the least padding).

    Rows are as wide as their fullest member, so fewer rows means less padding but wider rows; and without
    a varlen kernel (CPU sdpa/eager) attention costs rows * width^2, masked blocks included. The most rows that
    meet the pad target are the narrowest that do: the least attention compute for that padding.
    """
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"packing needs at least one sequence and no empty ones, got lengths {list(lengths)}")
    total = sum(lengths)
    best: tuple[float, list[list[int]]] | None = None
    for n_rows in range(len(lengths), 0, -1):
        rows = _balanced_rows(lengths, n_rows)
        slots = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        pad = 1 - total / slots
        if pad <= max_pad:
            return rows
        if best is None or pad < best[0]:
            best = (pad, rows)
    assert best is not None
    return best[1]


def pack_rows(
    input_ids: Tensor, attention_mask: Tensor, pad_token_id: int, *, max_pad: float = PACK_MAX_PAD
) -> PackedRows:
    """Pack the right-padded rows of `input_ids` [N, T] (real tokens: the `attention_mask` prefix of each row)
    as `packing_plan(lengths, max_pad)` says; sequences are never split, the width is the fullest row's."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must be the same [N, T]")
    lengths = [int(n) for n in attention_mask.sum(dim=1)]
    if any(bool(attention_mask[i, n:].any()) for i, n in enumerate(lengths)):
        raise ValueError("pack_rows needs right padding: attention_mask must be 1s then 0s in every row")
    plan = packing_plan(lengths, max_pad)
    packed_w = max(sum(lengths[i] for i in members) for members in plan)
    ids = torch.full((len(plan), packed_w), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(plan), packed_w), dtype=torch.long)
    row = torch.zeros(len(lengths), dtype=torch.long)
    start = torch.zeros(len(lengths), dtype=torch.long)
    for r, members in enumerate(plan):
        col = 0
        for i in members:
            n = lengths[i]
            ids[r, col:col + n] = input_ids[i, :n]
            positions[r, col:col + n] = torch.arange(n)
            row[i], start[i] = r, col
            col += n
        positions[r, col:] = torch.arange(packed_w - col)
    return PackedRows(ids, positions, row, start, torch.tensor(lengths, dtype=torch.long))


__all__ = ["PackedRows", "collate_pairs", "collate_sft", "length_bucketed_batches", "pack_rows", "packing_plan",
           "pad_fraction", "right_pad", "token_budget_batches"]

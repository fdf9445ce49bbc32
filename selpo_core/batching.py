"""Batch composition and collation: which rows go together, and how they become padded tensors.

Kept apart from `data.py` (reading and tokenizing) because trainers and the scorer import only this.
Index-level functions (`length_bucketed_batches`, `token_budget_batches`, `pad_fraction`) work on plain
lengths so they serve pairs, SFT rows and scoring alike. Collation follows docs/CONTRACTS.md: right padding,
chosen rows 0..B-1, rejected rows B..2B-1, boolean masks (never padding detected from values).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

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
) -> dict[str, Any]:
    """The pair batch of CONTRACTS.md, padded to the batch's longest row, plus `example_ids: list[str]`.

    Per-response lists (`*_selected`, `*_ref_logps`, `*_values`: stored per-token values such as TGDPO's
    oracle rewards or TIS-DPO's weights, batch key `token_values`) are aligned with that response's tokens (EOS
    included) and are placed at its positions in the row; everything else in those tensors is False / 0.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    n = len(pairs)
    selected = _both_sides("selected", chosen_selected, rejected_selected, n)
    ref = _both_sides("ref_logps", chosen_ref_logps, rejected_ref_logps, n)
    values = _both_sides("values", chosen_values, rejected_values, n)
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    prompts = [p.prompt_ids for p in pairs] * 2
    ids = [p.example_id for p in pairs] * 2
    width = max(len(prompt) + len(resp) for prompt, resp in zip(prompts, responses))
    input_ids = torch.full((2 * n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * n, width), dtype=torch.long)
    loss_mask = torch.zeros((2 * n, width), dtype=torch.bool)
    selected_mask = torch.zeros((2 * n, width), dtype=torch.bool) if selected is not None else None
    ref_logps = torch.zeros((2 * n, width), dtype=torch.float32) if ref is not None else None
    token_values = torch.zeros((2 * n, width), dtype=torch.float32) if values is not None else None
    for row, (prompt, resp) in enumerate(zip(prompts, responses)):
        start, end = len(prompt), len(prompt) + len(resp)
        input_ids[row, :end] = torch.tensor(list(prompt) + list(resp), dtype=torch.long)
        attention_mask[row, :end] = 1
        loss_mask[row, start:end] = True
        if selected is not None and selected_mask is not None:
            aligned = _aligned(selected[row], resp, "selected", ids[row])
            selected_mask[row, start:end] = torch.tensor(list(aligned), dtype=torch.bool)
        if ref is not None and ref_logps is not None:
            aligned = _aligned(ref[row], resp, "ref_logps", ids[row])
            ref_logps[row, start:end] = torch.tensor(list(aligned), dtype=torch.float32)
        if values is not None and token_values is not None:
            aligned = _aligned(values[row], resp, "values", ids[row])
            token_values[row, start:end] = torch.tensor(list(aligned), dtype=torch.float32)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if selected_mask is not None:
        batch["selected_mask"] = selected_mask
    if ref_logps is not None:
        batch["ref_per_token_logps"] = ref_logps
    if token_values is not None:
        batch["token_values"] = token_values
    batch["example_ids"] = [p.example_id for p in pairs]
    return batch


def collate_sft(items: Sequence[TokenizedSFT], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded SFT batch; `loss_mask` is True on completion tokens (EOS included), else False."""
    if not items:
        raise ValueError("collate_sft needs at least one item")
    width = max(len(item.prompt_ids) + len(item.completion_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    loss_mask = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        start, end = len(item.prompt_ids), len(item.prompt_ids) + len(item.completion_ids)
        input_ids[row, :end] = torch.tensor([*item.prompt_ids, *item.completion_ids], dtype=torch.long)
        attention_mask[row, :end] = 1
        loss_mask[row, start:end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


__all__ = ["collate_pairs", "collate_sft", "length_bucketed_batches", "pad_fraction", "token_budget_batches"]

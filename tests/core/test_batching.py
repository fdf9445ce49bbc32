"""right_pad: the one right-padding helper the collators use."""

from __future__ import annotations

import pytest
import torch

from selpo_core.batching import collate_sft, right_pad
from selpo_core.examples import TokenizedSFT


def test_right_pad_places_rows_at_their_starts() -> None:
    out = right_pad([[1, 2], [3], []], -1, torch.long, starts=[1, 0, 2])
    assert out.tolist() == [[-1, 1, 2], [3, -1, -1], [-1, -1, -1]]
    wide = right_pad([[True]], False, torch.bool, width=3)
    assert wide.dtype == torch.bool and wide.tolist() == [[True, False, False]]


def test_right_pad_rejects_rows_wider_than_width_and_mismatched_starts() -> None:
    with pytest.raises(ValueError, match="needs 3 columns"):
        right_pad([[1, 2, 3]], 0, torch.long, width=2)
    with pytest.raises(ValueError, match="1 starts for 2 rows"):
        right_pad([[1], [2]], 0, torch.long, starts=[0])


def test_collate_sft_masks_completions_only() -> None:
    items = [TokenizedSFT([5, 6], [7, 1]), TokenizedSFT([5], [1])]
    batch = collate_sft(items, 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]

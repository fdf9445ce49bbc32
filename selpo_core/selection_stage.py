"""The select stage: stored token rewards -> policy-token rewards -> selected mask, heatmap, precision.

Scores are on the reference/oracle tokenizer. When the policy's tokenizer differs (weak-to-strong across model
families), rewards move onto the policy's tokens through character offsets (`selection.transfer_rewards`);
with the same tokenization the transfer is an exact identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from selpo_core import selection
from selpo_core.config import SelectConfig

SELECTION_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("side", pa.string()),
    ("token_ids", pa.list_(pa.int32())),
    ("offset_start", pa.list_(pa.int32())),
    ("offset_end", pa.list_(pa.int32())),
    ("text", pa.string()),
    ("rewards", pa.list_(pa.float32())),
    ("selected", pa.list_(pa.bool_())),
])


def _policy_rows(score_rows: dict[tuple[str, str], dict[str, Any]], policy_pairs: Sequence[Any]) -> list[dict]:
    """One row per policy response with its rewards on the policy's tokens."""
    rows = []
    for pair in policy_pairs:
        for side in ("chosen", "rejected"):
            scored = score_rows.get((pair.example_id, side))
            if scored is None:
                raise ValueError(f"scores have no {side} response for example {pair.example_id}: "
                                 "the scores were computed on other data")
            token_ids = list(pair.chosen_ids if side == "chosen" else pair.rejected_ids)
            offsets = list(pair.chosen_offsets if side == "chosen" else pair.rejected_offsets)
            text = pair.chosen_text if side == "chosen" else pair.rejected_text
            if text != scored["text"]:
                raise ValueError(f"example {pair.example_id} ({side}): response text differs between scores and data")
            src_offsets = list(zip(scored["offset_start"], scored["offset_end"]))
            if list(scored["token_ids"]) == token_ids and src_offsets == [tuple(o) for o in offsets]:
                rewards = list(scored["rewards"])  # same tokenization: exact identity
            else:
                rewards = selection.transfer_rewards(src_offsets, scored["rewards"], [tuple(o) for o in offsets])
            rows.append({"example_id": pair.example_id, "side": side, "token_ids": token_ids,
                         "offset_start": [o[0] for o in offsets], "offset_end": [o[1] for o in offsets],
                         "text": text, "rewards": [float(r) for r in rewards]})
    return rows


def _padded(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max((len(row["rewards"]) for row in rows), default=0)
    rewards = torch.zeros(len(rows), max(length, 1), dtype=torch.float64)
    mask = torch.zeros(len(rows), max(length, 1), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row["rewards"])
        rewards[i, :n] = torch.tensor(row["rewards"], dtype=torch.float64)
        mask[i, :n] = True
    return rewards, mask


def select_rows(cfg: SelectConfig, rows: list[dict]) -> dict[str, Any]:
    """Fill `row["selected"]` for every row; return counts."""
    chosen = [row for row in rows if row["side"] == "chosen"]
    rejected = [row for row in rows if row["side"] == "rejected"]
    chosen_rewards, chosen_mask = _padded(chosen)
    rejected_rewards, rejected_mask = _padded(rejected)
    rule = selection.sepo_select if cfg.rule == "topk" else selection.global_threshold_select
    chosen_selected, rejected_selected = rule(chosen_rewards, chosen_mask, rejected_rewards, rejected_mask,
                                              k_chosen=cfg.k_chosen, k_rejected=cfg.k_rejected)
    for side_rows, selected in ((chosen, chosen_selected), (rejected, rejected_selected)):
        for i, row in enumerate(side_rows):
            row["selected"] = selected[i, : len(row["rewards"])].tolist()
    empty = [row for row in rows if not any(row["selected"])]
    return {
        "selected_fraction/chosen": float(chosen_selected.sum() / chosen_mask.sum().clamp(min=1)),
        "selected_fraction/rejected": float(rejected_selected.sum() / rejected_mask.sum().clamp(min=1)),
        # Reported, not dropped: such a response contributes nothing to the SePO loss (mean over 0 tokens = 0).
        "responses_without_selection": len(empty),
    }


def write_selection(cfg: SelectConfig, scores_dir: Path, policy_pairs: Sequence[Any], out_dir: Path, *,
                    truth_dir: Path | None) -> dict[str, Any]:
    from selpo_core.heatmap import write_heatmap
    from selpo_core.scoring import read_scores, scores_to_pair_lookup

    rows = _policy_rows(scores_to_pair_lookup(read_scores(scores_dir)), policy_pairs)
    metrics = select_rows(cfg, rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=SELECTION_SCHEMA), out_dir / "selection.parquet")
    if truth_dir is not None:
        metrics.update(_precision(rows, truth_dir))
        _attach_truth(rows, truth_dir)
    write_heatmap(rows, out_dir / "token_heatmap.html", title="selpo token rewards (selected tokens boxed)")
    return metrics


def _truth_labels(rows: list[dict], truth_dir: Path) -> list[list[int]]:
    from selpo_core.synthetic import GroundTruth

    truth = GroundTruth.load(truth_dir)
    return [truth.key_labels(list(zip(row["offset_start"], row["offset_end"])), row["text"]) for row in rows]


def _precision(rows: list[dict], truth_dir: Path) -> dict[str, float]:
    from selpo_core.oracle_quality import selection_precision

    labels = _truth_labels(rows, truth_dir)
    flat: dict[str, tuple[list[bool], list[int]]] = {"chosen": ([], []), "rejected": ([], [])}
    for row, row_labels in zip(rows, labels):
        selected, side_labels = flat[row["side"]]
        selected.extend(row["selected"])
        side_labels.extend(row_labels)
    return selection_precision(*flat["chosen"], *flat["rejected"])


def _attach_truth(rows: list[dict], truth_dir: Path) -> None:
    """Heatmap tooltips show the true token reward next to the oracle's."""
    for row, labels in zip(rows, _truth_labels(rows, truth_dir)):
        row["true_rewards"] = [float(label) for label in labels]

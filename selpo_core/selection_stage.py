"""The select stage: stored token rewards -> policy-token rewards -> selected mask, heatmap, truth metrics.

Scores are on the reference/oracle tokenizer. When the policy's tokenizer differs (weak-to-strong across model
families), rewards move onto the policy's tokens through character offsets (`selection.transfer_rewards`);
with the same tokenization the transfer is an exact identity.

Special tokens of the policy tokenizer (`special_token_ids`) are never selected when
`SelectConfig.exclude_special_tokens` is on (the default): per response, count = max(1, floor(k * n_selectable))
over the other tokens. Their rewards are still written, so the heatmap shows them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids selection must never pick: `tokenizer.all_special_ids` (EOS, BOS, pad, unk, ...) plus every added
    token marked special (chat-template markers such as <|im_start|>, which `all_special_ids` leaves out)."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids |= {int(i) for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special}
    return frozenset(ids)


def _padded(rows: list[dict], excluded: Collection[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [N, L] and the mask of SELECTABLE tokens (real tokens whose id is not in `excluded`)."""
    length = max((len(row["rewards"]) for row in rows), default=0)
    rewards = torch.zeros(len(rows), max(length, 1), dtype=torch.float64)
    mask = torch.zeros(len(rows), max(length, 1), dtype=torch.bool)
    excluded_array = np.fromiter(excluded, dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row["rewards"])
        rewards[i, :n] = torch.tensor(row["rewards"], dtype=torch.float64)
        selectable = ~np.isin(np.asarray(row["token_ids"], dtype=np.int64), excluded_array)
        mask[i, :n] = torch.from_numpy(selectable)
    return rewards, mask


def select_rows(cfg: SelectConfig, rows: list[dict], special_token_ids: Collection[int]) -> dict[str, Any]:
    """Fill `row["selected"]` for every row (rows carry `side`, `token_ids`, `rewards`); return counts.

    `special_token_ids` (from `special_token_ids(policy_tokenizer)`) are left out of the selection when
    `cfg.exclude_special_tokens`; with it off they compete like any token (and pass `()` if there are none).
    """
    excluded = special_token_ids if cfg.exclude_special_tokens else ()
    chosen = [row for row in rows if row["side"] == "chosen"]
    rejected = [row for row in rows if row["side"] == "rejected"]
    chosen_rewards, chosen_mask = _padded(chosen, excluded)
    rejected_rewards, rejected_mask = _padded(rejected, excluded)
    rule = selection.sepo_select if cfg.rule == "topk" else selection.global_threshold_select
    chosen_selected, rejected_selected = rule(chosen_rewards, chosen_mask, rejected_rewards, rejected_mask,
                                              k_chosen=cfg.k_chosen, k_rejected=cfg.k_rejected)
    special = np.fromiter(special_token_ids, dtype=np.int64)
    metrics: dict[str, Any] = {}
    for side, side_rows, selected in (("chosen", chosen, chosen_selected), ("rejected", rejected, rejected_selected)):
        n_tokens = n_special = n_special_selected = 0
        for i, row in enumerate(side_rows):
            row["selected"] = selected[i, : len(row["rewards"])].tolist()
            is_special = np.isin(np.asarray(row["token_ids"], dtype=np.int64), special)
            n_tokens += len(row["rewards"])
            n_special += int(is_special.sum())
            n_special_selected += int((is_special & np.asarray(row["selected"], dtype=bool)).sum())
        n_selected = int(selected.sum())
        metrics[f"selected_fraction/{side}"] = n_selected / max(1, n_tokens)
        # Of the selected tokens, the share that are special (EOS...): 0 when they are excluded.
        metrics[f"special_selected_fraction/{side}"] = n_special_selected / max(1, n_selected)
        metrics[f"special_token_fraction/{side}"] = n_special / max(1, n_tokens)
    # Reported, not dropped: such a response contributes nothing to the SePO loss (mean over 0 tokens = 0).
    metrics["responses_without_selection"] = sum(1 for row in rows if not any(row["selected"]))
    return metrics


def write_selection(cfg: SelectConfig, scores_dir: Path, policy_pairs: Sequence[Any], out_dir: Path, *,
                    special_token_ids: Collection[int], truth_dir: Path | None) -> dict[str, Any]:
    """selection.parquet + token_heatmap.html into `out_dir`; returns the stage metrics.

    `special_token_ids`: `special_token_ids(policy_tokenizer)` (the ids of the policy tokenizer, on whose
    tokens the selection is made). `truth_dir`: the synthetic task directory, for the truth metrics
    (`selection_truth_metrics`); None for user data.
    """
    from selpo_core.heatmap import write_heatmap
    from selpo_core.scoring import read_scores, scores_to_pair_lookup

    rows = _policy_rows(scores_to_pair_lookup(read_scores(scores_dir)), policy_pairs)
    metrics = select_rows(cfg, rows, special_token_ids)
    pq.write_table(pa.Table.from_pylist(rows, schema=SELECTION_SCHEMA), out_dir / "selection.parquet")
    if truth_dir is not None:
        labels = _truth_labels(rows, truth_dir)
        metrics.update(selection_truth_metrics(rows, labels, special_token_ids))
        for row, row_labels in zip(rows, labels):  # heatmap tooltips show the true token reward
            row["true_rewards"] = [float(label) for label in row_labels]
    write_heatmap(rows, out_dir / "token_heatmap.html", title="selpo token rewards (selected tokens boxed)")
    return metrics


def _truth_labels(rows: list[dict], truth_dir: Path) -> list[list[int]]:
    from selpo_core.synthetic import GroundTruth

    truth = GroundTruth.load(truth_dir)
    return [truth.key_labels(list(zip(row["offset_start"], row["offset_end"])), row["text"]) for row in rows]


def selection_truth_metrics(rows: list[dict], labels: Sequence[Sequence[int]],
                            special_token_ids: Collection[int]) -> dict[str, float]:
    """Truth metrics on the POLICY's tokens (after any cross-tokenizer transfer) of rows with `side`,
    `token_ids`, `rewards` and `selected`, given each row's key labels (+1 / -1 / 0 per token): selection
    precision, key-token recall, and `oracle_quality.score_truth_metrics` (token AUROC with and without special
    tokens, precision at the key rate)."""
    from selpo_core import oracle_quality

    flat: dict[str, tuple[list[bool], list[int]]] = {"chosen": ([], []), "rejected": ([], [])}
    for row, row_labels in zip(rows, labels, strict=True):
        selected, side_labels = flat[row["side"]]
        selected.extend(row["selected"])
        side_labels.extend(row_labels)
    return {
        **oracle_quality.selection_precision(*flat["chosen"], *flat["rejected"]),
        **oracle_quality.key_recall(*flat["chosen"], *flat["rejected"]),
        **oracle_quality.score_truth_metrics(rows, labels, special_token_ids),
    }


# ------------------------------------------------------------------------------------------ TIS-DPO weights

WEIGHTS_SCHEMA = pa.schema([("example_id", pa.string()), ("side", pa.string()), ("token_ids", pa.list_(pa.int32())),
                            ("weights", pa.list_(pa.float32()))])


def write_tis_weights(policy: Any, scores_dir: Path, reverse_scores_dir: Path, policy_pairs: Sequence[Any],
                      out_dir: Path, *, special_token_ids: Collection[int]) -> dict[str, Any]:
    """weights.parquet: TIS-DPO's token importance weights on the policy's tokens; returns the stage metrics.

    Score per token (`token_weights.tis_dpo_scores`): log pi_oracle - log pi_reverse_oracle on chosen responses,
    its negative on rejected ones, moved onto the policy's tokens like the selection's rewards, then mapped per
    response by `policy.tis_weighting` (rank, clamp, binary) over the non-special tokens; special tokens (EOS...)
    get weight 0, as in the official pipeline (weights estimated on the text tokens only).
    """
    from selpo_core import token_weights
    from selpo_core.scoring import read_scores, scores_to_pair_lookup

    forward = scores_to_pair_lookup(read_scores(scores_dir))
    reverse = scores_to_pair_lookup(read_scores(reverse_scores_dir))
    oriented = {}
    for key, row in forward.items():
        other = reverse.get(key)
        if other is None or list(other["token_ids"]) != list(row["token_ids"]):
            raise ValueError(f"the reverse oracle's scores of example {key[0]} ({key[1]}) are on other tokens: the two "
                             "score stages do not match")
        scores = token_weights.tis_dpo_scores(torch.tensor(row["oracle_logps"]), torch.tensor(other["oracle_logps"]),
                                              side=key[1])
        oriented[key] = {**row, "rewards": scores.tolist()}
    rows = _policy_rows(oriented, policy_pairs)
    for side in ("chosen", "rejected"):
        side_rows = [row for row in rows if row["side"] == side]
        scores, selectable = _padded(side_rows, special_token_ids)
        weights = _tis_weights(policy, scores.float(), selectable)
        for i, row in enumerate(side_rows):
            row["weights"] = weights[i, : len(row["rewards"])].tolist()
    pq.write_table(pa.Table.from_pylist([{k: row[k] for k in WEIGHTS_SCHEMA.names} for row in rows],
                                        schema=WEIGHTS_SCHEMA), out_dir / "weights.parquet")
    flat = np.concatenate([np.asarray(row["weights"]) for row in rows] or [np.zeros(1)])
    return {"tis_weighting": policy.tis_weighting, "weight_mean": float(flat.mean()), "weight_min": float(flat.min()),
            "weight_max": float(flat.max()), "n_responses": len(rows)}


def _tis_weights(policy: Any, scores: torch.Tensor, selectable: torch.Tensor) -> torch.Tensor:
    from selpo_core import token_weights

    if policy.tis_weighting == "rank":
        return token_weights.rank_weights(scores, selectable, min_weight=policy.tis_min_weight,
                                          max_weight=policy.tis_max_weight)
    if policy.tis_weighting == "clamp":
        return token_weights.clamp_scale_weights(scores, selectable, min_score=-policy.tis_score_clip,
                                                 max_score=policy.tis_score_clip, min_weight=policy.tis_min_weight,
                                                 max_weight=policy.tis_max_weight)
    return token_weights.binary_weights(scores, selectable, k=policy.tis_k)

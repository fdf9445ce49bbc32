"""How well token rewards find the key tokens, measured against the synthetic task's ground truth."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if a class is empty."""
    scores_array = np.asarray(scores, dtype=np.float64)
    labels_array = np.asarray(labels, dtype=bool)
    n_pos = int(labels_array.sum())
    n_neg = labels_array.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores_array, kind="mergesort")
    sorted_scores = scores_array[order]
    ranks = np.empty_like(sorted_scores)
    # Average ranks over runs of equal scores, so ties count one half.
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(starts, counts):
        ranks[start:start + count] = start + (count + 1) / 2.0
    rank_of = np.empty_like(ranks)
    rank_of[order] = ranks
    rank_sum = rank_of[labels_array].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def token_auroc(chosen_rewards: Sequence[float], chosen_labels: Sequence[int],
                rejected_rewards: Sequence[float], rejected_labels: Sequence[int]) -> dict[str, float]:
    """AUROC of positive key vs filler tokens in chosen responses (higher reward = key), of negative key vs
    filler in rejected responses (lower reward = key), and of both pooled. Labels are +1/-1/0 per token."""
    chosen_r = np.asarray(chosen_rewards, dtype=np.float64)
    chosen_l = np.asarray(chosen_labels)
    rejected_r = np.asarray(rejected_rewards, dtype=np.float64)
    rejected_l = np.asarray(rejected_labels)
    chosen_keep = chosen_l >= 0
    rejected_keep = rejected_l <= 0
    positive = auroc(chosen_r[chosen_keep], chosen_l[chosen_keep] == 1)
    negative = auroc(-rejected_r[rejected_keep], rejected_l[rejected_keep] == -1)
    pooled = auroc(np.concatenate([chosen_r[chosen_keep], -rejected_r[rejected_keep]]),
                   np.concatenate([chosen_l[chosen_keep] == 1, rejected_l[rejected_keep] == -1]))
    return {"token_auroc": pooled, "token_auroc_positive": positive, "token_auroc_negative": negative}


def selection_precision(chosen_selected: Sequence[bool], chosen_labels: Sequence[int],
                        rejected_selected: Sequence[bool], rejected_labels: Sequence[int]) -> dict[str, float]:
    """Fraction of selected chosen tokens that are positive keys, of selected rejected tokens that are negative
    keys, and pooled; plus the base rates a random selection would get."""
    chosen_sel = np.asarray(chosen_selected, dtype=bool)
    rejected_sel = np.asarray(rejected_selected, dtype=bool)
    chosen_hit = np.asarray(chosen_labels) == 1
    rejected_hit = np.asarray(rejected_labels) == -1
    hits = chosen_hit[chosen_sel].sum() + rejected_hit[rejected_sel].sum()
    n_selected = chosen_sel.sum() + rejected_sel.sum()
    return {
        "selection_precision": float(hits / n_selected) if n_selected else float("nan"),
        "selection_precision_chosen": float(chosen_hit[chosen_sel].mean()) if chosen_sel.any() else float("nan"),
        "selection_precision_rejected": (
            float(rejected_hit[rejected_sel].mean()) if rejected_sel.any() else float("nan")
        ),
        "selection_precision_chance": float((chosen_hit.sum() + rejected_hit.sum())
                                            / max(1, chosen_hit.size + rejected_hit.size)),
    }


def key_recall(chosen_selected: Sequence[bool], chosen_labels: Sequence[int],
               rejected_selected: Sequence[bool], rejected_labels: Sequence[int]) -> dict[str, float]:
    """Fraction of the true key tokens that the selection keeps: positive keys of chosen responses, negative keys
    of rejected responses, and both pooled (NaN where a side has no key). The headline of a selection: its
    precision cannot exceed the key rate / k (about 0.34 at k = 0.3 on the built-in task), its recall can be 1."""
    chosen_key = np.asarray(chosen_labels) == 1
    rejected_key = np.asarray(rejected_labels) == -1
    chosen_hits = int(np.asarray(chosen_selected, dtype=bool)[chosen_key].sum())
    rejected_hits = int(np.asarray(rejected_selected, dtype=bool)[rejected_key].sum())
    n_chosen, n_rejected = int(chosen_key.sum()), int(rejected_key.sum())

    def ratio(hits: int, n: int) -> float:
        return hits / n if n else float("nan")

    return {
        "key_recall": ratio(chosen_hits + rejected_hits, n_chosen + n_rejected),
        "key_recall_chosen": ratio(chosen_hits, n_chosen),
        "key_recall_rejected": ratio(rejected_hits, n_rejected),
    }


def precision_at_key_rate(chosen_rewards: Sequence[float], chosen_labels: Sequence[int],
                          rejected_rewards: Sequence[float], rejected_labels: Sequence[int]) -> dict[str, float]:
    """Precision of the oracle's ranking when it keeps exactly as many tokens as there are keys (R-precision).

    Per side over all of that side's tokens pooled: chosen keeps its n_+ highest rewards (n_+ = its positive
    keys), rejected its n_- lowest (n_- = its negative keys); the value is the fraction of kept tokens that are
    those keys (equal to the recall at that point; 1 for a perfect ranking, the key rate for a random one).
    Ties go to the earlier token. Pooled: hits of both sides over n_+ + n_-. `key_rate` is n_keys / n_tokens.
    """
    out: dict[str, float] = {}
    hits_total = keys_total = tokens_total = 0
    for side, rewards, labels, key, sign in (("chosen", chosen_rewards, chosen_labels, 1, -1.0),
                                             ("rejected", rejected_rewards, rejected_labels, -1, 1.0)):
        is_key = np.asarray(labels) == key
        n_keys = int(is_key.sum())
        order = np.argsort(sign * np.asarray(rewards, dtype=np.float64), kind="stable")
        hits = int(is_key[order[:n_keys]].sum())
        out[f"precision_at_key_rate_{side}"] = hits / n_keys if n_keys else float("nan")
        hits_total, keys_total, tokens_total = hits_total + hits, keys_total + n_keys, tokens_total + is_key.size
    out["precision_at_key_rate"] = hits_total / keys_total if keys_total else float("nan")
    out["key_rate"] = keys_total / tokens_total if tokens_total else float("nan")
    return out


def score_truth_metrics(rows: Sequence[dict], labels: Sequence[Sequence[int]],
                        special_token_ids: Collection[int]) -> dict[str, float]:
    """The score stage's truth metrics from scored rows (`side`, `token_ids`, `rewards`) and each row's key
    labels (+1 / -1 / 0 per token, `synthetic.GroundTruth.key_labels`).

    - token_auroc{,_positive,_negative}: over every response token, EOS included (the historical number);
    - token_auroc_no_special{,_positive,_negative}: the same without `special_token_ids` (EOS...), i.e. over
      the tokens the default selection ranks. Report both: EOS is a filler here, and an oracle that pushes
      EOS down in rejected responses (it does, more so at higher oracle beta) looks worse on the first;
    - precision_at_key_rate{,_chosen,_rejected} and key_rate: over the non-special tokens.
    """
    special = np.fromiter(special_token_ids, dtype=np.int64)
    flat = {key: ([], []) for key in ("chosen", "rejected", "chosen_text", "rejected_text")}
    for row, row_labels in zip(rows, labels, strict=True):
        rewards = np.asarray(row["rewards"], dtype=np.float64)
        side_labels = np.asarray(row_labels, dtype=np.int64)
        if rewards.shape != side_labels.shape:
            raise ValueError(f"example {row.get('example_id')} ({row['side']}): {rewards.size} rewards but "
                             f"{side_labels.size} labels")
        text = ~np.isin(np.asarray(row["token_ids"], dtype=np.int64), special)
        for key, keep in ((row["side"], slice(None)), (f"{row['side']}_text", text)):
            flat[key][0].append(rewards[keep])
            flat[key][1].append(side_labels[keep])

    def joined(key: str) -> tuple[np.ndarray, np.ndarray]:
        values, side_labels = flat[key]
        return (np.concatenate(values) if values else np.zeros(0),
                np.concatenate(side_labels) if side_labels else np.zeros(0, dtype=np.int64))

    everything = token_auroc(*joined("chosen"), *joined("rejected"))
    text_only = token_auroc(*joined("chosen_text"), *joined("rejected_text"))
    return {**everything,
            **{name.replace("token_auroc", "token_auroc_no_special"): value for name, value in text_only.items()},
            **precision_at_key_rate(*joined("chosen_text"), *joined("rejected_text"))}

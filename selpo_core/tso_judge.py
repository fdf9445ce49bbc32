"""TSO's judge and pair construction: judge scores, pairs from a ranking, the policy's implicit rewards.

Helpers of the TSO stages (selpo_core/stages/tso.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selpo_core.config import RunConfig


def judge_scores(judge: str, judge_path: str, data_dir: Path, prompts: list[Any], texts: list[str],
                 batch_size: int = 16) -> list[float | None]:
    """The judge's score of each (prompt, response); None where a label file has no label for it.

    truth: the synthetic task's ground truth (data_dir/task.json); reward_model: the scalar RM at `judge_path`;
    labels: a JSON/JSONL file of {prompt, response, score} rows at `judge_path`.
    """
    if judge == "truth":
        from selpo_core.synthetic import GroundTruth

        if not (data_dir / "task.json").is_file():
            raise ValueError("tso.judge=truth needs the synthetic task (data.path empty); use reward_model or labels")
        truth = GroundTruth.load(data_dir)
        return [truth.reward(text) for text in texts]
    if judge == "reward_model":
        from selpo_core.evaluate import reward_model_scores

        return list(reward_model_scores(judge_path, prompts, texts, batch_size=batch_size))
    if judge == "labels":
        return _label_scores(Path(judge_path), prompts, texts)
    raise ValueError(f"unknown judge {judge!r}")


def _label_scores(path: Path, prompts: list[Any], texts: list[str]) -> list[float | None]:
    raw = path.read_text()
    lines = [line for line in raw.splitlines() if line.strip()]
    rows = json.loads(raw) if path.suffix == ".json" else [json.loads(line) for line in lines]
    labels = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not {"prompt", "response", "score"} <= set(row):
            raise ValueError(f"{path} row {number}: a label needs prompt, response and score")
        labels[(json.dumps(row["prompt"], sort_keys=True), row["response"])] = float(row["score"])
    return [labels.get((json.dumps(p, sort_keys=True), t)) for p, t in zip(prompts, texts)]


def pairs_from_ranking(scores: list[float], pairing: str, pairs_per_prompt: int) -> list[tuple[int, int]]:
    """(chosen, rejected) candidate indices from one prompt's judge scores; equal scores never make a pair.

    Ties in the ranking keep candidate order (stable sort), so the same scores always give the same pairs.
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if pairing == "best_vs_worst":
        pairs = [(order[k], order[-1 - k]) for k in range(len(order) // 2)]
    else:
        adjacent = [(order[k], order[k + 1]) for k in range(len(order) - 1)]
        pairs = sorted(adjacent, key=lambda p: -(scores[p[0]] - scores[p[1]]))  # informative (large gaps) first
    return [(c, r) for c, r in pairs if scores[c] > scores[r]][:pairs_per_prompt]


def policy_implicit_rewards(cfg: RunConfig, policy_path: str, anchor_path: str | None, examples: list[Any],
                            prompt_template: str | None = None) -> dict[str, tuple[float, float]]:
    """{example_id: (r_chosen, r_rejected)} with r = beta * (log pi(y|x) - log pi_ref(y|x)), tokenized as training
    tokenizes (so the check sees exactly the sequences the next round trains on). `anchor_path` None: the policy
    is its own reference (round 1), so every r is 0."""
    from selpo_core import data, models
    from selpo_core.evaluate import implicit_rewards

    tokenizer = models.load_tokenizer(policy_path)
    pairs, _ = data.tokenize_pairs(examples, tokenizer, cfg.data, source="tso pairs", prompt_template=prompt_template)
    if anchor_path is None:
        return {pair.example_id: (0.0, 0.0) for pair in pairs}
    ratios = implicit_rewards(policy_path, anchor_path, pairs, batch_size=cfg.evaluate.batch_size, tokenizer=tokenizer)
    beta = cfg.policy.beta
    return {pair.example_id: (beta * c, beta * r) for pair, (c, r) in zip(pairs, ratios)}

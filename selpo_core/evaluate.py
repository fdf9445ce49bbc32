"""Offline evaluation: true reward on the synthetic task, reward-model scores and win rates, implicit-reward
accuracy on held-out pairs, and the report files.

Log-probs of a given answer are computed the way generation produced it: the prompt is rendered with the
chat template (add_generation_prompt=True) and the answer's tokens follow, plus EOS when the answer ended
with one (a `generations.jsonl` says so: finish_reasons == "eos"). `selpo_core.logps` does the shifting.

KL(policy || reference) is estimated on the policy's own samples, mean over samples of
log pi(y|x) - log pi_ref(y|x). That is the KL of the models' distributions only when the samples were drawn
at temperature 1 with top_p 1; otherwise it measures the same log-ratio on a different distribution.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selpo_core.artifacts import atomic_write_text

if TYPE_CHECKING:
    import torch

Prompt = str | list[dict[str, str]]
"""A user message, or a conversation ending with a user turn."""


# ----------------------------------------------------------------------------------------------- helpers


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _model(model_or_path: Any) -> Any:
    """A loaded model from a directory (or hub id), or the model itself."""
    from selpo_core import models

    return models.load_model(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path


def _tokenizer(model_or_path: Any, tokenizer: Any) -> Any:
    from selpo_core import models

    if tokenizer is not None:
        return tokenizer
    if isinstance(model_or_path, (str, Path)):
        return models.load_tokenizer(model_or_path)
    raise ValueError("a tokenizer is required when a loaded model (not a directory) is passed")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def encode_answer(
    tokenizer: Any, prompt: Prompt, answer: str, *, ended: bool = True
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) as generation saw them: the chat-templated prompt, then the answer (+ EOS)."""
    text = tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    if ended:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r:.60} renders to no tokens; the first answer token has no context")
    return prompt_ids, answer_ids


def _response_logps(model: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Sum of log p(response | prompt) for (prompt ids, response ids) rows, `batch_size` rows per forward."""
    import torch

    from selpo_core.logps import masked_sum, model_per_token_logps

    device, totals = _device(model), []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(p) + len(r) for p, r in chunk)
        input_ids = torch.zeros((len(chunk), length), dtype=torch.long)
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        loss_mask = torch.zeros((len(chunk), length), dtype=torch.bool)
        for b, (p, r) in enumerate(chunk):  # right padding (pad id 0: masked out everywhere)
            input_ids[b, : len(p) + len(r)] = torch.tensor(p + r)
            attention[b, : len(p) + len(r)] = 1
            loss_mask[b, len(p) : len(p) + len(r)] = True
        with torch.no_grad():
            logps = model_per_token_logps(
                model, input_ids.to(device), attention.to(device), loss_mask.to(device)
            )
        totals += masked_sum(logps, loss_mask.to(device)).tolist()
    return totals


def _answer_logps(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    ended: Sequence[bool] | None,
    batch_size: int,
) -> tuple[list[float], list[int]]:
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    flags = list(ended) if ended is not None else [True] * len(answers)
    rows = [encode_answer(tokenizer, p, a, ended=e) for p, a, e in zip(prompts, answers, flags, strict=True)]
    return _response_logps(model, rows, batch_size), [len(r) for _, r in rows]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------- log-probs


def sequence_logps(
    model_dir_or_model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    ended: Sequence[bool] | None = None,
) -> list[float]:
    """log pi(answer | prompt) per pair: the sum over the answer's tokens, EOS included where `ended` (default
    all). `tokenizer` may be None when a directory is given (its tokenizer is loaded)."""
    tokenizer = _tokenizer(model_dir_or_model, tokenizer)
    return _answer_logps(_model(model_dir_or_model), tokenizer, prompts, answers, ended, batch_size)[0]


def synthetic_metrics(
    policy_answers: Sequence[str],
    reference_answers: Sequence[str],
    prompts: Sequence[Prompt],
    task_dir: str | Path,
    policy_dir: Any,
    reference_dir: Any,
    *,
    policy_ended: Sequence[bool] | None = None,
    batch_size: int = 16,
    policy_tokenizer: Any = None,
    reference_tokenizer: Any = None,
) -> dict[str, float]:
    """Ground truth on the synthetic task. Answers are aligned with `prompts` (repeat a prompt per sample).

    true_reward / true_reward_reference: mean true reward of the policy's / reference's answers;
    reward_gain: their difference; kl_seq: mean log pi(y|x) - log pi_ref(y|x) over the policy's answers;
    kl_per_token: the same summed and divided by the policy's answer tokens (EOS included where ended);
    answer_words / answer_tokens (and the reference's words): mean answer lengths. Each model scores the
    text with its own tokenizer, so the sequence-level KL is valid across tokenizers.
    """
    from selpo_core.synthetic import GroundTruth

    if not (len(policy_answers) == len(reference_answers) == len(prompts)):
        raise ValueError("policy_answers, reference_answers and prompts must be aligned (same length)")
    truth = GroundTruth.load(task_dir)
    policy_rewards = [truth.reward(a) for a in policy_answers]
    reference_rewards = [truth.reward(a) for a in reference_answers]
    answers = answer_metrics(policy_answers, prompts, policy_dir, reference_dir, policy_ended=policy_ended,
                             batch_size=batch_size, policy_tokenizer=policy_tokenizer,
                             reference_tokenizer=reference_tokenizer)
    return {
        "true_reward": _mean(policy_rewards),
        "true_reward_reference": _mean(reference_rewards),
        "reward_gain": _mean(policy_rewards) - _mean(reference_rewards),
        **answers,
        "reference_answer_words": _mean([len(a.split()) for a in reference_answers]),
    }


def answer_metrics(
    policy_answers: Sequence[str],
    prompts: Sequence[Prompt],
    policy_dir: Any,
    reference_dir: Any,
    *,
    policy_ended: Sequence[bool] | None = None,
    batch_size: int = 16,
    policy_tokenizer: Any = None,
    reference_tokenizer: Any = None,
) -> dict[str, float]:
    """What any data allows about a policy's answers: kl_seq (mean log pi(y|x) - log pi_ref(y|x) over the
    policy's answers, a sample estimate of KL(pi || pi_ref)), kl_per_token (summed, over the answer tokens, EOS
    included where ended), answer_words / answer_tokens (mean lengths), n. Each model scores the text with its
    own tokenizer, so the sequence-level KL is valid across tokenizers."""
    policy_tok = _tokenizer(policy_dir, policy_tokenizer)
    reference_tok = _tokenizer(reference_dir, reference_tokenizer)
    # One model in memory at a time: each is loaded, used and dropped.
    policy_lp, policy_tokens = _answer_logps(
        _model(policy_dir), policy_tok, prompts, policy_answers, policy_ended, batch_size
    )
    reference_lp, _ = _answer_logps(
        _model(reference_dir), reference_tok, prompts, policy_answers, policy_ended, batch_size
    )
    log_ratios = [p - r for p, r in zip(policy_lp, reference_lp, strict=True)]
    return {
        "kl_seq": _mean(log_ratios),
        "kl_per_token": sum(log_ratios) / max(sum(policy_tokens), 1),
        "answer_words": _mean([len(a.split()) for a in policy_answers]),
        "answer_tokens": _mean(
            [len(policy_tok(a, add_special_tokens=False)["input_ids"]) for a in policy_answers]
        ),
        "n": float(len(policy_answers)),
    }


def wilson_interval(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound for small n and for 0 or n successes)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------------- reward model


def reward_model_scores(
    rm_path: str | Path, prompts: Sequence[Prompt], answers: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """Scalar scores of (prompt, answer) under an HF sequence-classification reward model (num_labels=1).

    The conversation [user prompt, assistant answer] is rendered with the RM's chat template (without a
    generation prompt), or as "prompt\\nanswer" when it has none. The model pools the last non-pad token
    itself, as in its training, so right padding gives the same scores as one-at-a-time scoring.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from selpo_core import models

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = models.default_device()
    tokenizer = models.load_tokenizer(rm_path)
    model = (
        AutoModelForSequenceClassification.from_pretrained(
            str(rm_path), dtype=models.resolve_dtype("auto", device)
        )
        .to(device)
        .eval()
    )
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {rm_path} has num_labels={model.config.num_labels}; a scalar RM has 1"
        )
    if model.config.pad_token_id is None:  # needed to find each row's last real token in a padded batch
        model.config.pad_token_id = tokenizer.pad_token_id
    texts = []
    for prompt, answer in zip(prompts, answers, strict=True):
        if getattr(tokenizer, "chat_template", None):
            messages = _messages(prompt) + [{"role": "assistant", "content": answer}]
            texts.append((tokenizer.apply_chat_template(messages, tokenize=False), False))
        else:
            user = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            texts.append((f"{user}\n{answer}", True))
    tokenizer.padding_side = "right"
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        # The template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
        batch = tokenizer(
            [t for t, _ in chunk], add_special_tokens=chunk[0][1], padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
        scores += logits.logits[:, 0].float().tolist()
    return scores


def pairwise_win_rate(
    rm_path: str | Path,
    prompts: Sequence[Prompt],
    policy_answers: Sequence[str],
    baseline_answers: Sequence[str],
    *,
    batch_size: int = 16,
) -> dict[str, float]:
    """Fraction of prompts where the RM scores the policy's answer above the baseline's (ties count half)."""
    if not (len(prompts) == len(policy_answers) == len(baseline_answers)):
        raise ValueError("prompts, policy_answers and baseline_answers must be aligned (same length)")
    n = len(prompts)
    # One call: the reward model is loaded once.
    scores = reward_model_scores(
        rm_path, list(prompts) * 2, list(policy_answers) + list(baseline_answers), batch_size=batch_size
    )
    policy, baseline = scores[:n], scores[n:]
    wins = sum(p > b for p, b in zip(policy, baseline))
    ties = sum(p == b for p, b in zip(policy, baseline))
    return {
        "win_rate": (wins + 0.5 * ties) / n if n else float("nan"),
        "wins": float(wins),
        "ties": float(ties),
        "losses": float(n - wins - ties),
        "n": float(n),
        "rm_score": _mean(policy),
        "rm_score_baseline": _mean(baseline),
    }


# ------------------------------------------------------------------------------------- implicit rewards


def _pair_rows(
    pairs: Any, tokenizer: Any
) -> tuple[list[tuple[list[int], list[int]]], list[tuple[list[int], list[int]]]]:
    """(chosen rows, rejected rows) of (prompt ids, response ids) from TokenizedPairs or string triples."""
    if isinstance(pairs, tuple) and len(pairs) == 3 and all(isinstance(x, (list, tuple)) for x in pairs):
        prompts, chosen, rejected = pairs
        if not (len(prompts) == len(chosen) == len(rejected)):
            raise ValueError("prompts, chosen and rejected must have the same length")
        if tokenizer is None:
            raise ValueError("string pairs need a tokenizer (pass a policy directory or tokenizer=)")
        return (
            [encode_answer(tokenizer, p, c) for p, c in zip(prompts, chosen)],
            [encode_answer(tokenizer, p, r) for p, r in zip(prompts, rejected)],
        )
    # data.TokenizedPair (or anything with the same fields): response ids already end with EOS.
    pairs = list(pairs)
    return (
        [(list(p.prompt_ids), list(p.chosen_ids)) for p in pairs],
        [(list(p.prompt_ids), list(p.rejected_ids)) for p in pairs],
    )


def implicit_rewards(policy_dir: Any, reference_dir: Any, pairs: Any, *, batch_size: int,
                     tokenizer: Any = None) -> list[tuple[float, float]]:
    """(chosen, rejected) log-ratios log pi(y|x) - log pi_ref(y|x) per pair: DPO's implicit reward over beta.

    `pairs`: `data.TokenizedPair`s, or a tuple (prompts, chosen, rejected) of string lists (tokenized with the
    policy's tokenizer for both models: the log-ratio needs the same tokens). Models may be directories or
    loaded models (then pass `tokenizer` for strings).
    """
    if tokenizer is None and isinstance(policy_dir, (str, Path)):
        tokenizer = _tokenizer(policy_dir, None)
    chosen, rejected = _pair_rows(pairs, tokenizer)
    if not chosen:
        return []
    rows = chosen + rejected
    policy_lp = _response_logps(_model(policy_dir), rows, batch_size)
    reference_lp = _response_logps(_model(reference_dir), rows, batch_size)
    ratios = [p - r for p, r in zip(policy_lp, reference_lp, strict=True)]
    n = len(chosen)
    return list(zip(ratios[:n], ratios[n:]))


def implicit_reward_accuracy(policy_dir: Any, reference_dir: Any, pairs: Any, *, batch_size: int,
                             tokenizer: Any = None) -> dict[str, float]:
    """accuracy: fraction of held-out pairs with r(chosen) > r(rejected) strictly, as TRL's rewards/accuracies (a
    tie is not a success; any beta > 0 gives the same); margin, chosen/rejected: means in log-ratio units."""
    ratios = implicit_rewards(policy_dir, reference_dir, pairs, batch_size=batch_size, tokenizer=tokenizer)
    if not ratios:
        raise ValueError("no held-out pairs to evaluate")
    margins = [c - r for c, r in ratios]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(ratios),
        "margin": _mean(margins),
        "chosen_reward": _mean([c for c, _ in ratios]),
        "rejected_reward": _mean([r for _, r in ratios]),
        "n": float(len(ratios)),
    }


# ------------------------------------------------------------------------------------------------ report


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write null instead of an unparseable token."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}/")
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def write_report(metrics: dict[str, Any], out_dir: str | Path, title: str) -> Path:
    """Write `metrics.json` (nested as given, NaN as null) and `report.md` (metric | value); -> out_dir."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "metrics.json", json.dumps(_finite(metrics), indent=2, default=str) + "\n")
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in _flatten(metrics).items()]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return out_dir


__all__ = [
    "encode_answer",
    "sequence_logps",
    "synthetic_metrics",
    "reward_model_scores",
    "pairwise_win_rate",
    "implicit_reward_accuracy",
    "write_report",
]

"""Evaluation: answer log-probs against a hand computation from full logits, the synthetic metrics (KL is 0
when policy == reference and equals the log-ratio otherwise), reward-model scoring with a tiny in-process RM,
win rates on hand-made scores, implicit-reward accuracy with a policy built as reference + a known bias."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import build_word_tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from selpo_core import evaluate
from selpo_core.evaluate import (
    encode_answer,
    implicit_reward_accuracy,
    pairwise_win_rate,
    reward_model_scores,
    sequence_logps,
    synthetic_metrics,
    write_report,
)
from selpo_core.synthetic import TASK_FORMAT

WORDS = [f"w{i}" for i in range(40)] + ["user:", "assistant:", "good", "bad", "describe", "the", "city"]
PROMPTS = ["describe the city", "w1 w2", "describe w3"]
ANSWERS = ["good w4 w5", "bad", "w6 good good w7 bad"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(WORDS)


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=vocab_size,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        initializer_range=0.3,
    )


def save_lm(path: Path, seed: int) -> Path:
    tok = build_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lms")
    return save_lm(root / "reference", seed=0), save_lm(root / "policy", seed=1)


def manual_logp(model: Any, tok: PreTrainedTokenizerFast, prompt: str, answer: str, *, eos: bool) -> float:
    """log p(answer [+ EOS] | rendered prompt) from the full logits of one unpadded sequence."""
    prompt_ids = tok(f"user: {prompt} assistant:", add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    ids = torch.tensor([prompt_ids + answer_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    return sum(float(logp[len(prompt_ids) + i - 1, t]) for i, t in enumerate(answer_ids))


# ------------------------------------------------------------------------------------------------ log-probs


def test_encode_answer_renders_like_generation(tok: PreTrainedTokenizerFast) -> None:
    prompt_ids, answer_ids = encode_answer(tok, "w1 w2", "good bad", ended=True)
    assert tok.convert_ids_to_tokens(prompt_ids) == ["user:", "w1", "w2", "assistant:"]
    assert tok.convert_ids_to_tokens(answer_ids) == ["good", "bad", "<eos>"]
    assert encode_answer(tok, "w1 w2", "good bad", ended=False)[1] == answer_ids[:-1]


def test_sequence_logps_matches_hand_computation(
    lm_dirs: tuple[Path, Path], tok: PreTrainedTokenizerFast
) -> None:
    from selpo_core.models import load_model

    ref_dir, _ = lm_dirs
    model = load_model(ref_dir, dtype=torch.float32, device="cpu")
    ended = [True, False, True]
    got = sequence_logps(model, tok, PROMPTS, ANSWERS, batch_size=2, ended=ended)  # ragged batch of 2, then 1
    expected = [manual_logp(model, tok, p, a, eos=e) for p, a, e in zip(PROMPTS, ANSWERS, ended)]
    assert got == pytest.approx(expected, abs=1e-4)
    # From a directory (loaded by models.load_model in its default dtype) the values agree with that model.
    from_dir = sequence_logps(ref_dir, None, PROMPTS, ANSWERS, batch_size=3, ended=ended)
    default_model = load_model(ref_dir)
    expected_dir = [manual_logp(default_model, tok, p, a, eos=e) for p, a, e in zip(PROMPTS, ANSWERS, ended)]
    assert from_dir == pytest.approx(expected_dir, abs=5e-2)


# ------------------------------------------------------------------------------------------ synthetic task


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    (tmp_path / "task.json").write_text(
        json.dumps({"format": TASK_FORMAT, "word_rewards": {"good": 1.0, "bad": -1.0}})
    )
    return tmp_path


def test_synthetic_metrics(lm_dirs: tuple[Path, Path], task_dir: Path) -> None:
    ref_dir, policy_dir = lm_dirs
    reference_answers = ["bad w1", "w2", "bad bad"]
    same = synthetic_metrics(ANSWERS, reference_answers, PROMPTS, task_dir, ref_dir, ref_dir)
    assert same["true_reward"] == pytest.approx((1 - 1 + 1) / 3)  # good w4 w5 | bad | w6 good good w7 bad
    assert same["true_reward_reference"] == pytest.approx(-3 / 3)
    assert same["reward_gain"] == pytest.approx(1 / 3 + 1)
    assert same["kl_seq"] == pytest.approx(0.0, abs=1e-6) and same["kl_per_token"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert (
        same["answer_words"] == pytest.approx((3 + 1 + 5) / 3)
        and same["answer_tokens"] == same["answer_words"]
    )
    assert same["n"] == 3

    differ = synthetic_metrics(ANSWERS, reference_answers, PROMPTS, task_dir, policy_dir, ref_dir)
    policy_lp = sequence_logps(policy_dir, None, PROMPTS, ANSWERS)
    ref_lp = sequence_logps(ref_dir, None, PROMPTS, ANSWERS)
    ratios = [p - r for p, r in zip(policy_lp, ref_lp)]
    assert differ["kl_seq"] == pytest.approx(sum(ratios) / 3, abs=1e-5)
    assert differ["kl_per_token"] == pytest.approx(sum(ratios) / (4 + 2 + 6), abs=1e-5)  # EOS counted
    assert abs(differ["kl_seq"]) > 1e-3


# ------------------------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rm")
    tok = build_tokenizer()
    torch.manual_seed(2)
    config = tiny_config(len(tok))
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_scores_batched_equal_one_at_a_time(rm_dir: Path, tok: PreTrainedTokenizerFast) -> None:
    batched = reward_model_scores(rm_dir, PROMPTS, ANSWERS, batch_size=3)  # right-padded, ragged
    model = LlamaForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    expected = []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        ids = tok(f"user: {prompt} assistant: {answer} ", add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            expected.append(float(model(**ids).logits[0, 0]))
    assert len(set(expected)) == 3
    # 'auto' dtype may be bf16 on this CPU: compare with the precision it allows.
    assert batched == pytest.approx(expected, abs=5e-2)
    one_by_one = [reward_model_scores(rm_dir, [p], [a])[0] for p, a in zip(PROMPTS, ANSWERS)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_pairwise_win_rate_counts_ties_half(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {"p1": 2.0, "p2": 0.5, "p3": 1.0, "p4": -1.0, "b1": 1.0, "b2": 0.7, "b3": 1.0, "b4": -3.0}
    seen: list[list[str]] = []

    def fake_scores(
        rm_path: Any, prompts: list[str], answers: list[str], *, batch_size: int = 16
    ) -> list[float]:
        seen.append(list(answers))
        return [table[a] for a in answers]

    monkeypatch.setattr(evaluate, "reward_model_scores", fake_scores)
    result = pairwise_win_rate("rm", ["q"] * 4, ["p1", "p2", "p3", "p4"], ["b1", "b2", "b3", "b4"])
    assert result["win_rate"] == pytest.approx((2 + 0.5) / 4)  # p1>b1, p2<b2, p3=b3, p4>b4
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (2, 1, 1, 4)
    assert len(seen) == 1  # one RM load for both sides


# --------------------------------------------------------------------------------------- implicit reward


class Biased(torch.nn.Module):
    """The reference plus a fixed logit bias: log pi/pi_ref rises on 'good' tokens and falls on 'bad'."""

    def __init__(self, base: torch.nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("bias", bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> Any:
        return SimpleNamespace(
            logits=self.base(input_ids=input_ids, attention_mask=attention_mask, **kw).logits + self.bias
        )


def test_implicit_reward_accuracy_with_a_known_bias(
    lm_dirs: tuple[Path, Path], tok: PreTrainedTokenizerFast
) -> None:
    from selpo_core.models import load_model

    reference = load_model(lm_dirs[0], dtype=torch.float32, device="cpu")
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids("good")], bias[tok.convert_tokens_to_ids("bad")] = 3.0, -3.0
    policy = Biased(reference, bias)
    prompts = ["describe the city", "w1 w2"]
    chosen, rejected = ["good w1 good", "w3 good"], ["bad w1 bad", "w3 bad"]

    result = implicit_reward_accuracy(policy, reference, (prompts, chosen, rejected), batch_size=16, tokenizer=tok)
    assert result["accuracy"] == 1.0 and result["margin"] > 0 and result["n"] == 2
    assert result["chosen_reward"] > 0 > result["rejected_reward"]
    # The margin is the difference of log-ratios (the implicit reward over beta), computed here by hand.
    policy_lp = sequence_logps(policy, tok, prompts * 2, chosen + rejected)
    reference_lp = sequence_logps(reference, tok, prompts * 2, chosen + rejected)
    ratio = [p - r for p, r in zip(policy_lp, reference_lp)]
    margins = [ratio[i] - ratio[i + 2] for i in range(2)]
    assert result["margin"] == pytest.approx(sum(margins) / 2, abs=1e-4)

    swapped = implicit_reward_accuracy(
        policy, reference, (prompts, rejected, chosen), batch_size=16, tokenizer=tok
    )
    assert swapped["accuracy"] == 0.0 and swapped["margin"] == pytest.approx(-result["margin"], abs=1e-5)
    same = implicit_reward_accuracy(
        reference, reference, (prompts, chosen, rejected), batch_size=16, tokenizer=tok
    )
    assert same["accuracy"] == 0.0 and same["margin"] == pytest.approx(0.0, abs=1e-6)  # a tie is no success

    # Tokenized pairs (data.TokenizedPair fields; responses end with EOS) give the same numbers as strings.
    pairs = []
    for p, c, r in zip(prompts, chosen, rejected):
        prompt_ids, chosen_ids = encode_answer(tok, p, c)
        pairs.append(
            SimpleNamespace(
                prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=encode_answer(tok, p, r)[1]
            )
        )
    tokenized = implicit_reward_accuracy(policy, reference, pairs, batch_size=16)
    assert tokenized == pytest.approx(result)


# ------------------------------------------------------------------------------------------------ report


def test_write_report(tmp_path: Path) -> None:
    metrics = {
        "true_reward": 1.23456,
        "kl": {"seq": 0.5, "per_token": float("nan")},
        "backend": "transformers",
    }
    write_report(metrics, tmp_path, "SePO vs DPO")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == {"true_reward": 1.23456, "kl": {"seq": 0.5, "per_token": None}, "backend": "transformers"}
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0] == "# SePO vs DPO" and lines[2:4] == ["| metric | value |", "|---|---|"]
    assert (
        "| true_reward | 1.235 |" in lines
        and "| kl/seq | 0.5 |" in lines
        and "| kl/per_token | n/a |" in lines
    )

"""logps: alignment by hand, masks over values, fast path == full logits, chunked KL == naive KL."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from selpo_core.logps import (
    masked_mean,
    masked_sum,
    model_logps_and_kl,
    model_per_token_logps,
    split_pair,
)

VOCAB = 61
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **TINY)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, **TINY)).eval()


def tiny_gemma2(seed: int = 0) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    # A strong soft-cap (2.0), so that skipping it would visibly change the log-probs.
    cfg = Gemma2Config(
        vocab_size=VOCAB, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, **TINY
    )
    return Gemma2ForCausalLM(cfg).eval()


def pair_batch() -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded batch: prompts of different lengths, one short response, one row without a response."""
    torch.manual_seed(123)
    input_ids = torch.randint(0, VOCAB, (4, 9))
    attention_mask = torch.ones(4, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[3, 4:] = 0
    loss_mask = torch.zeros(4, 9, dtype=torch.bool)
    loss_mask[0, 3:] = True  # prompt 0..2, response 3..8
    loss_mask[1, 5:6] = True  # one response token, then padding
    loss_mask[2, 2:] = True
    # row 3: no response tokens at all
    return input_ids, attention_mask, loss_mask


def naive_shifted_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """The definition, written out: out[b, t] = log_softmax(logits[b, t - 1])[input_ids[b, t]] on the mask."""
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(logps[:, :1]), torch.where(loss_mask[:, 1:], logps, 0.0)], dim=1)


def full_path(model: Any, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return naive_shifted_logps(logits, input_ids, loss_mask)


def logps_of(logits: Tensor | nn.Module, input_ids: Tensor, loss_mask: Tensor, **kwargs: Any) -> Tensor:
    """model_per_token_logps of a model whose logits are `logits` (the generic full-logits path)."""
    model = logits if isinstance(logits, nn.Module) else FixedLogits(logits)
    return model_per_token_logps(model, input_ids, torch.ones_like(input_ids), loss_mask, **kwargs)


def head_input_dims(model: Any) -> list[int]:
    """Record the rank of every lm_head input (2: selected rows, 3: the full [B, T, H] states)."""
    dims: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: dims.append(args[0].dim()))
    return dims


# ---------------------------------------------------------------------------------------------- by hand


def test_shifted_logps_hand_alignment() -> None:
    # V = 3, T = 3: out[t] = log softmax(logits[t - 1])[input_ids[t]]; position 0 and off-mask stay 0.
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [5.0, 5.0, 5.0]]])
    input_ids = torch.tensor([[2, 1, 2]])
    loss_mask = torch.tensor([[False, True, True]])
    out = logps_of(logits, input_ids, loss_mask)
    z0 = math.exp(1.0) + math.exp(2.0) + math.exp(3.0)
    z1 = math.exp(0.0) + math.exp(0.0) + math.exp(1.0)
    expected = [[0.0, 2.0 - math.log(z0), 1.0 - math.log(z1)]]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected))
    only_last = logps_of(logits, input_ids, torch.tensor([[False, False, True]]))
    torch.testing.assert_close(only_last, torch.tensor([[0.0, 0.0, 1.0 - math.log(z1)]]))


def test_shifted_logps_chunking_and_gradients() -> None:
    torch.manual_seed(0)
    model = FixedLogits(torch.randn(3, 7, 11))
    logits = model.logits
    input_ids = torch.randint(0, 11, (3, 7))
    loss_mask = torch.rand(3, 7) > 0.4
    loss_mask[:, 0] = False
    ref = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    expected = torch.where(loss_mask[:, 1:], ref, 0.0).float()
    for chunk_size in (1, 4, 1000):
        out = logps_of(model, input_ids, loss_mask, chunk_size=chunk_size)
        torch.testing.assert_close(out[:, 1:], expected)
        assert (out[:, 0] == 0).all()
    grad = torch.autograd.grad(out.sum(), logits)[0]
    assert (grad[:, -1] == 0).all()  # the last position predicts nothing
    assert (grad[:, :-1].abs().sum(-1) > 0).eq(loss_mask[:, 1:]).all()  # only rows predicting masked tokens


def test_mask_validation() -> None:
    logits, ids = torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="position 0"):
        logps_of(logits, ids, torch.tensor([[True, True, False]]))
    with pytest.raises(TypeError, match="bool"):
        logps_of(logits, ids, torch.tensor([[0, 1, 1]]))


def test_bf16_token_with_logp_exactly_zero_is_real() -> None:
    # A confident bf16 logit gives log-prob exactly 0.0 even in fp32: the mask, not the value, makes it real.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    input_ids = torch.tensor([[1, 0, 0]])
    loss_mask = torch.tensor([[False, True, True]])
    out = logps_of(logits, input_ids, loss_mask)
    assert out.dtype == torch.float32 and out[0, 2] == 0.0
    torch.testing.assert_close(out[0, 1], torch.tensor(-math.log(3.0)))
    assert masked_mean(out, loss_mask).item() == pytest.approx(-math.log(3.0) / 2)  # two real tokens
    bf16 = torch.tensor([[0.0, -1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[False, True, True, False]])
    assert masked_mean(bf16, mask).item() == -0.5 and masked_sum(bf16, mask).dtype == torch.float32


def test_masked_reductions() -> None:
    values = torch.tensor([[1.0, 2.0, math.nan], [3.0, math.inf, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_sum(values, mask), torch.tensor([3.0, 0.0]))
    mean = masked_mean(values, mask)
    torch.testing.assert_close(mean, torch.tensor([1.5, 0.0]))  # empty mask -> 0, no NaN
    (grad,) = torch.autograd.grad(mean.sum(), values)
    torch.testing.assert_close(grad, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_split_pair() -> None:
    x = torch.arange(12).reshape(4, 3)
    chosen, rejected = split_pair(x)
    assert chosen.tolist() == x[:2].tolist() and rejected.tolist() == x[2:].tolist()
    with pytest.raises(ValueError, match="even"):
        split_pair(torch.zeros(3, 2))


# ------------------------------------------------------------------------------------- model fast path


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_fast_path_matches_full_logits(build: Any) -> None:
    model = build()
    input_ids, attention_mask, loss_mask = pair_batch()
    dims = head_input_dims(model)
    fast = model_per_token_logps(model, input_ids, attention_mask, loss_mask, chunk_size=3)
    assert dims and set(dims) == {2}, "the fast path must apply lm_head to selected rows only"
    full = full_path(model, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert (fast[~loss_mask] == 0).all() and (fast[loss_mask] < 0).all()

    # Gradients through the (checkpointed) chunks equal the full path's.
    params = [p for p in model.parameters() if p.requires_grad]
    fast_grads = torch.autograd.grad(fast.sum(), params)
    full_grads = torch.autograd.grad(full.sum(), params)
    for fast_g, full_g in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(fast_g, full_g, rtol=1e-4, atol=1e-5)


def test_fast_path_keeps_lora_adapters() -> None:
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: non-zero adapters, so skipping them would change the log-probs.
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), lora)
    input_ids, attention_mask, loss_mask = pair_batch()
    dims = head_input_dims(model)
    fast = model_per_token_logps(model, input_ids, attention_mask, loss_mask)
    assert set(dims) == {2}
    with torch.no_grad(), model.disable_adapter():
        base = full_path(model, input_ids, attention_mask, loss_mask)
    assert not torch.allclose(fast, base)
    torch.testing.assert_close(fast, full_path(model, input_ids, attention_mask, loss_mask))


def test_softcapped_model_falls_back_to_full_logits() -> None:
    model = tiny_gemma2()
    input_ids, attention_mask, loss_mask = pair_batch()
    dims = head_input_dims(model)
    out = model_per_token_logps(model, input_ids, attention_mask, loss_mask)
    assert set(dims) == {3}, "soft-capped logits need the model's own forward"
    torch.testing.assert_close(out, full_path(model, input_ids, attention_mask, loss_mask))


def test_unknown_model_family_falls_back_to_full_logits() -> None:
    # Families outside the allow-list may transform logits after the head (scales, caps): never guess.
    model = tiny_llama()
    model.config.model_type = "someones_custom_lm"
    input_ids, attention_mask, loss_mask = pair_batch()
    dims = head_input_dims(model)
    out = model_per_token_logps(model, input_ids, attention_mask, loss_mask)
    assert set(dims) == {3}
    torch.testing.assert_close(out, full_path(model, input_ids, attention_mask, loss_mask))


def test_empty_loss_mask_gives_zeros() -> None:
    model = tiny_llama()
    input_ids, attention_mask, _ = pair_batch()
    empty = torch.zeros_like(input_ids, dtype=torch.bool)
    assert (model_per_token_logps(model, input_ids, attention_mask, empty) == 0).all()
    for out in model_logps_and_kl(model, model, input_ids, attention_mask, empty):
        assert out.shape == input_ids.shape and (out == 0).all()


# --------------------------------------------------------------------------------------------- TDPO KL


def naive_logps_and_kl(
    policy: Any, ref: Any, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, ...]:
    """Full-vocabulary [B, T-1] log-probs and KL(ref || policy) in float64, no chunking, no masks."""
    policy_lp = torch.log_softmax(
        policy(input_ids=input_ids, attention_mask=attention_mask).logits.double(), -1
    )
    with torch.no_grad():
        ref_lp = torch.log_softmax(
            ref(input_ids=input_ids, attention_mask=attention_mask).logits.double(), -1
        )
    policy_lp, ref_lp = policy_lp[:, :-1], ref_lp[:, :-1]
    kl = (ref_lp.exp() * (ref_lp - policy_lp)).sum(-1)
    targets = input_ids[:, 1:, None]
    return policy_lp.gather(-1, targets).squeeze(-1), ref_lp.gather(-1, targets).squeeze(-1), kl


def test_chunked_kl_matches_naive_full_vocab_kl() -> None:
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    input_ids, attention_mask, loss_mask = pair_batch()
    ref_grad_modes: list[bool] = []
    ref.get_decoder().register_forward_hook(lambda *_: ref_grad_modes.append(torch.is_grad_enabled()))
    policy_lp, ref_lp, kl = model_logps_and_kl(
        policy, ref, input_ids, attention_mask, loss_mask, chunk_size=3
    )
    # The reference forward ran without autograd: no activations are kept for a frozen model.
    assert ref_grad_modes == [False]
    naive = naive_logps_and_kl(policy, ref, input_ids, attention_mask)
    real = loss_mask[:, 1:]
    for got, want in zip((policy_lp, ref_lp, kl), naive, strict=True):
        assert got.dtype == torch.float32 and (got[~loss_mask] == 0).all()
        torch.testing.assert_close(got[:, 1:], torch.where(real, want, 0.0).float(), rtol=1e-5, atol=1e-5)
    assert (kl[loss_mask] > 0).all()

    # Gradient flows through the policy only, and equals the naive full-vocabulary gradient.
    (policy_lp.sum() + kl.sum()).backward()
    assert all(p.grad is None for p in ref.parameters())
    chunked_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    naive_lp, _, naive_kl = naive_logps_and_kl(policy, ref, input_ids, attention_mask)
    (naive_lp[real].sum() + naive_kl[real].sum()).backward()
    assert chunked_grads.keys() == {n for n, p in policy.named_parameters() if p.grad is not None}
    for name, param in policy.named_parameters():
        torch.testing.assert_close(chunked_grads[name], param.grad.float(), rtol=1e-4, atol=1e-5)


def test_kl_of_identical_models_is_zero_and_ref_logps_match_scoring() -> None:
    model = tiny_qwen2()
    input_ids, attention_mask, loss_mask = pair_batch()
    policy_lp, ref_lp, kl = model_logps_and_kl(model, model, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-6, rtol=0)
    with torch.no_grad():
        scored = model_per_token_logps(model, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(ref_lp, scored)
    torch.testing.assert_close(policy_lp.detach(), scored)


class FixedLogits(nn.Module):
    """A non-HF 'model' returning given logits: exercises the generic fallback and -inf reference logits."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def test_kl_with_zero_probability_reference_tokens_is_finite() -> None:
    # The reference gives token 2 probability exactly 0: softmax().log() would give 0 * -inf = NaN.
    ref_logits = torch.tensor([[[0.0, 1.0, -math.inf], [2.0, 0.0, -math.inf], [0.0, 0.0, 0.0]]])
    policy = FixedLogits(torch.tensor([[[0.5, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]))
    ref = FixedLogits(ref_logits).requires_grad_(False)
    input_ids = torch.tensor([[0, 1, 0]])
    loss_mask = torch.tensor([[False, True, True]])
    _, _, kl = model_logps_and_kl(
        policy, ref, input_ids, attention_mask=torch.ones_like(input_ids), loss_mask=loss_mask
    )
    # Row predicting t=1: p_ref = softmax([0, 1]) over the two live tokens, p_pol = softmax([0.5, 0, 1]).
    p = [1 / (1 + math.e), math.e / (1 + math.e)]
    z_pol = math.exp(0.5) + 1.0 + math.e
    q = [math.exp(0.5) / z_pol, 1.0 / z_pol]
    expected_t1 = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    torch.testing.assert_close(kl[0, 1], torch.tensor(expected_t1, dtype=torch.float32))
    kl.sum().backward()
    assert policy.logits.grad is not None and torch.isfinite(policy.logits.grad).all()

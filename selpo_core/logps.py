"""Per-token log-probabilities, masked reductions and the chunked full-vocabulary KL.

This is THE one module that shifts logits against labels (docs/CONTRACTS.md): every per-token tensor it
returns is aligned to `input_ids`, i.e. `out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`, is float32,
and is exactly 0 outside `loss_mask`. Position 0 has no prediction, so a `loss_mask` that is True there is
rejected rather than silently zeroed.

Memory: the log-softmax is taken in float32 only at the rows that predict a masked token, `chunk_size` rows
at a time, so no float32 copy of the whole [B, T, V] logits ever exists. When gradients are on, each chunk
is wrapped in activation checkpointing: otherwise autograd would keep every chunk's [chunk, V] float32
log-softmax alive until backward and the chunking would only bound the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from selpo_core.batching import PackedRows

# Causal-LM families whose forward is exactly `lm_head(decoder(...).last_hidden_state)` in transformers 5
# (checked by reading each `*ForCausalLM.forward`). Others (Granite divides logits, Cohere multiplies,
# MiniCPM3 rescales hidden states, Gemma2/3 soft-cap...) would silently get wrong log-probs from the fast
# path, so anything not listed here takes the slower, always-correct full-logits path.
FAST_PATH_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "deepseek_v3", "gemma", "glm4", "gpt2", "gpt_neox", "llama", "ministral", "mistral", "mixtral",
        "olmo", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3", "stablelm",
        "starcoder2",
    }
)  # fmt: skip

# Families whose decoder builds its causal mask with transformers' `create_causal_mask` from `position_ids`
# when `attention_mask` is None (masking_utils.find_packed_sequence_indices: a position that does not follow
# its left neighbour starts a new sequence), so packed sequences cannot see each other: tests/core/
# test_packing.py checks llama and qwen2 by changing one sequence and watching the other's log-probs.
PACKING_MODEL_TYPES: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Attention implementations that apply that block-diagonal mask. Flash-attention reads packed position_ids
# as varlen boundaries (and would skip the masked blocks) but is not tested here: it takes the padded path.
PACKING_ATTENTION: frozenset[str] = frozenset({"sdpa", "eager"})

# Config fields that transform logits after the LM head; belt and braces on top of the allow-list.
_LOGIT_TRANSFORM_FIELDS: tuple[str, ...] = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Wrappers whose own forward must run (gradient sync, unsharding of root parameters): calling the inner
# decoder directly would bypass it. FSDP forwards attribute lookups to the wrapped module, so we cannot
# rely on `get_decoder` being absent; match class names to avoid importing torch.distributed here.
_DISTRIBUTED_WRAPPERS: frozenset[str] = frozenset(
    {"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"}
)

RowFn = Callable[..., tuple[Tensor, ...]]
Head = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------- helpers


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` [B, T] over True positions of the bool `mask` [B, T] -> float32 [B].

    `torch.where` (not multiplication) so that NaN/-inf stored outside the mask cannot leak in.
    """
    return torch.where(mask, values.float(), 0.0).sum(dim=-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` [B, T] over True positions of `mask` -> float32 [B]; an empty row gives 0, not NaN."""
    count = mask.sum(dim=-1).clamp(min=1)
    return masked_sum(values, mask) / count


def split_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split a pair batch [2B, ...] into (chosen [B, ...], rejected [B, ...]) (rows 0..B-1 are chosen)."""
    if x.shape[0] % 2:
        raise ValueError(f"a pair batch needs an even first dimension (chosen, rejected); got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _target_positions(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(batch index, time index) of every masked target token, in row-major order."""
    if loss_mask.dtype != torch.bool:
        raise TypeError(f"loss_mask must be a bool tensor (masks decide what is real), got {loss_mask.dtype}")
    if loss_mask.shape != input_ids.shape or loss_mask.dim() != 2:
        shapes = f"{tuple(loss_mask.shape)} vs {tuple(input_ids.shape)}"
        raise ValueError(f"loss_mask and input_ids must both be [B, T] with the same shape, got {shapes}")
    if loss_mask.shape[1] and bool(loss_mask[:, 0].any()):
        raise ValueError("loss_mask is True at position 0, which has no prediction (responses need a prompt)")
    batch_idx, time_idx = loss_mask.nonzero(as_tuple=True)
    return batch_idx, time_idx


def _gather_target_logp(logits: Tensor, targets: Tensor) -> Tensor:
    # fp32 log_softmax: bf16 log-probs of confident tokens round to 0 and change token selections.
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _map_row_chunks(
    fn: RowFn,
    sources: tuple[Tensor, ...],
    src_rows: Tensor,
    src_cols: Tensor,
    targets: Tensor,
    chunk_size: int,
) -> list[Tensor]:
    """Run `fn(*rows, targets)` on `chunk_size` predicting rows at a time; return its outputs concatenated.

    `sources[k][src_rows[i], src_cols[i]]` ([B, T, D]: hidden states or logits) is the row that predicts
    `targets[i]`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = src_rows.numel()
    pieces: list[tuple[Tensor, ...]] = []
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        rows = [s[src_rows[sl].to(s.device), src_cols[sl].to(s.device)] for s in sources]
        args = (*rows, targets[sl].to(rows[0].device))
        if torch.is_grad_enabled() and n > chunk_size:
            # Recompute the [chunk, V] logits in backward instead of storing them: keeps peak memory
            # O(chunk * V) in training too, at the price of one extra LM-head matmul per chunk. With a single
            # chunk there is nothing to bound (backward rebuilds the same [N, V] next to the same saved
            # decoder activations), so it would only cost the extra matmul.
            pieces.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            pieces.append(fn(*args))
    return [torch.cat(parts) for parts in zip(*pieces, strict=True)]


def _scatter(values: Tensor, batch_idx: Tensor, time_idx: Tensor, like: Tensor) -> Tensor:
    """Place [N] values at (batch_idx, time_idx) of float32 zeros shaped like `like`; differentiable."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    dev = like.device
    return out.index_put((batch_idx.to(dev), time_idx.to(dev)), values.to(dev))


# ------------------------------------------------------------------------------------- per-token log-probs


def _uses_fast_path(model: Any) -> bool:
    if any(cls.__name__ in _DISTRIBUTED_WRAPPERS for cls in type(model).__mro__):
        return False
    # PEFT prompt learning (prompt/prefix tuning) injects virtual tokens in PeftModel.forward; LoRA lives
    # inside the modules and is fine.
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FAST_PATH_MODEL_TYPES:
        return False
    configs = [config]
    if callable(getattr(config, "get_text_config", None)):
        configs.append(config.get_text_config())
    return not any(getattr(c, f, None) is not None for c in configs for f in _LOGIT_TRANSFORM_FIELDS)


def supports_packing(model: Any) -> bool:
    """Whether `model` keeps the sequences of a `PackedRows` apart (block-diagonal causal attention).

    True for the families in `PACKING_MODEL_TYPES` with an attention in `PACKING_ATTENTION`; DDP/FSDP wrappers
    (no `config`) and PEFT prompt learning (virtual tokens shift every position) take the padded path.
    """
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in PACKING_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in PACKING_ATTENTION)


def _final_states(
    model: Any, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
) -> tuple[Tensor, Head]:
    """(states [B, T, D], head) with `head(states[rows]) == model(...).logits[rows]`.

    Fast path: final hidden states + the LM head, so logits are only ever made for the rows we need.
    Fallback: the full logits with an identity head. Packed rows: `position_ids` and no `attention_mask`.
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if _uses_fast_path(model):
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else getattr(model, "model", None)
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        # get_decoder() returns the model itself when it finds nothing: that would give logits, not states.
        if decoder is not None and decoder is not model and head is not None:
            out = decoder(**inputs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            return hidden, head
    return model(**inputs).logits, _identity


def _forward(
    model: Any, input_ids: Tensor, attention_mask: Tensor, packed: PackedRows | None, batch_idx: Tensor,
    time_idx: Tensor,
) -> tuple[Tensor, Head, Tensor, Tensor]:
    """(states, head, rows, cols): one forward, packed when given, and where in `states` each target's
    predicting row (padded position (b, t - 1)) is."""
    if packed is None:
        states, head = _final_states(model, input_ids, attention_mask)
        return states, head, batch_idx, time_idx - 1
    if packed.row.numel() != input_ids.shape[0]:
        raise ValueError(f"packed rows hold {packed.row.numel()} sequences, the batch has {input_ids.shape[0]}")
    states, head = _final_states(model, packed.input_ids, None, packed.position_ids)
    rows, cols = packed.slots(batch_idx.to(packed.row.device), time_idx.to(packed.row.device) - 1)
    return states, head, rows, cols


def _identity(x: Tensor) -> Tensor:
    return x


def model_per_token_logps(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    chunk_size: int = 4096,
    packed: PackedRows | None = None,
) -> Tensor:
    """Per-token log-probs [B, T] float32 of a causal LM, aligned to `input_ids`, 0 outside `loss_mask`.

    For the families in `FAST_PATH_MODEL_TYPES` the LM head is applied only to the hidden states that
    predict masked tokens (skipping prompt and padding: a large saving when scoring long prompts with big
    vocabularies). Other models, soft-capped/scaled logits and distributed wrappers (DDP/FSDP/DeepSpeed,
    whose own forward must run) use the full `model(...).logits`. Differentiable; pass the wrapped model.

    `packed`: the same rows without padding (`batching.pack_rows`); the model runs on them when
    `supports_packing(model)`, else on the padded rows. Either way the result has the padded layout.
    Only the rows predicting `loss_mask` tokens reach the LM head: pass `loss_mask & selected_mask` to pay
    for the selected tokens only.
    """
    batch_idx, time_idx = _target_positions(input_ids, loss_mask)
    if batch_idx.numel() == 0:
        return torch.zeros(input_ids.shape, dtype=torch.float32, device=loss_mask.device)
    packed = packed if packed is not None and supports_packing(model) else None
    states, head, rows, cols = _forward(model, input_ids, attention_mask, packed, batch_idx, time_idx)
    targets = input_ids[batch_idx, time_idx]

    def rows_to_logps(rows: Tensor, tgt: Tensor) -> tuple[Tensor]:
        return (_gather_target_logp(head(rows), tgt),)

    (logps,) = _map_row_chunks(rows_to_logps, (states,), rows, cols, targets, chunk_size)
    return _scatter(logps, batch_idx, time_idx, loss_mask)


class _TargetLogpAndKL(torch.autograd.Function):
    """(log p_theta(target), KL(p_ref || p_theta)) per row from policy logits [c, V] and reference log-probs.

    The same numbers as autograd through `log_softmax` and the KL's elementwise chain, with the gradient with
    respect to the logits written out: d logp(target) = onehot - P, d KL = P - R (P, R: policy and reference
    probabilities; sum R = 1). That keeps two [c, V] float32 tensors for backward and makes ~half the passes
    over them: at a 32k vocabulary these passes, not the LM-head matmuls, are most of TDPO's extra step time.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, ref_lp: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 log-softmax: bf16 log-probs of confident tokens round to 0.
        policy_lp = torch.log_softmax(logits.float(), dim=-1)
        ref_p = ref_lp.exp()
        # Tokens the reference gives probability exactly 0 contribute 0 (the 0 * log 0 = 0 convention).
        kl = torch.where(ref_p > 0, ref_p * (ref_lp - policy_lp), 0.0).sum(dim=-1)
        target_lp = policy_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(policy_lp, ref_p, targets)
        ctx.logits_dtype = logits.dtype
        return target_lp, kl

    @staticmethod
    def backward(ctx: Any, grad_target_lp: Tensor, grad_kl: Tensor) -> tuple[Tensor, None, None]:
        policy_lp, ref_p, targets = ctx.saved_tensors
        g_lp, g_kl = grad_target_lp.unsqueeze(-1), grad_kl.unsqueeze(-1)
        grad = policy_lp.exp().mul_(g_kl - g_lp).addcmul_(ref_p, g_kl, value=-1.0)
        grad.scatter_add_(-1, targets.unsqueeze(-1), g_lp)
        return grad.to(ctx.logits_dtype), None, None


def model_logps_and_kl(
    policy_model: Any,
    ref_model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    chunk_size: int = 2048,
    packed: PackedRows | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(policy_logps, ref_logps, kl), each [B, T] float32 and 0 outside `loss_mask`, for TDPO.

    `kl[b, t] = KL(pi_ref(. | x, y_<t) || pi_theta(. | x, y_<t))` over the full vocabulary, at each
    response position t (the distribution that predicts token t). The reference runs under `no_grad`;
    gradients flow through the policy only. Both log-softmaxes are float32 and the KL uses the reference
    log-probs directly (never `softmax().log()`, which gives 0 * -inf = NaN), `chunk_size` positions at a
    time so the [*, V] temporaries are O(chunk_size * V): 2 float32 [chunk, V] kept per chunk for backward
    (0.5 GB at 2048 x 32k). More rows than that are chunked and each chunk recomputed in backward (both LM
    heads again), which made an 8M-model, 32k-vocabulary tdpo2 step 1.36x slower than one chunk.
    `packed`: as in `model_per_token_logps`, used
    when both models support packing.
    """
    batch_idx, time_idx = _target_positions(input_ids, loss_mask)
    if batch_idx.numel() == 0:
        zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=loss_mask.device)
        return zeros, zeros.clone(), zeros.clone()
    both = packed is not None and supports_packing(policy_model) and supports_packing(ref_model)
    packed = packed if both else None
    policy_states, policy_head, rows, cols = _forward(
        policy_model, input_ids, attention_mask, packed, batch_idx, time_idx)
    with torch.no_grad():
        ref_states, ref_head, _, _ = _forward(ref_model, input_ids, attention_mask, packed, batch_idx, time_idx)
    targets = input_ids[batch_idx, time_idx]

    def rows_to_logps_and_kl(policy_rows: Tensor, ref_rows: Tensor, tgt: Tensor) -> tuple[Tensor, ...]:
        policy_logits = policy_head(policy_rows)
        with torch.no_grad():
            ref_lp = torch.log_softmax(ref_head(ref_rows).float(), dim=-1).to(policy_logits.device)
        if ref_lp.shape != policy_logits.shape:
            sizes = f"{policy_logits.shape[-1]} vs {ref_lp.shape[-1]}"
            raise ValueError(f"policy and reference vocabulary sizes differ: {sizes}")
        policy_lp, kl = _TargetLogpAndKL.apply(policy_logits, ref_lp, tgt)
        return policy_lp, ref_lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1), kl

    policy_logps, ref_logps, kl = _map_row_chunks(
        rows_to_logps_and_kl, (policy_states, ref_states), rows, cols, targets, chunk_size
    )
    return (
        _scatter(policy_logps, batch_idx, time_idx, loss_mask),
        _scatter(ref_logps, batch_idx, time_idx, loss_mask),
        _scatter(kl, batch_idx, time_idx, loss_mask),
    )

"""Selected-token fast path: sepo and sepo_dpo compute policy log-probs only at the selected tokens, with the
same loss and gradients as computing them at every response token."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selpo_core import objectives
from selpo_core.batching import collate_pairs
from selpo_core.config import PolicyConfig
from selpo_core.examples import TokenizedPair
from selpo_core.models import frozen_copy
from selpo_core.objectives import READS_SELECTED_ONLY, make_preference_step

VOCAB = 97
# Head dim 64 (hidden 128, 2 heads), random init.
TINY = {"vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def make_pairs(n: int, seed: int) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    def pair(i: int) -> TokenizedPair:
        chosen, rejected = [*ids(rng.randint(2, 13)), 1], [*ids(rng.randint(2, 13)), 1]
        return TokenizedPair(f"e{i}", ids(rng.randint(2, 9)), chosen, rejected, "", "", [(0, 0)] * len(chosen),
                             [(0, 0)] * len(rejected))

    return [pair(i) for i in range(n)]


def selections(pairs: list[TokenizedPair], side: str) -> list[list[bool]]:
    """About 40% of each response's tokens, at least one (as the select stage keeps)."""
    rng = random.Random(side)
    out = []
    for pair in pairs:
        n = len(pair.chosen_ids if side == "chosen" else pair.rejected_ids)
        keep = [rng.random() < 0.4 for _ in range(n)]
        keep[rng.randrange(n)] = True
        out.append(keep)
    return out


def loss_and_grads(method: str, model: LlamaForCausalLM, ref_model: LlamaForCausalLM, batch: dict,
                   ) -> tuple[float, list[torch.Tensor], dict, list[int]]:
    head_rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: head_rows.append(args[0].shape[0]))
    loss, metrics = make_preference_step(method, PolicyConfig(beta=0.5), ref_model)(model, batch)
    loss.backward()
    hook.remove()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, metrics, head_rows


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method", READS_SELECTED_ONLY)
def test_fast_path_equals_the_full_mask_path(method: str, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = make_pairs(n=5, seed=3)
    model = tiny_llama(0)
    ref_model = frozen_copy(tiny_llama(1))
    batch = collate_pairs(pairs, 0, chosen_selected=selections(pairs, "chosen"),
                          rejected_selected=selections(pairs, "rejected"), packed=packed)
    n_selected = int((batch["loss_mask"] & batch["selected_mask"]).sum())
    n_response = int(batch["loss_mask"].sum())
    assert n_selected < n_response

    fast_loss, fast_grads, fast_metrics, fast_rows = loss_and_grads(method, model, ref_model, batch)
    monkeypatch.setattr(objectives, "READS_SELECTED_ONLY", ())
    full_loss, full_grads, full_metrics, full_rows = loss_and_grads(method, model, ref_model, batch)

    assert fast_rows == [n_selected] and full_rows == [n_response]  # the LM head ran at the selected rows only
    assert abs(fast_loss - full_loss) <= 1e-5
    for fast, full in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-4)
    for name in ("rewards/chosen", "rewards/margins", "selected_fraction/chosen"):
        assert abs(float(fast_metrics[name]) - float(full_metrics[name])) <= 1e-5, name
    # The fast path's log-prob metrics say they sum over the selected tokens only; the full path's over all.
    assert "logps/chosen_selected" in fast_metrics and "logps/chosen" not in fast_metrics
    assert float(fast_metrics["logps/chosen_selected"]) > float(full_metrics["logps/chosen"])

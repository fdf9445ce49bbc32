"""Every training method: one step function, loss goes down on a fixed batch, parameters move."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selpo_core.config import DataConfig, PolicyConfig
from selpo_core.data import PreferenceExample, collate_pairs, tokenize_pairs
from selpo_core.logps import model_per_token_logps, split_pair
from selpo_core.models import frozen_copy
from selpo_core.objectives import LOSS_FIELDS, READS_SELECTED_ONLY, make_preference_step, sft_step

METHODS = ("sepo", "dpo", "ipo", "simpo", "selective_dpo", "tdpo1", "tdpo2", "tso", "sepo_dpo", "tgdpo", "tis_dpo",
           "confpo")


def _pairs(tokenizer):
    examples = [
        PreferenceExample("a", "what is the sky color", "blue blue very good", "red bad"),
        PreferenceExample("b", "tell me about the cat", "the cat sat on the mat", "no"),
        PreferenceExample("c", "how are you", "I am fine thanks", "bad bad bad very bad"),
    ]
    pairs, _ = tokenize_pairs(examples, tokenizer, DataConfig(max_length=32, max_prompt_length=16), source="test")
    return pairs


def _model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_loss_and_changes_parameters(method: str, word_tokenizer) -> None:
    pairs = _pairs(word_tokenizer)
    model = _model(word_tokenizer)
    ref_model = frozen_copy(model)
    # SePO's selection: the first half of every response's tokens (what matters here is that it is a subset).
    def first_half(ids: list[int]) -> list[bool]:
        return [i < max(1, len(ids) // 2) for i in range(len(ids))]

    # Stored per-token values (TGDPO's oracle rewards, TIS-DPO's weights): any fixed numbers will do here.
    def values(ids: list[int]) -> list[float]:
        return [0.5 + 0.25 * (i % 3) for i in range(len(ids))]

    batch = collate_pairs(pairs, word_tokenizer.pad_token_id,
                          chosen_selected=[first_half(p.chosen_ids) for p in pairs],
                          rejected_selected=[first_half(p.rejected_ids) for p in pairs],
                          chosen_values=[values(p.chosen_ids) for p in pairs],
                          rejected_values=[values(p.rejected_ids) for p in pairs])
    params = PolicyConfig(beta=0.5, simpo_beta=2.0, tso_chosen_reward_max=50.0, tso_rejected_reward_min=-50.0)
    step = make_preference_step(method, params, ref_model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, metrics = step(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Methods that read only the selected tokens' log-probs report them as logps/*_selected.
    suffix = "_selected" if method in READS_SELECTED_ONLY else ""
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", f"logps/chosen{suffix}",
            f"logps/rejected{suffix}"} <= metrics.keys()
    if method in ("sepo", "selective_dpo", "sepo_dpo", "confpo"):
        assert 0 < float(metrics["selected_fraction/chosen"]) < 1
    if method.startswith("tdpo"):
        assert float(metrics["kl/chosen"]) > 0


def test_stored_reference_logps_give_the_same_loss_as_running_the_reference(word_tokenizer) -> None:
    pairs = _pairs(word_tokenizer)
    model = _model(word_tokenizer)
    ref_model = frozen_copy(model)
    with torch.no_grad():  # the reference changes once the policy trains: perturb the policy first
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    batch = collate_pairs(pairs, word_tokenizer.pad_token_id)
    with torch.no_grad():
        ref = model_per_token_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    chosen_ref, rejected_ref = split_pair(ref)
    lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    starts = [len(p.prompt_ids) for p in pairs] * 2
    stored = [row[start:start + n].tolist() for row, start, n in zip(ref, starts, lengths)]
    batch_stored = collate_pairs(pairs, word_tokenizer.pad_token_id, chosen_ref_logps=stored[: len(pairs)],
                                 rejected_ref_logps=stored[len(pairs):])
    params = PolicyConfig(beta=0.1)
    loss_run, _ = make_preference_step("dpo", params, ref_model)(model, batch)
    loss_stored, _ = make_preference_step("dpo", params, None)(model, batch_stored)
    assert loss_stored.item() == pytest.approx(loss_run.item(), abs=1e-6)
    assert chosen_ref.shape == rejected_ref.shape


def test_sft_step_is_mean_nll_of_response_tokens(word_tokenizer) -> None:
    model = _model(word_tokenizer)
    batch = collate_pairs(_pairs(word_tokenizer), word_tokenizer.pad_token_id)
    loss, _ = sft_step(model, batch)
    logps = model_per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    expected = -(logps[batch["loss_mask"]]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_fields_name_real_params_and_cover_every_method() -> None:
    from selpo_core.config import POLICY_METHODS, LossParams

    assert set(LOSS_FIELDS) == set(POLICY_METHODS)
    names = {f.name for f in dataclasses.fields(LossParams)}
    assert all(set(fields) <= names for fields in LOSS_FIELDS.values())
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_preference_step("nope", PolicyConfig(), None)

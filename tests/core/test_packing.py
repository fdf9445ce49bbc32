"""Padding-free pairs: the packing plan, the packed layout, and packed forwards == padded forwards."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate.utils import send_to_device
from torch import Tensor
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from selpo_core.batching import PackedRows, collate_pairs, pack_rows, packing_plan
from selpo_core.config import PolicyConfig
from selpo_core.examples import TokenizedPair
from selpo_core.logps import model_logps_and_kl, model_per_token_logps, supports_packing
from selpo_core.models import frozen_copy
from selpo_core.objectives import make_preference_step

VOCAB = 97
# Head dim 64 (hidden 128, 2 heads): the head size real models use, where sdpa takes its fused CPU kernels.
TINY = {"vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY))


def make_pairs(n: int = 6, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of uneven lengths (prompt 2-9, responses 1-14 tokens, EOS 1 last), as a real batch has."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    def pair(i: int) -> TokenizedPair:
        chosen, rejected = [*ids(rng.randint(0, 13)), 1], [*ids(rng.randint(0, 13)), 1]
        return TokenizedPair(f"e{i}", ids(rng.randint(2, 9)), chosen, rejected, "", "", [(0, 0)] * len(chosen),
                             [(0, 0)] * len(rejected))

    return [pair(i) for i in range(n)]


def selections(pairs: list[TokenizedPair], side: str, seed: int = 1) -> list[list[bool]]:
    rng = random.Random(seed)
    out = []
    for pair in pairs:
        n = len(pair.chosen_ids if side == "chosen" else pair.rejected_ids)
        keep = [rng.random() < 0.4 for _ in range(n)]
        keep[rng.randrange(n)] = True  # the select stage keeps at least one token per response
        out.append(keep)
    return out


def padded_and_packed(pairs: list[TokenizedPair], **extras: object) -> tuple[dict, dict]:
    padded = collate_pairs(pairs, 0, **extras)
    packed = collate_pairs(pairs, 0, packed=True, **extras)
    # The comparison means something only if packing really put several sequences in a row.
    assert packed["packed"].input_ids.shape[0] < padded["input_ids"].shape[0]
    return padded, packed


def grads(model: torch.nn.Module) -> list[Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------------- the plan


def test_plan_places_every_sequence_once_and_meets_the_pad_target() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(20, 120) for _ in range(32)]
    plan = packing_plan(lengths, max_pad=0.05)
    assert sorted(i for row in plan for i in row) == list(range(32))
    width = max(sum(lengths[i] for i in row) for row in plan)
    assert 1 - sum(lengths) / (len(plan) * width) <= 0.05
    # Rows one per sequence pad 1 - mean/max here (~45%): the plan had to pack.
    assert len(plan) < 32


def test_plan_keeps_one_sequence_per_row_when_that_already_meets_the_target() -> None:
    assert sorted(packing_plan([50, 49, 50, 48], max_pad=0.05)) == [[0], [1], [2], [3]]


def test_pack_rows_layout_round_trips_and_restarts_positions() -> None:
    batch = collate_pairs(make_pairs(), 0)
    packed = pack_rows(batch["input_ids"], batch["attention_mask"], 0)
    lengths = batch["attention_mask"].sum(dim=1)
    assert torch.equal(packed.length, lengths)
    for i, n in enumerate(lengths.tolist()):
        r, s = int(packed.row[i]), int(packed.start[i])
        assert torch.equal(packed.input_ids[r, s:s + n], batch["input_ids"][i, :n])
        assert torch.equal(packed.position_ids[r, s:s + n], torch.arange(n))
    assert packed.pad_fraction <= 0.05
    moved = send_to_device({"packed": packed}, torch.device("cpu"))["packed"]  # how the training loop moves it
    assert isinstance(moved, PackedRows) and torch.equal(moved.row, packed.row)


def test_pack_rows_rejects_left_padding() -> None:
    with pytest.raises(ValueError, match="right padding"):
        pack_rows(torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), 0)


# --------------------------------------------------------------------------------------- packed == padded


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_packed_per_token_logps_and_gradients_equal_the_padded_path(build) -> None:
    model = build()
    assert supports_packing(model)
    padded, packed = padded_and_packed(make_pairs())
    args = (padded["input_ids"], padded["attention_mask"], padded["loss_mask"])
    ref = model_per_token_logps(model, *args)
    ref.sum().backward()
    ref_grads = grads(model)
    out = model_per_token_logps(model, *args, packed=packed["packed"])
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(grads(model), ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["dpo", "sepo", "tdpo2"])
def test_packed_loss_equals_the_padded_loss(method: str) -> None:
    pairs = make_pairs()
    model = tiny_llama()
    ref_model = frozen_copy(tiny_llama(seed=1))
    extras = {"chosen_selected": selections(pairs, "chosen"), "rejected_selected": selections(pairs, "rejected")}
    padded, packed = padded_and_packed(pairs, **extras)
    step = make_preference_step(method, PolicyConfig(beta=0.5), ref_model)
    loss_padded, metrics_padded = step(model, padded)
    loss_packed, metrics_packed = step(model, packed)
    assert abs(loss_padded.item() - loss_packed.item()) <= 1e-5
    for name, value in metrics_padded.items():
        assert abs(float(value) - float(metrics_packed[name])) <= 1e-4, name


def test_packed_tdpo_kl_equals_the_padded_kl() -> None:
    policy, ref_model = tiny_llama(), frozen_copy(tiny_llama(seed=1))
    padded, packed = padded_and_packed(make_pairs())
    args = (padded["input_ids"], padded["attention_mask"], padded["loss_mask"])
    expected = model_logps_and_kl(policy, ref_model, *args)
    got = model_logps_and_kl(policy, ref_model, *args, packed=packed["packed"])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_packed_sequence_cannot_see_its_row_neighbours() -> None:
    model = tiny_llama()
    pairs = make_pairs()
    batch = collate_pairs(pairs, 0, packed=True)
    packed: PackedRows = batch["packed"]
    # A sequence placed after another in its row: causal attention alone would let it see that one.
    first = next(i for i in range(len(packed.row)) if int(packed.start[i]) > 0)
    neighbours = [i for i in range(len(packed.row)) if i != first and packed.row[i] == packed.row[first]]
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    before = model_per_token_logps(model, *args, packed=packed)[first]

    changed = packed.input_ids.clone()
    for i in neighbours:
        r, s, n = int(packed.row[i]), int(packed.start[i]), int(packed.length[i])
        changed[r, s:s + n] = (changed[r, s:s + n] + 7) % VOCAB
    after = model_per_token_logps(model, *args, packed=PackedRows(changed, packed.position_ids, packed.row,
                                                                 packed.start, packed.length))[first]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)

    # Control: with positions running on across the row (plain causal attention) the same change leaks in,
    # so the equality above is the mask's doing.
    running = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids).clone()
    leak_before = model_per_token_logps(model, *args, packed=PackedRows(
        packed.input_ids, running, packed.row, packed.start, packed.length))[first]
    leak_after = model_per_token_logps(model, *args, packed=PackedRows(
        changed, running, packed.row, packed.start, packed.length))[first]
    assert (leak_after - leak_before).abs().max() > 1e-3


def test_models_that_cannot_isolate_packed_sequences_run_the_padded_rows() -> None:
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY.items()}
    model = Gemma2ForCausalLM(Gemma2Config(**cfg, head_dim=64))  # not in PACKING_MODEL_TYPES
    eager_llama = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="eager"))
    flex_llama = LlamaForCausalLM(LlamaConfig(**TINY))
    flex_llama.config._attn_implementation = "flex_attention"  # set directly: flex needs no install check here
    assert not supports_packing(model) and supports_packing(eager_llama) and not supports_packing(flex_llama)
    padded, packed = padded_and_packed(make_pairs())
    shapes: list[tuple[int, ...]] = []
    model.get_decoder().register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    args = (padded["input_ids"], padded["attention_mask"], padded["loss_mask"])
    out = model_per_token_logps(model, *args, packed=packed["packed"])
    torch.testing.assert_close(out, model_per_token_logps(model, *args), atol=1e-6, rtol=0)
    assert shapes and all(shape == tuple(padded["input_ids"].shape) for shape in shapes)
    # eager attention applies the packed mask too
    torch.testing.assert_close(model_per_token_logps(eager_llama, *args, packed=packed["packed"]),
                               model_per_token_logps(eager_llama, *args), atol=1e-5, rtol=0)


def test_training_packs_only_when_asked_and_says_when_the_model_cannot(caplog: pytest.LogCaptureFixture) -> None:
    from selpo_core.stages.training import _packing

    llama, gemma = tiny_llama(), Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=64))
    assert (_packing(False, llama), _packing(True, llama)) == (False, True)
    with caplog.at_level("WARNING", logger="selpo.stages"):
        assert _packing(True, gemma) is False
    assert "Gemma2ForCausalLM cannot keep packed sequences apart" in caplog.text

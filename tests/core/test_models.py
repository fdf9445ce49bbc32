"""Model helpers: dtype choice, seeded tiny models, save/reload like a hub model, LoRA, frozen reference."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selpo_core import models
from selpo_core.config import ModelConfig, SyntheticConfig
from selpo_core.models import (
    LORA_TARGETS,
    ModelLoadError,
    build_tiny_model,
    check_model_source,
    count_parameters,
    default_device,
    frozen_copy,
    load_model,
    load_tokenizer,
    maybe_apply_lora,
    resolve_dtype,
    save_model_dir,
)
from selpo_core.synthetic import build_tokenizer, make_vocabulary

ARCHS = ("llama", "qwen2")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    vocab = make_vocabulary(SyntheticConfig(n_filler=40, n_positive=4, n_negative=4))
    build_tokenizer(vocab).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def _cfg(arch: str = "llama", **kw) -> ModelConfig:
    return ModelConfig(tiny_arch=arch, tiny_hidden_size=32, tiny_layers=2, tiny_heads=4, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _batch(tokenizer) -> torch.Tensor:
    return torch.randint(4, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("auto", "meta") is torch.float32  # unknown devices get the safe choice
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16", cpu)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_seeded_and_forward(arch: str, tokenizer) -> None:
    before = torch.random.get_rng_state()
    a, b = build_tiny_model(_cfg(arch), tokenizer), build_tiny_model(_cfg(arch), tokenizer)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG stream is not consumed
    assert _same_weights(a, b)
    assert not _same_weights(a, build_tiny_model(_cfg(arch, seed=1), tokenizer))
    assert a.config.model_type == arch and a.config.vocab_size == len(tokenizer)
    assert (a.config.pad_token_id, a.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert a.config.intermediate_size == 4 * 32 and a.config.num_key_value_heads == 4
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight  # tied
    x = _batch(tokenizer)
    out = a(input_ids=x, attention_mask=torch.ones_like(x))
    assert out.logits.shape == (2, 7, len(tokenizer)) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_reproduces_weights_and_logits(arch: str, tokenizer, tmp_path: Path) -> None:
    model = build_tiny_model(_cfg(arch), tokenizer).eval()
    save_model_dir(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and not list((tmp_path / "m").glob("*.bin"))
    loaded = load_model(tmp_path / "m", dtype=torch.float32, device="cpu")
    assert type(loaded) is type(model) and not loaded.training
    assert _same_weights(model, loaded)
    x = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    # Through a ModelConfig, as stages load it.
    via_cfg = load_model(ModelConfig(path=str(tmp_path / "m"), dtype="fp32"), device="cpu")
    assert _same_weights(model, via_cfg)
    # The tokenizer travels with the weights and stays word-level (transformers 5's AutoTokenizer would swap
    # in a byte-level Qwen2Tokenizer for a qwen2 config.json: load_tokenizer must not).
    text = " ".join(tokenizer.convert_ids_to_tokens(list(range(10, 16))))
    reloaded = load_tokenizer(tmp_path / "m")
    expected = tokenizer(text, return_offsets_mapping=True)
    for key in ("input_ids", "offset_mapping"):
        assert reloaded(text, return_offsets_mapping=True)[key] == expected[key]
    assert reloaded.chat_template == tokenizer.chat_template
    # Same seed -> byte-identical artifacts.
    save_model_dir(build_tiny_model(_cfg(arch), tokenizer), tokenizer, tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_load_model_default_dtype_is_auto(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_model_dir(build_tiny_model(_cfg(), tokenizer), tokenizer, tmp_path)
    for fast, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda fast=fast: fast)
        assert load_model(tmp_path, device="cpu").dtype is dtype


def test_bad_paths_fail_with_one_line_errors(tmp_path: Path) -> None:
    # None of these may reach the hub: each is rejected before any network call.
    for bad in ("/no/such/model", "runs/x/model", "./my-model", "~/nowhere/model"):
        with pytest.raises(ModelLoadError, match="no such local directory") as err:
            load_model(bad)
        assert "\n" not in str(err.value)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_tokenizer(tmp_path / "f.txt")
    with pytest.raises(ValueError, match="build_tiny_model"):
        load_model(ModelConfig())


def test_model_load_error_is_permanent_not_io() -> None:
    # Retry rules treat OSError as transient: a mistyped path must not be retried for minutes.
    assert not issubclass(ModelLoadError, OSError) and issubclass(ModelLoadError, ValueError)


@pytest.fixture(scope="module")
def good_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_dir(build_tiny_model(_cfg(), tokenizer), tokenizer, tmp_path_factory.mktemp("good") / "m")


def _broken(good: Path, out: Path, damage: str) -> Path:
    import shutil

    shutil.copytree(good, out)
    weights = out / "model.safetensors"
    if damage == "no_config":
        (out / "config.json").unlink()
    elif damage == "only_bin":
        weights.rename(out / "pytorch_model.bin")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 100)
    elif damage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).unlink()
    elif damage == "missing_shard":
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


DAMAGE = {
    "no_config": "has no config.json (not a saved transformers model",
    "only_bin": "holds only pickled weights (pytorch_model.bin); selpo loads safetensors only",
    "truncated": "has a truncated model.safetensors (",
    "garbage": "has a corrupt model.safetensors (its header is not a safetensors header)",
    "no_tokenizer": "has no tokenizer (tokenizer.json or tokenizer_config.json)",
    "missing_shard": "has model.safetensors.index.json listing 1 missing shard(s), e.g. model-00002-of-00002",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_model_dirs_are_named_with_what_is_wrong(good_dir: Path, tmp_path: Path, damage: str) -> None:
    assert check_model_source(good_dir) is None
    bad = _broken(good_dir, tmp_path / damage, damage)
    problem = check_model_source(bad, what="reference.path")
    assert problem is not None and problem.startswith(f"reference.path dir {str(bad)!r} {DAMAGE[damage]}")
    loader = load_tokenizer if damage == "no_tokenizer" else load_model
    with pytest.raises(ModelLoadError) as err:
        loader(bad)
    assert DAMAGE[damage] in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value)


def test_hub_ids_offline_must_be_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        (snapshot / name).write_text("{}")
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert check_model_source("org/cached") is None
    problem = check_model_source("org/missing", what="policy_model.path")
    assert problem.startswith("policy_model.path 'org/missing' is not a local directory") and str(cache) in problem
    # A relative path whose first folder exists is a typo of a local dir, not a hub id.
    (tmp_path / "models").mkdir()
    assert check_model_source("models/my-sft") == (
        f"model 'models/my-sft': no such local directory ({tmp_path / 'models' / 'my-sft'})")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("org/missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_model_source("org/missing") is None  # online: left to the download
    assert check_model_source("") == "model: empty path"


def test_load_tokenizer_sets_pad_and_requires_fast(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    raw.pad_token = None
    raw.save_pretrained(str(tmp_path / "nopad"))
    with caplog.at_level(logging.INFO, logger="selpo_core.models"):
        tok = load_tokenizer(tmp_path / "nopad")
    assert tok.pad_token == tok.eos_token and "no pad token" in caplog.text

    class Slow:
        is_fast = False

    for cls in (AutoTokenizer, PreTrainedTokenizerFast):  # the generic-dir path and the AutoTokenizer path
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: Slow())
    with pytest.raises(ModelLoadError, match="fast"):
        load_tokenizer(tokenizer_dir)


def test_lora_wraps_and_saves_merged(tokenizer, tmp_path: Path) -> None:
    from peft import PeftModel

    base = build_tiny_model(_cfg(), tokenizer)
    assert maybe_apply_lora(base, _cfg()) is base  # lora_r = 0: untouched
    model = maybe_apply_lora(base, _cfg(lora_r=4))
    assert isinstance(model, PeftModel)
    assert set(model.peft_config["default"].target_modules) == set(LORA_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert count_parameters(model, trainable_only=True) < count_parameters(model)
    with torch.no_grad():  # B starts at 0 (a no-op adapter); make the merge observable
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    x = _batch(tokenizer)
    with torch.no_grad():
        expected = model(input_ids=x).logits
    save_model_dir(model, tokenizer, tmp_path / "m")
    assert not any("lora" in k for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    loaded = load_model(tmp_path / "m", dtype=torch.float32, device="cpu")
    assert not isinstance(loaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)
        # The caller's model keeps training as LoRA: still wrapped, adapters unmerged, same outputs.
        assert isinstance(model, PeftModel) and any("lora_B" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(input_ids=x).logits, expected)


def test_frozen_copy_has_no_grad(tokenizer) -> None:
    model = build_tiny_model(_cfg(), tokenizer).train()
    ref = frozen_copy(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert _same_weights(model, ref)
    with torch.no_grad():  # a copy, not a view: training the policy must not move the reference
        next(model.parameters()).add_(1.0)
    assert not _same_weights(model, ref)
    out = ref(_batch(tokenizer)).logits
    assert not out.requires_grad


def test_count_parameters(tokenizer) -> None:
    model = build_tiny_model(_cfg(), tokenizer)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    # Tied head counted once: the embedding appears once even though two modules use it.
    assert count_parameters(model) < sum(p.numel() for p in model.state_dict().values())

"""CPU capability, native bf16 detection, matmul peaks, the FLOP convention, and precision auto without bf16."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from selpo_core import hardware, models
from selpo_core import train as train_module
from selpo_core.config import GenerateConfig, ScoreConfig, TrainConfig

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("selpo_test_ddp_worker_hw", HERE / "ddp_worker.py")
assert _spec is not None and _spec.loader is not None
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture
def flags(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU's flags for one test (cpu_flags is cached per process)."""
    def set_flags(*names: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(names))
    return set_flags


def test_bf16_is_native_only_with_a_bf16_instruction_set(flags: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    flags("avx2", "avx512f", "avx512bw")  # oneDNN says yes on any AVX-512 CPU; Skylake emulates bf16
    assert models._cpu_has_fast_bf16() is False
    flags("avx2", "avx512f", "avx512_bf16")
    assert models._cpu_has_fast_bf16() is True
    flags("avx2", "amx_bf16", "amx_tile")
    assert models._cpu_has_fast_bf16() is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert models._cpu_has_fast_bf16() is False


def test_cpu_capability_names_the_isa(flags: Any) -> None:
    flags("avx2", "fma")
    cap = hardware.cpu_capability()
    assert cap["isa"] == "AVX2" and cap["avx2"] and not cap["avx512f"] and cap["bf16_native"] is False
    flags("avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16")
    assert hardware.cpu_capability()["isa"] == "AMX"


def test_cpu_flags_of_this_machine_are_read() -> None:
    if not Path("/proc/cpuinfo").exists():
        pytest.fail("these tests run on Linux")
    assert hardware.cpu_flags(), "no flags line in /proc/cpuinfo"


def test_matmul_peak_is_positive_and_cached() -> None:
    first = hardware.matmul_peak_flops(torch.float32, "cpu", 128, 2)
    assert first > 1e6
    assert hardware.matmul_peak_flops(torch.float32, "cpu", 128, 2) == first
    assert set(hardware.matmul_peaks()) == {"fp32", "bf16"}


def test_peak_flops_of_unknown_cuda_devices_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware.peak_flops(torch.bfloat16, "cuda") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert hardware.peak_flops(torch.bfloat16, "cuda") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert hardware.peak_flops(torch.bfloat16, "cuda") is None


def test_training_flops_count_parameters_once() -> None:
    model = tiny.tiny_model()  # tied embeddings: the one matrix is the LM head's matmul
    total = sum(p.numel() for p in model.parameters())
    assert hardware.flop_parameters(model) == (total, total)
    assert hardware.training_flops_per_token(model) == 6.0 * total
    assert hardware.training_flops_per_token(model, frozen_forward_params=10) == 6.0 * total + 20
    for param in model.parameters():
        param.requires_grad_(False)
    assert hardware.training_flops_per_token(model) == 4.0 * total  # frozen: forward + activation grads


def test_untied_input_embedding_is_a_lookup() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    total = sum(p.numel() for p in model.parameters())
    assert hardware.flop_parameters(model)[0] == total - 50 * 16


def test_precision_auto_never_picks_bf16_without_native_bf16(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """On a CPU without native bf16 the defaults (precision auto) train, score and generate in fp32."""
    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    cpu = torch.device("cpu")
    assert TrainConfig().precision == ScoreConfig().precision == GenerateConfig().precision == "auto"
    assert models.resolve_dtype(ScoreConfig().precision, cpu) == torch.float32
    assert models.resolve_dtype(GenerateConfig().precision, cpu) == torch.float32
    assert train_module.mixed_precision(TrainConfig().precision, cpu) == "no"

    seen: list[tuple[bool, torch.dtype]] = []

    def step(model: Any, batch: dict[str, torch.Tensor]) -> Any:
        loss, metrics = tiny.sft_step(model, batch)
        seen.append((torch.is_autocast_enabled("cpu"), loss.dtype))
        return loss, metrics

    items = tiny.make_items(8)
    cfg = TrainConfig(max_steps=2, batch_size=4, save_every=0, log_every=1, report_to="none")  # precision auto
    train_module.train(tiny.tiny_model(), step, items, tiny.collate, tiny.lengths(items), cfg,
                       tmp_path / "ckpt", log_dir=None, desc="auto")
    assert seen and all(not autocast and dtype == torch.float32 for autocast, dtype in seen)

    assert scored_dtype(monkeypatch, tmp_path / "fp32") == torch.float32

    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: True)  # the check can fail: bf16 where native
    assert train_module.mixed_precision(TrainConfig().precision, cpu) == "bf16"
    assert scored_dtype(monkeypatch, tmp_path / "bf16") == torch.bfloat16


class _Loaded(Exception):
    pass


def scored_dtype(monkeypatch: pytest.MonkeyPatch, out_dir: Path) -> torch.dtype:
    """The dtype `score_pairs` with the default ScoreConfig loads its models in (stopped at the first load)."""
    from selpo_core import scoring
    from selpo_core.data import TokenizedPair

    loaded: list[torch.dtype] = []

    def load_model(path: Any, *, dtype: torch.dtype, device: Any) -> Any:
        loaded.append(dtype)
        raise _Loaded

    monkeypatch.setattr(scoring, "load_model", load_model)
    monkeypatch.setattr(scoring, "default_device", lambda: torch.device("cpu"))
    pair = TokenizedPair("ex0", [5, 6], [7, 2], [8, 2], "a", "b", [(0, 1), (1, 1)], [(0, 1), (1, 1)])
    with pytest.raises(_Loaded):
        scoring.score_pairs([pair], out_dir / "oracle", out_dir / "reference", ScoreConfig(), out_dir / "scores")
    return loaded[0]

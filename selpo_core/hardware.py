"""What the machine can do: CPU vector extensions, native bf16, the matmul peak of each dtype, FLOPs and MFU.

Machines of one kind differ: one has AVX-512 BF16 and AMX (bf16 matmul ~4x fp32), another only AVX2, where
bf16 is emulated (~75x slower than fp32). Benchmarks record `cpu_capability()` and `matmul_peaks()` beside
their numbers, and the training loop reports model FLOP utilization (MFU) against `peak_flops(dtype, device)`:
on CPU the matmul peak measured in this process (cached: it is ~a second of work once), on CUDA the vendor's
dense peak of known devices (none for others: no MFU rather than a made-up one).

FLOP convention (`training_flops_per_token`), the one torchtune / open-instruct / PaLM's MFU use without the
attention term: a forward costs 2 FLOPs per parameter per token (each weight multiplies and adds once), the
backward 4 (2 for the activations' gradients, 2 for the weights' gradients), so full fine-tuning costs
6 * N per token; frozen parameters (LoRA's base, a reference model run each step) cost only their forward
(and the activation gradients where the backward passes through them). N excludes the input embedding when it
is a separate matrix (a lookup costs no FLOPs); a tied embedding is the LM head's matmul and counts.
Attention's score/value products (4 * layers * hidden * context per token) are left out, so MFU is a slight
under-estimate at long contexts.
"""

from __future__ import annotations

import statistics
import time
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
"""x86 flags recorded by `cpu_capability` (bf16 is native with avx512_bf16 or amx_bf16)."""

CUDA_DENSE_PEAK_FLOPS: tuple[tuple[str, dict[torch.dtype, float]], ...] = (
    # (substring of torch.cuda.get_device_name, peak dense FLOP/s by dtype), most specific first.
    # fp32 is the non-tensor-core rate (torch's default matmul without TF32).
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float32: 51e12}),
    ("H100", {torch.bfloat16: 989e12, torch.float32: 67e12}),
    ("H200", {torch.bfloat16: 989e12, torch.float32: 67e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float32: 19.5e12}),
)
"""Vendor datasheet dense peaks (no sparsity) of the devices whose MFU selpo reports."""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo "flags" on x86, "Features" on ARM); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX; ARM's "bf16" feature


def cpu_has_native_bf16() -> bool:
    """bf16 matmul in hardware: oneDNN supports bf16 here and the CPU has a bf16 instruction set.

    oneDNN alone is not enough: it reports bf16 support on any AVX-512 CPU, where Skylake-class chips without
    AVX512_BF16 emulate it (and AVX2-only CPUs ran bf16 matmul ~75x slower than fp32). Where the CPU flags are
    unreadable (not Linux), oneDNN's answer stands."""
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # private op: absent or raising on some builds -> assume no fast bf16
        return False
    flags = cpu_flags()
    return onednn and (not flags or any(flag in flags for flag in _NATIVE_BF16_FLAGS))


def cpu_capability() -> dict[str, Any]:
    """{"avx2": bool, ..., "amx_bf16": bool, "bf16_native": bool, "isa": the best of AMX/AVX-512/AVX2/other}."""
    flags = cpu_flags()
    out: dict[str, Any] = {name: name in flags for name in CPU_FEATURES}
    out["bf16_native"] = cpu_has_native_bf16()
    out["isa"] = next((name for name, flag in (("AMX", "amx_tile"), ("AVX-512", "avx512f"), ("AVX2", "avx2"))
                       if flag in flags), "other")
    return out


def _time_matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


@cache
def matmul_peak_flops(dtype: torch.dtype, device: str = "cpu", side: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of a square `side`^3 matmul in `dtype` on `device` (median of `repeats` after one warm-up), with
    the current thread count; cached per process. An emulated dtype (where a 256^3 product already takes
    > 50 ms, e.g. bf16 on AVX2) is measured at 256^3 instead, so this stays within ~a second everywhere."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(256, 256, generator=gen).to(dev, dtype)
    _time_matmul(probe, probe, dev)
    if _time_matmul(probe, probe, dev) > 0.05:
        side = 256
    a = torch.randn(side, side, generator=gen).to(dev, dtype)
    b = torch.randn(side, side, generator=gen).to(dev, dtype)
    _time_matmul(a, b, dev)
    seconds = statistics.median(_time_matmul(a, b, dev) for _ in range(repeats))
    return 2.0 * side**3 / max(seconds, 1e-12)


def matmul_peaks(device: str = "cpu") -> dict[str, float]:
    """Measured GFLOP/s of fp32 and bf16 matmuls on `device` (benchmarks record both)."""
    return {name: round(matmul_peak_flops(dtype, device) / 1e9, 1)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def peak_flops(dtype: torch.dtype, device: torch.device | str) -> float | None:
    """Peak FLOP/s per device for `dtype`: measured on CPU, the datasheet for known CUDA devices, else None."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return matmul_peak_flops(dtype, "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
        for pattern, peaks in CUDA_DENSE_PEAK_FLOPS:
            if pattern in name:
                return peaks.get(dtype)
    return None


def flop_parameters(model: Any) -> tuple[int, int]:
    """(parameters that do matmul work, of which trainable): each tensor once; a separate input embedding (a
    lookup) excluded."""
    seen: set[int] = set()
    total = trainable = 0
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = embedding.weight if embedding is not None and (head is None or head.weight is not embedding.weight) \
        else None
    for param in model.parameters():
        if id(param) in seen or param is skip:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def training_flops_per_token(model: Any, *, frozen_forward_params: int = 0) -> float:
    """FLOPs per real token of one training step of `model` (see the module docstring): 2N forward, 2N for the
    activations' gradients, 2 * trainable for the weights' gradients (6N in full fine-tuning), plus
    2 * `frozen_forward_params` for other models run forward-only on the same tokens (a reference model)."""
    total, trainable = flop_parameters(model)
    return 4.0 * total + 2.0 * trainable + 2.0 * frozen_forward_params

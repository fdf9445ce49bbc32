"""Models and tokenizers: load (local dir or hub id), dtype/device, LoRA, the frozen reference, tiny models.

A tiny model saved with `save_model_dir` is an ordinary HF directory (safetensors + config + tokenizer), so
every later stage loads it with `load_model(dir)` exactly like a hub checkpoint and never knows it is tiny.

Sources are checked before anything is loaded, with one line naming the path and what is wrong
(`check_model_source`, also usable alone for fail-fast validation): a local directory needs config.json,
safetensors weights whose headers and sizes agree (pickled `.bin` weights are refused: unpickling runs code),
and tokenizer files; a path that can only be local (absolute, ./, ../, ~, deeper than org/name, or whose first
folder exists here) is reported as a missing local directory, never as a failed hub download; a hub id under
HF_HUB_OFFLINE=1 must be in the local Hugging Face cache.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from selpo_core.config import PRECISIONS, ModelConfig
from selpo_core.hardware import cpu_has_native_bf16

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Llama/Qwen/Mistral names of the attention and MLP projections (the LoRA targets when present).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# "name" or "org/name" of letters, digits, '-', '_', '.': anything else (absolute or deeper paths) can only be
# a local directory, so a missing one is reported as such instead of as a confusing hub lookup failure.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Class names transformers writes for a plain fast tokenizer (v5, v4): no model-specific tokenizer code.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


class ModelLoadError(ValueError):
    """A model or tokenizer source is unusable. Permanent: not an OSError, which retry rules treat as transient
    I/O, so a mistyped path fails at once instead of after minutes of retries."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_has_fast_bf16() -> bool:
    # bf16 matmul in hardware (hardware.cpu_has_native_bf16); tests replace this to play a CPU without it.
    return cpu_has_native_bf16()


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """`auto`: bf16 where the device does it natively (CUDA with bf16, CPUs with bf16 matmul), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    return torch.float32


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _only_local(path: str) -> bool:
    """A path that cannot be a hub id, or whose first folder exists here (a typo below it, e.g. models/x)."""
    if not _HUB_ID.match(path) or path.startswith((".", "~")):
        return True
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def _safetensors_problem(file: Path) -> str | None:
    """Header and size of a safetensors file agree (a truncated or overwritten file fails here, cheaply)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or 8 + header_len > size:
                return f"has a truncated or corrupt {file.name} ({size} bytes; its header claims {header_len})"
            header = json.loads(handle.read(header_len))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"has a corrupt {file.name} (its header is not a safetensors header)"
    needed = 8 + header_len + max(ends, default=0)
    return None if size >= needed else f"has a truncated {file.name} ({size} bytes of {needed})"


def _weights_problem(directory: Path) -> str | None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"has an invalid {index.name}"
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            return f"has {index.name} listing {len(missing)} missing shard(s), e.g. {missing[0]}"
        files = [directory / name for name in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in directory.glob(ext))
        if pickles:
            return (f"holds only pickled weights ({pickles[0]}); selpo loads safetensors only (unpickling can "
                    "run code): convert with model.save_pretrained(dir, safe_serialization=True)")
        return "has no model weights (*.safetensors)"
    return next((problem for problem in map(_safetensors_problem, files) if problem), None)


def _tokenizer_problem(directory: Path) -> str | None:
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        return None
    return "has no tokenizer (tokenizer.json or tokenizer_config.json); save one with tokenizer.save_pretrained(dir)"


def _dir_problem(directory: Path, *, weights: bool, tokenizer: bool) -> str | None:
    if weights and not (directory / "config.json").is_file():
        return "has no config.json (not a saved transformers model; save one with save_pretrained)"
    return (_weights_problem(directory) if weights else None) or (_tokenizer_problem(directory) if tokenizer else None)


def _hub_cache_problem(path: str) -> str | None:
    """Under HF_HUB_OFFLINE=1 a hub id must be in the local cache (config.json and a tokenizer file)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(path, name), str)

    if cached("config.json") and (cached("tokenizer.json") or cached("tokenizer_config.json")):
        return None
    return (f"is not a local directory ({Path(path).resolve()} does not exist) and not in the local Hugging Face "
            f"cache ({HF_HUB_CACHE}); HF_HUB_OFFLINE=1 forbids downloading it")


def check_model_source(path: str | Path, *, what: str = "model") -> str | None:
    """One line saying what is wrong with a model source, or None when it looks loadable. Cheap (reads only
    file headers), for validating every model a run needs before any training.

    `what` names the source in the message (e.g. the config field, "reference.path"). A hub id is checked
    only under HF_HUB_OFFLINE=1 (against the local cache); online it is left to the download.
    """
    path = str(path)
    if not path:
        return f"{what}: empty path"
    local = Path(path).expanduser()
    if local.is_dir():
        problem = _dir_problem(local, weights=True, tokenizer=True)
        return f"{what} dir {path!r} {problem}" if problem else None
    if local.exists():
        return f"{what} {path!r} is a file, not a model directory or a hub id like org/name"
    if _only_local(path):
        return f"{what} {path!r}: no such local directory ({local.resolve()})"
    problem = _hub_cache_problem(path) if _offline() else None
    return f"{what} {path!r} {problem}" if problem else None


def _check_source(path: str, what: str, *, weights: bool, tokenizer: bool) -> bool:
    """True for a usable local directory, False for a plausible hub id; a ModelLoadError for anything else."""
    local = Path(path).expanduser()
    if local.is_dir():
        problem = _dir_problem(local, weights=weights, tokenizer=tokenizer)
        if problem:
            raise ModelLoadError(f"{what} dir {path!r} {problem}")
        return True
    problem = check_model_source(path, what=what)
    if problem:
        raise ModelLoadError(problem)
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_generic_saved_tokenizer(directory: Path) -> bool:
    """A local dir saved from a generic fast tokenizer (e.g. the synthetic word-level one)."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (directory / "tokenizer.json").is_file() and config.get("tokenizer_class") in _GENERIC_TOKENIZERS


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A fast tokenizer (selection transfer and heatmaps need character offsets), with a pad token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = str(path)
    is_dir = _check_source(path, "tokenizer", weights=False, tokenizer=True)
    source = str(Path(path).expanduser()) if is_dir else path
    try:
        if is_dir and _is_generic_saved_tokenizer(Path(source)):
            # transformers 5's AutoTokenizer swaps the saved tokenizer of a dir whose config.json says e.g.
            # qwen2 for that model type's class rebuilt from the vocab: the word-level synthetic tokenizer
            # silently became a byte-level BPE. Load exactly the saved tokenizer.json instead.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a tokenizer from {path!r}: {_first_line(err)}") from err
    if not tokenizer.is_fast:
        raise ModelLoadError(
            f"tokenizer {path!r} is a slow (Python) tokenizer; selpo needs a fast one for character offsets"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer {path!r} has neither a pad nor an eos token; add a pad token")
        # Padding is always masked out (attention_mask / loss_mask), so reusing EOS as pad is harmless.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer %s has no pad token; using eos %r as pad", path, tokenizer.eos_token)
    return tokenizer


def load_model(
    cfg_or_path: ModelConfig | str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """AutoModelForCausalLM from a local directory or hub id, in `dtype` (default: the config's `dtype`, or
    `auto`), on `device` (default: `default_device()`), in eval mode. For training, pass dtype=torch.float32
    and use autocast: `auto` may give bf16 weights, which lose small optimizer updates."""
    from transformers import AutoModelForCausalLM

    precision = "auto"
    if isinstance(cfg_or_path, ModelConfig):
        if not cfg_or_path.path:
            raise ValueError("model.path is empty: build a tiny model with build_tiny_model(cfg, tokenizer)")
        path, precision = cfg_or_path.path, cfg_or_path.dtype
        trust_remote_code = trust_remote_code or cfg_or_path.trust_remote_code
    else:
        path = str(cfg_or_path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else resolve_dtype(precision, device)
    from safetensors import SafetensorError

    is_dir = _check_source(path, "model", weights=True, tokenizer=False)
    source = str(Path(path).expanduser()) if is_dir else path
    # Never unpickle a .bin (beside safetensors or instead of them): local dirs were checked to hold safetensors.
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        where = f"model dir {path!r}" if is_dir else f"model {path!r} (not a local directory; as a hub id)"
        raise ModelLoadError(f"could not load {where}: {_first_line(err)}") from err
    return model.to(device).eval()


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A small Llama- or Qwen2-style causal LM from `cfg.tiny_*`, fp32 on CPU, seeded by `cfg.seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {
        "vocab_size": len(tokenizer),  # len() counts added tokens, unlike tokenizer.vocab_size
        "hidden_size": cfg.tiny_hidden_size,
        # 4x like GPT-2 rather than Llama's 8/3x: at this width the extra MLP capacity is cheap and helps.
        "intermediate_size": 4 * cfg.tiny_hidden_size,
        "num_hidden_layers": cfg.tiny_layers,
        "num_attention_heads": cfg.tiny_heads,
        "num_key_value_heads": cfg.tiny_heads,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,  # at vocab ~300 x hidden 64 the head would be a big share of the weights
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[cfg.tiny_arch]
    # A private RNG scope: the same seed gives identical weights, and the caller's global RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_cls(config_cls(**common))
    return model


def maybe_apply_lora(model: PreTrainedModel, cfg: ModelConfig) -> Any:
    """A peft LoRA model on the attention and MLP projections when `cfg.lora_r > 0`; else `model`."""
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return model
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets: list[str] | str = [t for t in LORA_TARGETS if t in names] or "all-linear"  # other architectures
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices are random: seed them like the tiny model
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no gradients: the reference model."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def save_model_dir(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) + tokenizer. A LoRA model is saved merged, as a plain model, so the
    directory loads anywhere without peft; the caller's (still training) LoRA model is left unmerged."""
    from peft import PeftModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()  # merge a copy: merge_and_unload edits in place
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once, as `parameters()` de-duplicates them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "LORA_TARGETS", "ModelLoadError", "check_model_source", "default_device", "resolve_dtype", "load_tokenizer",
    "load_model",
    "build_tiny_model", "maybe_apply_lora", "frozen_copy", "save_model_dir", "count_parameters",
]

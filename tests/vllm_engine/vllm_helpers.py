"""Helpers of the vLLM tests: tiny models vLLM takes, synthetic prompts, the vLLM venv's environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("vllm_driver.py")
HEAD_DIM_64 = {"tiny_hidden_size": 64, "tiny_heads": 1}
"""Tiny models vLLM's CPU attention takes (head size 64); the demo's 64 / 4 heads = 16 it does not."""


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))})
    return env


def synthetic_tokenizer() -> Any:
    from selpo_core import synthetic
    from selpo_core.config import SyntheticConfig

    return synthetic.build_tokenizer(synthetic.make_vocabulary(SyntheticConfig()))


def save_tiny_model(path: Path, *, arch: str = "qwen2", seed: int = 0, std: float = 0.3,
                    eos_extra: list[int] | None = None, **shape: int) -> Path:
    """selpo's tiny model on the synthetic tokenizer, fp32, saved as an ordinary HF directory.

    Weight matrices are re-drawn with std `std` (seeded): the default init gives near-uniform logits whose
    argmax float noise could decide; peaked ones make greedy decoding a real comparison. `eos_extra` adds
    end-of-answer ids to generation_config.json (both backends read them), so some answers end with EOS.
    """
    from selpo_core import models
    from selpo_core.config import ModelConfig

    tokenizer = synthetic_tokenizer()
    cfg = ModelConfig(tiny_arch=arch, seed=seed, **{**HEAD_DIM_64, **shape})
    model = models.build_tiny_model(cfg, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    if eos_extra:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *eos_extra]
    models.save_model_dir(model, tokenizer, path)
    return path


def prompt_texts(n: int) -> list[str]:
    """n distinct instructions of the synthetic task (its own words, so no <unk>)."""
    from selpo_core import synthetic
    from selpo_core.config import SyntheticConfig

    train, heldout = synthetic.make_prompts(SyntheticConfig())
    texts = list(dict.fromkeys(p.text for p in heldout + train))
    assert len(texts) >= n
    return texts[:n]

"""Fixtures and helpers of the vLLM tests: real engines in the vLLM venv (`.venv-vllm`, `make vllm-env`),
driven from the Prefect venv.

They never skip: where the venv is missing they FAIL and say how to build it (`.ci/run` builds it first).
A test that skipped wherever its dependency could be installed would be a test that does not run.
Engine starts cost ~5-30 s each, so every module starts as few as it can: one driver subprocess
(`vllm_driver.py`) answers a whole batch of checks, and the tests assert on what it returns.

Test modules import the fixtures they use (`from vllm_helpers import vllm_python_fixture`): a conftest.py
here would be imported as a second module named `conftest`, shadowing tests/conftest.py's helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
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


@pytest.fixture(scope="session", name="vllm_python")
def vllm_python_fixture() -> Path:
    """The vLLM venv's python; a clear failure (not a skip) where it was never built."""
    path = Path(os.environ.get("SELPO_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not path.is_file():
        pytest.fail(f"the vLLM tests need the vLLM venv, but {path} does not exist: run `make vllm-env` "
                    "(or deselect them with -m 'not vllm')", pytrace=False)
    return path


@pytest.fixture(scope="session", name="run_driver")
def run_driver_fixture(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], Any]:
    """run_driver(job) -> the driver's JSON answer; the driver runs in the vLLM venv (see vllm_driver.py)."""

    def run(job: dict[str, Any]) -> Any:
        work = tmp_path_factory.mktemp("vllm-driver")
        job_path, out_path = work / "job.json", work / "result.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([str(vllm_python), str(DRIVER), str(job_path), str(out_path)], env=vllm_env(),
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            pytest.fail(f"vLLM driver exited with {proc.returncode}:\n{tail}", pytrace=False)
        return json.loads(out_path.read_text())

    return run

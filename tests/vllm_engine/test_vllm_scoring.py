"""score.backend=vllm for real: `score_pairs` through vLLM's prompt log-probs (oracle and reference, one
subprocess in the vLLM venv) agrees with selpo's torch scorer to 1e-4 per token in fp32."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vllm_helpers import (
    save_tiny_model,
    synthetic_tokenizer,
    vllm_python_fixture,  # noqa: F401  (fixtures, by name)
)

from selpo_core.config import ScoreConfig
from selpo_core.data import TokenizedPair
from selpo_core.scoring import read_scores, score_pairs

pytestmark = pytest.mark.vllm

TORCH = ScoreConfig(beta=0.5, precision="fp32", shard_rows=16, batch_tokens=512)


def make_pairs(tokenizer: Any, n: int, seed: int = 0) -> list[TokenizedPair]:
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<")]
    rng = random.Random(seed)

    def encode(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
        return ids, [tuple(o) for o in enc["offset_mapping"]] + [(len(text), len(text))]

    pairs = []
    for i in range(n):
        prompt = " ".join(rng.choices(words, k=rng.randint(2, 8)))
        chosen, rejected = (" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(2))
        (c_ids, c_off), (r_ids, r_off) = encode(chosen), encode(rejected)
        pairs.append(TokenizedPair(
            example_id=f"ex{i:03d}", prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"],
            chosen_ids=c_ids, rejected_ids=r_ids, chosen_text=chosen, rejected_text=rejected,
            chosen_offsets=c_off, rejected_offsets=r_off,
        ))  # fmt: skip
    return pairs


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vllm-scoring")
    oracle = save_tiny_model(root / "oracle", arch="llama", seed=1, std=0.1)
    reference = save_tiny_model(root / "reference", arch="llama", seed=2, std=0.1)
    pairs = make_pairs(synthetic_tokenizer(), 40)
    torch_metrics = score_pairs(pairs, oracle, reference, TORCH, root / "torch")
    vllm_cfg = ScoreConfig(**{**TORCH.__dict__, "backend": "vllm", "vllm_python": str(vllm_python)})
    vllm_metrics = score_pairs(pairs, oracle, reference, vllm_cfg, root / "vllm")
    return {"torch": read_scores(root / "torch"), "vllm": read_scores(root / "vllm"), "dir": root / "vllm",
            "torch_metrics": torch_metrics, "vllm_metrics": vllm_metrics}


def test_vllm_log_probs_agree_with_torch_per_token(scored: dict[str, Any]) -> None:
    ours, theirs = scored["torch"], scored["vllm"]
    assert ours.num_rows == theirs.num_rows == 80
    for name in ("example_id", "side", "token_ids", "offset_start", "offset_end", "text"):
        assert ours.column(name).to_pylist() == theirs.column(name).to_pylist()
    worst = 0.0
    for name in ("oracle_logps", "ref_logps", "log_ratio", "rewards"):
        a = np.concatenate([np.asarray(v) for v in ours.column(name).to_pylist()])
        b = np.concatenate([np.asarray(v) for v in theirs.column(name).to_pylist()])
        diff = float(np.abs(a - b).max())
        assert diff <= 1e-4, f"{name}: max |torch - vLLM| = {diff:.2e} per token"
        worst = max(worst, diff)
    spread = np.concatenate([np.asarray(v) for v in ours.column("oracle_logps").to_pylist()])
    assert spread.std() > 0.1, "log-probs that barely vary would make the agreement vacuous"
    print(f"max |torch - vLLM| per token: {worst:.2e}")


def test_vllm_scoring_metrics_and_clean_up(scored: dict[str, Any]) -> None:
    metrics = scored["vllm_metrics"]
    assert metrics["shards_scored"] == metrics["shards_total"] == 5 and metrics["shards_reused"] == 0
    assert metrics["n_tokens"] == scored["torch_metrics"]["n_tokens"] and metrics["pad_fraction"] == 0.0
    assert metrics["real_tokens_per_second"] > 0
    assert not list(scored["dir"].glob(".vllm-*")), "the subprocess's work files must go once shards are final"

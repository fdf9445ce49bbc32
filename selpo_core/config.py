"""Frozen, primitive-field configs for every stage, YAML load/save, `key=value` overrides, validation.

A run is described by one `RunConfig`. Each stage reads only its own section (plus the sections of the
models it loads), and a stage's cache key is a fingerprint of exactly those sections: changing
`policy.beta` re-runs policy training and what follows, never the oracle. Validation runs in
`__post_init__`, so a bad value fails before any compute with the field name and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


def _choice(section: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(section: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name}={value!r} must be {bound}")


def _fraction(section: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{section}.{name}={value!r} must be in {bound}")


PRECISIONS = ("auto", "bf16", "fp32")
POLICY_METHODS = ("sepo", "dpo", "ipo", "simpo", "selective_dpo", "tdpo1", "tdpo2", "tso", "sepo_dpo", "tgdpo",
                  "tis_dpo", "confpo")
TIS_WEIGHTINGS = ("rank", "clamp", "binary")
ORACLE_LOSSES = ("dpo", "ipo", "simpo")


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in task with known token rewards (used when `data.path` is empty)."""

    seed: int = 0
    """Seed of every random draw of the task: vocabulary, prompts, corpus, pairs."""
    n_filler: int = 200
    """Neutral filler words (true token reward 0)."""
    n_positive: int = 16
    """Positive key words (true token reward +1)."""
    n_negative: int = 16
    """Negative key words (true token reward -1)."""
    n_sft: int = 4000
    """Responses in the SFT corpus the reference model imitates."""
    n_pairs: int = 2000
    """Preference pairs (ties in true reward are dropped, so slightly fewer may be written)."""
    n_heldout_prompts: int = 64
    """Prompts kept out of all training, answered by the generate stage."""
    min_words: int = 8
    """Shortest response, in words (EOS not counted)."""
    max_words: int = 24
    """Longest response, in words (EOS not counted)."""
    p_key: float = 0.15
    """Probability that a response word is a key word (half positive, half negative on average)."""
    positive_rewards: tuple[float, ...] = (1.0,)
    """True rewards of the positive key words, all > 0: key word i gets positive_rewards[i % len] (one value:
    every positive key is worth it; several, e.g. [0.25, 1, 3]: graded rewards, each value on an equal share)."""
    negative_rewards: tuple[float, ...] = (-1.0,)
    """True rewards of the negative key words, all < 0, assigned like positive_rewards."""

    def __post_init__(self) -> None:
        for name in ("n_filler", "n_positive", "n_negative", "n_sft", "n_pairs", "n_heldout_prompts", "min_words"):
            _positive("synthetic", name, getattr(self, name))
        if self.max_words < self.min_words:
            raise ConfigError(f"synthetic.max_words={self.max_words} must be >= synthetic.min_words={self.min_words}")
        _fraction("synthetic", "p_key", self.p_key)
        for name, sign in (("positive_rewards", 1.0), ("negative_rewards", -1.0)):
            values = tuple(float(v) for v in getattr(self, name))  # YAML [0.25, 1, 3] gives ints
            object.__setattr__(self, name, values)
            if not values or any(not v * sign > 0 for v in values):
                raise ConfigError(f"synthetic.{name}={list(values)} must be a non-empty list of "
                                  f"{'positive' if sign > 0 else 'negative'} numbers")


@dataclass(frozen=True)
class DataConfig:
    """Preference data in TRL's formats, from a local JSON/JSONL/Parquet file (also .jsonl.gz / .json.gz) or a
    hub dataset id. Rows are numbered from 0 in messages (in JSON lines, row N is line N + 1)."""

    path: str = ""
    """Local file or hub id. Empty: the synthetic task's pairs."""
    split: str = "train"
    """Split to read from a hub dataset (local files have one split)."""
    format: str = "auto"
    """standard (prompt/chosen/rejected strings), conversational (message lists), implicit (no prompt), auto."""
    max_length: int = 1024
    """Longest prompt + response in tokens (EOS included). A pair that fits is never cut."""
    max_prompt_length: int = 512
    """How long a prompt may stay when its pair does not fit max_length: a longer one is cut to this first."""
    truncation_mode: str = "keep_end"
    """Which part of a too-long prompt is kept: keep_end (the end, the turn being answered; BOS stays) or
    keep_start (the beginning). Responses are always cut at the end, to the room the prompt leaves."""
    on_too_long: str = "truncate"
    """A pair longer than max_length under any of the run's tokenizers: truncate (prompt first, then the
    responses; counted per tokenizer), skip (drop it for every stage, counted, listed in skipped.jsonl), or
    error (stop, naming file, row and field)."""
    on_bad_row: str = "error"
    """A malformed row (invalid JSON or UTF-8, missing or wrong-typed field, empty or identical responses):
    error (stop at the first, naming file, row and field) or skip (drop and count it). Never covers length:
    that is on_too_long."""
    prompt_template: str = "auto"
    """How prompts become tokens in every stage: auto (string prompts as raw text, conversations through
    the tokenizer's chat template, as TRL), raw (text as is) or chat (always the chat template)."""
    sft_path: str = ""
    """SFT data (TRL SFT formats: prompt/completion, or messages ending with the assistant turn). Empty:
    prompt + chosen response of the training pairs."""
    heldout_fraction: float = 0.05
    """Fraction of pairs held out of every training stage, for implicit-reward accuracy."""
    seed: int = 0
    """Seed of the held-out split."""

    def __post_init__(self) -> None:
        _choice("data", "format", self.format, ("auto", "standard", "conversational", "implicit"))
        _choice("data", "truncation_mode", self.truncation_mode, ("keep_end", "keep_start"))
        _choice("data", "on_too_long", self.on_too_long, ("truncate", "skip", "error"))
        _choice("data", "on_bad_row", self.on_bad_row, ("error", "skip"))
        _choice("data", "prompt_template", self.prompt_template, ("auto", "raw", "chat"))
        _positive("data", "max_length", self.max_length)
        _positive("data", "max_prompt_length", self.max_prompt_length)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.max_prompt_length} must be < data.max_length={self.max_length}"
            )
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"data.heldout_fraction={self.heldout_fraction} must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM: a local directory or a hub id, or (empty path) a tiny model built from the fields below."""

    path: str = ""
    """Local directory or hub id. Empty: build a tiny model (synthetic task, tests)."""
    dtype: str = "auto"
    """Weights dtype when loading: auto (bf16 where the device does it fast, else fp32), bf16, fp32."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off: only transformers' own architectures."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    tiny_arch: str = "llama"
    """Tiny model architecture: llama or qwen2."""
    tiny_hidden_size: int = 64
    """Tiny model width."""
    tiny_layers: int = 2
    """Tiny model depth."""
    tiny_heads: int = 1
    """Tiny model attention heads (hidden 64 / 1 head: head size 64, which vLLM's CPU attention supports)."""
    seed: int = 0
    """Seed of the tiny model's initial weights."""

    def __post_init__(self) -> None:
        _choice("model", "dtype", self.dtype, PRECISIONS)
        _choice("model", "tiny_arch", self.tiny_arch, ("llama", "qwen2"))
        _positive("model", "lora_r", self.lora_r, allow_zero=True)
        for name in ("tiny_hidden_size", "tiny_layers", "tiny_heads"):
            _positive("model", name, getattr(self, name))
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigError(f"model.tiny_hidden_size={self.tiny_hidden_size} must be divisible by "
                              f"model.tiny_heads={self.tiny_heads}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: optimisation, precision, checkpoints, logging."""

    max_steps: int = 100
    """Optimizer steps (ignored when epochs > 0)."""
    epochs: float = 0.0
    """Passes over the data; > 0 sets the steps to ceil(epochs * micro-batches per epoch / grad_accum), so the
    run scales with the data (a fraction is fine). 0 uses max_steps. The resolved count is logged."""
    batch_size: int = 8
    """Pairs (or SFT sequences) per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 10
    """Linear warmup steps, then linear decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables."""
    precision: str = "auto"
    """auto (bf16 autocast where the device supports it), bf16, fp32."""
    seed: int = 0
    """Seed of data order and dropout."""
    pack_pairs: bool = False
    """Pack the chosen and rejected responses (and several pairs) into padding-free rows with restarting position
    ids and a block-diagonal mask (llama/mistral/qwen2/qwen3 with sdpa or eager attention; other models keep
    padded rows, with a warning). Off by default: it cuts padding from 10.8% to 3.3% on the demo task, but
    without a varlen attention kernel each wider row costs width^2 attention, and a CPU step ran 1.04-1.29x
    slower (benchmarks/padding.py, train_speed.py)."""
    save_every: int = 50
    """Checkpoint (weights, optimizer, scheduler, RNG, data position, checksums) every N steps; 0 only at the end.
    A resume continues exactly, so this never changes the trained weights."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk. With 2 or more, a damaged newest checkpoint (truncated, edited) falls
    back to the one before it; with 1 it means starting over."""
    log_every: int = 10
    """Log metrics every N steps."""
    report_to: str = "tensorboard"
    """tensorboard (offline, under the stage dir), wandb, or none."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "lr", "log_every", "keep_checkpoints"):
            _positive("train", name, getattr(self, name))
        for name in ("epochs", "warmup_steps", "weight_decay", "max_grad_norm", "save_every"):
            _positive("train", name, getattr(self, name), allow_zero=True)
        _choice("train", "precision", self.precision, PRECISIONS)
        _choice("train", "report_to", self.report_to, ("tensorboard", "wandb", "none"))


TRAIN_FIELDS_NOT_IN_KEY = ("save_every", "keep_checkpoints", "log_every", "report_to")
"""TrainConfig fields that cannot change a training result (weights, metrics aside): checkpoint cadence and
retention (resume is exact) and logging. A stage's cache key should leave them out (tests/core/test_train.py
trains twice per field, with only that field changed, and asserts equal weights)."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning that makes the reference model (and the policy's start)."""

    enabled: bool = True
    """False: the model paths are already SFT models and are used as they are."""
    train: TrainConfig = TrainConfig(max_steps=300, batch_size=32, lr=3e-3, warmup_steps=20)
    """Training settings of SFT."""


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of every preference loss; the oracle and the policy configs embed them (as fields of their
    own), the step functions hand them to the losses as they are. A stage's key holds only the fields its loss
    reads (`objectives.LOSS_FIELDS`)."""

    beta: float = 0.1
    """DPO-family temperature (dpo, ipo, tdpo1/2, selective_dpo, tso)."""
    label_smoothing: float = 0.0
    """cDPO label smoothing for dpo."""
    sepo_gamma: float = 1.0
    """SePO scale of the mean selected log-prob (the official code uses 1; the paper searches 2.1-2.5)."""
    sepo_margin: float = 0.0
    """SePO margin lambda (official code: 0)."""
    simpo_beta: float = 2.0
    """SimPO beta."""
    simpo_gamma_beta_ratio: float = 0.5
    """SimPO gamma / beta."""
    tdpo_alpha: float = 0.5
    """TDPO2 alpha."""
    sdpo_quantile: float = 0.6
    """Selective-DPO per-sequence quantile (0.6 keeps about the top 40%)."""
    tso_chosen_reward_max: float = 5.0
    """TSO dual clip: chosen implicit reward is capped above at this value."""
    tso_rejected_reward_min: float = -5.0
    """TSO dual clip: rejected implicit reward is floored below at this value."""
    tgdpo_alpha: float = 0.5
    """TGDPO: how strongly the oracle's token rewards reweight the DPO sum (0 is DPO; the paper's 0.5)."""
    confpo_beta: float = 1.5
    """ConfPO (SimPO on low-confidence tokens) beta (the paper's 1.5)."""
    confpo_gamma: float = 1.6
    """ConfPO margin gamma, absolute (the paper's 1.6)."""

    def __post_init__(self) -> None:
        section = "oracle" if isinstance(self, OracleConfig) else "policy"
        _positive(section, "beta", self.beta)
        _positive(section, "simpo_beta", self.simpo_beta)
        _fraction(section, "sdpo_quantile", self.sdpo_quantile, allow_zero=True)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{section}.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.tso_rejected_reward_min >= self.tso_chosen_reward_max:
            raise ConfigError(f"{section}.tso_rejected_reward_min must be < {section}.tso_chosen_reward_max")


@dataclass(frozen=True)
class OracleConfig(LossParams):
    """The oracle: DPO (or IPO/SimPO) from the reference on a random subset of the preference data."""

    beta: float = 1.0
    """The oracle's DPO temperature. 1.0, not the policy's 0.1: on the synthetic task the 0.1 oracle over-fit the
    word counts of its subset (a filler word frequent in rejected responses scored below the negative keys;
    rejected-side token AUROC 0.74), 1.0 separates the keys on both sides (docs/RESULTS.md)."""
    loss: str = "dpo"
    """dpo, ipo or simpo (its hyper-parameters: beta / simpo_beta, simpo_gamma_beta_ratio, label_smoothing)."""
    subset_fraction: float = 0.5
    """Fraction of the training pairs the oracle sees (ignored when subset_count > 0)."""
    subset_count: int = 0
    """Exact number of training pairs the oracle sees; 0 uses subset_fraction."""
    subset_seed: int = 0
    """Seed of the subset draw."""
    train: TrainConfig = TrainConfig(epochs=3.0, batch_size=16, lr=1e-3)
    """Training settings of the oracle: 3 passes over its subset whatever its size (a fixed step count over-trains
    a small subset: 150 steps were 15 epochs of a 10% subset)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("oracle", "loss", self.loss, ORACLE_LOSSES)
        _fraction("oracle", "subset_fraction", self.subset_fraction)
        _positive("oracle", "subset_count", self.subset_count, allow_zero=True)


@dataclass(frozen=True)
class ScoreConfig:
    """Offline token scoring: r_t = beta * (log pi_oracle - log pi_ref), written to Parquet shards."""

    beta: float = 1.0
    """Scale of the stored reward (rankings do not depend on it; the raw log-ratio is stored too)."""
    batch_tokens: int = 8192
    """Token budget of one forward batch (padded tokens counted)."""
    shard_rows: int = 1024
    """Responses per Parquet shard (the unit of resume)."""
    precision: str = "auto"
    """auto (bf16 where the device does it fast), bf16, fp32. Log-softmax is always fp32."""
    one_model_at_a_time: bool = False
    """Load oracle and reference in turn (half the memory, two passes) instead of side by side."""
    backend: str = "torch"
    """torch (selpo's batched scorer) or vllm (prompt log-probs of the actual tokens from vLLM, run in the vLLM
    venv as a subprocess: the fast path for large models on a GPU). Only these per-token log-probs are stored
    either way; TDPO's full-vocabulary KL is always computed by the torch reference in the policy stage."""
    vllm_python: str = ".venv-vllm/bin/python"
    """Python of the separate vLLM venv (make vllm-env), for backend=vllm."""

    def __post_init__(self) -> None:
        _choice("score", "backend", self.backend, ("torch", "vllm"))
        _positive("score", "beta", self.beta)
        _positive("score", "batch_tokens", self.batch_tokens)
        _positive("score", "shard_rows", self.shard_rows)
        _choice("score", "precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class SelectConfig:
    """Key-token selection from the stored token rewards."""

    rule: str = "topk"
    """topk: SePO's per-response top k_chosen / bottom k_rejected. global: one dataset-wide threshold per side."""
    k_chosen: float = 0.3
    """Fraction of chosen-response tokens kept (highest reward)."""
    k_rejected: float = 0.3
    """Fraction of rejected-response tokens kept (lowest reward)."""
    exclude_special_tokens: bool = True
    """Never select the policy tokenizer's special tokens (EOS, BOS, pad, unk, chat-template markers); fractions
    then count the selectable tokens only. Off: EOS competes like any token (bottom-k on rejected responses
    picks it about twice as often as top-k on chosen, which teaches the policy not to stop)."""

    def __post_init__(self) -> None:
        _choice("select", "rule", self.rule, ("topk", "global"))
        _fraction("select", "k_chosen", self.k_chosen)
        _fraction("select", "k_rejected", self.k_rejected)


@dataclass(frozen=True)
class PolicyConfig(LossParams):
    """Policy training. `methods` lists what the pipeline trains (each from the same scores)."""

    methods: tuple[str, ...] = ("sepo", "dpo")
    """Methods to train, each into its own stage directory: sepo, dpo, ipo, simpo, selective_dpo, tdpo1, tdpo2, tso."""
    sdpo_reference: str = ""
    """Selective-DPO scorer/anchor model dir or hub id; empty uses the reference (may be larger than the policy)."""
    ref_logps_from_scores: bool = True
    """dpo/ipo/tso/selective_dpo read the reference log-probs from the scoring Parquet (no reference forward)."""
    tis_weighting: str = "rank"
    """TIS-DPO token weights from the DPO and reverse-DPO oracles: rank (per response into [min, max], the
    paper's run), clamp (scores clamped to +-tis_score_clip, scaled into [min, max]), binary (1 on the top
    tis_k of each response, 0 elsewhere: an ablation against sepo's selection)."""
    tis_min_weight: float = 0.7
    """TIS-DPO smallest token weight (rank, clamp)."""
    tis_max_weight: float = 1.3
    """TIS-DPO largest token weight (rank, clamp)."""
    tis_score_clip: float = 1.5
    """TIS-DPO clamp weighting: scores are clamped to [-clip, clip]."""
    tis_k: float = 0.3
    """TIS-DPO binary weighting: fraction of each response's tokens weighted 1."""
    train: TrainConfig = TrainConfig(max_steps=120, batch_size=16, lr=5e-4)
    """Training settings of every policy method (equal steps and data for a fair comparison)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.methods, str):  # a single method from YAML or an override
            object.__setattr__(self, "methods", (self.methods,))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods:
            raise ConfigError(f"policy.methods is empty; choose from {', '.join(POLICY_METHODS)}")
        for method in self.methods:
            _choice("policy", "methods", method, POLICY_METHODS)
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"policy.methods={list(self.methods)} lists a method twice")
        _choice("policy", "tis_weighting", self.tis_weighting, TIS_WEIGHTINGS)
        if not 0 <= self.tis_min_weight < self.tis_max_weight:
            raise ConfigError(f"policy.tis_min_weight={self.tis_min_weight} must be >= 0 and < "
                              f"policy.tis_max_weight={self.tis_max_weight}")
        _positive("policy", "tis_score_clip", self.tis_score_clip)
        _fraction("policy", "tis_k", self.tis_k)


@dataclass(frozen=True)
class GenerateConfig:
    """Answer a benchmark's prompts with the trained policy."""

    backend: str = "auto"
    """auto (vLLM whenever it can run: importable here or `vllm_python` exists, CPU or GPU, and the model's
    head size suits the device; else transformers), vllm (an error saying what to do when it cannot run),
    transformers. The choice and why is logged and written to the stage manifest."""
    prompts: str = ""
    """Prompt file (JSON/JSONL/Parquet) or hub id; empty: the synthetic task's held-out prompts."""
    benchmark: str = "plain"
    """Output format: plain (generations.jsonl only), alpaca_eval, arena_hard, mt_bench."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 48
    """Longest answer in tokens."""
    n: int = 1
    """Samples per prompt."""
    seed: int = 0
    """Sampling seed (same seed, same answers, per backend)."""
    stop: tuple[str, ...] = ()
    """Stop strings (the stop string is not included in the answer)."""
    batch_size: int = 32
    """Prompts per generate call (transformers backend)."""
    precision: str = "auto"
    """Weights dtype for generation, both backends: auto (bf16 where the device does it natively, else fp32),
    bf16, fp32."""
    mt_bench_temperatures: bool = True
    """mt_bench: FastChat's per-category temperatures (writing, roleplay 0.7; stem, humanities 0.1; extraction,
    math, coding, reasoning, arena-hard-200 0 = greedy; any other category 0.7) instead of `temperature`."""
    vllm_python: str = ".venv-vllm/bin/python"
    """Python of the separate vLLM venv (make vllm-env); generation runs there as a subprocess."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallel GPUs."""
    max_model_len: int = 0
    """vLLM context length (prompt + answer tokens) the engine is sized for; 0: the model's own
    max_position_embeddings."""
    vllm_kv_cache_gib: float = 0.0
    """vLLM KV-cache size in GiB; 0: auto (CPU: VLLM_CPU_KVCACHE_SPACE when set, else room for 32 sequences of
    max_model_len, at most min(4 GiB, 10% of available memory); GPU: vllm_gpu_memory_utilization)."""
    vllm_gpu_memory_utilization: float = 0.9
    """vLLM on a GPU, when vllm_kv_cache_gib is 0: fraction of GPU memory for weights + KV cache."""
    vllm_compile: str = "auto"
    """vLLM torch.compile (+ CUDA graphs): auto (on a GPU; eager on CPU, where compiling adds ~40 s to every
    engine start), always, never."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        _choice("generate", "backend", self.backend, ("auto", "vllm", "transformers"))
        _choice("generate", "benchmark", self.benchmark, ("plain", "alpaca_eval", "arena_hard", "mt_bench"))
        _choice("generate", "precision", self.precision, PRECISIONS)
        _choice("generate", "vllm_compile", self.vllm_compile, ("auto", "always", "never"))
        _positive("generate", "temperature", self.temperature, allow_zero=True)
        _fraction("generate", "top_p", self.top_p)
        _fraction("generate", "vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization)
        for name in ("max_model_len", "vllm_kv_cache_gib"):
            _positive("generate", name, getattr(self, name), allow_zero=True)
        for name in ("max_new_tokens", "n", "batch_size", "tensor_parallel_size"):
            _positive("generate", name, getattr(self, name))


@dataclass(frozen=True)
class EvaluateConfig:
    """Offline evaluation of generations and of held-out pairs."""

    reward_model: str = ""
    """HF sequence-classification reward model (dir or hub id) for real data; empty on the synthetic task."""
    baseline_answers: str = ""
    """Baseline's generations.jsonl for a pairwise win rate under the reward model."""
    batch_size: int = 16
    """Sequences per forward pass."""

    def __post_init__(self) -> None:
        _positive("evaluate", "batch_size", self.batch_size)


JUDGES = ("truth", "reward_model", "labels")
PAIRINGS = ("best_vs_worst", "all_adjacent")
ROUND_LOSSES = ("tso", "dpo", "ipo")


@dataclass(frozen=True)
class TSOConfig:
    """The TSO loop (the `tso:` section of a run YAML). Loss settings live in `policy` (beta, tso_* clip bounds)."""

    rounds: int = 3
    """Rounds of generate -> judge -> train; the reference of round r+1 is the policy of round r."""
    prompts_per_round: int = 64
    """Fresh training prompts per round (a seeded permutation, sliced per round; wraps when exhausted). 0: all."""
    generators: tuple[str, ...] = ()
    """The model matrix besides the current policy (always included): model dirs, hub ids, or `initial`."""
    include_human: bool = True
    """Add the dataset's chosen responses to each prompt as candidates (the human-written ones)."""
    samples_per_model: int = 2
    """Answers per prompt from each generator (and at most this many human responses)."""
    temperature: float = 1.0
    """Sampling temperature of the candidates (the rest of the sampling comes from `generate`)."""
    judge: str = "truth"
    """truth (the synthetic task's ground truth), reward_model (judge_path: HF scalar RM), labels (judge_path)."""
    judge_path: str = ""
    """Reward model dir/hub id, or a JSON/JSONL label file of {prompt, response, score} rows (higher is better)."""
    pairing: str = "best_vs_worst"
    """best_vs_worst: rank 1 vs last, then 2 vs second-last...; all_adjacent: neighbours in the ranking."""
    pairs_per_prompt: int = 1
    """Most pairs per prompt (all_adjacent keeps the largest judge margins first)."""
    max_pairs_per_round: int = 0
    """Cap on a round's pairs (a seeded random subset); 0: no cap."""
    loss: str = "tso"
    """Each round's loss: tso (dual-clip DPO); dpo or ipo for ablations of the clip."""
    seed: int = 0
    """Seed of the prompt permutation, candidate sampling and the pair cap."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "generators", tuple(self.generators))
        _choice("tso", "judge", self.judge, JUDGES)
        _choice("tso", "pairing", self.pairing, PAIRINGS)
        _choice("tso", "loss", self.loss, ROUND_LOSSES)
        for name in ("rounds", "samples_per_model", "pairs_per_prompt"):
            _positive("tso", name, getattr(self, name))
        for name in ("prompts_per_round", "max_pairs_per_round", "temperature"):
            _positive("tso", name, getattr(self, name), allow_zero=True)
        if self.judge != "truth" and not self.judge_path:
            raise ConfigError(f"tso.judge={self.judge!r} needs tso.judge_path (a reward model or a label file)")


@dataclass(frozen=True)
class RunConfig:
    """A whole pipeline run: sft? -> oracle -> score -> select -> policy (per method) -> generate -> evaluate."""

    name: str = "demo"
    """Run name: artifacts go to <runs_dir>/<name>/."""
    runs_dir: str = "runs"
    """Root directory of all runs."""
    synthetic: SyntheticConfig = SyntheticConfig()
    data: DataConfig = DataConfig()
    reference: ModelConfig = ModelConfig()
    """The reference: starting point of SFT (if enabled), of the oracle, and the anchor of scoring."""
    policy_model: ModelConfig = ModelConfig()
    """The policy's starting point; identical to `reference` unless weak-to-strong (e.g. a larger model)."""
    sft: SFTConfig = SFTConfig()
    oracle: OracleConfig = OracleConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    policy: PolicyConfig = PolicyConfig()
    generate: GenerateConfig = GenerateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tso: TSOConfig = TSOConfig()
    """TSO's iterative self-training loop (flows/tso.py); unused by the SePO pipeline."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith(("_", ".")):
            raise ConfigError(f"name={self.name!r} must be a non-empty name without '/' that does not start with "
                              "'_' or '.' (<runs_dir>/_stages/ holds the stages every run shares)")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# ---------------------------------------------------------------------------------------------- conversion


def _resolve_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, values: dict[str, Any], *, where: str = "") -> Any:
    """Build a (nested) config dataclass from plain values, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(values).__name__}")
    hints = _resolve_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys: {', '.join(sorted(names))}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            # A partial section overrides the field's own default (e.g. oracle.train's), not the class defaults.
            default = defaults[key]
            base = to_dict(default) if dataclasses.is_dataclass(default) else {}
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping, got {value!r}")
            kwargs[key] = from_dict(hint, _deep_merge(base, value), where=path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Validation names its section ("train.lr"); give the full path ("oracle.train.lr").
        message = str(err)
        short = where.rsplit(".", 1)[-1]
        if where and where != short and message.startswith(short + "."):
            message = where + message[len(short):]
        raise ConfigError(message) from None


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return tuple(str(item) for item in items)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `3e-5` (no dot) as a string; it is the usual way to write a learning rate.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):
        return value
    raise ConfigError(f"{path}: unsupported config type {hint!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass, suitable for YAML and JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def parse_overrides(overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """`["policy.beta=0.2", "policy.methods=[sepo,dpo]"]` or a flat dict -> nested dict (values YAML-parsed)."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.field=value")
            key, raw = item.split("=", 1)
            pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    nested: dict[str, Any] = {}
    for key, value in pairs:
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_run_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (None: all defaults, i.e. the synthetic demo), apply overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if isinstance(values, dict):
            values = _resolve_relative_paths(values, Path(path).resolve().parent)
    if overrides:
        values = _deep_merge(values, parse_overrides(overrides))
    return from_dict(RunConfig, values)


PATH_FIELDS = (("data", "path"), ("data", "sft_path"), ("reference", "path"), ("policy_model", "path"),
               ("policy", "sdpo_reference"), ("generate", "prompts"), ("evaluate", "reward_model"),
               ("evaluate", "baseline_answers"), ("tso", "judge_path"))
"""Fields of a config file that name files or model dirs (or hub ids)."""


def _resolve_relative_paths(values: dict[str, Any], config_dir: Path) -> dict[str, Any]:
    """A relative path in a config file means the file's own folder when it exists there (a config next to its
    models and data works from any directory); otherwise it stays as written (the working directory, or a hub
    id). Overrides on the command line are not touched: they mean the working directory."""
    resolved = json.loads(json.dumps(values))
    for section, name in PATH_FIELDS:
        node = resolved.get(section)
        value = node.get(name) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            candidate = config_dir / value
            if candidate.exists():
                node[name] = str(candidate)
    tso = resolved.get("tso")
    if isinstance(tso, dict) and isinstance(tso.get("generators"), list):
        tso["generators"] = [str(config_dir / g) if isinstance(g, str) and g != "initial" and not
                             Path(g).is_absolute() and (config_dir / g).exists() else g for g in tso["generators"]]
    return resolved


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def replace(config: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-runs validation (it does: __post_init__ is called)."""
    return dataclasses.replace(config, **changes)


__all__ = [
    "ConfigError", "SyntheticConfig", "DataConfig", "ModelConfig", "TrainConfig", "SFTConfig", "OracleConfig",
    "ScoreConfig", "SelectConfig", "LossParams", "PolicyConfig", "GenerateConfig", "EvaluateConfig", "TSOConfig",
    "RunConfig",
    "load_run_config", "save_config", "to_dict", "from_dict", "parse_overrides", "field",
]

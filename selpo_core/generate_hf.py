"""The transformers generation backend: batched `model.generate`, left padding, prompts sorted by length.

Same meaning of a `SamplingSpec` as every backend (selpo_core/generate_spec.py); runs anywhere torch runs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selpo_core.generate_spec import (
    BackendUnavailable,
    Completion,
    Conversation,
    SamplingSpec,
    cut_at_stop,
    encode_conversation,
    merge_eos_ids,
)

if TYPE_CHECKING:
    import torch


def _batch_seed(seed: int, batch_index: int) -> int:
    # A hash, not seed + index: (seed 0, batch 1) and (seed 1, batch 0) must not share a random stream.
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()[:8], "little") % (2**63)


class _StopOnStrings:
    """Stopping criterion: a row is done once its generated text contains a stop string.

    transformers' own `stop_strings` cannot handle every tokenizer (it fails on word-level vocabularies),
    so we decode the last few generated tokens of each row instead. Records the generated length at which
    each row stopped: HF pads finished rows with pad_token_id, which may equal a real token.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len
        # Every non-special token decodes to >= 1 character for common tokenizers; the margin covers byte
        # pieces and special tokens that decode to nothing.
        self.window = 2 * max(len(s) for s in stop) + 8
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch

        generated = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = [r for r in range(input_ids.shape[0]) if r not in self.stopped_at]
        tails = input_ids[rows, input_ids.shape[1] - min(generated, self.window) :].tolist() if rows else []
        for row, text in zip(rows, self.tokenizer.batch_decode(tails, skip_special_tokens=True)):
            if any(s in text for s in self.stop):
                self.stopped_at[row] = generated
        for row in self.stopped_at:
            done[row] = True
        return done


class TransformersBackend:
    """Batched `model.generate` with left padding, prompts sorted by length (little padding)."""

    name = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        progress: bool = True,
        prompt_template: str = "chat",
    ) -> None:
        import torch

        from selpo_core import models

        self.device = torch.device(device) if device is not None else models.default_device()
        if isinstance(dtype, str):
            dtype = models.resolve_dtype(dtype, self.device)
        self.tokenizer = models.load_tokenizer(model_dir)
        self.model = models.load_model(model_dir, dtype=dtype, device=self.device)
        self.batch_size, self.progress = batch_size, progress
        self.prompt_template = prompt_template
        if prompt_template == "chat" and getattr(self.tokenizer, "chat_template", None) is None:
            raise BackendUnavailable(
                f"tokenizer of {model_dir} has no chat template; prompts cannot be rendered"
            )
        self.eos_ids = merge_eos_ids(self.model.generation_config.eos_token_id, self.tokenizer, str(model_dir))

    def encode(self, conversation: Conversation) -> list[int]:
        return encode_conversation(self.tokenizer, conversation, self.prompt_template)

    def generate(self, conversations: list[Conversation], spec: SamplingSpec) -> list[list[Completion]]:
        from tqdm.auto import tqdm

        encoded = [self.encode(c) for c in conversations]
        # Longest first: a batch that does not fit in memory fails at once, not at the end.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[list[Completion]] = [[] for _ in conversations]
        tokens, start = 0, time.perf_counter()
        bar = tqdm(total=len(encoded), desc="generate", unit="prompt", disable=not self.progress)
        for b, first in enumerate(range(0, len(order), self.batch_size)):
            batch = order[first : first + self.batch_size]
            completions = self._generate_batch([encoded[i] for i in batch], spec, _batch_seed(spec.seed, b))
            for i, row in zip(batch, completions, strict=True):
                results[i] = row
                tokens += sum(c.n_tokens for c in row)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        bar.close()
        return results

    def _generate_batch(
        self, prompts: list[list[int]], spec: SamplingSpec, seed: int
    ) -> list[list[Completion]]:
        import torch

        length = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor(
            [[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        samples = 1 if spec.greedy else spec.n  # greedy samples are all the same answer: compute it once
        criterion = _StopOnStrings(self.tokenizer, spec.stop, length) if spec.stop else None
        # Every knob is explicit (neutral unless the spec sets it): otherwise the checkpoint's
        # generation_config.json (top_k=20, repetition_penalty=1.05, ...) fills it in, and the same spec
        # would sample from another distribution than vLLM's.
        kwargs: dict[str, Any] = {
            "max_new_tokens": spec.max_new_tokens,
            "num_return_sequences": samples,
            "pad_token_id": pad,
            "eos_token_id": self.eos_ids,
            "do_sample": not spec.greedy,
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
        }
        if not spec.greedy:  # (sampling knobs only when sampling: greedy warns about them)
            kwargs |= {
                "temperature": spec.temperature,
                "top_p": spec.top_p,
                "top_k": 0,
                "min_p": 0.0,
                "typical_p": 1.0,
            }
        if criterion is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # leave the caller's RNG untouched
            torch.manual_seed(seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        generated = output[:, length:].tolist()
        rows = [
            self._completion(ids, spec, criterion.stopped_at.get(r) if criterion else None)
            for r, ids in enumerate(generated)
        ]
        return [rows[i * samples : (i + 1) * samples] * (spec.n // samples) for i in range(len(prompts))]

    def _completion(self, ids: list[int], spec: SamplingSpec, stopped_at: int | None) -> Completion:
        end = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        if stopped_at is not None and (end is None or stopped_at <= end):
            generated, n_tokens, reason = ids[:stopped_at], stopped_at, "stop"
            ids = generated
        elif end is not None:
            # EOS counts as generated but is not text, even when it is not a special token (as in vLLM).
            generated, n_tokens, reason = ids[: end + 1], end + 1, "eos"
            ids = ids[:end]
        else:
            generated, n_tokens, reason = ids, len(ids), "length"
        text, was_cut = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), spec.stop)
        return Completion(text=text, n_tokens=n_tokens, finish_reason="stop" if was_cut else reason,
                          token_ids=tuple(generated))


__all__ = ["TransformersBackend"]

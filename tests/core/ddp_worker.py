"""Tiny training fixtures for tests/core/test_train.py, and the worker of its multi-process runs.

    python -m torch.distributed.run --nproc_per_node 2 tests/core/ddp_worker.py --out DIR --steps 3
    python tests/core/ddp_worker.py --out DIR --checkpoints DIR --pid N --ready FILE --go FILE   # concurrent run

The second form is one of two independent processes training the same run into one checkpoint dir at once:
each claims pid N (as in two containers) and waits for the go file, so their saves overlap.

Kept in one file so the single-process reference run and the DDP run build exactly the same model, data
and step function. test_train.py imports it by path (tests/ is not a package).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

VOCAB = 50
PAD = 0
PROMPT_LEN = 3


def tiny_model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer Llama of width 32, tied embeddings like selpo's own tiny models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True, attention_dropout=dropout, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def make_items(n: int, seed: int = 0, min_len: int = 8, max_len: int = 14) -> list[list[int]]:
    """Sequences that count upwards mod VOCAB from a random start: learnable, so the loss can fall."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        start, length = rng.randrange(1, VOCAB), rng.randint(min_len, max_len)
        items.append([1 + (start + k) % (VOCAB - 1) for k in range(length)])  # never PAD
    return items


def collate(items: list[list[int]]) -> dict[str, Tensor]:
    """Right padding; loss_mask on the 'response' (everything after the first PROMPT_LEN tokens)."""
    width = max(len(ids) for ids in items)
    input_ids = torch.full((len(items), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    loss_mask = torch.zeros((len(items), width), dtype=torch.bool)
    for row, ids in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        loss_mask[row, PROMPT_LEN : len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def sft_step(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Mean over sequences of the mean next-token NLL on loss_mask.

    Per-sequence means (not one token mean over the batch) make the loss of a batch of 8 exactly the average
    of two batches of 4, so DDP and gradient accumulation can be compared with the single big batch.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch["loss_mask"][:, 1:]
    per_sequence = -(token_logps * mask).sum(1) / mask.sum(1)
    loss = per_sequence.mean()
    return loss, {"nll": loss.detach(), "response_tokens": mask.sum(1).float().mean(), "constant": 1.0}


def lengths(items: list[list[int]]) -> list[int]:
    return [len(ids) for ids in items]


def main() -> None:
    from selpo_core.config import TrainConfig
    from selpo_core.train import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-items", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--checkpoints", type=Path, default=None, help="default: OUT/checkpoints")
    parser.add_argument("--pid", type=int, default=0, help="report this pid (temp names), not the real one")
    parser.add_argument("--ready", type=Path, default=None, help="touched when set up; then wait for --go")
    parser.add_argument("--go", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")  # the test reads selpo's log lines
    if args.pid:
        os.getpid = lambda: args.pid

    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=3e-3, warmup_steps=1,
                      precision="fp32", save_every=args.save_every, log_every=1, report_to="none")
    items = make_items(args.n_items)
    model = tiny_model()
    if args.ready is not None and args.go is not None:
        args.ready.touch()
        while not args.go.exists():
            time.sleep(0.005)
    result = train(model, sft_step, items, collate, lengths(items), cfg, args.checkpoints or args.out / "checkpoints",
                   log_dir=None, desc="ddp")
    import torch.distributed as dist

    distributed = dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        torch.save(model.state_dict(), args.out / "state_dict.pt")
        summary = {"steps": result.steps, "world_size": dist.get_world_size() if distributed else 1}
        (args.out / "result.json").write_text(json.dumps(summary))
    if distributed:
        dist.barrier()  # train() leaves the process group up (a second call could follow); we are done with it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The one training loop of selpo: SFT, oracle and every policy method differ only in their `step_fn`.

accelerate supplies devices, bf16 autocast, gradient accumulation, DDP (torchrun / accelerate launch) and
checkpoint (de)serialisation; this file owns what accelerate leaves to the caller: the data order, the
schedule, metrics, and exact resume.

Data order: every epoch has a deterministic plan of *global* batches (`length_bucketed_batches` seeded with
`seed + epoch`, batch = batch_size * world_size), and each rank takes its contiguous slice of every global
batch. So 2 processes x batch 4 see the same examples per micro-step as 1 process x batch 8, and a checkpoint
only needs (epoch, micro-batch index) to know where the data stream stands. Epochs repeat until the run's
optimizer steps are done (`max_steps`, or `epochs` passes over the data); one optimizer step consumes
`grad_accum` micro-batches, possibly straddling two epochs.

Checkpoints (selpo_core/checkpoints.py): weights, optimizer, scheduler, every RNG, the data position and the
open metrics window, with checksums of every file; the newest intact one is loaded on start, a damaged one
is named and skipped. In fp32 a resumed run ends with bit-identical weights and the same metrics as an
uninterrupted one (tests check this), so `save_every`, `keep_checkpoints` and logging never change results.

Throughput: `tokens` in the logged metrics is the real (non-padding: attention_mask) tokens of all processes
in that logging window, `tokens_per_second` those per second of training in the window (a window cut by a
resume keeps its tokens and seconds from before the interruption), `tokens_per_second_per_device` that over
the number of processes. `flops_per_second` is the model FLOPs of those tokens per second, FLOPs per token
from `hardware.training_flops_per_token` (6 * parameters for full fine-tuning, + 2 * parameters of a frozen
model run forward on the same tokens, `frozen_forward_params`), and `mfu` that per device over the device's
peak for the dtype the matmuls run in (bf16 under autocast, else fp32; `hardware.peak_flops`: measured on CPU,
the datasheet on known GPUs, absent where unknown), as torchtune and open-instruct report them. Where a log dir
is given, every logged window is also a line of `<log_dir>/metrics.jsonl` (`step` and the metrics; a resumed
run appends the steps after its checkpoint again, so readers keep the last line of each step).
`TrainResult.tokens_per_second` covers this call's loop; `total_tokens_per_second` covers
every step of the run across resumes (seconds of the steps that were kept, none of the lost work).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import parse_flag_from_env, send_to_device, set_seed
from torch import Tensor
from tqdm.auto import tqdm

from selpo_core import hardware, progress
from selpo_core.batching import length_bucketed_batches
from selpo_core.checkpoints import TRAINER_STATE, latest_checkpoint, read_state, resumable_checkpoint, save_checkpoint
from selpo_core.config import TrainConfig

log = logging.getLogger("selpo.train")

StepFn = Callable[[Any, dict[str, Any]], tuple[Tensor, dict[str, Tensor | float]]]

TIMING_METRICS = ("tokens_per_second", "tokens_per_second_per_device", "flops_per_second", "mfu")
"""Logged metrics that depend on wall time (the rest are equal between a resumed and an uninterrupted run)."""
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    steps: int
    """Optimizer steps the model has taken in total (== planned_steps(...) once finished)."""
    final_metrics: dict[str, float]
    """Metrics of the last logging window (restored from the checkpoint if nothing was left to run)."""
    tokens_per_second: float
    """Real (non-padding) tokens of all processes per second of this call's training loop (0: nothing ran)."""
    seconds: float
    """Wall time of this call's training loop."""
    resumed_from_step: int
    """Step of the checkpoint this call started from; 0 for a fresh run."""
    total_tokens: float = 0.0
    """Real tokens of all processes over steps 1..steps, across resumes: the same as in one uninterrupted run."""
    total_tokens_per_second: float = 0.0
    """total_tokens per second of the training that produced those steps (across resumes, lost work excluded)."""


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warmup, then linear decay to 0 at max_steps.

    Warmup is (step+1)/(warmup+1) rather than HF's step/warmup, so the first step does not run at lr 0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def mixed_precision(precision: str, device: torch.device) -> str:
    """accelerate's mixed_precision for TrainConfig.precision: "bf16" or "no". Weights stay fp32."""
    from selpo_core.models import resolve_dtype  # models pulls in transformers; only needed here

    return "bf16" if resolve_dtype(precision, device) == torch.bfloat16 else "no"


def _cpu_only_multiprocess() -> bool:
    """torchrun/accelerate launch with several processes and no accelerator device: DDP over gloo on CPU.

    accelerate only goes multi-process on CPU when asked (cpu=True); without it every process would silently
    train alone on its own shard.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    device_api = getattr(torch, "accelerator", None)  # torch >= 2.6: cuda, xpu, mps, ...
    return not (device_api.is_available() if device_api is not None else torch.cuda.is_available())


def planned_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of a run: cfg.max_steps, or with cfg.epochs > 0, ceil(epochs * micro-batches per
    epoch / grad_accum) (at least 1). The rounding guards against 0.1 * 30 = 3.0000000000000004 -> 4 steps."""
    if cfg.epochs <= 0:
        return cfg.max_steps
    return max(1, math.ceil(round(cfg.epochs * micro_batches_per_epoch / cfg.grad_accum, 9)))


def train(model: Any, step_fn: StepFn, items: Sequence[Any], collate: Callable[[list[Any]], dict],
          lengths: Sequence[int], cfg: TrainConfig, checkpoint_dir: Path, *, log_dir: Path | None,
          desc: str, frozen_forward_params: int = 0) -> TrainResult:
    """Train `model` in place with `step_fn(model, batch) -> (loss, metrics)`; resume from `checkpoint_dir`.

    `collate(list_of_items) -> dict` builds one micro-batch (CPU tensors are fine: they are moved to the
    device here); `lengths[i]` is the padded-length proxy of `items[i]` used to bucket batches. Metrics
    from step_fn are averaged over `log_every` steps and logged under their own names next to the loop's
    loss, lr, grad_norm, tokens, tokens_per_second(_per_device), flops_per_second, mfu, pad_fraction and
    epoch. `frozen_forward_params`: parameters of models step_fn runs forward-only on the batch's tokens each
    step (a reference model), counted as 2 FLOPs each per token in flops_per_second and mfu.
    """
    if len(items) != len(lengths):
        raise ValueError(f"{desc}: {len(items)} items but {len(lengths)} lengths")
    checkpoint_dir = Path(checkpoint_dir)
    if cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise RuntimeError("train.report_to=wandb but wandb is not installed: pip install 'selpo[wandb]'")
    tracker = None if cfg.report_to == "none" or (cfg.report_to == "tensorboard" and log_dir is None) \
        else cfg.report_to
    # ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets; we create PartialState first, so pass it on.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or _cpu_only_multiprocess()
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {state.num_processes}: "
                           "each would train alone. Was a PartialState/Accelerator created before train() "
                           "without cpu=True?")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision(cfg.precision, state.device),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=tracker,
        project_dir=str(log_dir) if log_dir is not None else None,
        # We step the scheduler once per optimizer step ourselves: a prepared scheduler would otherwise step
        # num_processes times per step (accelerate assumes per-process batches shrink the epoch).
        step_scheduler_with_optimizer=False,
    )
    if tracker is not None:  # trackers live on the main process only (accelerate checks)
        run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", desc).strip("_") or "train"
        config = {**dataclasses.asdict(cfg), "world_size": accelerator.num_processes}
        accelerator.init_trackers(run_name, config=config, init_kwargs={"wandb": {"name": desc}})
    try:
        flops = _FlopRate(model, accelerator, frozen_forward_params)
        metrics_file = log_dir / METRICS_FILE if log_dir is not None and accelerator.is_main_process else None
        return _train(accelerator, model, step_fn, items, collate, lengths, cfg, checkpoint_dir, desc, flops,
                      metrics_file)
    finally:
        # Not accelerator.end_training(): besides finishing trackers it destroys the process group, after
        # which a second train() in the same torchrun process (or the caller's own barrier) would fail.
        for handle in accelerator.trackers:
            handle.finish()
        accelerator.free_memory()
        # accelerate keeps its config in process-wide singletons that refuse to change (bf16 -> fp32, cuda ->
        # cpu); reset them so train() can run again in this process. Under several processes PartialState
        # stays: it owns the process group, which the next call reuses.
        AcceleratorState._reset_state(reset_partial_state=accelerator.num_processes == 1)
        GradientState._reset_state()


def _train(accelerator: Accelerator, model: Any, step_fn: StepFn, items: Sequence[Any],
           collate: Callable[[list[Any]], dict], lengths: Sequence[int], cfg: TrainConfig,
           checkpoint_dir: Path, desc: str, flops: _FlopRate, metrics_file: Path | None) -> TrainResult:
    rank, world = accelerator.process_index, accelerator.num_processes
    global_batch = cfg.batch_size * world
    set_seed(cfg.seed)  # dropout etc.; a resume then overwrites every RNG with the checkpoint's
    per_epoch = len(_epoch_plan(lengths, global_batch, world, cfg.seed, 0))  # the same length every epoch
    max_steps = planned_steps(cfg, per_epoch)
    if accelerator.is_main_process:
        source = f"{cfg.epochs:g} epochs" if cfg.epochs > 0 else "max_steps"
        log.info("%s: %d optimizer steps (%s; %d items, %d micro-batches of %d per epoch, grad_accum %d)",
                 desc, max_steps, source, len(items), per_epoch, global_batch, cfg.grad_accum)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, max_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, micro, last_metrics = 0, 0, 0, {}
    window = _Window(accelerator.device, flops)
    done_tokens, done_seconds = 0.0, 0.0  # of the steps before this call (from the checkpoint)
    if (ckpt := resumable_checkpoint(accelerator, checkpoint_dir)) is not None:
        state = read_state(ckpt)
        if (state["seed"], state["global_batch"]) != (cfg.seed, global_batch):
            raise ValueError(f"{desc}: checkpoint {ckpt} was made with seed={state['seed']}, global batch "
                             f"{state['global_batch']}; this run has seed={cfg.seed}, global batch "
                             f"{global_batch} (its data order would differ). Use a fresh checkpoint_dir.")
        try:
            accelerator.load_state(str(ckpt))  # weights, optimizer, scheduler, every RNG, accelerate's step
        except Exception as err:  # verified a moment ago: vanished, or a format this torch cannot read
            raise RuntimeError(f"{desc}: could not load checkpoint {ckpt}: {type(err).__name__}: {err}") \
                from err
        step, epoch, micro, last_metrics = state["step"], state["epoch"], state["micro_index_in_epoch"], \
            state["metrics"]
        done_tokens, done_seconds = state["tokens_total"], state["seconds_total"]
        window.restore(state["window"], main_process=accelerator.is_main_process)
        log.info("%s: resuming from %s (epoch %d, micro-batch %d)", desc, ckpt, epoch, micro)
    resumed_from = step

    model.train()
    stream = _micro_batches(lengths, global_batch, world, cfg.seed, epoch, micro)
    total_tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    bar = tqdm(total=max_steps, initial=step, desc=desc, disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    started = time.perf_counter()
    while step < max_steps:
        lr = scheduler.get_last_lr()[0]
        for _ in range(cfg.grad_accum):
            epoch, micro, n_micro, indices = next(stream)
            batch = send_to_device(collate([items[i] for i in _rank_slice(indices, rank, world)]),
                                   accelerator.device)
            with accelerator.accumulate(model):
                # The whole step_fn runs under autocast, not only the prepared model's forward: step_fns reach
                # into the decoder directly (logps fast path) and run frozen reference models.
                with accelerator.autocast():
                    loss, metrics = step_fn(model, batch)
                accelerator.backward(loss)  # divides by grad_accum; DDP syncs only on the last micro-batch
            total_tokens += window.add_micro(loss, metrics, batch)
        # accumulate() set sync_gradients on the last micro-batch, so these act (and clip the synced grads).
        # max_grad_norm 0: clipping at inf multiplies by exactly 1, and we still get the norm to log.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, micro = step + 1, micro + 1  # the data position is now the micro-batch after the one consumed
        window.add_step(grad_norm, lr)
        bar.update(1)
        if accelerator.is_main_process:
            progress.report(desc, step, cfg.max_steps)

        if step % cfg.log_every == 0 or step == max_steps:
            last_metrics = window.flush(accelerator, epoch=epoch + micro / n_micro)
            accelerator.log(last_metrics, step=step)
            if metrics_file is not None:
                _append_line(metrics_file, {"step": step, **last_metrics})
            bar.set_postfix(loss=f"{last_metrics['loss']:.4f}",
                            tok_s=f"{last_metrics['tokens_per_second']:.0f}")
            if accelerator.is_main_process:
                log.info("%s step %d/%d %s", desc, step, max_steps,
                         " ".join(f"{k}={v:.4g}" for k, v in last_metrics.items()))
        if (cfg.save_every and step % cfg.save_every == 0) or step == max_steps:
            tokens = accelerator.reduce(total_tokens.clone(), reduction="sum").item()
            save_checkpoint(accelerator, checkpoint_dir, {
                "step": step, "max_steps": max_steps, "epoch": epoch, "micro_index_in_epoch": micro,
                "seed": cfg.seed, "global_batch": global_batch, "world_size": world, "metrics": last_metrics,
                "window": window.snapshot(accelerator), "tokens_total": done_tokens + tokens,
                "seconds_total": done_seconds + time.perf_counter() - started}, cfg.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - started
    tokens = accelerator.reduce(total_tokens, reduction="sum").item()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # gives back the caller's forward (no autocast)
    all_tokens, all_seconds = done_tokens + tokens, done_seconds + (seconds if step > resumed_from else 0.0)
    return TrainResult(steps=step, final_metrics=last_metrics, seconds=seconds,
                       tokens_per_second=tokens / seconds if tokens else 0.0, resumed_from_step=resumed_from,
                       total_tokens=all_tokens, total_tokens_per_second=all_tokens / all_seconds if all_seconds
                       else 0.0)


def _micro_batches(lengths: Sequence[int], global_batch: int, world: int, seed: int, epoch: int,
                   micro: int) -> Iterator[tuple[int, int, int, list[int]]]:
    """(epoch, index in epoch, micro-batches in epoch, global batch indices) from a data position onwards.

    A resume starts mid-plan by index: skipped micro-batches are never collated or run.
    """
    while True:
        plan = _epoch_plan(lengths, global_batch, world, seed, epoch)
        for index in range(micro, len(plan)):
            yield epoch, index, len(plan), plan[index]
        epoch, micro = epoch + 1, 0


def _epoch_plan(lengths: Sequence[int], global_batch: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch. Every epoch has the same number: only the order changes."""
    # A last batch smaller than the world size would leave a rank without data (DDP would hang): drop it.
    plan = length_bucketed_batches(lengths, global_batch, seed=seed + epoch)
    plan = [batch for batch in plan if len(batch) >= world]
    if not plan:
        raise ValueError(f"{len(lengths)} examples cannot feed {world} processes")
    return plan


def _rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """Contiguous, near-equal slice of a global batch for this rank (exactly batch_size when it is full)."""
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    return indices[start:start + base + (rank < extra)]


def _append_line(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


class _FlopRate:
    """FLOPs per real token of a training step and the per-device peak they are measured against."""

    def __init__(self, model: Any, accelerator: Accelerator, frozen_forward_params: int) -> None:
        self.per_token = hardware.training_flops_per_token(model, frozen_forward_params=frozen_forward_params)
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        self.peak_per_device = hardware.peak_flops(dtype, accelerator.device)

    def metrics(self, tokens_per_second: float, world: int) -> dict[str, float]:
        out = {"tokens_per_second_per_device": tokens_per_second / world,
               "flops_per_second": tokens_per_second * self.per_token}
        if self.peak_per_device:
            out["mfu"] = out["flops_per_second"] / (world * self.peak_per_device)
        return out


class _Window:
    """Sums since the last log, kept as device tensors so the loop never waits on the GPU between logs."""

    def __init__(self, device: torch.device, flops: _FlopRate) -> None:
        self.device = device
        self.flops = flops
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.micro = self.steps = 0
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self.slots = 0  # padded token slots (rows x padded length)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        self.lr = 0.0
        self.start = time.perf_counter()

    def _add(self, name: str, value: Tensor | float) -> None:
        value = value.detach().to(self.device, torch.float64) if isinstance(value, Tensor) else float(value)
        self.sums[name] = self.sums.get(name, 0.0) + value

    def add_micro(self, loss: Tensor, metrics: dict[str, Tensor | float], batch: dict[str, Any]) -> Tensor:
        """Record one micro-batch; returns its real-token count (attention_mask sum)."""
        self._add("loss", loss)
        for name, value in metrics.items():
            if name != "loss":
                self._add(name, value)
        mask = batch.get("attention_mask")
        if mask is None:  # a batch without padding: every slot is a real token
            mask = torch.ones_like(batch["input_ids"])
        real = mask.sum(dtype=torch.float64)
        self.tokens += real
        packed = batch.get("packed")
        # Packed rows: the slots the model computes on are the packed rows', not the padded layout's.
        self.slots += packed.input_ids.numel() if packed is not None else mask.numel()
        self.micro += 1
        return real

    def add_step(self, grad_norm: Tensor | float | None, lr: float) -> None:
        if grad_norm is not None:
            self.grad_norm += torch.as_tensor(grad_norm, dtype=torch.float64).to(self.device)
        self.lr = lr
        self.steps += 1

    def snapshot(self, accelerator: Accelerator) -> dict[str, Any]:
        """The open window summed over processes (one all-reduce; every rank calls it), for a checkpoint."""
        names = sorted(self.sums)
        local = torch.stack([*(torch.as_tensor(self.sums[n], dtype=torch.float64, device=self.device)
                               for n in names),
                             self.grad_norm, self.tokens, torch.as_tensor(self.slots, dtype=torch.float64,
                                                                          device=self.device)])
        total = accelerator.reduce(local, reduction="sum").tolist()
        return {"sums": dict(zip(names, total)), "grad_norm": total[-3], "tokens": total[-2],
                "slots": total[-1], "micro": self.micro, "steps": self.steps, "lr": self.lr,
                "seconds": time.perf_counter() - self.start}

    def restore(self, snapshot: dict[str, Any], *, main_process: bool) -> None:
        """Continue a window from `snapshot`. Its sums (already over all processes) go to the main process, the
        others start from 0, so the next flush averages exactly the micro-batches of an uninterrupted run."""
        self.reset()

        def value(x: float) -> Tensor:
            return torch.tensor(x if main_process else 0.0, dtype=torch.float64, device=self.device)

        self.sums = {name: value(x) for name, x in snapshot["sums"].items()}
        self.grad_norm, self.tokens = value(snapshot["grad_norm"]), value(snapshot["tokens"])
        self.slots = int(snapshot["slots"]) if main_process else 0
        self.micro, self.steps, self.lr = snapshot["micro"], snapshot["steps"], snapshot["lr"]
        self.start = time.perf_counter() - snapshot["seconds"]  # the window's training time before the stop

    def flush(self, accelerator: Accelerator, *, epoch: float) -> dict[str, float]:
        """Average over the window and over processes (one all-reduce), then start a new window."""
        names = sorted(self.sums)  # same order on every rank: step_fn returns the same keys everywhere
        def as_tensor(value: Tensor | float) -> Tensor:
            return torch.as_tensor(value, dtype=torch.float64, device=self.device)

        averages = [as_tensor(self.sums[n]) / self.micro for n in names]
        grad_norm = self.grad_norm / max(1, self.steps)
        local = torch.stack([*averages, grad_norm, self.tokens, as_tensor(self.slots)])
        total = accelerator.reduce(local, reduction="sum").tolist()
        world = accelerator.num_processes
        seconds = max(time.perf_counter() - self.start, 1e-9)
        tokens, slots = total[-2], total[-1]
        out = {name: value / world for name, value in zip(names, total)}
        out.update(lr=self.lr, grad_norm=total[-3] / world, tokens=tokens, tokens_per_second=tokens / seconds,
                   **self.flops.metrics(tokens / seconds, world),
                   pad_fraction=1.0 - tokens / slots if slots else 0.0, epoch=epoch)
        self.reset()
        return out


__all__ = ["TrainResult", "TIMING_METRICS", "METRICS_FILE", "train", "lr_factor",
           "mixed_precision", "planned_steps", "latest_checkpoint",
           "TRAINER_STATE"]

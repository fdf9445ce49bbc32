"""The training loop: learning, gradient accumulation, schedule, exact resume, trackers, bf16, 2-process DDP.

Every run uses the tiny Llama, data and SFT-like step of ddp_worker.py (shared with the DDP worker process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from selpo_core import train as train_module
from selpo_core.batching import length_bucketed_batches
from selpo_core.config import TrainConfig
from selpo_core.train import (
    KEEP_CHECKPOINTS,
    TRAINER_STATE,
    latest_checkpoint,
    lr_factor,
    mixed_precision,
    train,
)

HERE = Path(__file__).parent
REPO = HERE.parent.parent
_spec = importlib.util.spec_from_file_location("selpo_test_ddp_worker", HERE / "ddp_worker.py")
assert _spec is not None and _spec.loader is not None
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def fp32(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = dict(max_steps=4, batch_size=8, lr=3e-3, warmup_steps=1, precision="fp32",
                                save_every=0, log_every=1, report_to="none")
    return TrainConfig(**{**base, **changes})


def run(cfg: TrainConfig, tmp: Path, *, items: list[list[int]] | None = None, model: Any = None,
        step_fn: Any = None, name: str = "run", log_dir: Path | None = None) -> tuple[Any, Any]:
    items = items if items is not None else tiny.make_items(40)
    model = model if model is not None else tiny.tiny_model()
    result = train(model, step_fn or tiny.sft_step, items, tiny.collate, tiny.lengths(items), cfg,
                   tmp / name / "checkpoints", log_dir=log_dir, desc=name)
    return model, result


def assert_state_close(a: Any, b: Any, atol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(autouse=True)
def on_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """These checks are about the loop, in exact fp32 arithmetic: run them on CPU even on a GPU host."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


@pytest.fixture
def in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unshuffled plans: batches of 4 then pair up exactly into the batches of 8 (any seed, any epoch)."""

    def plan(lengths: Any, batch_size: int, *, seed: int, shuffle: bool = True) -> list[list[int]]:
        return length_bucketed_batches(lengths, batch_size, seed=seed, shuffle=False)

    monkeypatch.setattr(train_module, "length_bucketed_batches", plan)


def test_lr_factor_warmup_then_linear_decay_to_zero() -> None:
    assert [lr_factor(s, 2, 6) for s in range(7)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [lr_factor(s, 0, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_factor(3, 10, 5) == pytest.approx(4 / 11)  # warmup longer than the run: still warming up


def test_rank_slices_are_contiguous_and_cover_the_global_batch() -> None:
    batch = list(range(10, 18))
    assert [train_module._rank_slice(batch, r, 2) for r in range(2)] == [batch[:4], batch[4:]]
    odd = list(range(7))
    slices = [train_module._rank_slice(odd, r, 3) for r in range(3)]
    assert slices == [[0, 1, 2], [3, 4], [5, 6]]


def test_training_lowers_the_loss_changes_weights_and_logs_metrics(tmp_path: Path) -> None:
    items = tiny.make_items(48)
    model = tiny.tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        initial_loss = tiny.sft_step(model, tiny.collate(items))[0].item()
    cfg = fp32(max_steps=30, lr=1e-2, warmup_steps=2, log_every=5)
    _, result = run(cfg, tmp_path, items=items, model=model)

    assert result.steps == 30 and result.resumed_from_step == 0
    assert result.final_metrics["loss"] < 0.6 * initial_loss
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = result.final_metrics
    for name in ("loss", "lr", "grad_norm", "tokens_per_second", "pad_fraction", "epoch", "nll", "constant"):
        assert name in metrics, name
    assert metrics["nll"] == pytest.approx(metrics["loss"]) and metrics["constant"] == pytest.approx(1.0)
    assert 0 < metrics["pad_fraction"] < 0.5 and metrics["tokens_per_second"] > 0 and metrics["grad_norm"] > 0
    assert metrics["epoch"] == pytest.approx(30 * 8 / 48)  # 6 full batches per epoch, none dropped
    assert metrics["lr"] == pytest.approx(1e-2 * lr_factor(29, 2, 30))
    assert result.tokens_per_second > 0 and result.seconds > 0


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path, in_order: None) -> None:
    big, big_result = run(fp32(batch_size=8, grad_accum=1), tmp_path, name="big")
    acc, acc_result = run(fp32(batch_size=4, grad_accum=2), tmp_path, name="accumulated")
    assert_state_close(acc, big, atol=1e-5)
    # Adam (and clipping) are nearly blind to the gradient's scale: the norm also checks the 1/grad_accum.
    got, want = acc_result.final_metrics, big_result.final_metrics
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    untrained = tiny.tiny_model()
    assert not torch.allclose(untrained.lm_head.weight, big.lm_head.weight, atol=1e-4)


class Interrupt(RuntimeError):
    pass


def recording_step(calls: list[torch.Tensor], fail_at_call: int | None = None) -> Any:
    def step(model: Any, batch: dict[str, torch.Tensor]) -> Any:
        if fail_at_call is not None and len(calls) == fail_at_call:
            raise Interrupt(f"simulated crash at micro-batch {fail_at_call}")
        calls.append(batch["input_ids"].clone())
        return tiny.sft_step(model, batch)

    return step


def test_resume_after_a_crash_gives_bit_identical_weights(tmp_path: Path) -> None:
    # 20 items / batch 4 = 5 micro-batches per epoch with grad_accum 2: step 3 straddles epochs 0 and 1 and
    # the step-2 checkpoint sits mid-epoch, so the skip inside an epoch and the roll-over are both exercised.
    # Attention dropout makes the result depend on the restored RNG too.
    cfg = fp32(max_steps=6, batch_size=4, grad_accum=2, save_every=2, warmup_steps=2)
    items = tiny.make_items(20)
    clean_calls: list[torch.Tensor] = []
    clean, clean_result = run(cfg, tmp_path, items=items, model=tiny.tiny_model(dropout=0.1),
                              step_fn=recording_step(clean_calls), name="clean")

    calls: list[torch.Tensor] = []
    with pytest.raises(Interrupt):  # crash at the first micro-batch of step 4, after 3 steps
        run(cfg, tmp_path, items=items, model=tiny.tiny_model(dropout=0.1),
            step_fn=recording_step(calls, fail_at_call=3 * 2), name="crashed")
    ckpt_dir = tmp_path / "crashed" / "checkpoints"
    assert [p.name for p in ckpt_dir.iterdir()] == ["step-000002"]
    state = json.loads((ckpt_dir / "step-000002" / TRAINER_STATE).read_text())
    assert (state["step"], state["epoch"], state["micro_index_in_epoch"]) == (2, 0, 4)

    resumed_calls: list[torch.Tensor] = []
    other_init = tiny.tiny_model(seed=123, dropout=0.1)  # the checkpoint's weights must replace these
    resumed, result = run(cfg, tmp_path, items=items, model=other_init, step_fn=recording_step(resumed_calls),
                          name="crashed")
    assert result.resumed_from_step == 2 and result.steps == 6
    # Consumed micro-batches were skipped, not re-run, and the data stream continued where it stood.
    assert len(resumed_calls) == (6 - 2) * 2
    assert all(torch.equal(a, b) for a, b in zip(resumed_calls, clean_calls[4:], strict=True))
    for key, value in clean.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert result.final_metrics["loss"] == clean_result.final_metrics["loss"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-000004", "step-000006"][-KEEP_CHECKPOINTS:]
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "step-000006"

    # A finished run resumes to its end without training again, and gives back the final weights and metrics.
    again_calls: list[torch.Tensor] = []
    again, again_result = run(cfg, tmp_path, items=items, model=tiny.tiny_model(seed=7, dropout=0.1),
                              step_fn=recording_step(again_calls), name="crashed")
    assert again_calls == [] and again_result.resumed_from_step == 6 and again_result.steps == 6
    assert again_result.final_metrics == result.final_metrics
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in clean.state_dict().items())

    # A checkpoint of another data order is refused rather than silently continued.
    with pytest.raises(ValueError, match="seed"):
        run(fp32(**{**cfg.__dict__, "seed": 1}), tmp_path, items=items, name="crashed")


def test_tensorboard_gets_every_metric_and_the_schedule(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    cfg = fp32(max_steps=4, warmup_steps=2, report_to="tensorboard")
    run(cfg, tmp_path, log_dir=log_dir, name="tb run")
    events = list(log_dir.rglob("events.out.tfevents.*"))
    assert events
    scalars = EventAccumulator(str(log_dir / "tb_run")).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "pad_fraction", "epoch", "nll"} <= tags
    lrs = [(e.step, e.value) for e in scalars.Scalars("lr")]
    assert lrs == [(s, pytest.approx(cfg.lr * lr_factor(s - 1, 2, 4), rel=1e-6)) for s in range(1, 5)]


def test_bf16_autocasts_keeps_fp32_weights_and_state_resets_between_calls(tmp_path: Path) -> None:
    assert mixed_precision("fp32", torch.device("cpu")) == "no"
    assert mixed_precision("bf16", torch.device("cpu")) == "bf16"
    seen: list[torch.dtype | None] = []

    def step(model: Any, batch: dict[str, torch.Tensor]) -> Any:
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return tiny.sft_step(model, batch)

    model, result = run(fp32(max_steps=2, precision="bf16"), tmp_path, step_fn=step, name="bf16")
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert "_original_forward" not in model.__dict__  # accelerate's autocast forward was removed again
    assert torch.isfinite(torch.tensor(result.final_metrics["loss"]))
    seen.clear()
    run(fp32(max_steps=2), tmp_path, step_fn=step, name="fp32")  # a new precision in the same process
    assert seen == [None, None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU even on a GPU host (one GPU cannot hold two ranks)
    env.pop("ACCELERATE_USE_CPU", None)  # the worker must find the CPU-only multi-process case by itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(HERE / "ddp_worker.py"), "--out", str(out), "--steps", "3", "--batch-size", "4"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["world_size"] == 2

    # Same global batch of 8 in one process: same examples per step, so the same weights up to rounding.
    single, _ = run(TrainConfig(max_steps=3, batch_size=8, lr=3e-3, warmup_steps=1, precision="fp32",
                                save_every=2, log_every=1, report_to="none"), tmp_path, name="single")
    ddp_state = torch.load(out / "state_dict.pt")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=0, msg=key)
    assert not torch.allclose(ddp_state["lm_head.weight"], tiny.tiny_model().lm_head.weight, atol=1e-4)
    # Both ranks wrote their RNG state into the checkpoint; only one copy of everything else.
    final = out / "checkpoints" / "step-000003"
    rng_files = {p.name for p in final.glob("random_states_*.pkl")}
    assert rng_files == {"random_states_0.pkl", "random_states_1.pkl"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_precision_trains_in_bf16_and_resumes(tmp_path: Path) -> None:
    seen: list[tuple[str, torch.dtype | None]] = []

    def step(model: Any, batch: dict[str, torch.Tensor]) -> Any:
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        seen.append((batch["input_ids"].device.type, autocast))
        return tiny.sft_step(model, batch)

    cfg = fp32(max_steps=4, precision="auto", save_every=2)
    model, result = run(cfg, tmp_path, step_fn=step, name="cuda")
    assert set(seen) == {("cuda", torch.bfloat16)}
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.float32)}
    assert result.steps == 4 and result.final_metrics["loss"] == result.final_metrics["loss"]  # not NaN
    # A finished run resumes to its end on the GPU too, restoring weights on the device.
    again, again_result = run(cfg, tmp_path, name="cuda")
    assert again_result.resumed_from_step == 4
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())

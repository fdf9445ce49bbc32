"""The training loop: learning, gradient accumulation, schedule, exact resume, trackers, bf16, 2-process DDP.

Every run uses the tiny Llama, data and SFT-like step of ddp_worker.py (shared with the DDP worker process).
"""

from __future__ import annotations

import dataclasses
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

from selpo_core import checkpoints
from selpo_core import train as train_module
from selpo_core.batching import length_bucketed_batches
from selpo_core.config import TRAIN_FIELDS_NOT_IN_KEY, TrainConfig
from selpo_core.train import (
    TIMING_METRICS,
    TRAINER_STATE,
    latest_checkpoint,
    lr_factor,
    mixed_precision,
    planned_steps,
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
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-000004", "step-000006"]
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


def assert_same_weights(a: Any, b: Any) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


RESUME_CFG = dict(max_steps=6, batch_size=4, grad_accum=2, save_every=2, warmup_steps=2, log_every=4)


def crash_then_resume(tmp: Path, name: str, damage: Any, caplog: pytest.LogCaptureFixture,
                      init_seed: int = 5) -> tuple[Any, Any]:
    """Train to a crash at step 5 (checkpoints 2 and 4 on disk), `damage(checkpoint_dir)`, resume to the end
    from a model initialised with `init_seed` (a checkpoint's weights replace it)."""
    cfg, items = fp32(**RESUME_CFG), tiny.make_items(20)
    with pytest.raises(Interrupt):
        run(cfg, tmp, items=items, model=tiny.tiny_model(dropout=0.1), step_fn=recording_step([], 4 * 2),
            name=name)
    ckpt_dir = tmp / name / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-000002", "step-000004"]
    damage(ckpt_dir)
    caplog.clear()
    with caplog.at_level("WARNING", logger="selpo.train"):
        return run(cfg, tmp, items=items, model=tiny.tiny_model(seed=init_seed, dropout=0.1), name=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The run of RESUME_CFG without interruption; its result also carries `checkpoint_root`."""
    root = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")  # module scope: the autouse on_cpu fixture is not active yet
        model, result = run(fp32(**RESUME_CFG), root, items=tiny.make_items(20), model=tiny.tiny_model(dropout=0.1),
                            name="clean")
    result.checkpoint_root = root / "clean"
    return model, result


def truncate_weights(ckpt_dir: Path) -> None:
    weights = ckpt_dir / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # today's `SafetensorError: incomplete metadata`


def tamper_rng(ckpt_dir: Path) -> None:
    rng_file = ckpt_dir / "step-000004" / "random_states_0.pkl"
    states = torch.load(rng_file, weights_only=False)
    states["torch_manual_seed"] = torch.Generator().manual_seed(99).get_state()  # other dropout masks
    torch.save(states, rng_file)  # well-formed, so accelerate would load it without a word


def edit_trainer_state(ckpt_dir: Path) -> None:
    path = ckpt_dir / "step-000004" / TRAINER_STATE
    state = json.loads(path.read_text())
    state["micro_index_in_epoch"] += 1  # would silently skip a micro-batch
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage, problem", [(truncate_weights, "model.safetensors of 100 bytes"),
                                              (tamper_rng, "random_states_0.pkl whose content changed"),
                                              (edit_trainer_state, "edited trainer_state.json")])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_and_ends_identical(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, uninterrupted: tuple[Any, Any], damage: Any,
        problem: str) -> None:
    clean, clean_result = uninterrupted
    resumed, result = crash_then_resume(tmp_path, "damaged", damage, caplog)
    damaged = tmp_path / "damaged" / "checkpoints" / "step-000004"
    warnings = [r.getMessage() for r in caplog.records if r.name == "selpo.train" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and problem in warnings[0], warnings
    assert result.resumed_from_step == 2 and result.steps == 6
    assert_same_weights(resumed, clean)
    # Every metric of the last window (averages over steps 5-6) is as in one run; only the speed differs.
    timing = set(TIMING_METRICS)
    assert {k: v for k, v in result.final_metrics.items() if k not in timing} == \
        {k: v for k, v in clean_result.final_metrics.items() if k not in timing}
    assert result.total_tokens == clean_result.total_tokens > 0
    assert sorted(p.name for p in damaged.parent.iterdir()) == ["step-000004", "step-000006"]
    assert checkpoints.checkpoint_problem(damaged) is None  # re-saved intact


def test_every_checkpoint_damaged_starts_over_without_crashing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, uninterrupted: tuple[Any, Any]) -> None:
    def damage_both(ckpt_dir: Path) -> None:
        truncate_weights(ckpt_dir)
        (ckpt_dir / "step-000002" / "optimizer.bin").unlink()

    resumed, result = crash_then_resume(tmp_path, "all damaged", damage_both, caplog, init_seed=0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "selpo.train" and r.levelname == "WARNING"]
    assert len(warnings) == 3 and "step-000002 lacks optimizer.bin" in warnings[1]
    assert "no intact checkpoint left" in warnings[2] and "starts from step 0" in warnings[2]
    assert result.resumed_from_step == 0
    assert_same_weights(resumed, uninterrupted[0])


def test_metrics_window_cut_by_a_resume_equals_one_run(tmp_path: Path, uninterrupted: tuple[Any, Any]) -> None:
    # log_every=4, crash in step 4, resume from step 2: the window of steps 1-4 is cut in half by the crash.
    cfg, items = fp32(**RESUME_CFG), tiny.make_items(20)
    with pytest.raises(Interrupt):
        run(cfg, tmp_path, items=items, model=tiny.tiny_model(dropout=0.1), step_fn=recording_step([], 3 * 2),
            name="cut")
    _, result = run(cfg, tmp_path, items=items, model=tiny.tiny_model(dropout=0.1), name="cut")
    assert result.resumed_from_step == 2

    def logged_at_step_4(root: Path) -> dict[str, float]:
        state = json.loads((root / "checkpoints" / "step-000004" / TRAINER_STATE).read_text())
        return {k: v for k, v in state["metrics"].items() if k not in TIMING_METRICS}

    clean_dir = uninterrupted[1].checkpoint_root
    assert logged_at_step_4(tmp_path / "cut") == logged_at_step_4(clean_dir)
    assert set(logged_at_step_4(clean_dir)) >= {"loss", "grad_norm", "pad_fraction", "nll", "lr", "epoch"}
    assert result.total_tokens == uninterrupted[1].total_tokens


def test_load_failure_names_the_checkpoint(tmp_path: Path) -> None:
    cfg = fp32(max_steps=2, save_every=1)
    run(cfg, tmp_path, name="unloadable")
    ckpt = tmp_path / "unloadable" / "checkpoints" / "step-000002"
    (ckpt / "model.safetensors").write_bytes(b"not safetensors")  # and checksums that vouch for it
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    state["files"]["model.safetensors"] = {"bytes": 15, "sha256": checkpoints._sha256(ckpt / "model.safetensors")}
    state["checksum"] = checkpoints._state_checksum(state)
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    with pytest.raises(RuntimeError, match=f"could not load checkpoint {ckpt}"):
        run(cfg, tmp_path, name="unloadable")


def test_epochs_set_the_steps_from_the_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = tiny.make_items(40)  # 5 micro-batches of 8 per epoch
    assert planned_steps(fp32(max_steps=7), 5) == 7  # epochs 0: max_steps, unchanged
    assert planned_steps(fp32(epochs=2), 5) == 10 and planned_steps(fp32(epochs=2, grad_accum=2), 5) == 5
    assert planned_steps(fp32(epochs=0.1), 30) == 3  # not 4: 0.1 * 30 = 3.0000000000000004
    assert planned_steps(fp32(epochs=0.01), 30) == 1
    with caplog.at_level("INFO", logger="selpo.train"):
        _, result = run(fp32(max_steps=3, epochs=2, warmup_steps=0), tmp_path, items=items, name="epochs")
    assert result.steps == 10  # max_steps=3 is ignored
    assert "epochs: 10 optimizer steps (2 epochs; 40 items, 5 micro-batches of 8 per epoch" in caplog.text
    assert result.final_metrics["epoch"] == pytest.approx(2.0)
    assert result.final_metrics["lr"] == pytest.approx(3e-3 * lr_factor(9, 0, 10))  # schedule over 10 steps
    _, more = run(fp32(max_steps=3, epochs=2, warmup_steps=0), tmp_path, items=tiny.make_items(80), name="x2")
    assert more.steps == 20


FIELD_VARIANTS = {"save_every": (0, 1), "keep_checkpoints": (2, 1), "log_every": (1, 3),
                  "report_to": ("none", "tensorboard")}


def test_the_fields_out_of_the_key_are_exactly_those_tested_below() -> None:
    assert set(TRAIN_FIELDS_NOT_IN_KEY) == set(FIELD_VARIANTS)
    assert set(TRAIN_FIELDS_NOT_IN_KEY) <= {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("field", sorted(FIELD_VARIANTS))
def test_a_field_out_of_the_key_does_not_change_the_weights(tmp_path: Path, field: str) -> None:
    # Dropout, grad accumulation and several epochs: RNG use and the data stream would show any difference.
    base = dict(max_steps=7, batch_size=4, grad_accum=2, warmup_steps=2, save_every=0, log_every=1)
    models = []
    for value in FIELD_VARIANTS[field]:
        cfg = fp32(**{**base, field: value})
        model, _ = run(cfg, tmp_path, items=tiny.make_items(20), model=tiny.tiny_model(dropout=0.1),
                       name=f"{field}={value}", log_dir=tmp_path / f"tb-{value}")
        models.append(model)
    assert_same_weights(*models)
    assert not torch.equal(models[0].lm_head.weight, tiny.tiny_model().lm_head.weight)


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

    # Damage the last checkpoint and run again: both ranks fall back to step 2 (the main process decides) and
    # finish with the same weights as the uninterrupted 2-process run.
    (final / "random_states_1.pkl").write_bytes(b"tampered")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"checkpoint {final} has random_states_1.pkl of 8 bytes" in proc.stderr
    assert "resuming from" in proc.stderr and "step-000002" in proc.stderr
    resumed_state = torch.load(out / "state_dict.pt")
    for key, value in ddp_state.items():
        assert torch.equal(resumed_state[key], value), key


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


@pytest.mark.slow
def test_two_processes_training_into_one_checkpoint_dir_with_the_same_pid_both_succeed(tmp_path: Path) -> None:
    """Two runs of the same training share a checkpoint dir and a pid (two containers): both finish, with the
    weights of a single run, and leave only intact checkpoints (the old `.step-000001.tmp` was shared)."""
    import time

    ckpt_dir, go = tmp_path / "checkpoints", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    procs, outs = [], []
    for i in range(2):
        out = tmp_path / f"run{i}"
        out.mkdir()
        outs.append(out)
        # The pid both claim is this test's: alive, so neither mistakes the other's temp dir for a dead one's.
        cmd = [sys.executable, str(HERE / "ddp_worker.py"), "--out", str(out), "--checkpoints", str(ckpt_dir),
               "--steps", "6", "--batch-size", "8", "--save-every", "1", "--pid", str(os.getpid()),
               "--ready", str(out / "ready"), "--go", str(go)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + 120
    while not all((out / "ready").exists() for out in outs) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]

    single, _ = run(TrainConfig(max_steps=6, batch_size=8, lr=3e-3, warmup_steps=1, precision="fp32",
                                save_every=0, log_every=1, report_to="none"), tmp_path, name="single")
    for out in outs:
        state = torch.load(out / "state_dict.pt")
        assert all(torch.equal(state[k], v) for k, v in single.state_dict().items())
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-000005", "step-000006"]
    assert all(checkpoints.checkpoint_problem(p) is None for p in ckpt_dir.iterdir())

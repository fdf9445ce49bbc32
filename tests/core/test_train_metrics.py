"""Throughput metrics of the training loop: real tokens, tokens/s, model FLOP/s and MFU, in every log sink."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from selpo_core import hardware
from selpo_core import train as train_module
from selpo_core.config import TrainConfig

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("selpo_test_ddp_worker_metrics", HERE / "ddp_worker.py")
assert _spec is not None and _spec.loader is not None
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


def train_once(tmp_path: Path, **changes: Any) -> tuple[Any, list[list[int]], Any]:
    items = tiny.make_items(16, min_len=5, max_len=14)  # uneven lengths: the batches hold padding
    cfg = TrainConfig(**{"max_steps": 2, "batch_size": 8, "precision": "fp32", "save_every": 0, "log_every": 2,
                         "report_to": "none", "lr": 1e-3, **changes})
    model = tiny.tiny_model()
    result = train_module.train(model, tiny.sft_step, items, tiny.collate, tiny.lengths(items), cfg,
                                tmp_path / "ckpt", log_dir=tmp_path / "logs", desc="metrics",
                                frozen_forward_params=1000)
    return result, items, model


def test_tokens_count_exactly_the_non_pad_tokens(tmp_path: Path) -> None:
    result, items, model = train_once(tmp_path)  # 2 steps x 8 = one epoch: every item once
    metrics = result.final_metrics
    real = sum(len(item) for item in items)
    slots = sum(8 * max(len(items[i]) for i in batch) for batch in train_module._epoch_plan(
        tiny.lengths(items), 8, 1, TrainConfig().seed, 0))
    assert metrics["tokens"] == real and result.total_tokens == real
    assert real < slots and metrics["pad_fraction"] == pytest.approx(1 - real / slots)
    assert metrics["tokens_per_second"] > 0
    assert metrics["tokens_per_second_per_device"] == metrics["tokens_per_second"]  # one process
    per_token = 6.0 * sum(p.numel() for p in model.parameters()) + 2.0 * 1000  # + the frozen forward
    assert metrics["flops_per_second"] == pytest.approx(metrics["tokens_per_second"] * per_token)
    peak = hardware.peak_flops(torch.float32, "cpu")
    assert peak is not None and metrics["mfu"] == pytest.approx(metrics["flops_per_second"] / peak)
    assert 0 < metrics["mfu"] < 1


def test_metrics_jsonl_has_every_logged_window(tmp_path: Path) -> None:
    result, _, _ = train_once(tmp_path, max_steps=4, log_every=2)
    lines = [json.loads(line) for line in (tmp_path / "logs" / train_module.METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert lines[-1] == {"step": 4, **result.final_metrics}
    for line in lines:
        assert line["tokens"] > 0 and line["tokens_per_second"] > 0 and line["flops_per_second"] > 0
        assert line["mfu"] > 0


def test_tensorboard_gets_the_throughput_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_once(tmp_path, report_to="tensorboard")
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for event in events:
        accumulator = EventAccumulator(str(event.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"tokens", "tokens_per_second", "tokens_per_second_per_device", "flops_per_second", "mfu"} <= tags


def test_no_mfu_where_the_peak_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "peak_flops", lambda dtype, device: None)
    result, _, _ = train_once(tmp_path)
    assert "mfu" not in result.final_metrics and result.final_metrics["flops_per_second"] > 0


def test_pad_fraction_of_packed_rows_counts_the_packed_slots() -> None:
    from selpo_core.batching import pack_rows

    input_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [5, 0, 0, 0], [5, 6, 7, 0]])
    attention_mask = (input_ids != 0).long()
    packed = pack_rows(input_ids, attention_mask, 0)
    window = train_module._Window(torch.device("cpu"), flops=None)  # type: ignore[arg-type]
    window.add_micro(torch.tensor(0.0), {}, {"input_ids": input_ids, "attention_mask": attention_mask})
    assert (window.tokens.item(), window.slots) == (10, 16)
    window.reset()
    window.add_micro(torch.tensor(0.0), {}, {"input_ids": input_ids, "attention_mask": attention_mask,
                                             "packed": packed})
    assert window.tokens.item() == 10 and window.slots == packed.input_ids.numel() < 16

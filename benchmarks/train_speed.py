"""Training-step speed and memory: selpo's `sepo` and `dpo` steps vs TRL's DPOTrainer, same model, data, batch.

Model: the 8M Llama of benchmarks/perf_common.py (vocab 32000, random init, fp32 weights, precision auto in every
trainer, AdamW, grad-norm clipping 1.0, no gradient checkpointing). Data: the same random-token pairs on the
realistic length distribution (prompt+response <= 256), batch 8 pairs (16 rows).

Contenders, each in its own fresh process (so peak memory is its own):
- selpo sepo: `selpo_core.train.train` + `make_preference_step("sepo")`, selected masks from selpo's own scoring and
  selection (reference-free: one forward per step);
- selpo dpo: the same loop with method "dpo", reference per-token log-probs read from the scoring Parquet (as
  `train_policy` does with `ref_logps_from_scores`): no reference forward;
- TRL ref each step: `trl.DPOTrainer` with a frozen reference model (one policy and one reference forward per step);
- TRL precompute: `DPOTrainer(precompute_ref_log_probs=True)`: a reference pass over the data before training.
The offline work each needs before its first step (selpo: scoring + selection; TRL precompute: its reference pass)
is reported as setup seconds, not in the step rate.

Step time = wall time from one step's batch collation to the next (collate, forward, backward, clipping, optimizer),
the first `--warmup` steps dropped. Real tokens = attention-mask ones (prompt + response of both rows of each pair).
Peak memory: the process's peak RSS (ru_maxrss) and the peak RSS during the timed steps (VmHWM after a reset via
/proc/self/clear_refs), in MiB.

TRL runs from `.venv-bench` (created by `make bench-env`: torch 2.13.0 CPU, trl 1.16.0, transformers 5.20.2, selpo
with --no-deps), so the project's venv never depends on trl; without it the TRL rows are skipped, saying so.

    python -m benchmarks.train_speed            # 64 pairs, 2 warm-up + 10 timed steps per contender
    python -m benchmarks.train_speed --quick    # 1 warm-up + 4 timed steps
    python -m benchmarks.train_speed --compare --contenders selpo-sepo,selpo-dpo   # selpo's paths side by side

`--compare` adds, each in its own process like the others: sepo with log-probs at every response token (the
library without its selected-token fast path: `objectives.READS_SELECTED_ONLY` emptied in that process), sepo
and dpo on packed rows (`collate_pairs(packed=True)`), and tdpo2 against dpo both with the reference model each
step and `precision: auto` (TDPO's full-vocabulary KL is the difference; the vocabulary is 32000).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import perf_common as pc

BENCH_VENV_PYTHON = pc.REPO_ROOT / ".venv-bench" / "bin" / "python"
CONTENDERS = ("selpo-sepo", "selpo-dpo", "trl-ref", "trl-precompute")
# Side-by-side comparisons of selpo's own paths (--compare): the selected-token fast path against log-probs at
# every response token; packed rows against padded ones; TDPO's full-vocabulary KL against DPO, both with the
# reference model each step and precision auto.
COMPARISONS = ("selpo-sepo-allrows", "selpo-sepo-packed", "selpo-dpo-packed", "selpo-dpo-ref", "selpo-tdpo2-ref")
LABELS = {
    "selpo-sepo": "selpo sepo (selected tokens, no reference)",
    "selpo-dpo": "selpo dpo (ref log-probs from Parquet)",
    "trl-ref": "TRL DPOTrainer (reference each step)",
    "trl-precompute": "TRL DPOTrainer (precompute_ref_log_probs)",
    "selpo-sepo-allrows": "selpo sepo, log-probs at every response token",
    "selpo-sepo-packed": "selpo sepo, packed rows",
    "selpo-dpo-packed": "selpo dpo (Parquet ref), packed rows",
    "selpo-dpo-ref": "selpo dpo, reference each step, precision auto",
    "selpo-tdpo2-ref": "selpo tdpo2 (full-vocab KL), reference each step, precision auto",
}
RESULT_PREFIX = "RESULT_JSON "


# ------------------------------------------------------------------------------------------------- memory


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next reading is the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------- workers


class _Recorder:
    """Time stamps at each batch collation and the batch's real / padded token counts."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.slots: list[int] = []

    def record(self, batch: dict[str, Any]) -> dict[str, Any]:
        mask = batch["attention_mask"]
        self.tokens.append(int(mask.sum()))
        # What the model computes on: the packed rows where the batch has them.
        self.slots.append(int(batch["packed"].input_ids.numel() if "packed" in batch else mask.numel()))
        return batch

    def stamp(self) -> None:
        pc.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def summary(self, warmup: int, pairs_per_step: int) -> dict[str, Any]:
        """Rates as the median over the timed steps (robust to a one-off slow step: a first allocation, a GPU
        clock ramp, a checkpoint); `*_all_steps` divide the totals instead."""
        durations = [b - a for a, b in zip(self.stamps, self.stamps[1:])][warmup:]
        tokens = self.tokens[warmup:warmup + len(durations)]
        slots = self.slots[warmup:warmup + len(durations)]
        seconds = sum(durations)
        return {"timed_steps": len(durations), "seconds": seconds, "step_seconds": durations,
                "step_tokens": tokens, "median_step_seconds": statistics.median(durations),
                "real_tokens": sum(tokens),
                "real_tokens_per_second": statistics.median(t / d for t, d in zip(tokens, durations)),
                "samples_per_second": statistics.median(pairs_per_step / d for d in durations),
                "real_tokens_per_second_all_steps": sum(tokens) / seconds,
                "pad_fraction": 1 - sum(tokens) / sum(slots)}


def _selpo_variant(kind: str) -> tuple[str, str]:
    """selpo-<method>[-<variant>] -> (method, variant)."""
    _, method, *rest = kind.split("-", 2)
    return method, rest[0] if rest else ""


def _selpo_worker(kind: str, settings: dict[str, Any], tmp: Path) -> dict[str, Any]:

    import torch

    from selpo_core import data, objectives
    from selpo_core.config import PolicyConfig, TrainConfig
    from selpo_core.models import frozen_copy, resolve_dtype
    from selpo_core.objectives import make_preference_step
    from selpo_core.stages.training import PerToken, _pair_extras
    from selpo_core.train import train

    size = pc.MODEL_SIZES[settings["size"]]
    pairs = pc.make_pairs(settings["pairs"], seed=settings["seed"], vocab=settings["vocab"])
    model = pc.build_llama(size, vocab=settings["vocab"], seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    method, variant = _selpo_variant(kind)
    started = time.perf_counter()
    extras: dict[str, Any] = {}
    ref_model = frozen_copy(model) if variant == "ref" else None
    if ref_model is None:
        extras = {prefix: PerToken(lookup, column) for prefix, (lookup, column) in
                  _offline_inputs(method, model, pairs, tmp).items()}
    setup_seconds = time.perf_counter() - started
    recorder = _Recorder(device)
    packed = variant == "packed"

    def collate(batch: list[Any]) -> dict[str, Any]:
        recorder.stamp()
        return recorder.record(data.collate_pairs(batch, 0, packed=packed, **_pair_extras(batch, extras)))

    steps = settings["warmup"] + settings["steps"] + 1  # the last step has no next collation to end its timing
    cfg = TrainConfig(max_steps=steps, batch_size=settings["batch_pairs"], lr=5e-4, warmup_steps=0,
                      precision="auto", save_every=0, log_every=steps, report_to="none", seed=0)
    if variant == "allrows":  # this process only: the library without its selected-token fast path
        objectives.READS_SELECTED_ONLY = ()
    step_fn = make_preference_step(method, PolicyConfig(), ref_model)
    rss_before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    _reset_gpu_peak()
    train(model, step_fn, pairs, collate, [pair.length for pair in pairs], cfg, tmp / "checkpoints", log_dir=None,
          desc=f"bench {kind}")
    return {**recorder.summary(settings["warmup"], settings["batch_pairs"]), "setup_seconds": setup_seconds,
            "rss_before_training_mib": rss_before, "peak_rss_training_mib": _status_mib("VmHWM") if reset else None,
            "peak_gpu_mib": _gpu_peak_mib(), "precision": cfg.precision,
            "autocast_dtype": str(resolve_dtype(cfg.precision, device))}


def _offline_inputs(method: str, model: Any, pairs: list[Any], tmp: Path) -> dict[str, tuple[dict, str]]:
    """What the score and select stages would have written before training (setup, not step time): collate_pairs'
    keyword prefix -> ((example_id, side) -> row, the row's column), as the policy stage reads them."""
    from selpo_core import scoring
    from selpo_core.config import ScoreConfig, SelectConfig
    from selpo_core.selection_stage import select_rows

    model.save_pretrained(tmp / "reference")
    pc.perturbed_copy(model, seed=1).save_pretrained(tmp / "oracle")
    scoring.score_pairs(pairs, tmp / "oracle", tmp / "reference", ScoreConfig(precision="auto"), tmp / "scores")
    table = scoring.read_scores(tmp / "scores")
    if method == "sepo":
        rows = list(scoring.iter_rows(table))
        select_rows(SelectConfig(), rows, special_token_ids=())
        return {"selected": ({(row["example_id"], row["side"]): row for row in rows}, "selected")}
    return {"ref_logps": (scoring.scores_to_pair_lookup(table), "ref_logps")}


SPECIAL = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 (2 = EOS, as in make_pairs)


def _word(i: int) -> str:
    return SPECIAL[i] if i < len(SPECIAL) else f"t{i}"


def _word_tokenizer(vocab: int) -> Any:
    """A fast tokenizer whose text "t5 t17 </s>" is exactly the ids [5, 17, 2]: TRL sees selpo's token ids.
    (Special tokens are matched inside words, so none may be a prefix of a word: hence "<pad>", not "t0".)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({_word(i): i for i in range(vocab)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


def _trl_worker(kind: str, settings: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import copy

    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    size = pc.MODEL_SIZES[settings["size"]]
    pairs = pc.make_pairs(settings["pairs"], seed=settings["seed"], vocab=settings["vocab"])

    def text(ids: list[int]) -> str:
        return " ".join(_word(i) for i in ids)

    # The responses end with EOS (</s>), so TRL adds none; the leading space keeps prompt+response word-aligned.
    dataset = Dataset.from_list([{"prompt": text(p.prompt_ids), "chosen": " " + text(p.chosen_ids),
                                  "rejected": " " + text(p.rejected_ids)} for p in pairs])
    dataset.save_to_disk(str(tmp / "dataset"))  # a dataset with cache files, as one read from disk or the hub
    dataset = Dataset.load_from_disk(str(tmp / "dataset"))
    tokenizer = _word_tokenizer(settings["vocab"])
    for pair in pairs[:4]:  # TRL must see exactly selpo's ids
        row = text(pair.prompt_ids) + " " + text(pair.chosen_ids)
        if tokenizer(row)["input_ids"] != [*pair.prompt_ids, *pair.chosen_ids]:
            raise RuntimeError("the benchmark tokenizer does not reproduce the pairs' token ids")
    model = pc.build_llama(size, vocab=settings["vocab"], seed=0)
    precompute = kind == "trl-precompute"
    ref_model = None if precompute else copy.deepcopy(model).eval().requires_grad_(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recorder = _Recorder(device)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=pc.MAX_LENGTH)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            recorder.stamp()

    steps = settings["warmup"] + settings["steps"] + 1
    args = DPOConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=settings["batch_pairs"], max_steps=steps,
        learning_rate=5e-4, lr_scheduler_type="linear", warmup_steps=0, bf16=pc.auto_dtype(device)[1] == "bf16",
        max_length=pc.MAX_LENGTH,
        precompute_ref_log_probs=precompute, gradient_checkpointing=False, logging_steps=steps, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, beta=0.1, max_grad_norm=1.0,
        use_cpu=device.type == "cpu",
    )
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, data_collator=lambda rows: recorder.record(collator(rows)),
                         callbacks=[StepTimer()])
    setup_seconds = time.perf_counter() - started
    recorder.tokens.clear()  # the precompute pass went through the collator too
    recorder.slots.clear()
    rss_before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    _reset_gpu_peak()
    trainer.train()
    return {**recorder.summary(settings["warmup"], settings["batch_pairs"]), "setup_seconds": setup_seconds,
            "rss_before_training_mib": rss_before, "peak_rss_training_mib": _status_mib("VmHWM") if reset else None,
            "peak_gpu_mib": _gpu_peak_mib(), "trl": trl.__version__, "optimizer": str(args.optim)}


def run_worker(kind: str, settings: dict[str, Any]) -> None:
    pc.quiet()
    import torch
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        worker = _selpo_worker if kind.startswith("selpo") else _trl_worker
        result = worker(kind, settings, Path(tmp))
    result.update(peak_rss_mib=_max_rss_mib(), torch=torch.__version__, transformers=transformers.__version__,
                  python=sys.executable)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- orchestrator


def _launch(kind: str, settings: dict[str, Any], timeout: float, trl_python: str) -> dict[str, Any]:
    python = sys.executable if kind.startswith("selpo") else trl_python
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pc.REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    # perf_common's TQDM_DISABLE, inherited, makes tqdm bars without `.desc`, which scoring's progress report
    # reads (AttributeError); the worker's output is captured anyway.
    env.pop("TQDM_DISABLE", None)
    command = [python, "-m", "benchmarks.train_speed", "--worker", kind, "--settings", json.dumps(settings)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=pc.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_seconds"] = time.perf_counter() - started
    return result


def _ratio(results: dict[str, dict[str, Any]], a: str, b: str, key: str = "real_tokens_per_second") -> float | None:
    if "error" in results.get(a, {"error": 1}) or "error" in results.get(b, {"error": 1}):
        return None
    return results[a][key] / results[b][key]


def _comparison_parts(results: dict[str, dict[str, Any]], verdicts: list[str]) -> list[str]:
    """Median step-time ratios of selpo's paths run side by side (slower / faster reads as the cost)."""
    parts = []
    for label, slow, fast in (("sepo every-token / selected-token step", "selpo-sepo-allrows", "selpo-sepo"),
                              ("sepo packed / padded step", "selpo-sepo-packed", "selpo-sepo"),
                              ("dpo packed / padded step", "selpo-dpo-packed", "selpo-dpo"),
                              ("tdpo2 / dpo step (reference each step)", "selpo-tdpo2-ref", "selpo-dpo-ref")):
        if (ratio := _ratio(results, slow, fast, key="median_step_seconds")) is not None:
            parts.append(f"{label} {ratio:.2f}x")
            if slow == "selpo-tdpo2-ref":
                verdicts.append("tdpo2 <= 1.5x dpo: " + ("met" if ratio <= 1.5 else "NOT met"))
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 pairs, 1 warm-up + 4 timed steps")
    parser.add_argument("--pairs", type=int, default=None, help="pairs in the training set (default 64; quick 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 10; quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; quick 1)")
    parser.add_argument("--rounds", type=int, default=1, help="run every contender this many times (median)")
    parser.add_argument("--size", default="8M", choices=sorted(pc.MODEL_SIZES))
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--compare", action="store_true",
                        help=f"also run {', '.join(COMPARISONS)}: selpo's paths side by side")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per contender process")
    parser.add_argument("--trl-python", default=str(BENCH_VENV_PYTHON),
                        help="interpreter that has trl (default .venv-bench/bin/python)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, json.loads(args.settings))
        return 0

    settings = {"size": args.size, "vocab": pc.VOCAB_SIZE, "seed": 0, "batch_pairs": 8,
                "pairs": args.pairs or (32 if args.quick else 64), "steps": args.steps or (4 if args.quick else 10),
                "warmup": args.warmup if args.warmup is not None else (1 if args.quick else 2)}
    kinds = [k.strip() for k in args.contenders.split(",") if k.strip()]
    kinds += [k for k in COMPARISONS if args.compare and k not in kinds]
    have_trl = shutil.which(args.trl_python) is not None
    if not have_trl:
        skipped = [k for k in kinds if k.startswith("trl")]
        kinds = [k for k in kinds if not k.startswith("trl")]
        if skipped:
            print(f"NOTE {args.trl_python} not found: skipping TRL ({', '.join(skipped)}); create .venv-bench with "
                  "`make bench-env`", flush=True)
    note = pc.busy_machine_note()
    print(f"train_speed: {settings['size']} Llama, {settings['pairs']} pairs, batch {settings['batch_pairs']} pairs, "
          f"{settings['warmup']} warm-up + {settings['steps']} timed steps, {args.rounds} round(s)"
          + (f"\n  NOTE {note}" if note else ""), flush=True)

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            result = _launch(kind, settings, args.timeout, args.trl_python)
            runs[kind].append(result)
            status = result.get("error") or f"{result['real_tokens_per_second']:.0f} tok/s"
            print(f"  {kind}: {status}", flush=True)
    results = {}
    for kind, attempts in runs.items():
        good = [r for r in attempts if "error" not in r]
        if not good:
            results[kind] = attempts[-1]
            continue
        best = sorted(good, key=lambda r: r["real_tokens_per_second"])[len(good) // 2]  # the median round
        results[kind] = {**best, "rounds_tokens_per_second": [r["real_tokens_per_second"] for r in good]}

    def ok(kind: str) -> bool:
        return kind in results and "error" not in results[kind]

    gpu = any(ok(k) and results[k].get("peak_gpu_mib") for k in kinds)
    rows = []
    for kind in kinds:
        r = results[kind]
        if "error" in r:
            rows.append([LABELS[kind], "error: " + r["error"][:80]] + ["-"] * (8 + gpu))
            continue
        vs_ref, vs_pre = _ratio(results, kind, "trl-ref"), _ratio(results, kind, "trl-precompute")
        rows.append([LABELS[kind], f"{r['samples_per_second']:.2f}", pc.fmt(r["real_tokens_per_second"]),
                     pc.fmt(r["real_tokens_per_second_all_steps"]), "-" if vs_ref is None else f"{vs_ref:.2f}",
                     "-" if vs_pre is None else f"{vs_pre:.2f}", f"{1000 * r['median_step_seconds']:.0f}",
                     f"{100 * r['pad_fraction']:.0f}%", pc.fmt(r["peak_rss_mib"])]
                    + ([pc.fmt(r.get("peak_gpu_mib") or float("nan"))] if gpu else []) + [f"{r['setup_seconds']:.1f}"])
    print()
    print(pc.table(["trainer", "samples/s", "real tok/s", "tok/s all steps", "x TRL ref", "x TRL precompute",
                    "median step ms", "pad", "peak RSS MiB"] + (["peak GPU MiB"] if gpu else []) + ["setup s"], rows))

    sepo_vs = _ratio(results, "selpo-sepo", "trl-ref")
    dpo_vs = _ratio(results, "selpo-dpo", "trl-precompute")
    parts, verdicts = [], []
    if sepo_vs is not None:
        parts.append(f"sepo {sepo_vs:.2f}x TRL (ref each step)")
        verdicts.append("sepo >=1.4x: " + ("met" if sepo_vs >= 1.4 else "NOT met"))
    if dpo_vs is not None:
        parts.append(f"dpo (Parquet ref) {dpo_vs:.2f}x TRL precompute")
        verdicts.append("dpo >=1.15x: " + ("met" if dpo_vs >= 1.15 else "NOT met"))
    parts += _comparison_parts(results, verdicts)
    memory = "peak_gpu_mib" if gpu else "peak_rss_mib"
    unit = "GPU" if gpu else "RSS"
    selpo_peak = [results[k][memory] for k in ("selpo-sepo", "selpo-dpo") if ok(k)]
    trl_peak = [results[k][memory] for k in ("trl-ref", "trl-precompute") if ok(k)]
    if selpo_peak and trl_peak:
        parts.append(f"peak {unit} selpo {min(selpo_peak):.0f}-{max(selpo_peak):.0f} MiB vs TRL "
                     f"{min(trl_peak):.0f}-{max(trl_peak):.0f} MiB")
        verdicts.append("memory <= TRL: " + ("met" if max(selpo_peak) <= min(trl_peak) else "NOT met"))
    if sepo_vs is None and dpo_vs is None:
        parts += [f"{k} {results[k]['real_tokens_per_second']:.0f} tok/s" for k in kinds if ok(k)]
        tried = any(k.startswith("trl") for k in kinds)
        verdicts.append("TRL failed: no ratios" if tried else "TRL not run: no ratios")
    summary = "SUMMARY train_speed: " + "; ".join(parts) + "; " + ", ".join(verdicts)
    recorded = {**settings, "rounds": args.rounds, "trl_python": args.trl_python if have_trl else None,
                "busy_note": note}
    path = pc.write_results("train_speed", {"settings": recorded, "results": results, "summary": summary},
                            Path(args.out) if args.out else None)
    print(f"\nwrote {path}")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

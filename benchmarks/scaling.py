"""Is selpo's cost linear in tokens? Scoring and training time as the data grows and as the model grows.

    python -m benchmarks.scaling            # pairs 16/64/256 on 8M; models 8M, 42M, 160M on 64 pairs
    python -m benchmarks.scaling --quick    # pairs 4/16/64 on 8M; models 8M, 42M on 16 pairs

Two sweeps, each point timed `--repeats` times (median), in the dtype `precision: auto` picks here:
- data: 1x, 4x, 16x pairs on one model size;
- model: the sizes of benchmarks/perf_common.py (8M, 42M, and 160M = hidden 1024 x 10 layers) on one pair count.
Scoring is selpo's scorer with the models in memory (`scoring_speed.selpo_inner`: the length-sorted token-budget
batches, the LM head at response rows, the Parquet table and the selection: the part of the score + select stages
that grows with the data), both models. Training is `selpo_core.train.train` with DPO and its frozen reference run
every step (batch 4 pairs, one untimed warm-up step per model first), seconds from the loop's own clock.
Data are perf_common's random-token pairs on the realistic length distribution (prompt + response <= 256).

Reported per point: seconds, real tokens (prompt + response, non-pad), microseconds per real token, model GFLOP/s
(scoring: perf_common.forward_flops of both models; training: selpo_core.hardware.training_flops_per_token with the
reference's forward) and its fraction of the measured matmul peak of the dtype run. Linear cost shows as constant
us/token along the data sweep (ratio to the 1x point, `per_token_vs_first`) and as constant GFLOP/s along the
model sweep (us/token then grows with the parameters, `per_token_per_param_vs_first` stays ~1; small models are
overhead-bound, so it falls as the model grows).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import perf_common as pc
from benchmarks.scoring_speed import selpo_inner

SIZES = {**pc.MODEL_SIZES, "160M": pc.LlamaSize("160M", hidden=1024, layers=10, intermediate=2816, heads=16)}
BATCH_PAIRS = 4


def real_tokens(pairs: list[Any]) -> int:
    return sum(len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids))


def response_tokens(pairs: list[Any]) -> int:
    return sum(len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids))


def time_scoring(size: pc.LlamaSize, pairs: list[Any], repeats: int, device: Any, dtype: Any) -> dict[str, Any]:
    reference = pc.build_llama(size, seed=0)
    params = pc.parameter_counts(reference)
    oracle = pc.perturbed_copy(reference, seed=1).to(device, dtype)
    reference = reference.to(device, dtype)
    selpo_inner(oracle, reference, pairs[:2], device, dtype)  # first-call costs (oneDNN kernels, allocator)
    times = pc.interleaved({"score": lambda: selpo_inner(oracle, reference, pairs, device, dtype)}, repeats,
                           warmup=False, device=device)["score"]
    flops = 2 * pc.forward_flops(params, size.hidden, pc.VOCAB_SIZE, tokens=real_tokens(pairs),
                                 head_rows=response_tokens(pairs))
    return {"seconds": times, "flops": flops, "parameters": params["total"]}


def time_training(size: pc.LlamaSize, pairs: list[Any], repeats: int, tmp: Path) -> dict[str, Any]:
    from selpo_core.batching import collate_pairs
    from selpo_core.config import PolicyConfig, TrainConfig
    from selpo_core.hardware import flop_parameters, training_flops_per_token
    from selpo_core.models import frozen_copy
    from selpo_core.objectives import make_preference_step
    from selpo_core.train import train

    def collate(batch: list[Any]) -> dict[str, Any]:
        return collate_pairs(batch, 0)

    seconds, tokens, flops = [], 0.0, 0.0
    for repeat in range(-1, repeats):  # repeat -1: the untimed warm-up step
        model = pc.build_llama(size, seed=0).train()
        reference = frozen_copy(model)
        data = pairs[:BATCH_PAIRS] if repeat < 0 else pairs
        steps = max(1, len(data) // BATCH_PAIRS)
        cfg = TrainConfig(max_steps=steps, batch_size=BATCH_PAIRS, lr=1e-4, warmup_steps=0, precision="auto",
                          save_every=0, log_every=steps, report_to="none", seed=0)
        frozen = flop_parameters(reference)[0]
        result = train(model, make_preference_step("dpo", PolicyConfig(), reference), data, collate,
                       [p.length for p in data], cfg, Path(tempfile.mkdtemp(dir=tmp)),  # fresh: no resume
                       log_dir=None, desc="scaling", frozen_forward_params=frozen)
        if repeat >= 0:
            seconds.append(result.seconds)
            tokens = result.total_tokens
            flops = tokens * training_flops_per_token(model, frozen_forward_params=frozen)
    return {"seconds": seconds, "flops": flops, "tokens": tokens, "parameters": pc.parameter_counts(model)["total"]}


def point(kind: str, size: str, pairs: list[Any], timing: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    seconds = pc.median(timing["seconds"])
    tokens = timing.get("tokens") or real_tokens(pairs)
    return {"kind": kind, "size": size, "parameters": timing["parameters"], "pairs": len(pairs),
            "real_tokens": int(tokens), "median_seconds": round(seconds, 3),
            "spread": round(pc.spread(timing["seconds"]), 3),
            "us_per_token": 1e6 * seconds / tokens, "gflops_per_s": timing["flops"] / seconds / 1e9,
            "peak_fraction": pc.peak_fraction(timing["flops"] / seconds, dtype_name, "cpu"), "dtype": dtype_name}


def relative(points: list[dict[str, Any]]) -> None:
    """Per-token time of each point over the sweep's first point (and the same per parameter)."""
    for kind in ("score", "train"):
        mine = [p for p in points if p["kind"] == kind]
        for p in mine:
            p["per_token_vs_first"] = round(p["us_per_token"] / mine[0]["us_per_token"], 3)
            p["per_token_per_param_vs_first"] = round(
                p["us_per_token"] / p["parameters"] / (mine[0]["us_per_token"] / mine[0]["parameters"]), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pairs 4/16/64 on 8M; models 8M, 42M on 16 pairs")
    parser.add_argument("--base-pairs", type=int, default=None, help="the 1x pair count (default 16; quick 4)")
    parser.add_argument("--data-size", default="8M", help="model of the data sweep")
    parser.add_argument("--sizes", default=None, help="models of the model sweep (default 8M,42M,160M; quick 8M,42M)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per point (default 3; quick 1)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    pc.quiet()
    import torch

    from selpo_core.threads import apply_thread_policy

    threads = apply_thread_policy()  # what a selpo stage would run with on this box now
    device = torch.device("cpu")  # the CPU story; on a GPU host the speed benchmarks are the GPU story
    dtype, dtype_name = pc.auto_dtype(device)
    base = args.base_pairs or (4 if args.quick else 16)
    sizes = (args.sizes or ("8M,42M" if args.quick else "8M,42M,160M")).split(",")
    repeats = args.repeats or (1 if args.quick else 3)
    all_pairs = pc.make_pairs(16 * base, seed=0)
    note = pc.busy_machine_note()
    print(f"scaling on {device} ({dtype_name}, {torch.get_num_threads()} threads): data sweep {base}/{4 * base}/"
          f"{16 * base} pairs on {args.data_size}, model sweep {','.join(sizes)} on {4 * base} pairs, {repeats} "
          "repeat(s)" + (f"\n  NOTE {note}" if note else ""), flush=True)
    points: dict[str, list[dict[str, Any]]] = {"data": [], "model": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selpo-bench-scaling-") as tmp:
        plan = [("data", args.data_size, n * base) for n in (1, 4, 16)] + [("model", s, 4 * base) for s in sizes]
        for sweep, size, n in plan:
            pairs = all_pairs[:n]
            for kind in ("score", "train"):
                timing = (time_scoring(SIZES[size], pairs, repeats, device, dtype) if kind == "score" else
                          time_training(SIZES[size], pairs, repeats, Path(tmp)))
                points[sweep].append(point(kind, size, pairs, timing, dtype_name))
                p = points[sweep][-1]
                print(f"  {sweep:>5} {kind:>5} {size:>4} {n:>4} pairs: {p['median_seconds']:8.2f} s, "
                      f"{p['us_per_token']:8.1f} us/token, {p['gflops_per_s']:6.1f} GFLOP/s "
                      f"({100 * p['peak_fraction']:.0f}% of {dtype_name} peak)", flush=True)
    for sweep in points.values():
        relative(sweep)
    rows = [[sweep, p["kind"], p["size"], p["pairs"], p["real_tokens"], p["median_seconds"],
             f"{p['us_per_token']:.1f}",
             p["per_token_vs_first"], p["per_token_per_param_vs_first"], f"{p['gflops_per_s']:.1f}",
             f"{100 * p['peak_fraction']:.0f}%"] for sweep, sweep_points in points.items() for p in sweep_points]
    print(pc.table(["sweep", "stage", "model", "pairs", "real tokens", "median s", "us/token", "us/token vs 1st",
                    "per param vs 1st", "GFLOP/s", f"% {dtype_name} peak"], rows))
    data_ratios = {kind: max(p["per_token_vs_first"] for p in points["data"] if p["kind"] == kind)
                   for kind in ("score", "train")}
    summary = (f"SUMMARY scaling [cpu, {dtype_name}]: us/token at 16x pairs vs 1x: scoring "
               f"{[p['per_token_vs_first'] for p in points['data'] if p['kind'] == 'score'][-1]}, training "
               f"{[p['per_token_vs_first'] for p in points['data'] if p['kind'] == 'train'][-1]} (max over the sweep "
               f"{data_ratios['score']} / {data_ratios['train']}); model sweep GFLOP/s " + ", ".join(
                   f"{p['kind']} {p['size']} {p['gflops_per_s']:.0f}" for p in points["model"]))
    path = pc.write_results("scaling", {
        "settings": {"base_pairs": base, "data_size": args.data_size, "sizes": sizes, "repeats": repeats,
                     "batch_pairs": BATCH_PAIRS, "dtype": dtype_name, "threads": vars(threads),
                     "busy_note": note, "seconds": round(time.perf_counter() - started, 1)},
        "data_sweep": points["data"], "model_sweep": points["model"], "summary": summary},
        Path(args.out) if args.out else None)
    print(f"\nwrote {path}\n{summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

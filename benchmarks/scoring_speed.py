"""Token-scoring throughput: selpo's batched scorer vs the SePO reference code's per-example loop.

Same models (an oracle and a reference Llama of one size, random init; the oracle is the reference plus a 5%
perturbation so log-ratios are small, as for a DPO-trained oracle), same pairs (benchmarks/perf_common.py: realistic
lengths, prompt+response <= 256, vocab 32000), every contender scores both models and selects the top/bottom 30%:

  (a) per-example loop: a re-implementation of the reference `token_score.py`: one response at a time, fp32, full
      logits of every position, logits moved to the CPU, log_softmax over the whole vocabulary there, gather,
      top-k / bottom-k by repeated argmax/argmin in Python. (We grant it `torch.no_grad`, which the original lacks,
      and align the scores to the response tokens correctly; the original is one position off. Same work.) One
      response at a time, its rate does not depend on how many: it is timed on the first `--loop-pairs` pairs.
  (b) naive batched: 8 pairs (16 rows) per batch in data order, right-padded, full logits, one fp32
      log_softmax over [B, T, V], gather, torch.topk per response.
  (c) selpo inner: `scoring._plan` + `scoring._score_shard` (length-sorted token-budget batches of 4096 tokens,
      LM head only at the response rows, fp32 log-softmax of those rows) + the Parquet table +
      `selection_stage.select_rows`, models already in memory: the part of `score_pairs` that scales with the data.
  (d) selpo `score_pairs` end to end: loads both models from disk, writes and fsyncs Parquet shards, then reads
      them back and selects (as the score and select stages do).
  (e) `score.backend=vllm`: `score_pairs` through vLLM's prompt log-probs in .venv-vllm (make vllm-env), run once
      (each call starts an engine per model in a subprocess): its time is the scoring alone, engine start and
      subprocess reported beside it; only where the venv exists and vLLM takes the model's head size.

Real tokens = prompt + response of every response, counted once although two models read it (selpo's own
`real_tokens_per_second`). FLOPs: `perf_common.forward_flops` (2 x non-embedding params per real token + the LM
head only at response rows, both models); the same useful FLOPs are credited to every contender. The FLOP/s
reference is one product of each of the model's own GEMM shapes (2048 tokens) in the fast dtype, FLOP-weighted, timed
as one more contender in the same interleaved rounds (so it sees the same machine). "best" columns use each
contender's fastest round (and the fastest GEMM round): on a machine shared with other jobs they compare undisturbed
runs. Selection agreement (on `--agreement-pairs` pairs): selpo's selection from bf16 scores vs from fp32 scores
(per-response Jaccard, share of identical sets; only where bf16 is native: emulated bf16 would take minutes), and
selpo fp32 vs the per-example loop (a check that both compute the same thing). "selpo decoder stacks only" (timed
once) runs just the decoder layers on selpo's batches: what is
left of (c) without the LM head, the log-softmax and the bookkeeping.

Precision: (b)-(e) run in the dtype selpo's `precision: auto` picks on this device (bf16 where it is native: CUDA,
CPUs with AVX512-BF16 / AMX; else fp32, as on AVX2-only CPUs, where bf16 matmul is ~75x slower), the loop (a) in fp32
as the original does. Each contender's GFLOP/s is also stated as a fraction of the measured square-matmul peak of the
dtype it ran (`peak_fraction`; the peaks are in machine.matmul_peak_gflops).

    python -m benchmarks.scoring_speed            # 8M and 42M, 32 pairs (8 for the loop), 5 interleaved repeats
    python -m benchmarks.scoring_speed --quick    # 16 pairs (4 for the loop), 2 repeats
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import perf_common as pc

K = 0.3  # SePO's default selected fraction, both sides
# selpo's scorer token budget: 4096 = 8 pairs (16 rows) of 256 tokens, the "batch 8" of the comparison (selpo's default
# is 8192; on this little data a bigger budget only packs rows of more different lengths together). --batch-tokens.
SCORER = {"batch_tokens": 4096}


# ------------------------------------------------------------------------------------- (a) per-example loop


def _argmax_topk(advantage: Any, count: int, *, largest: bool) -> list[int]:
    """The reference's get_topK: repeatedly take argmax (argmin), then overwrite it with -/+100000."""
    import torch

    work = advantage.clone()
    picked: list[int] = []
    while len(picked) < count:
        index = int((torch.argmax if largest else torch.argmin)(work, dim=-1))
        picked.append(index)
        work[index] = -100000.0 if largest else 100000.0
    return picked


def per_example_loop(oracle: Any, reference: Any, pairs: list[Any], device: Any) -> dict[tuple[str, str], Any]:
    """{(example_id, side): (log_ratio [R] fp32 CPU, top-k set, bottom-k set)}, one forward per response."""
    import torch

    out = {}
    with torch.no_grad():
        for pair in pairs:
            for side in ("chosen", "rejected"):
                response = pair.chosen_ids if side == "chosen" else pair.rejected_ids
                ids = torch.tensor([list(pair.prompt_ids) + list(response)]).to(device)
                oracle_logits = oracle(ids)["logits"].detach()
                ref_logits = reference(ids)["logits"].detach()
                labels = ids[:, 1:].cpu()
                oracle_logits = oracle_logits[:, :-1, :].cpu()
                ref_logits = ref_logits[:, :-1, :].cpu()
                oracle_logps = torch.gather(oracle_logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
                ref_logps = torch.gather(ref_logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
                advantage = (oracle_logps - ref_logps)[0, len(pair.prompt_ids) - 1:]
                count = int(K * len(advantage))
                top = _argmax_topk(advantage, count, largest=True)
                bottom = _argmax_topk(advantage, count, largest=False)
                out[(pair.example_id, side)] = (advantage, set(top), set(bottom))
    return out


# ------------------------------------------------------------------------------------------ (b) naive batched


def naive_batched(oracle: Any, reference: Any, pairs: list[Any], device: Any, batch_pairs: int = 8) -> dict:
    """{(example_id, side): selected set}: padded batches in data order, full logits, fp32 log_softmax of all."""
    import torch

    out = {}
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_pairs):
            batch = pairs[start:start + batch_pairs]
            rows = [(p, "chosen", p.chosen_ids) for p in batch] + [(p, "rejected", p.rejected_ids) for p in batch]
            width = max(len(p.prompt_ids) + len(r) for p, _, r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, (p, _, r) in enumerate(rows):
                n = len(p.prompt_ids) + len(r)
                ids[j, :n] = torch.tensor(list(p.prompt_ids) + list(r))
                mask[j, :n] = 1
            ids, mask = ids.to(device), mask.to(device)
            labels = ids[:, 1:].unsqueeze(-1)
            logps = []
            for model in (oracle, reference):
                logits = model(input_ids=ids, attention_mask=mask).logits
                logps.append(logits[:, :-1].float().log_softmax(-1).gather(-1, labels).squeeze(-1))
            advantage = (logps[0] - logps[1]).cpu()
            for j, (p, side, r) in enumerate(rows):
                a = advantage[j, len(p.prompt_ids) - 1:len(p.prompt_ids) - 1 + len(r)]
                picked = torch.topk(a, max(1, int(K * len(a))), largest=side == "chosen").indices
                out[(p.example_id, side)] = set(picked.tolist())
    return out


# ---------------------------------------------------------------------------------------------------- (c), (d)


def selpo_inner(oracle: Any, reference: Any, pairs: list[Any], device: Any, dtype: Any) -> tuple[list[dict], Any]:
    """selpo's scoring loop with the models in memory, plus its selection: (rows with `selected`, counter)."""
    import torch
    from tqdm.auto import tqdm

    from selpo_core import scoring
    from selpo_core.config import ScoreConfig, SelectConfig
    from selpo_core.selection_stage import select_rows

    cfg = ScoreConfig(batch_tokens=SCORER["batch_tokens"])
    counter = scoring._Counter()
    rows: list[dict] = []
    with torch.inference_mode(), tqdm(disable=True) as bar:
        bar.desc = "scoring"  # a disabled bar has none; _score_shard reports progress under it
        for shard in scoring._plan(pairs, cfg, dtype):
            oracle_logps, ref_logps = scoring._score_shard((oracle, reference), shard, cfg, device, counter, bar)
            rows.extend(scoring.iter_rows(scoring._shard_table(shard, oracle_logps, ref_logps, cfg.beta)))
    select_rows(SelectConfig(k_chosen=K, k_rejected=K), rows, special_token_ids=())
    return rows, counter


def selpo_end_to_end(oracle_dir: Path, reference_dir: Path, pairs: list[Any], precision: str) -> dict[str, Any]:
    """`score_pairs` into a fresh directory, then read back and select: what the score + select stages compute."""
    from selpo_core import scoring
    from selpo_core.config import ScoreConfig, SelectConfig
    from selpo_core.selection_stage import select_rows

    with tempfile.TemporaryDirectory(prefix="selpo-bench-scores-") as tmp:
        metrics = scoring.score_pairs(pairs, oracle_dir, reference_dir, ScoreConfig(precision=precision,
                                                                                   **SCORER), Path(tmp))
        rows = list(scoring.iter_rows(scoring.read_scores(Path(tmp))))
    select_rows(SelectConfig(k_chosen=K, k_rejected=K), rows, special_token_ids=())
    return metrics


def selpo_decoder_only(oracle: Any, reference: Any, pairs: list[Any], device: Any, dtype: Any) -> None:
    """Only the decoder stacks on selpo's own batches (no LM head, no log-softmax): the floor of (c)."""
    import numpy as np
    import torch

    from selpo_core import scoring
    from selpo_core.config import ScoreConfig

    cfg = ScoreConfig(batch_tokens=SCORER["batch_tokens"])
    with torch.inference_mode():
        for shard in scoring._plan(pairs, cfg, dtype):
            for batch in scoring._batches(shard, cfg.batch_tokens):
                rows = [shard.responses[i] for i in batch]
                width = max(r.total for r in rows)
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, : r.total] = torch.from_numpy(np.concatenate([r.prompt_ids, r.ids]))
                    mask[j, : r.total] = 1
                for model in (oracle, reference):
                    model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)


def vllm_contender(oracle_dir: Path, reference_dir: Path, pairs: list[Any], subset: list[Any]) -> dict[str, Any]:
    """(e): precision-auto timing on `pairs`, fp32 log-ratios on `subset` (for agreement), or {"skipped": why}."""
    from selpo_core import scoring
    from selpo_core.config import ScoreConfig
    from selpo_core.generate_vllm import read_model_shape, unsupported_reason
    from selpo_core.vllm_venv import resolve_vllm_python, vllm_build

    python = resolve_vllm_python(ScoreConfig().vllm_python)
    why = "no .venv-vllm (make vllm-env)" if python is None else unsupported_reason(read_model_shape(oracle_dir),
                                                                                    vllm_build(python))
    if why:
        return {"skipped": why}
    out: dict[str, Any] = {}
    for precision, data in (("auto", pairs), ("fp32", subset)):
        with tempfile.TemporaryDirectory(prefix="selpo-bench-vllm-") as tmp:
            started = time.perf_counter()
            cfg = ScoreConfig(precision=precision, backend="vllm", **SCORER)
            metrics = scoring.score_pairs(data, oracle_dir, reference_dir, cfg, Path(tmp))
            rows = list(scoring.iter_rows(scoring.read_scores(Path(tmp))))
        real = sum(len(p.prompt_ids) + len(r) for p in data for r in (p.chosen_ids, p.rejected_ids))
        out[precision] = {"seconds": real / metrics["real_tokens_per_second"], "wall_seconds": time.perf_counter()
                          - started, "log_ratio": {(r["example_id"], r["side"]): r["log_ratio"] for r in rows}}
    return out


# ------------------------------------------------------------------------------------------------- agreement


def _selected_sets(rows: list[dict]) -> dict[tuple[str, str], set[int]]:
    return {(row["example_id"], row["side"]): {i for i, s in enumerate(row["selected"]) if s} for row in rows}


def agreement(a: dict[tuple[str, str], set[int]], b: dict[tuple[str, str], set[int]]) -> dict[str, float]:
    """Mean per-response Jaccard of two selections and the fraction of responses with identical sets."""
    jaccards, identical = [], 0
    for key, left in a.items():
        right = b[key]
        union = left | right
        jaccards.append(len(left & right) / len(union) if union else 1.0)
        identical += left == right
    return {"mean_jaccard": round(sum(jaccards) / len(jaccards), 4), "identical_sets": round(identical / len(a), 4),
            "min_jaccard": round(min(jaccards), 4), "responses": len(a)}


# ------------------------------------------------------------------------------------------------------ main


def bench_size(size: pc.LlamaSize, pairs: list[Any], repeats: int, device: Any, vocab: int, loop_pairs: int,
               agreement_pairs: int) -> dict[str, Any]:
    import torch

    reference32 = pc.build_llama(size, vocab=vocab, seed=0)
    oracle32 = pc.perturbed_copy(reference32, seed=1)
    params = pc.parameter_counts(reference32)
    reference32, oracle32 = reference32.to(device), oracle32.to(device)
    fast, fast_name = pc.auto_dtype(device)  # what `precision: auto` runs here
    reference16 = pc.build_llama(size, vocab=vocab, seed=0)
    oracle16 = pc.perturbed_copy(reference16, seed=1)
    reference16, oracle16 = reference16.to(device, fast), oracle16.to(device, fast)

    def counts(subset: list[Any]) -> tuple[int, int]:
        real = sum(len(p.prompt_ids) + len(r) for p in subset for r in (p.chosen_ids, p.rejected_ids))
        return real, sum(len(r) for p in subset for r in (p.chosen_ids, p.rejected_ids))

    # (a) handles one response at a time, so its rate does not depend on how many: it is timed on a subset.
    loop_subset, warm = pairs[:loop_pairs], pairs[:2]
    real_tokens, response_tokens = counts(pairs)
    work = {"full": counts(pairs), "loop": counts(loop_subset)}
    last_e2e: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="selpo-bench-models-") as tmp:
        oracle_dir, reference_dir = Path(tmp) / "oracle", Path(tmp) / "reference"
        oracle32.save_pretrained(oracle_dir)
        reference32.save_pretrained(reference_dir)

        def e2e(subset: list[Any]) -> None:
            last_e2e.update(selpo_end_to_end(oracle_dir, reference_dir, subset, "auto"))

        gemm_ops = pc.gemm_operands(size, vocab=vocab, rows=2048, head_rows=int(2048 * response_tokens / real_tokens),
                                    device=device, dtype=fast)
        gemm_runs: list[dict[str, Any]] = []

        def contenders(full: bool) -> dict[str, Any]:
            data, loop_data = (pairs, loop_subset) if full else (warm, warm)
            return {
                # Timed in the same rounds as the contenders, so it sees the same machine (load, clocks).
                "GEMM reference": lambda: gemm_runs.append(pc.gemm_pass(gemm_ops, device)),
                "(a) per-example loop, fp32": lambda: per_example_loop(oracle32, reference32, loop_data, device),
                f"(b) naive batched, {fast_name}": lambda: naive_batched(oracle16, reference16, data, device),
                f"(c) selpo inner, {fast_name}": lambda: selpo_inner(oracle16, reference16, data, device, fast),
                f"(d) selpo score_pairs e2e, {fast_name}": lambda: e2e(data),
            }

        pc.interleaved(contenders(full=False), 1, warmup=False, device=device)  # first-call costs, on 2 pairs
        gemm_runs.clear()
        times = pc.interleaved(contenders(full=True), repeats, warmup=False, device=device)
        del times["GEMM reference"]
        vllm = vllm_contender(oracle_dir, reference_dir, pairs, pairs[:agreement_pairs])
        if "auto" in vllm:  # one run: an engine start per model per call
            times[f"(e) vLLM prompt_logprobs, {fast_name} (scoring only, 1 run)"] = [vllm["auto"]["seconds"]]
    # Breakdown, timed once: the decoder stacks alone on selpo's own batches (no LM head, no log-softmax).
    times[f"selpo decoder stacks only, {fast_name}"] = pc.interleaved(
        {"decoder": lambda: selpo_decoder_only(oracle16, reference16, pairs, device, fast)}, 1,
        warmup=False, device=device)["decoder"]

    # Agreement (untimed, on a subset): selpo's selection from bf16 vs fp32 scores; selpo fp32 vs the loop.
    subset = pairs[:agreement_pairs]
    rows32, _ = selpo_inner(oracle32, reference32, subset, device, torch.float32)
    if fast == torch.bfloat16:
        rows16, _ = selpo_inner(oracle16, reference16, subset, device, torch.bfloat16)
    else:  # not native here: bf16 is never what selpo runs, and emulated it would take minutes
        rows16 = None
    loop = per_example_loop(oracle32, reference32, subset, device)
    sel32 = _selected_sets(rows32)
    sel16 = _selected_sets(rows16) if rows16 is not None else None
    loop_sel = {key: (top if key[1] == "chosen" else bottom) for key, (_, top, bottom) in loop.items()}
    by_key32 = {(row["example_id"], row["side"]): row for row in rows32}
    max_diff = max(float((torch.tensor(by_key32[key]["log_ratio"]) - adv).abs().max()) for key, (adv, _, _)
                   in loop.items())
    ratios = [abs(v) for row in rows32 for v in row["log_ratio"]]
    _, counter = selpo_inner(oracle16, reference16, pairs, device, fast)

    rates = [run["gflops_per_s"] for run in gemm_runs]
    gemm = {"model_gemm_gflops_per_s": pc.median(rates), "best_model_gemm_gflops_per_s": max(rates),
            "rounds_gflops_per_s": [round(r, 1) for r in rates],
            "per_shape_gflops_per_s": {k: round(pc.median([r["per_shape"][k] for r in gemm_runs]), 1)
                                       for k in gemm_runs[0]["per_shape"]},
            "square_2048_gflops_per_s": pc.square_gemm_gflops(device, fast), "dtype": fast_name}
    results = []
    for name, values in times.items():
        seconds = pc.median(values)
        real, response = work["loop" if name.startswith("(a)") else "full"]
        if name.startswith("selpo decoder"):  # credited with the decoder layers' FLOPs only: it runs no LM head
            response = 0
        gflops = 2 * pc.forward_flops(params, size.hidden, vocab, tokens=real, head_rows=response) / seconds / 1e9
        ran = "fp32" if name.startswith("(a)") else fast_name
        results.append({"method": name, "dtype": ran, "peak_fraction": pc.peak_fraction(gflops * 1e9, ran, device),
                        "median_seconds": round(seconds, 4), "spread": round(pc.spread(values), 3),
                        "real_tokens": real, "real_tokens_per_second": real / seconds, "gflops_per_s": gflops,
                        "fraction_of_gemm": gflops / gemm["model_gemm_gflops_per_s"],
                        "best_real_tokens_per_second": real / min(values), "seconds": [round(v, 4) for v in values],
                        "best_fraction_of_gemm": gflops * seconds / min(values) / gemm["best_model_gemm_gflops_per_s"]})
    base, best_base = results[0]["real_tokens_per_second"], results[0]["best_real_tokens_per_second"]
    for result in results:
        result["speedup_vs_loop"] = result["real_tokens_per_second"] / base
        # Best-of-repeats: the least disturbed run of each, the fairer pair on a machine shared with other jobs.
        result["best_speedup_vs_loop"] = result["best_real_tokens_per_second"] / best_base
    return {
        "size": size.name, "parameters": params, "hidden": size.hidden, "layers": size.layers,
        "intermediate": size.intermediate, "vocab": vocab, "pairs": len(pairs), "loop_pairs": len(loop_subset),
        "real_tokens": real_tokens, "response_tokens": response_tokens, "results": results, "gemm_reference": gemm,
        "selpo_pad_fraction": round((counter.padded - counter.real) / counter.padded, 4),
        "selpo_score_pairs_metrics": {k: last_e2e.get(k) for k in ("real_tokens_per_second", "pad_fraction",
                                                                   "seconds")},
        "median_abs_log_ratio": sorted(ratios)[len(ratios) // 2],
        "agreement_pairs": len(subset),
        "dtype": fast_name,
        "agreement_bf16_vs_fp32": agreement(sel16, sel32) if sel16 is not None else
        {"skipped": "bf16 is not native here (precision auto runs fp32)"},
        "agreement_selpo_fp32_vs_loop": agreement(sel32, loop_sel),
        "max_abs_log_ratio_diff_selpo_fp32_vs_loop": max_diff,
        "vllm": {"skipped": vllm["skipped"]} if "skipped" in vllm else {
            "wall_seconds_auto": round(vllm["auto"]["wall_seconds"], 2),  # with subprocess and engine starts
            "max_abs_log_ratio_diff_vllm_fp32_vs_selpo_fp32": max(
                float(abs(torch.tensor(by_key32[key]["log_ratio"]) - torch.tensor(lr)).max())
                for key, lr in vllm["fp32"]["log_ratio"].items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 pairs (4 for the loop), 2 repeats")
    parser.add_argument("--sizes", default="8M,42M", help=f"model sizes among {','.join(pc.MODEL_SIZES)}")
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs scored (default 32; quick 16)")
    parser.add_argument("--loop-pairs", type=int, default=None,
                        help="pairs the per-example loop is timed on (default 8; quick 4)")
    parser.add_argument("--agreement-pairs", type=int, default=None,
                        help="pairs scored in bf16 and fp32 for selection agreement (default 12; quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 5; quick 2)")
    parser.add_argument("--batch-tokens", type=int, default=SCORER["batch_tokens"],
                        help="selpo scorer token budget per forward batch (default 4096 = 8 pairs of 256 tokens)")
    parser.add_argument("--vocab", type=int, default=pc.VOCAB_SIZE)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    pc.quiet()
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    n_pairs = args.pairs or (16 if args.quick else 32)
    loop_pairs = min(n_pairs, args.loop_pairs or (4 if args.quick else 8))
    agreement_pairs = min(n_pairs, args.agreement_pairs or (8 if args.quick else 12))
    repeats = args.repeats or (2 if args.quick else 5)
    SCORER["batch_tokens"] = args.batch_tokens
    pairs = pc.make_pairs(n_pairs, seed=args.seed, vocab=args.vocab)
    note = pc.busy_machine_note()
    print(f"scoring_speed on {device}: {n_pairs} pairs ({loop_pairs} for the per-example loop), {repeats} "
          f"interleaved repeats, vocab {args.vocab}"
          + (f"\n  NOTE {note}" if note else ""), flush=True)

    per_size = []
    for name in args.sizes.split(","):
        result = bench_size(pc.MODEL_SIZES[name.strip()], pairs, repeats, device, args.vocab, loop_pairs,
                            agreement_pairs)
        per_size.append(result)
        p = result["parameters"]
        print(f"\n{name}: {p['total'] / 1e6:.1f}M params ({p['non_embedding'] / 1e6:.1f}M non-embedding), "
              f"{result['real_tokens']} real tokens ({result['response_tokens']} response), "
              f"{result['dtype']} model-shaped GEMM ref {result['gemm_reference']['model_gemm_gflops_per_s']:.0f} "
              "GFLOP/s median, "
              f"{result['gemm_reference']['best_model_gemm_gflops_per_s']:.0f} best "
              f"(square 2048^3: {result['gemm_reference']['square_2048_gflops_per_s']:.0f})")
        print(pc.table(["method", "real tok/s", "x loop", "GFLOP/s", "% GEMM ref", "% peak of its dtype",
                        "median s", "spread", "best tok/s", "x loop (best)", "% GEMM (best)"], [
            [r["method"], pc.fmt(r["real_tokens_per_second"]), f"{r['speedup_vs_loop']:.2f}",
             pc.fmt(r["gflops_per_s"], 1), f"{100 * r['fraction_of_gemm']:.0f}%",
             f"{100 * r['peak_fraction']:.0f}% {r['dtype']}", f"{r['median_seconds']:.3f}",
             f"{100 * r['spread']:.0f}%", pc.fmt(r["best_real_tokens_per_second"]),
             f"{r['best_speedup_vs_loop']:.2f}", f"{100 * r['best_fraction_of_gemm']:.0f}%"]
            for r in result["results"]]))
        a16, aloop = result["agreement_bf16_vs_fp32"], result["agreement_selpo_fp32_vs_loop"]
        diff = result["max_abs_log_ratio_diff_selpo_fp32_vs_loop"]
        print((f"selection bf16 vs fp32: {a16['skipped']}" if "skipped" in a16 else
               f"selection bf16 vs fp32 (selpo, {a16['responses']} responses, median |log-ratio| "
               f"{result['median_abs_log_ratio']:.3f}): mean Jaccard {a16['mean_jaccard']:.3f}, identical sets "
               f"{100 * a16['identical_sets']:.0f}%")
              + f"; selpo fp32 vs loop: Jaccard {aloop['mean_jaccard']:.3f}, "
              f"max |log-ratio diff| {diff:.1e}; selpo batches pad {100 * result['selpo_pad_fraction']:.1f}%",
              flush=True)
        v = result["vllm"]
        print(f"(e) vLLM skipped: {v['skipped']}" if "skipped" in v else
              f"(e) vLLM fp32 vs selpo fp32: max |log-ratio diff| "
              f"{v['max_abs_log_ratio_diff_vllm_fp32_vs_selpo_fp32']:.1e};"
              f" {result['dtype']} call {v['wall_seconds_auto']:.1f} s wall with subprocess and engine starts",
              flush=True)

    def pick(result: dict[str, Any], prefix: str) -> dict[str, Any]:
        return next(r for r in result["results"] if r["method"].startswith(prefix))

    parts = []
    for result in per_size:
        inner, e2e = pick(result, "(c)"), pick(result, "(d)")
        parts.append(f"{result['size']} selpo {inner['speedup_vs_loop']:.1f}x loop (best-of "
                     f"{inner['best_speedup_vs_loop']:.1f}x, e2e {e2e['speedup_vs_loop']:.1f}x), "
                     f"{pc.fmt(inner['real_tokens_per_second'])} tok/s, {100 * inner['fraction_of_gemm']:.0f}% of "
                     f"{result['dtype']} GEMM (best-of {100 * inner['best_fraction_of_gemm']:.0f}%), "
                     f"{100 * inner['peak_fraction']:.0f}% of the {result['dtype']} matmul peak")
    largest = per_size[-1]
    inner = pick(largest, "(c)")
    verdict = [f"speedup target >=4x on {largest['size']}: " + ("met" if inner["speedup_vs_loop"] >= 4 else "NOT met"),
               "FLOP/s target >=50%: " + ("met" if inner["fraction_of_gemm"] >= 0.5 else "NOT met")]
    a16 = largest["agreement_bf16_vs_fp32"]
    agree = ("bf16 not native: no bf16 agreement" if "skipped" in a16 else f"bf16-vs-fp32 selection Jaccard "
             f"{a16['mean_jaccard']:.3f} ({100 * a16['identical_sets']:.0f}% identical)")
    summary = (f"SUMMARY scoring_speed [{device.type}, {largest['dtype']}]: " + "; ".join(parts) + f"; {agree}; "
               + ", ".join(verdict))
    path = pc.write_results("scoring_speed", {
        "settings": {"pairs": n_pairs, "loop_pairs": loop_pairs, "agreement_pairs": agreement_pairs,
                     "repeats": repeats, "vocab": args.vocab, "device": str(device), "selected_fraction": K,
                     "selpo_batch_tokens": SCORER["batch_tokens"],
                     "busy_note": note},
        "sizes": per_size, "summary": summary}, Path(args.out) if args.out else None)
    print(f"\nwrote {path}")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

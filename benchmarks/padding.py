"""Padding efficiency of selpo's batchers on a realistic length distribution (no model, index arithmetic only).

Lengths: benchmarks/perf_common.py (`sample_pair_lengths`: prompt+response <= 256, mean ~150 tokens).

Training (batch 8 pairs = 16 rows; chosen and rejected of a pair always share a batch, as in DPO):
- random batches: shuffle, cut in 8s (what a trainer without bucketing, e.g. TRL's DPOTrainer, pads);
- selpo `length_bucketed_batches` (the training loop's plan: sort by pair length inside windows of 50 batches);
- selpo `length_bucketed_batches(shuffle=False)` (one global sort: the best any bucketing of pairs can do).
Two pad fractions per plan:
- pair-level: `batching.pad_fraction` on pair lengths (prompt + longer response): padding *between* pairs;
- row-level: pad slots of the collated [2B, width] tensors, which is what the model computes on and what the training
  loop logs as `pad_fraction`. It also counts the shorter response of each pair padded to the batch width, which no
  ordering of pairs removes: "pair floor" is that part alone (every batch as wide as its longest pair, nothing else).
- "bucketed + rows split in 2": a possible fix, not in selpo: run the 16 rows of a bucketed batch as two forward
  calls of 8 rows each, sorted by row length (rows of a pair may then sit in different calls; the loss only needs
  per-row log-probs).
- "bucketed + packed rows": what selpo's training computes where the model supports packing
  (`batching.packing_plan`: the 2B sequences of a bucketed batch end to end in rows, no padding between them).
  Its "attention x padded" column is rows * width^2 over the padded batch's: the attention work of a kernel that
  computes masked blocks (CPU sdpa/eager), which packing into wider rows increases; a varlen kernel skips them.

The same training plans also run on the demo task's real token lengths (configs/demo.yaml: its synthetic task,
its tokenizer, the policy's batch size), side by side with the padded path.

Scoring (rows = one response each, prompt + response): selpo's plan (`scoring._plan`: global sort by length, shards
of 1024 responses, `token_budget_batches` of 8192 padded tokens) vs random batches of 16 rows.

    python -m benchmarks.padding            # 4096 pairs, 5 seeds
    python -m benchmarks.padding --quick    # 1024 pairs, 2 seeds
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.perf_common import length_summary, sample_pair_lengths, table, write_results
from selpo_core.batching import length_bucketed_batches, packing_plan, pad_fraction, token_budget_batches

TARGET = 0.05


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def row_pad_fraction(batches: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int, int]]) -> float:
    """Pad share of collated pair batches: 2 rows per pair (prompt+chosen, prompt+rejected), one width per batch."""
    padded = real = 0
    for batch in batches:
        rows = [pairs[i][0] + pairs[i][side] for i in batch for side in (1, 2)]
        padded += len(rows) * max(rows)
        real += sum(rows)
    return (padded - real) / padded


def pair_floor(batches: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int, int]]) -> float:
    """Row-level pad that remains even if every pair in a batch were as long as the longest one."""
    padded = gap = 0
    for batch in batches:
        width = max(pairs[i][0] + max(pairs[i][1], pairs[i][2]) for i in batch)
        padded += 2 * len(batch) * width
        gap += sum(abs(pairs[i][1] - pairs[i][2]) for i in batch)
    return gap / padded


def split_rows_pad_fraction(batches: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int, int]],
                            calls: int = 2) -> float:
    """Row-level pad when the 2B rows of each batch are sorted by length and run as `calls` forward calls."""
    padded = real = 0
    for batch in batches:
        rows = sorted(pairs[i][0] + pairs[i][side] for i in batch for side in (1, 2))
        size = -(-len(rows) // calls)
        for start in range(0, len(rows), size):
            group = rows[start:start + size]
            padded += len(group) * max(group)
            real += sum(group)
    return (padded - real) / padded


def packed_rows(batches: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int, int]]) -> tuple[float, float]:
    """(pad share, attention work / the padded batches') of the packed rows selpo's training runs."""
    slots = real = attention = padded_attention = 0
    for batch in batches:
        rows = [pairs[i][0] + pairs[i][side] for i in batch for side in (1, 2)]
        plan = packing_plan(rows)
        width = max(sum(rows[j] for j in members) for members in plan)
        slots += len(plan) * width
        real += sum(rows)
        attention += len(plan) * width**2
        padded_attention += len(rows) * max(rows) ** 2
    return (slots - real) / slots, attention / padded_attention


def demo_pairs() -> tuple[list[tuple[int, int, int]], int]:
    """(prompt, chosen, rejected) token counts of the demo task's pairs, and the demo policy's batch size."""
    import tempfile
    from dataclasses import replace

    from selpo_core import data, synthetic
    from selpo_core.config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_task(cfg.synthetic, Path(tmp))
        examples, _ = data.load_preference_data(replace(cfg.data, path=f"{tmp}/pairs.jsonl", format="standard"))
    tokenizer = synthetic.build_tokenizer(synthetic.make_vocabulary(cfg.synthetic))
    pairs, _ = data.tokenize_pairs(examples, tokenizer, cfg.data)
    return [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], cfg.policy.train.batch_size


def demo_rows(seeds: int) -> list[list[str]]:
    """Padded vs packed rows of the policy's bucketed batches on the demo task (mean over seeds)."""
    pairs, batch_size = demo_pairs()
    lengths = [p + max(c, r) for p, c, r in pairs]
    padded, packed, attention = [], [], []
    for seed in range(seeds):
        batches = length_bucketed_batches(lengths, batch_size, seed=seed)
        padded.append(row_pad_fraction(batches, pairs))
        pad, work = packed_rows(batches, pairs)
        packed.append(pad)
        attention.append(work)
    mean = statistics.fmean
    return [[f"demo task ({len(pairs)} pairs, batch {batch_size}): padded rows", f"{100 * mean(padded):.1f}%", "1.00"],
            [f"demo task ({len(pairs)} pairs, batch {batch_size}): packed rows", f"{100 * mean(packed):.1f}%",
             f"{mean(attention):.2f}"]]


def scoring_plan(totals: list[int], *, shard_rows: int = 1024, batch_tokens: int = 8192) -> list[list[int]]:
    """selpo's scoring batches (scoring._plan + token_budget_batches), as indices into `totals`."""
    order = sorted(range(len(totals)), key=lambda i: totals[i])
    batches = []
    for start in range(0, len(order), shard_rows):
        shard = order[start:start + shard_rows]
        batches += [[shard[j] for j in b] for b in token_budget_batches([totals[i] for i in shard], batch_tokens)]
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 pairs, 2 seeds")
    parser.add_argument("--pairs", type=int, default=None, help="pairs (default 4096; quick 1024)")
    parser.add_argument("--seeds", type=int, default=None, help="data/plan seeds averaged (default 5; quick 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per training batch (default 8)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    n = args.pairs or (1024 if args.quick else 4096)
    seeds = args.seeds or (2 if args.quick else 5)
    bs = args.batch_size

    train_rows: dict[str, dict[str, list[float]]] = {}
    score_rows: dict[str, list[float]] = {}
    windows = (10, 50, 200)
    attention: list[float] = []

    def add(name: str, pair_level: float, row_level: float, floor: float) -> None:
        entry = train_rows.setdefault(name, {"pair": [], "row": [], "floor": []})
        entry["pair"].append(pair_level)
        entry["row"].append(row_level)
        entry["floor"].append(floor)

    for seed in range(seeds):
        pairs = sample_pair_lengths(n, seed=seed)
        lengths = [p + max(c, r) for p, c, r in pairs]
        plans = {"random batches (no bucketing)": random_batches(n, bs, seed)}
        for window in windows:
            label = "selpo length_bucketed_batches" + (" (default window 50)" if window == 50 else
                                                      f" (window {window})")
            plans[label] = length_bucketed_batches(lengths, bs, seed=seed, window_batches=window)
        plans["selpo length_bucketed_batches, shuffle=False"] = length_bucketed_batches(lengths, bs, seed=seed,
                                                                                        shuffle=False)
        for name, batches in plans.items():
            add(name, pad_fraction(batches, lengths), row_pad_fraction(batches, pairs), pair_floor(batches, pairs))
        bucketed = plans["selpo length_bucketed_batches (default window 50)"]
        add("bucketed + rows split in 2 calls (proposed)", pad_fraction(bucketed, lengths),
            split_rows_pad_fraction(bucketed, pairs), float("nan"))
        packed_pad, packed_attention = packed_rows(bucketed, pairs)
        add("bucketed + packed rows (selpo, where the model supports packing)", pad_fraction(bucketed, lengths),
            packed_pad, float("nan"))
        attention.append(packed_attention)

        totals = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        score_rows.setdefault("random batches of 16 rows", []).append(
            pad_fraction(random_batches(len(totals), 2 * bs, seed), totals))
        score_rows.setdefault("selpo scoring plan (sorted, 8192-token budget)", []).append(
            pad_fraction(scoring_plan(totals), totals))

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    all_pairs = sample_pair_lengths(n, seed=0)
    totals0 = [p + c for p, c, _ in all_pairs] + [p + r for p, _, r in all_pairs]
    print(f"padding: {n} pairs x {seeds} seeds, batch {bs} pairs ({2 * bs} rows); prompt+response lengths "
          f"{length_summary(totals0)}")
    print("\ntraining batches (pad share, mean over seeds)")
    print(table(["plan", "pair-level (pad_fraction)", "row-level (collated tensors)", "of which pair floor"], [
        [name, f"{100 * mean(v['pair']):.1f}%", f"{100 * mean(v['row']):.1f}%",
         "-" if v["floor"][0] != v["floor"][0] else f"{100 * mean(v['floor']):.1f}%"]
        for name, v in train_rows.items()]))
    print(f"  packed rows: attention work {statistics.fmean(attention):.2f}x the padded batches' (rows x width^2)")
    demo = demo_rows(seeds)
    print("\ndemo task, policy training batches (pad share of the computed tensors, mean over seeds)")
    print(table(["plan", "pad share", "attention x padded"], demo))
    print("\nscoring batches (rows = responses)")
    print(table(["plan", "pad share"], [[name, f"{100 * mean(v):.2f}%"] for name, v in score_rows.items()]))

    default = train_rows["selpo length_bucketed_batches (default window 50)"]
    random_row = mean(train_rows["random batches (no bucketing)"]["row"])
    pair_level, row_level = mean(default["pair"]), mean(default["row"])
    split = mean(train_rows["bucketed + rows split in 2 calls (proposed)"]["row"])
    packed = mean(train_rows["bucketed + packed rows (selpo, where the model supports packing)"]["row"])
    scoring = mean(score_rows["selpo scoring plan (sorted, 8192-token budget)"])
    demo_packed = float(demo[1][1].rstrip("%")) / 100
    verdict = "met" if packed <= TARGET and demo_packed <= TARGET else "NOT met"
    summary = (f"SUMMARY padding: selpo bucketed training batches {100 * pair_level:.1f}% pad between pairs, "
               f"{100 * row_level:.1f}% in the padded tensors, {100 * packed:.1f}% in packed rows "
               f"(attention work {statistics.fmean(attention):.2f}x); demo task padded {demo[0][1]}, packed "
               f"{demo[1][1]} (attention {demo[1][2]}x); random batches {100 * random_row:.1f}%; rows split "
               f"in 2 calls {100 * split:.1f}%; scoring plan {100 * scoring:.2f}%; packed target <=5%: {verdict}")
    payload: dict[str, Any] = {
        "settings": {"pairs": n, "seeds": seeds, "batch_pairs": bs, "length_summary": length_summary(totals0)},
        "training": {name: {k: mean(v) if v and v[0] == v[0] else None for k, v in entry.items()}
                     for name, entry in train_rows.items()},
        "scoring": {name: mean(v) for name, v in score_rows.items()},
        "packed_attention_vs_padded": statistics.fmean(attention),
        "demo_task": {row[0]: {"pad": row[1], "attention_vs_padded": row[2]} for row in demo},
        "summary": summary,
    }
    path = write_results("padding", payload, Path(args.out) if args.out else None)
    print(f"\nwrote {path}")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

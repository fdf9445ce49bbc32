"""Token-reward estimation against the truth: oracle AUROC and selection precision vs oracle size and subset.

For each oracle size (the oracle starts from the SFT reference, so oracle size = reference size: tiny hidden size
x layers), each oracle training-subset fraction and each seed, the pipeline runs up to `select` (SFT reference,
DPO oracle on the subset, token scoring, top/bottom-30% selection). Read from the stages' manifests:

- token AUROC, pooled: +key vs filler tokens in chosen responses (high reward = key) together with -key vs filler
  in rejected responses (low reward = key); also each side alone;
- the same AUROC without special tokens (EOS...), i.e. over the tokens the default selection ranks;
- recall of the key tokens in the selection (select.k_chosen / k_rejected, default 0.3): the share of +key chosen
  tokens and -key rejected tokens that the selection picks (the headline: at k = 0.3 precision cannot exceed
  ~0.34 on a task whose key rate is ~10%);
- precision at k = the key rate: of the top key-rate share of tokens by reward, how many are keys;
- the old precision of the 30% selection, next to its chance rate (the key-token base rate).

Every oracle trains for the same number of epochs over its subset (oracle.train.epochs), so a smaller subset is
fewer steps. One seed = a new task draw, model init, oracle subset and data order.

    python -m benchmarks.oracle_quality            # 3 sizes x 4 fractions x 3 seeds
    python -m benchmarks.oracle_quality --quick    # smoke run
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import (
    Stopwatch,
    base_parser,
    input_dir,
    make_config,
    manifest_metrics,
    markdown_table,
    model_overrides,
    parse_args,
    parse_size,
    pm,
    progress,
    run_upto,
    seed_overrides,
    size_name,
    span,
    stats,
    write_results,
)

DEFAULT_SIZES = "32x1,64x2,128x2"
DEFAULT_FRACTIONS = "0.1,0.25,0.5,1.0"
METRICS = ("token_auroc", "token_auroc_positive", "token_auroc_negative", "token_auroc_no_special", "key_recall",
           "key_recall_chosen", "key_recall_rejected", "precision_at_key_rate", "key_rate", "selection_precision",
           "selection_precision_chosen", "selection_precision_rejected", "selection_precision_chance")


def measure(args: Any, size: tuple[int, int], fraction: float, seed: int) -> dict[str, Any]:
    cfg = make_config(args, seed_overrides(seed), model_overrides("reference", size),
                      model_overrides("policy_model", size), {"oracle.subset_fraction": fraction})
    result = run_upto(cfg, "select")
    score_dir = input_dir(result.path, "scores")
    oracle_dir = input_dir(score_dir, "oracle")
    score, oracle = manifest_metrics(score_dir), manifest_metrics(oracle_dir)
    row = {"size": size_name(size), "fraction": fraction, "seed": seed, "cached": result.cached,
           "seconds": round(result.seconds, 1), "oracle_parameters": oracle.get("parameters"),
           "oracle_pairs": oracle.get("n_pairs"), "oracle_train_seconds": oracle.get("seconds"),
           "oracle_final_loss": oracle.get("loss"), "select_dir": str(result.path)}
    merged = {**score, **result.metrics}
    row.update({name: merged.get(name) for name in METRICS})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"oracle (= reference) sizes, hidden x layers "
                        f"(default {DEFAULT_SIZES})")
    parser.add_argument("--fractions", default=DEFAULT_FRACTIONS, help="oracle training-subset fractions "
                        f"(default {DEFAULT_FRACTIONS})")
    parser.add_argument("--only-seed", type=int, default=None, help="run just this seed (to fill the shared stage "
                        "cache from parallel processes; a final run without it finds every run cached and summarizes)")
    args = parse_args(parser, argv)
    if args.quick and args.sizes == DEFAULT_SIZES:
        args.sizes = "32x1,64x2"
    if args.quick and args.fractions == DEFAULT_FRACTIONS:
        args.fractions = "0.25,1.0"
    sizes = [parse_size(text) for text in args.sizes.split(",")]
    fractions = [float(text) for text in args.fractions.split(",")]
    clock = Stopwatch()

    runs = []
    for seed in ([args.only_seed] if args.only_seed is not None else range(args.seeds)):
        for size in sizes:
            for fraction in fractions:
                row = measure(args, size, fraction, seed)
                runs.append(row)
                progress(f"seed {seed} oracle {row['size']} subset {fraction:g}: AUROC {row['token_auroc']:.3f} "
                         f"key recall {row['key_recall']:.3f} ({'cached' if row['cached'] else 'ran'} "
                         f"{row['seconds']:.0f}s)")

    cells = []
    for size in sizes:
        for fraction in fractions:
            group = [r for r in runs if r["size"] == size_name(size) and r["fraction"] == fraction]
            cell = {"size": size_name(size), "fraction": fraction, "oracle_parameters": group[0]["oracle_parameters"],
                    "oracle_pairs": stats(r["oracle_pairs"] for r in group)}
            cell.update({name: stats(r[name] for r in group) for name in METRICS})
            cells.append(cell)

    headers = ["oracle", "params", "subset", "pairs", "AUROC pooled", "AUROC +key", "AUROC -key", "min..max pooled",
               "AUROC no special", "key recall", "precision@key rate", "precision@k", "chance"]
    rows = [[c["size"], c["oracle_parameters"], f"{c['fraction']:g}", f"{c['oracle_pairs']['mean']:.0f}",
             pm(c["token_auroc"]), pm(c["token_auroc_positive"]), pm(c["token_auroc_negative"]),
             span(c["token_auroc"]), pm(c["token_auroc_no_special"]), pm(c["key_recall"]),
             pm(c["precision_at_key_rate"]), pm(c["selection_precision"]),
             f"{c['selection_precision_chance']['mean']:.3f}"] for c in cells]
    k = make_config(args).select
    print(f"\nOracle token-reward quality (mean ± std over {args.seeds} seed(s); selection k = "
          f"{k.k_chosen:g}/{k.k_rejected:g})")
    print(markdown_table(headers, rows))
    print("\nPooled AUROC / key recall, oracle size x subset fraction (means):")
    pivot = [[size_name(z)] + [next(f"{c['token_auroc']['mean']:.3f} / {c['key_recall']['mean']:.3f}"
                                    for c in cells if c["size"] == size_name(z) and c["fraction"] == f)
                               for f in fractions] for z in sizes]
    print(markdown_table(["oracle"] + [f"subset {f:g}" for f in fractions], pivot))

    best = max(cells, key=lambda c: c["token_auroc"]["mean"])
    chance = stats(r["selection_precision_chance"] for r in runs)["mean"]

    def auroc_of(size: tuple[int, int] | None, fraction: float | None) -> float:
        """Mean pooled AUROC of the matching cells (None: average over that axis)."""
        return stats(c["token_auroc"]["mean"] for c in cells
                     if (size is None or c["size"] == size_name(size))
                     and (fraction is None or c["fraction"] == fraction))["mean"]

    path = write_results("oracle_quality", {
        "settings": {"sizes": [size_name(s) for s in sizes], "fractions": fractions, "seeds": args.seeds,
                     "quick": args.quick, "runs_dir": args.runs_dir, "overrides": args.set,
                     "select_k": [k.k_chosen, k.k_rejected], "seconds": round(clock.seconds, 1)},
        "cells": cells, "runs": runs,
    }, args.out_dir)
    print(f"\nwrote {path} in {clock.seconds:.0f}s")
    recall = [c["key_recall"]["mean"] for c in cells]
    by_fraction = "/".join(f"{auroc_of(None, f):.2f}" for f in fractions)
    by_size = "/".join(f"{auroc_of(z, fractions[-1]):.2f}" for z in sizes)
    print(f"SUMMARY oracle_quality: pooled token AUROC by subset {'/'.join(f'{f:g}' for f in fractions)} (mean over "
          f"sizes) {by_fraction}; by size {'/'.join(size_name(z) for z in sizes)} at subset {fractions[-1]:g} "
          f"{by_size}; best {pm(best['token_auroc'])} ({best['size']}, subset {best['fraction']:g}); "
          f"key recall@{k.k_chosen:g} {min(recall):.3f}..{max(recall):.3f} (precision@k chance {chance:.3f}); "
          f"{args.seeds} seed(s), {clock.seconds / 60:.1f} min "
          f"({sum(not r['cached'] for r in runs)}/{len(runs)} runs computed, the rest cached)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

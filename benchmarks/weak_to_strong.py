"""Weak-to-strong: a SePO policy guided by an oracle several times smaller than itself vs by a same-size oracle.

Settings, per seed (all on the same task; every model SFT'd on the same corpus):
- weak oracle:   reference (= oracle's start) tiny 32x1, policy_model tiny 128x2. The weak oracle's token rewards
                 select the strong policy's tokens (same tokenizer, so the transfer is the identity).
- same-size:     reference = policy_model = tiny 128x2 (the oracle is as large as the policy).
- context rows:  dpo on the 128x2 policy (no oracle at all), and sepo on a 32x1 policy with its 32x1 oracle
                 (what the weak model reaches by itself).
Reported: the oracle's token AUROC (+key in chosen, -key in rejected, pooled), selection precision, and the
policy's true reward gain over its SFT start and KL to it. Both 128x2 starts are the same SFT run config (the
weak setting trains it as `policy_model`, the same-size one as `reference`); the table shows each start's own
true reward so a mismatch would be visible.

    python -m benchmarks.weak_to_strong            # 3 seeds
    python -m benchmarks.weak_to_strong --quick    # smoke run
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import (
    Stopwatch,
    answer_stats,
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
    stats,
    write_results,
)

METRICS = ("token_auroc", "selection_precision", "selection_precision_chance", "reward_gain", "kl",
           "mean_reward", "reference_reward", "trained_token_fraction", "train_seconds", "oracle_parameters",
           "policy_parameters", "answer_tokens", "eos_fraction")


def settings(weak: tuple[int, int], strong: tuple[int, int]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, overrides) of each setting."""
    w, s = size_name(weak), size_name(strong)
    return [
        (f"weak oracle {w} -> policy {s}", "sepo",
         {**model_overrides("reference", weak), **model_overrides("policy_model", strong)}),
        (f"same-size oracle {s} -> policy {s}", "sepo",
         {**model_overrides("reference", strong), **model_overrides("policy_model", strong)}),
        (f"dpo, policy {s} (no oracle)", "dpo",
         {**model_overrides("reference", strong), **model_overrides("policy_model", strong)}),
        (f"oracle {w} -> policy {w} (weak alone)", "sepo",
         {**model_overrides("reference", weak), **model_overrides("policy_model", weak)}),
    ]


def measure(args: Any, label: str, method: str, extra: dict[str, Any], seed: int) -> dict[str, Any]:
    cfg = make_config(args, seed_overrides(seed), {"generate.n": args.samples}, extra)
    result = run_upto(cfg, "evaluate", method)
    evaluation = result.metrics
    policy_dir = input_dir(result.path, "model")
    policy = manifest_metrics(policy_dir)
    row: dict[str, Any] = {"label": label, "method": method, "seed": seed, "cached": result.cached,
                           "seconds_this_run": round(result.seconds, 1), "evaluate_dir": str(result.path),
                           "policy_parameters": policy.get("parameters"), "train_seconds": policy.get("seconds"),
                           "trained_token_fraction": policy.get("trained_token_fraction"), "oracle_parameters": None,
                           "token_auroc": None, "selection_precision": None, "selection_precision_chance": None}
    if method == "sepo":  # policy <- selection <- scores <- oracle
        select_dir = input_dir(policy_dir, "selection")
        scores_dir = input_dir(select_dir, "scores")
        select, score = manifest_metrics(select_dir), manifest_metrics(scores_dir)
        row.update({"oracle_parameters": manifest_metrics(input_dir(scores_dir, "oracle")).get("parameters"),
                    "token_auroc": score.get("token_auroc"),
                    **{name: select.get(name) for name in ("selection_precision", "selection_precision_chance")}})
    row.update({name: evaluation.get(name)
                for name in ("reward_gain", "kl", "mean_reward", "reference_reward", "answer_tokens")})
    row["eos_fraction"] = answer_stats(result.path)["eos_fraction"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--weak", default="32x1", help="weak oracle size, hidden x layers (default 32x1)")
    parser.add_argument("--strong", default="128x2", help="policy size, hidden x layers (default 128x2)")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out prompt (default 4)")
    args = parse_args(parser, argv)
    if args.quick:
        args.weak = "16x1" if args.weak == "32x1" else args.weak
        args.strong = "32x1" if args.strong == "128x2" else args.strong
        args.samples = min(args.samples, 2)
    weak, strong = parse_size(args.weak), parse_size(args.strong)
    plan = settings(weak, strong)
    clock = Stopwatch()

    runs = []
    for seed in range(args.seeds):
        for label, method, extra in plan:
            row = measure(args, label, method, extra, seed)
            runs.append(row)
            auroc = f"AUROC {row['token_auroc']:.3f} " if row["token_auroc"] is not None else ""
            progress(f"seed {seed} {label}: {auroc}reward gain {row['reward_gain']:+.3f} KL {row['kl']:.2f} "
                     f"({'cached' if row['cached'] else 'ran'} {row['seconds_this_run']:.0f}s)")

    groups = []
    for label, method, _ in plan:
        group = [r for r in runs if r["label"] == label]
        groups.append({"label": label, "method": method, **{name: stats(r[name] for r in group) for name in METRICS}})

    def params(stat: dict[str, Any]) -> str:
        return f"{stat['mean'] / 1e3:.0f}k" if stat["n"] else "-"

    headers = ["setting", "oracle params", "policy params", "oracle AUROC", "precision@0.3 (chance)",
               "reward gain", "KL to start", "answer tokens", "ended (EOS)", "start's reward", "train s"]
    rows = [[g["label"], params(g["oracle_parameters"]) if g["method"] == "sepo" else "-",
             params(g["policy_parameters"]), pm(g["token_auroc"]),
             f"{pm(g['selection_precision'])} ({g['selection_precision_chance']['mean']:.3f})"
             if g["selection_precision"]["n"] else "-",
             pm(g["reward_gain"], 2), pm(g["kl"], 1), f"{g['answer_tokens']['mean']:.1f}",
             f"{g['eos_fraction']['mean']:.2f}", pm(g["reference_reward"], 2), pm(g["train_seconds"], 0)]
            for g in groups]
    print(f"\nWeak-to-strong (mean ± std over {args.seeds} seed(s), {args.samples} answers per held-out prompt)")
    print(markdown_table(headers, rows))

    weak_run, same_run = plan[0][0], plan[1][0]
    by_key = {(r["label"], r["seed"]): r for r in runs}
    gap = stats(by_key[(weak_run, s)]["reward_gain"] - by_key[(same_run, s)]["reward_gain"]
                for s in range(args.seeds))
    path = write_results("weak_to_strong", {
        "settings": {"weak": size_name(weak), "strong": size_name(strong), "seeds": args.seeds,
                     "samples_per_prompt": args.samples, "quick": args.quick, "runs_dir": args.runs_dir,
                     "overrides": args.set, "threads": args.threads, "seconds": round(clock.seconds, 1)},
        "groups": groups, "paired_weak_minus_same_reward_gain": gap, "runs": runs,
    }, args.out_dir)
    print(f"\nweak minus same-size oracle, reward gain paired by seed: {pm(gap, 2)}")
    print(f"wrote {path} in {clock.seconds:.0f}s")
    g = {row["label"]: row for row in groups}
    w, s, d, alone = (g[label] for label, _, _ in plan)
    ratio = s["oracle_parameters"]["mean"] / max(1.0, w["oracle_parameters"]["mean"])
    print(f"SUMMARY weak_to_strong: {size_name(weak)} oracle ({ratio:.1f}x fewer params) AUROC {pm(w['token_auroc'])} "
          f"vs same-size {size_name(strong)} {pm(s['token_auroc'])}; {size_name(strong)} sepo policy reward gain "
          f"{pm(w['reward_gain'], 2)} (KL {w['kl']['mean']:.1f}) with the weak oracle vs {pm(s['reward_gain'], 2)} "
          f"(KL {s['kl']['mean']:.1f}) with the same-size one (paired diff {pm(gap, 2)}); dpo {pm(d['reward_gain'], 2)}"
          f" (KL {d['kl']['mean']:.1f}); weak policy alone {pm(alone['reward_gain'], 2)}; {args.seeds} seed(s), "
          f"{clock.seconds / 60:.1f} min "
          f"({sum(not r['cached'] for r in runs)}/{len(runs)} runs computed, the rest cached)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

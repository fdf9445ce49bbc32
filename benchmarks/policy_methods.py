"""Policy methods at equal steps and equal data, scored against the synthetic task's true token rewards.

Every method starts from the same SFT reference and trains on the same pairs for the same number of steps with
the same optimiser settings (policy.train); sepo reads the same oracle's token scores, selecting k = 0.1, 0.3,
0.5, 1.0 of the tokens per response (select.k_chosen = select.k_rejected = k). Then each policy answers the
held-out prompts and is evaluated against the truth:

- reward gain: mean true reward of the policy's answers minus the SFT reference's answers to the same prompts;
- KL: sequence-level KL(policy || reference) estimated on the policy's samples;
- trained tokens: the fraction of response tokens whose log-prob enters the loss;
- train wall time of the policy stage (from its manifest, so cached runs report the time they took).

The hyperparameters are the library's defaults for every method (policy.beta, simpo_beta, sepo_gamma, ...):
nothing here is tuned per method. Writes a reward-gain vs KL plot next to the JSON.

    python -m benchmarks.policy_methods                  # 9 methods x 3 seeds
    python -m benchmarks.policy_methods --sensitivity    # + 5 single-knob changes (oracle subset, lr, beta, scorer)
    python -m benchmarks.policy_methods --quick          # smoke run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
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

SEPO_KS = (0.1, 0.3, 0.5, 1.0)
OTHER_METHODS = ("dpo", "simpo", "tdpo1", "tdpo2", "selective_dpo")
EVAL_METRICS = ("reward_gain", "kl", "mean_reward", "reference_reward", "implicit_reward_accuracy", "answer_tokens")
POLICY_METRICS = ("trained_token_fraction", "seconds", "tokens_per_second", "steps")


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    sensitivity: bool = False
    """A knob moved away from the library default: reported apart from the equal-settings comparison."""
    oracle_as_sdpo_reference: bool = False
    """selective_dpo scored and anchored by this seed's oracle instead of the SFT reference."""


def variants(methods: list[str], ks: list[float], sensitivity: bool) -> list[Variant]:
    """Only sepo changes the selection, so every other method shares one scores/selection prefix."""
    out: list[Variant] = []
    for method in methods:
        if method == "sepo":
            out += [Variant(f"sepo@{k:g}", "sepo", {"select.k_chosen": k, "select.k_rejected": k}) for k in ks]
        else:
            out.append(Variant(method, method))
    if sensitivity:
        out += [
            Variant("sepo@0.3, oracle subset 0.1", "sepo", {"oracle.subset_fraction": 0.1}, True),
            Variant("sepo@0.3, oracle subset 1", "sepo", {"oracle.subset_fraction": 1.0}, True),
            Variant("sepo@0.3, lr 1e-4", "sepo", {"policy.train.lr": 1e-4}, True),
            Variant("dpo, beta 0.01", "dpo", {"policy.beta": 0.01}, True),
            Variant("selective_dpo, oracle as scorer", "selective_dpo", {}, True, oracle_as_sdpo_reference=True),
        ]
    return out


def measure(args: Any, variant: Variant, seed: int) -> dict[str, Any]:
    def config(extra: dict[str, Any]) -> Any:
        return make_config(args, seed_overrides(seed), model_overrides("reference", args.size),
                           model_overrides("policy_model", args.size), {"generate.n": args.samples}, extra)

    select_dir = run_upto(config(variant.overrides), "select").path
    oracle_dir = input_dir(input_dir(select_dir, "scores"), "oracle")
    extra = dict(variant.overrides)
    if variant.oracle_as_sdpo_reference:
        extra["policy.sdpo_reference"] = str(oracle_dir.resolve())
    result = run_upto(config(extra), "evaluate", variant.method)
    evaluation = result.metrics
    policy = manifest_metrics(input_dir(result.path, "model"))
    row: dict[str, Any] = {"label": variant.label, "method": variant.method, "seed": seed, "cached": result.cached,
                           "seconds_this_run": round(result.seconds, 1),
                           "batch_size": config(extra).policy.train.batch_size, "evaluate_dir": str(result.path),
                           "oracle_auroc": manifest_metrics(input_dir(select_dir, "scores")).get("token_auroc")}
    row.update({name: evaluation.get(name) for name in EVAL_METRICS})
    # The true reward is a sum over tokens, so a longer answer can earn more: report the per-token rate as well.
    row["reference_answer_tokens"] = answer_stats(result.path, "reference_generations")["answer_tokens"]
    row["eos_fraction"] = answer_stats(result.path)["eos_fraction"]
    row["reward_per_token"] = (evaluation["mean_reward"] / evaluation["answer_tokens"]
                               if evaluation.get("answer_tokens") else None)
    row.update({f"train_{name}" if name in ("seconds", "steps") else name: policy.get(name) for name in POLICY_METRICS})
    return row


STYLE = {"sepo": ("tab:red", "o"), "dpo": ("tab:blue", "s"), "simpo": ("tab:green", "^"),
         "tdpo1": ("tab:purple", "v"), "tdpo2": ("tab:orange", "D"), "selective_dpo": ("tab:brown", "P"),
         "ipo": ("tab:cyan", "X"), "tso": ("tab:olive", "*")}


def plot(groups: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Reward gain vs KL: one marker per method (mean, bars = std over seeds), faint dots per seed, sepo's k path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.4), dpi=130)
    for row in runs:
        color, marker = STYLE.get(row["method"], ("gray", "o"))
        ax.scatter(row["kl"], row["reward_gain"], s=16, alpha=0.25, color=color, marker=marker, linewidths=0)
    sepo = [g for g in groups if g["method"] == "sepo"]
    if len(sepo) > 1:
        ax.plot([g["kl"]["mean"] for g in sepo], [g["reward_gain"]["mean"] for g in sepo], color="tab:red",
                alpha=0.4, linewidth=1.2, zorder=1)
    legend_done: set[str] = set()
    for group in groups:
        x, y = group["kl"], group["reward_gain"]
        color, marker = STYLE.get(group["method"], ("gray", "o"))
        label = group["method"] if group["method"] not in legend_done else None
        legend_done.add(group["method"])
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=marker, markersize=7, capsize=3,
                    color=color, zorder=3, label=("sepo (k = selected fraction)" if label == "sepo" else label))
        if group["method"] == "sepo":
            ax.annotate(group["label"].split("@")[1].join(["k=", ""]), (x["mean"], y["mean"]),
                        textcoords="offset points", xytext=(6, -12), fontsize=8, color="tab:red")
    kls = [r["kl"] for r in runs if r["kl"] and r["kl"] > 0]
    log_x = bool(kls) and max(kls) / min(kls) > 20
    if log_x:
        ax.set_xscale("log")
    ax.axhline(0.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"KL(policy || SFT reference) per answer, nats{' (log scale)' if log_x else ''}; "
                  "left = closer to the reference")
    ax.set_ylabel("true reward gain over the SFT reference")
    ax.set_title(title, fontsize=9.5)
    ax.grid(alpha=0.35, which="major")
    ax.grid(alpha=0.12, which="minor")
    ax.legend(fontsize=8.5, loc="best", framealpha=0.85)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def summarize(plan: list[Variant], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = []
    for variant in plan:
        group = [r for r in runs if r["label"] == variant.label]
        summary = {"label": variant.label, "method": variant.method, "sensitivity": variant.sensitivity,
                   "overrides": variant.overrides, "train_steps": group[0]["train_steps"],
                   "batch_size": group[0]["batch_size"]}
        summary.update({name: stats(r[name] for r in group)
                        for name in (*EVAL_METRICS, "reward_per_token", "eos_fraction", "trained_token_fraction",
                                     "train_seconds",
                                     "tokens_per_second", "oracle_auroc")})
        gain, kl = summary["reward_gain"]["mean"], summary["kl"]["mean"]
        summary["gain_per_kl"] = gain / kl if kl and kl > 0 else None
        groups.append(summary)
    return groups


def table(groups: list[dict[str, Any]], *, with_oracle: bool = False) -> str:
    headers = ["method", "reward gain", "min..max gain", "KL to ref", "gain / KL", "answer tokens", "ended (EOS)",
               "reward / token", "implicit acc", "trained tokens", "train s", "steps x batch"]
    headers += ["oracle AUROC"] if with_oracle else []
    rows = [[g["label"], pm(g["reward_gain"]), f"[{g['reward_gain']['min']:+.2f}, {g['reward_gain']['max']:+.2f}]",
             pm(g["kl"], 2), f"{g['gain_per_kl']:.3f}" if g["gain_per_kl"] is not None else "-",
             f"{g['answer_tokens']['mean']:.1f}", f"{g['eos_fraction']['mean']:.2f}",
             f"{g['reward_per_token']['mean']:+.3f}",
             pm(g["implicit_reward_accuracy"], 2), f"{g['trained_token_fraction']['mean']:.2f}",
             pm(g["train_seconds"], 0), f"{g['train_steps']} x {g['batch_size']}"]
            + ([pm(g["oracle_auroc"]) if g["method"] == "sepo" else "-"] if with_oracle else []) for g in groups]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="sepo," + ",".join(OTHER_METHODS),
                        help="methods to compare (sepo expands to one run per --sepo-k)")
    parser.add_argument("--sepo-k", default=",".join(f"{k:g}" for k in SEPO_KS), help="sepo selection fractions")
    parser.add_argument("--size", default="64x2", help="reference = policy size, hidden x layers (default 64x2, "
                        "the demo's)")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out prompt (generate.n), for "
                        "less noisy reward and KL estimates (default 4)")
    parser.add_argument("--sensitivity", action="store_true", help="also run a few single-knob changes (oracle "
                        "subset, sepo lr, dpo beta, selective_dpo scored by the oracle), reported apart")
    args = parse_args(parser, argv)
    args.size = parse_size(args.size)
    if args.quick and args.size == (64, 2):
        args.size = (32, 1)
    if args.quick:
        args.samples = min(args.samples, 2)
    methods = [m for m in args.methods.split(",") if m]
    plan = variants(methods, [float(k) for k in args.sepo_k.split(",")], args.sensitivity)
    clock = Stopwatch()

    runs = []
    for seed in range(args.seeds):
        for variant in plan:
            row = measure(args, variant, seed)
            runs.append(row)
            progress(f"seed {seed} {variant.label}: reward gain {row['reward_gain']:+.3f} KL {row['kl']:.2f} "
                     f"({'cached' if row['cached'] else 'ran'} {row['seconds_this_run']:.0f}s)")

    groups = summarize(plan, runs)
    main_groups = [g for g in groups if not g["sensitivity"]]
    reference_reward = stats(r["reference_reward"] for r in runs if r["label"] == plan[0].label)
    reference_tokens = stats(r["reference_answer_tokens"] for r in runs if r["label"] == plan[0].label)
    print(f"\nPolicy methods, {size_name(args.size)} tiny Llama, equal steps and data, library defaults (mean ± std "
          f"over {args.seeds} seed(s); the SFT reference's answers: true reward {pm(reference_reward, 2)}, "
          f"{reference_tokens['mean']:.1f} tokens; {args.samples} answers per held-out prompt)")
    print(table(main_groups))
    sensitivity = [g for g in groups if g["sensitivity"]]
    if sensitivity:
        print("\nSensitivity: one knob moved from the defaults (not an equal-settings comparison)")
        print(table(sensitivity, with_oracle=True))

    paired = paired_difference(runs, "sepo@0.3", "dpo")
    if paired:
        print(f"\nsepo@0.3 minus dpo, paired by seed: reward gain {pm(paired['reward_gain'])} "
              f"(sepo ahead in {paired['wins']}/{paired['n']} seeds), KL {pm(paired['kl'], 2)}")

    out_dir = args.out_dir or RESULTS_DIR
    png = out_dir / "policy_methods.png"
    steps, batch = main_groups[0]["train_steps"], main_groups[0]["batch_size"]
    plot(main_groups, [r for r in runs if r["label"] in {g["label"] for g in main_groups}], png,
         f"selpo policy methods on the synthetic task: {size_name(args.size)} tiny Llama, {steps} steps x {batch} "
         f"pairs each, library defaults\nmean of {args.seeds} seed(s), bars = std, faint = single seeds; higher and "
         "further left is better")
    path = write_results("policy_methods", {
        "settings": {"methods": methods, "sepo_k": args.sepo_k, "size": size_name(args.size), "seeds": args.seeds,
                     "samples_per_prompt": args.samples, "quick": args.quick, "sensitivity": args.sensitivity,
                     "runs_dir": args.runs_dir, "overrides": args.set, "threads": args.threads,
                     "seconds": round(clock.seconds, 1), "plot": png.name},
        "reference_reward": reference_reward, "reference_answer_tokens": reference_tokens, "methods": groups,
        "paired_sepo0.3_minus_dpo": paired, "runs": runs,
    }, args.out_dir)
    print(f"\nwrote {path} and {png} in {clock.seconds:.0f}s")

    best = max(main_groups, key=lambda g: g["reward_gain"]["mean"])
    by_label = {g["label"]: g for g in main_groups}
    parts = [f"{g['label']} {g['reward_gain']['mean']:+.2f}/KL {g['kl']['mean']:.2g}" for g in main_groups]
    verdict = ""
    if paired:
        verdict = (f"; sepo@0.3 minus dpo {paired['reward_gain']['mean']:+.2f} ± {paired['reward_gain']['std']:.2f}"
                   f" (sepo ahead in {paired['wins']}/{paired['n']} seeds) at {paired['kl']['mean']:+.1f} KL")
    fastest = min(main_groups, key=lambda g: g["train_seconds"]["mean"])
    print(f"SUMMARY policy_methods: reward gain/KL (mean of {args.seeds} seed(s), {size_name(args.size)}): "
          + ", ".join(parts) + f"; best gain {best['label']} {pm(best['reward_gain'], 2)}{verdict}; fastest "
          f"{fastest['label']} {fastest['train_seconds']['mean']:.0f}s"
          + (f" vs dpo {by_label['dpo']['train_seconds']['mean']:.0f}s"
             if "dpo" in by_label and fastest["label"] != "dpo" else "")
          + f"; {clock.seconds / 60:.1f} min "
          f"({sum(not r['cached'] for r in runs)}/{len(runs)} runs computed, the rest cached)")
    return 0


def paired_difference(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Per-seed a - b (same task, same reference, same oracle): removes the between-seed spread."""
    by_seed = {(r["label"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if (a, r["seed"]) in by_seed and (b, r["seed"]) in by_seed})
    if not seeds:
        return None
    gain = [by_seed[(a, s)]["reward_gain"] - by_seed[(b, s)]["reward_gain"] for s in seeds]
    kl = [by_seed[(a, s)]["kl"] - by_seed[(b, s)]["kl"] for s in seeds]
    return {"a": a, "b": b, "n": len(seeds), "wins": sum(g > 0 for g in gain), "reward_gain": stats(gain),
            "kl": stats(kl)}


if __name__ == "__main__":
    raise SystemExit(main())

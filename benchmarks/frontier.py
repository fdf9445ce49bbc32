"""The reward–KL frontier: every method swept over its strength, on two synthetic tasks, 3 seeds.

Methods whose KL to the reference differs 30-fold at one setting cannot be compared by one point each. Here every
method trains at four learning rates (its strength knob; see LRS) from the same SFT reference, oracle, scores and
selection, each policy answers the
held-out prompts, and the true reward gain over the reference's answers is read against the sample KL(policy ||
reference). Per method and seed, the frontier is the upper envelope of its points, starting at the reference
itself (KL 0, gain 0), linearly interpolated; "reward at matched KL k" is that frontier at k (None when no point
of the method reaches k, so it never extrapolates).

Tasks: `binary` (the built-in demo task: key words +1 / -1) and `graded` (configs/graded.yaml: +-0.25/1/3, twice
the key density). Generation runs on transformers here, so the numbers do not depend on whether a vLLM venv exists.

    python -m benchmarks.frontier                 # 2 tasks x 9 methods x 4 learning rates x 3 seeds
    python -m benchmarks.frontier --quick         # smoke run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    Stopwatch,
    answer_stats,
    base_parser,
    make_config,
    markdown_table,
    parse_args,
    pm,
    progress,
    run_upto,
    seed_overrides,
    stats,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"binary": None, "graded": str(ROOT / "configs" / "graded.yaml")}
LRS = {"dpo_family": (2.5e-4, 5e-4, 1e-3, 2e-3), "reference_free": (3e-5, 1e-4, 2e-4, 5e-4)}
"""Every method is swept over the learning rate at its default strength: lr moves the KL far more than beta does
(measured: dpo at lr 5e-4, beta 0.01 / 0.03 / 0.1 / 0.3 -> KL 1.95 / 1.46 / 1.17 / 0.74, all below KL 2; lr 1e-3 /
2e-3 / 5e-3 at beta 0.1 -> KL 2.9 / 14 / 47). The reference-free methods (no KL anchor in their loss) move much
further per step, so their grid is lower; both grids include the default lr 5e-4."""
BETA_METHODS = ("dpo", "sepo_dpo", "selective_dpo", "tdpo2", "tgdpo", "tis_dpo")
LR_METHODS = ("sepo", "confpo", "simpo")
MATCHED_KL = (1.0, 2.0, 5.0, 10.0)
SELECTIVE = ("sepo", "sepo_dpo", "selective_dpo", "tgdpo", "tis_dpo", "confpo")
"""The selective and token-weighted methods, each held against DPO at matched KL."""


@dataclass(frozen=True)
class Point:
    method: str
    knob: str
    value: float

    @property
    def overrides(self) -> dict[str, Any]:
        return {self.knob: self.value}


def points(methods: list[str], quick: bool) -> list[Point]:
    out = []
    for method in methods:
        lrs = LRS["reference_free" if method in LR_METHODS else "dpo_family"]
        out += [Point(method, "policy.train.lr", lr) for lr in (lrs[1:3] if quick else lrs)]
    return out


def measure(args: Any, task: str, seed: int, point: Point) -> dict[str, Any]:
    cfg = make_config(_with_config(args, TASKS[task]), seed_overrides(seed),
                      {"policy.methods": [point.method], "generate.backend": "transformers"}, point.overrides)
    result = run_upto(cfg, "evaluate", point.method)
    metrics = result.metrics
    return {"task": task, "seed": seed, "method": point.method, "knob": point.knob, "value": point.value,
            "kl": metrics.get("kl"), "reward_gain": metrics.get("reward_gain"), "eos_rate": metrics.get("eos_rate"),
            "answer_tokens": metrics.get("answer_tokens"), "implicit_accuracy": metrics.get("implicit_reward_accuracy"),
            "reference_eos_rate": answer_stats(result.path, "reference_generations")["eos_fraction"],
            "cached": result.cached, "seconds": round(result.seconds, 1)}


def _with_config(args: Any, config: str | None) -> Any:
    import copy

    out = copy.copy(args)
    out.config = config
    return out


def frontier(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Upper envelope (KL ascending, gain rising) of one method's points, from the reference (0, 0)."""
    envelope = [(0.0, 0.0)]
    for row in sorted((r for r in rows if r["kl"] is not None), key=lambda r: r["kl"]):
        if row["reward_gain"] > envelope[-1][1]:
            envelope.append((max(row["kl"], envelope[-1][0]), row["reward_gain"]))
    return envelope


def at_kl(envelope: list[tuple[float, float]], k: float, reached: float) -> float | None:
    """The frontier's reward at KL k; None when the method's points never reach k (no extrapolation)."""
    if k > reached:
        return None
    for (kl0, r0), (kl1, r1) in zip(envelope, envelope[1:]):
        if kl0 <= k <= kl1:
            return r0 + (r1 - r0) * (k - kl0) / (kl1 - kl0) if kl1 > kl0 else r1
    return envelope[-1][1]  # beyond the last rise: the best point within the budget


def matched(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[float, float | None]]:
    """(task, method, seed) -> {k: reward at matched KL k}."""
    out = {}
    keys = sorted({(r["task"], r["method"], r["seed"]) for r in rows})
    for task, method, seed in keys:
        own = [r for r in rows if (r["task"], r["method"], r["seed"]) == (task, method, seed)]
        reached = max((r["kl"] for r in own if r["kl"] is not None), default=0.0)
        envelope = frontier(own)
        out[(task, method, seed)] = {k: at_kl(envelope, k, reached) for k in MATCHED_KL}
    return out


def summarize(rows: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    table = matched(rows)
    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "dpo", m))
    summary: dict[str, Any] = {"matched_kl": {}, "beats_dpo": {}, "eos_rate": {}}
    for task in tasks:
        for method in methods:
            cells = {k: stats([table[(task, method, s)][k] for s in range(seeds) if (task, method, s) in table])
                     for k in MATCHED_KL}
            summary["matched_kl"][f"{task}/{method}"] = cells
            summary["eos_rate"][f"{task}/{method}"] = stats([r["eos_rate"] for r in rows
                                                             if r["task"] == task and r["method"] == method])
            if method in SELECTIVE:
                # (wins, seeds where both reach k): a KL DPO does not reach is no comparison at all.
                summary["beats_dpo"][f"{task}/{method}"] = {k: _wins(table, task, method, k, seeds) for k in MATCHED_KL}
    return summary


def _wins(table: dict[tuple[str, str, int], dict[float, float | None]], task: str, method: str, k: float,
          seeds: int) -> list[int]:
    """[seeds where the method gains more than DPO at KL k, seeds where both reach k]."""
    pairs = [(table.get((task, method, s), {}).get(k), table.get((task, "dpo", s), {}).get(k)) for s in range(seeds)]
    both = [(ours, dpo) for ours, dpo in pairs if ours is not None and dpo is not None]
    return [sum(1 for ours, dpo in both if ours > dpo), len(both)]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "dpo", m))
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            own = [r for r in rows if r["task"] == task and r["method"] == method and r["kl"] is not None]
            ax.scatter([r["kl"] for r in own], [r["reward_gain"] for r in own], s=12, alpha=0.35,
                       color=colors[method])
            seeds = sorted({r["seed"] for r in own})
            for seed in seeds:
                envelope = frontier([r for r in own if r["seed"] == seed])
                ax.plot(*zip(*envelope), color=colors[method], alpha=0.8, lw=1.6 if method == "dpo" else 1.1,
                        label=method if seed == seeds[0] else None)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL(policy || reference) per answer (nats)")
        ax.set_ylabel("true reward gain over the reference")
        ax.set_title(f"task: {task} (points: every setting and seed; lines: each seed's frontier)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(summary: dict[str, Any], seeds: int) -> str:
    lines = []
    for task in sorted({key.split("/")[0] for key in summary["matched_kl"]}):
        rows = []
        for key, cells in summary["matched_kl"].items():
            if not key.startswith(f"{task}/"):
                continue
            method = key.split("/", 1)[1]
            wins = summary["beats_dpo"].get(key)
            rows.append([method, *[pm(cells[k], 2) if cells[k]["n"] == seeds else
                                   (f"{pm(cells[k], 2)} ({cells[k]['n']}/{seeds} seeds reach it)" if cells[k]["n"]
                                    else "not reached") for k in MATCHED_KL],
                         " ".join(f"{wins[k][0]}/{wins[k][1]}" if wins[k][1] else "n/a" for k in MATCHED_KL)
                         if wins else "-",
                         pm(summary["eos_rate"][key], 2)])
        lines += [f"\ntask {task}: true reward gain at matched KL (mean ± std over seeds)",
                  markdown_table(["method", *[f"KL {k:g}" for k in MATCHED_KL],
                                  "beats dpo (seeds won / both reach, per KL)", "ends with EOS"], rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=[*BETA_METHODS, *LR_METHODS])
    parser.add_argument("--only-seed", type=int, default=None, help="run just this seed (to fill the shared stage "
                        "cache from parallel processes; a final run without it finds every run cached and summarizes)")
    args = parse_args(parser, argv)
    watch = Stopwatch()
    rows = []
    for task in args.tasks:
        for seed in ([args.only_seed] if args.only_seed is not None else range(args.seeds)):
            for point in points(args.methods, args.quick):
                row = measure(args, task, seed, point)
                rows.append(row)
                progress(f"{task} seed {seed} {point.method} {point.knob}={point.value:g}: KL {row['kl']:.2f}, "
                         f"gain {row['reward_gain']:+.2f}, EOS {row['eos_rate']:.2f}"
                         f"{' (cached)' if row['cached'] else ''}")
    summary = summarize(rows, args.seeds)
    out_dir = args.out_dir or RESULTS_DIR
    plot(rows, out_dir / "frontier.png")
    text = report(summary, args.seeds)
    write_results("frontier", {"rows": rows, "summary": {"matched_kl": {k: {str(kk): v for kk, v in cells.items()}
                                                                        for k, cells in summary["matched_kl"].items()},
                                                         "beats_dpo": {k: {str(kk): v for kk, v in c.items()}
                                                                       for k, c in summary["beats_dpo"].items()},
                                                         "eos_rate": summary["eos_rate"]},
                               "report": text, "seconds": round(watch.seconds, 1)}, args.out_dir)
    print(text)
    print(f"\nSUMMARY frontier: {len(rows)} runs in {watch.seconds / 60:.0f} min; plot {out_dir / 'frontier.png'}")


if __name__ == "__main__":
    main()

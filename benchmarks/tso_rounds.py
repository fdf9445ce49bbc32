"""TSO on the synthetic task: ground-truth reward per round for TSO (3 rounds) vs ONE round of DPO on the same
number of judged pairs and the same number of optimizer steps, plus TSO with a tight dual clip.

Every variant starts from the same SFT reference (the quality benchmarks' shared one: same runs dir and name) and
uses the same judge (the ground truth), model matrix (the moving policy + the fixed SFT model + the dataset's human
chosen responses) and pairing (best vs worst, 2 pairs per prompt):

- tso: `rounds` rounds of `prompts` fresh prompts, `steps` optimizer steps each, dual-clip loss with the config's
  bounds; each round starts from and is anchored to the previous round's policy;
- dpo x1: one round in which the START policy answers all training prompts, capped to exactly the number of pairs
  TSO trained on in total, `rounds * steps` steps (one LR schedule instead of three), plain DPO;
- tso tight clip: tso with |bounds| = --tight-clip, to show the clip when it binds (with beta 0.1 the default
  bounds +-5 need a log-ratio of 50 nats, which these runs never reach: there tso is iterative DPO).

True reward: mean over the held-out prompts x `generate.n` samples of the policy's answers (temperature 1).

    python -m benchmarks.tso_rounds            # 1 seed, a few minutes on 2 quiet CPU cores
    python -m benchmarks.tso_rounds --seeds 3  # mean +- std over seeds
    python -m benchmarks.tso_rounds --quick    # smoke run
Writes benchmarks/results/tso_rounds.json.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from benchmarks.common import (
    base_parser,
    make_config,
    markdown_table,
    parse_args,
    pm,
    progress,
    seed_overrides,
    stats,
    write_results,
)
from selpo_core import artifacts, tso

CURVE_KEYS = ("round", "n_prompts", "n_pairs", "n_corrected", "true_reward", "reward_gain", "kl_to_initial",
              "implicit_accuracy", "train_loss")


def run_variant(args: Any, seed: int, tso_changes: dict[str, Any], policy_changes: dict[str, Any]) -> dict[str, Any]:
    steps = 4 if args.quick else args.steps
    train = {"policy.train.max_steps": steps, "policy.train.batch_size": 8 if args.quick else 16,
             "policy.train.warmup_steps": 0 if args.quick else 5}
    cfg = make_config(args, seed_overrides(seed), {"generate.n": args.samples, "generate.backend": "transformers"},
                      train, policy_changes)
    tso_cfg = tso.TSOConfig(**{"rounds": args.rounds, "prompts_per_round": 12 if args.quick else args.prompts,
                               "generators": ("initial",), "samples_per_model": 2, "pairs_per_prompt": 2,
                               "seed": seed, **tso_changes})
    tso.check_run(cfg, tso_cfg)
    if args.verbose:
        summary = tso.run_tso(cfg, tso_cfg)
    else:  # progress bars and warnings go to <runs_dir>/bench.log, as in the other quality benchmarks
        Path(cfg.runs_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.runs_dir) / "bench.log", "a") as log, contextlib.redirect_stderr(log):
            summary = tso.run_tso(cfg, tso_cfg)
    return {"curve": [{k: row.get(k) for k in CURVE_KEYS} for row in summary["rounds"]], "clip": summary["clip"],
            "loss": tso_cfg.loss, "steps_per_round": cfg.policy.train.max_steps, "tso": summary["tso"]}


def run_seed(args: Any, seed: int) -> dict[str, dict[str, Any]]:
    steps = 4 if args.quick else args.steps
    out = {"tso": run_variant(args, seed, {}, {})}
    total = sum(row["n_pairs"] for row in out["tso"]["curve"][1:])
    progress(f"seed {seed}: tso {args.rounds} rounds, {total} pairs")
    out["dpo_x1"] = run_variant(args, seed, {"rounds": 1, "loss": "dpo", "prompts_per_round": 0,
                                             "max_pairs_per_round": total},
                                {"policy.train.max_steps": args.rounds * steps})
    progress(f"seed {seed}: dpo x1, {out['dpo_x1']['curve'][1]['n_pairs']} pairs")
    out["tso_tight_clip"] = run_variant(args, seed, {}, {"policy.tso_chosen_reward_max": args.tight_clip,
                                                         "policy.tso_rejected_reward_min": -args.tight_clip})
    progress(f"seed {seed}: tso tight clip")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], default_seeds=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=96, help="prompts per TSO round (344 training prompts)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per TSO round (16 pairs each)")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out prompt for the true reward")
    parser.add_argument("--tight-clip", type=float, default=0.5, help="|bound| of the tight-clip TSO variant")
    args = parse_args(parser, argv)
    # Stage keys hash selpo_core's sources at every lookup: pin them for this process, so an edit made while the
    # benchmark runs cannot make a later variant miss the shared task/SFT stages and silently recompute them.
    artifacts.code_version = functools.cache(artifacts.code_version)

    per_seed = [run_seed(args, seed) for seed in range(args.seeds)]
    names = {"tso": f"TSO x{args.rounds}", "dpo_x1": "DPO x1, same pairs",
             "tso_tight_clip": f"TSO x{args.rounds}, clip +-{args.tight_clip:g}"}
    rows, aggregate = [], {}
    for key, name in names.items():
        for r in range(len(per_seed[0][key]["curve"])):
            cells = {metric: stats(seed[key]["curve"][r][metric] for seed in per_seed)
                     for metric in ("n_pairs", "n_corrected", "true_reward", "reward_gain", "kl_to_initial")}
            aggregate.setdefault(key, []).append({"round": r, **cells})
            rows.append([name, r, pm(cells["n_pairs"], 0), pm(cells["n_corrected"], 0), pm(cells["true_reward"]),
                         pm(cells["reward_gain"]), pm(cells["kl_to_initial"])])
    table = markdown_table(["variant", "round", "pairs", "corrected", "true reward", "gain vs SFT", "KL to SFT"], rows)
    final = {key: aggregate[key][-1] for key in names}
    first = per_seed[0]["tso"]
    summary = (f"summary: true reward {aggregate['tso'][0]['true_reward']['mean']:.3f} (SFT) -> "
               f"TSO x{args.rounds} {final['tso']['true_reward']['mean']:.3f} "
               f"(KL {final['tso']['kl_to_initial']['mean']:.2f})"
               f" vs DPO x1 {final['dpo_x1']['true_reward']['mean']:.3f} "
               f"(KL {final['dpo_x1']['kl_to_initial']['mean']:.2f}) on the same "
               f"{final['dpo_x1']['n_pairs']['mean']:.0f} pairs and {args.rounds * first['steps_per_round']} steps; "
               f"tight clip {final['tso_tight_clip']['true_reward']['mean']:.3f}; {args.seeds} seed(s)")
    path = write_results("tso_rounds", {"settings": {"rounds": args.rounds, "prompts_per_round": args.prompts,
                                                     "steps_per_round": first["steps_per_round"],
                                                     "samples": args.samples, "tight_clip": args.tight_clip,
                                                     "seeds": args.seeds, "quick": args.quick},
                                        "clip_default": first["clip"], "aggregate": aggregate, "per_seed": per_seed,
                                        "table": table, "summary": summary}, args.out_dir)
    print(table)
    print(f"{summary}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TSO (Chen et al., arXiv 2409.02118): iterative self-training on pairs a judge builds from a model matrix.

One round r = four cached stages on top of the pipeline's own (docs/TSO.md):
  prompts    a fresh seeded slice of the training prompts         -> tso_round{r}_prompts-<key>/prompts.jsonl
  candidates every generator of the matrix answers them (the current policy always; `initial` = the SFT start;
             any model dir or hub id), plus the dataset's human chosen responses -> candidates.jsonl
  pairs      the judge (ground truth, a reward model, or a label file) ranks each prompt's candidates; pairs come
             from the ranking; feedback correction flags the pairs whose order the policy's own implicit reward
             beta * log(pi / pi_ref) gets wrong -> pairs.jsonl (TRL standard) + train.jsonl/heldout.jsonl
  train      `stages.train_policy(cfg, "tso", pairs_dir, policy, reference=policy)`: the dual-clip loss of
             losses.py with policy.tso_chosen_reward_max / tso_rejected_reward_min -> policy_tso_round{r}-<key>/
After a round the reference becomes the latest policy. `run_tso` loops over rounds without Prefect; every stage
goes through `stages.run_stage`, so finished rounds are reused and `stages.planned_dir` works on each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from selpo_core import stages
from selpo_core.artifacts import StageOutput, atomic_write_json, read_manifest
from selpo_core.config import ConfigError, RunConfig, TSOConfig, load_run_config, replace, to_dict
from selpo_core.tso_judge import implicit_rewards, judge_scores, pairs_from_ranking

log = logging.getLogger("selpo.tso")

INITIAL = "initial"
"""Generator alias: the round-0 policy (the SFT start), a fixed member of the matrix next to the moving policy."""


def _fields(tso_cfg: TSOConfig, *names: str) -> dict[str, Any]:
    # Each stage keys on the TSO fields it reads, so e.g. a new judge re-runs pairs and training, not generation.
    return {name: to_dict(tso_cfg)[name] for name in names}


def load_tso_run(path: str | Path | None = None,
                 overrides: list[str] | dict[str, Any] | None = None) -> tuple[RunConfig, TSOConfig]:
    """The run config and its `tso:` section from one YAML (+ overrides such as `tso.rounds=2`)."""
    cfg = load_run_config(path, overrides)
    check_run(cfg, cfg.tso)
    return cfg, cfg.tso


def check_run(cfg: RunConfig, tso_cfg: TSOConfig) -> None:
    """What only the whole run can tell, checked before any compute."""
    if tso_cfg.judge == "truth" and cfg.data.path:
        raise ConfigError("tso.judge='truth' needs the synthetic task (data.path empty); with your own data use "
                          "tso.judge=reward_model or labels")


def round_label(round_index: int) -> str:
    return f"tso_round{round_index}"


# ------------------------------------------------------------------------------------------------ prompts


def _prompt_text(prompt: Any) -> str:
    """Generation answers one user turn: a string prompt, or a conversation that is exactly one user message."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    raise ValueError("TSO generates candidates for single-turn prompts; a prompt with roles "
                     f"{[m['role'] for m in prompt]} cannot be answered by the generate stage")


def _prompt_id(prompt: Any) -> str:
    return "p" + hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12]


def round_prompts(cfg: RunConfig, tso_cfg: TSOConfig, round_index: int, data_dir: Path) -> Path:
    """prompts.jsonl ({id, prompt, content}) of round `round_index`: disjoint slices of one seeded permutation."""
    section = {"tso": _fields(tso_cfg, "prompts_per_round", "seed")}

    def body(out: StageOutput) -> None:
        unique = list({_prompt_id(e.prompt): e.prompt for e in stages.read_examples(data_dir / "train.jsonl")}.items())
        random.Random(f"tso-prompts:{tso_cfg.seed}").shuffle(unique)
        k = tso_cfg.prompts_per_round or len(unique)
        start = ((round_index - 1) * k) % len(unique)
        picked = [unique[(start + i) % len(unique)] for i in range(min(k, len(unique)))]
        with open(out.file("prompts.jsonl"), "w") as handle:
            for pid, prompt in picked:  # `prompt` (text) is what generation reads; `content` keeps the data format
                handle.write(json.dumps({"id": pid, "prompt": _prompt_text(prompt), "content": prompt}) + "\n")
        out.metrics.update({"n_prompts": len(picked), "n_unique_prompts": len(unique),
                            "wrapped": round_index * k > len(unique)})

    return stages.run_stage(cfg, f"{round_label(round_index)}_prompts", section, {"data": data_dir}, body)


# --------------------------------------------------------------------------------------------- candidates


def generator_matrix(tso_cfg: TSOConfig, policy_dir: Path | str,
                     initial_dir: Path | str | None) -> list[tuple[str, str]]:
    """(name, model) of every generator: the policy first, then the configured ones (same model only once)."""
    matrix: list[tuple[str, str]] = [("policy", str(policy_dir))]
    for i, entry in enumerate(tso_cfg.generators):
        if entry == INITIAL:
            if initial_dir is None:
                raise ValueError("tso.generators names `initial` but no initial policy dir was given")
            name, model = INITIAL, str(initial_dir)
        else:
            name, model = f"g{i}-{Path(entry).name or entry}".replace("/", "-"), entry
        if not any(stages._same_model(model, other) for _, other in matrix):
            matrix.append((name, model))
    return matrix


def candidates(cfg: RunConfig, tso_cfg: TSOConfig, round_index: int, data_dir: Path, policy_dir: Path | str,
               prompts_path: Path, *, initial_dir: Path | str | None = None) -> Path:
    """candidates.jsonl: per prompt {id, prompt, candidates: [{text, source, ended}]} from the model matrix."""
    from selpo_core.benchmarks_io import read_generations
    from selpo_core.data import response_text
    from selpo_core.generate import generate_answers

    matrix = generator_matrix(tso_cfg, policy_dir, initial_dir)
    gen_cfg = replace(cfg.generate, prompts=str(prompts_path), benchmark="plain", n=tso_cfg.samples_per_model,
                      temperature=tso_cfg.temperature, seed=cfg.generate.seed + 1000 * tso_cfg.seed + round_index)
    section = {"tso": _fields(tso_cfg, "include_human", "samples_per_model", "temperature", "seed"),
               "generate": to_dict(gen_cfg), "generators": [name for name, _ in matrix]}
    inputs: dict[str, str | Path] = {"prompts": prompts_path, "data": data_dir}
    inputs.update({f"generator_{name}": model for name, model in matrix})

    def body(out: StageOutput) -> None:
        rows = [json.loads(line) for line in Path(prompts_path).read_text().splitlines() if line.strip()]
        by_id: dict[str, list[dict[str, Any]]] = {row["id"]: [] for row in rows}
        for i, (name, model) in enumerate(matrix):
            gen_dir = out.work_dir / "generators" / name
            # Each generator its own sample stream: two similar models with one seed give identical answers.
            stats = generate_answers(replace(gen_cfg, seed=gen_cfg.seed + 100 * i), stages._model_dir(model),
                                     str(prompts_path), gen_dir, model_name=name)
            out.metrics[f"generate_seconds/{name}"] = stats["seconds"]
            for record in read_generations(gen_dir / "generations.jsonl"):
                for sample, reasons in zip(record.answers, record.finish_reasons):
                    by_id[record.id].append({"text": sample[-1], "source": name, "ended": reasons[-1] == "eos"})
        if tso_cfg.include_human:
            human: dict[str, list[str]] = {}
            for example in stages.read_examples(data_dir / "train.jsonl"):
                human.setdefault(_prompt_id(example.prompt), []).append(response_text(example.chosen))
            for pid, texts in by_id.items():
                texts.extend({"text": t, "source": "human", "ended": True}
                             for t in list(dict.fromkeys(human.get(pid, [])))[: tso_cfg.samples_per_model])
        counts: Counter[str] = Counter()
        with open(out.file("candidates.jsonl"), "w") as handle:
            for row in rows:
                seen, kept = set(), []
                for cand in by_id[row["id"]]:
                    # An empty answer cannot be a pair side (data validation rejects it); a repeat adds nothing.
                    reason = "empty" if not cand["text"].strip() else "duplicate" if cand["text"] in seen else ""
                    counts[f"dropped_{reason}" if reason else f"from/{cand['source']}"] += 1
                    if not reason:
                        seen.add(cand["text"])
                        kept.append(cand)
                        counts["unfinished"] += not cand["ended"]
                handle.write(json.dumps({"id": row["id"], "prompt": row["content"], "candidates": kept}) + "\n")
        out.metrics.update({"n_prompts": len(rows), "n_candidates": sum(v for k, v in counts.items()
                                                                         if k.startswith("from/")), **counts})

    return stages.run_stage(cfg, f"{round_label(round_index)}_candidates", section, inputs, body)


# -------------------------------------------------------------------------------------------------- judge


def build_pairs(cfg: RunConfig, tso_cfg: TSOConfig, round_index: int, candidates_dir: Path, data_dir: Path,
                policy_dir: Path | str, reference_dir: Path | str) -> Path:
    """Judge, pair, correct. The dir is a data dir for `stages.train_policy` (train.jsonl, heldout.jsonl) and holds
    pairs.jsonl (TRL standard/conversational, as the data) and judgements.jsonl (scores, sources, implicit rewards,
    `corrected`: the policy preferred the judge's rejected answer, so the judge's label corrects it)."""
    from selpo_core.data import PreferenceExample, example_id

    section = {"tso": _fields(tso_cfg, "judge", "judge_path", "pairing", "pairs_per_prompt", "max_pairs_per_round",
                              "seed"), "beta": cfg.policy.beta, "data": to_dict(cfg.data)}
    inputs: dict[str, str | Path] = {"candidates": candidates_dir, "data": data_dir, "policy": policy_dir,
                                     "reference": reference_dir}
    if tso_cfg.judge_path:
        inputs["judge"] = tso_cfg.judge_path

    def body(out: StageOutput) -> None:
        rows = [json.loads(line) for line in (candidates_dir / "candidates.jsonl").read_text().splitlines()
                if line.strip()]
        flat = [(row["prompt"], cand["text"]) for row in rows for cand in row["candidates"]]
        scores = iter(judge_scores(tso_cfg.judge, tso_cfg.judge_path, data_dir, [p for p, _ in flat],
                                   [t for _, t in flat], cfg.evaluate.batch_size))
        judged: list[dict[str, Any]] = []
        n_unlabeled = 0
        for row in rows:
            scored = [(cand, score) for cand in row["candidates"] if (score := next(scores)) is not None]
            n_unlabeled += len(row["candidates"]) - len(scored)
            for c, r in pairs_from_ranking([s for _, s in scored], tso_cfg.pairing, tso_cfg.pairs_per_prompt):
                (chosen, c_score), (rejected, r_score) = scored[c], scored[r]
                prompt = row["prompt"]
                chosen_content = _response(prompt, chosen["text"])
                rejected_content = _response(prompt, rejected["text"])
                judged.append({"example_id": example_id(prompt, chosen_content, rejected_content),
                               "prompt": prompt, "chosen": chosen_content, "rejected": rejected_content,
                               "prompt_id": row["id"], "chosen_source": chosen["source"],
                               "rejected_source": rejected["source"], "chosen_score": c_score,
                               "rejected_score": r_score})
        judged = list({j["example_id"]: j for j in judged}.values())
        if tso_cfg.max_pairs_per_round and len(judged) > tso_cfg.max_pairs_per_round:
            keep = sorted(random.Random(f"tso-pairs:{tso_cfg.seed}:{round_index}").sample(
                range(len(judged)), tso_cfg.max_pairs_per_round))
            judged = [judged[i] for i in keep]
        if not judged:
            raise ValueError(f"TSO round {round_index}: the judge ranked no two candidates apart, so there are no "
                             "pairs (more samples_per_model, generators or include_human help)")
        examples = [PreferenceExample(j["example_id"], j["prompt"], j["chosen"], j["rejected"]) for j in judged]
        rewards = implicit_rewards(cfg, policy_dir, reference_dir, examples)
        for j in judged:
            r_chosen, r_rejected = rewards.get(j["example_id"], (float("nan"), float("nan")))
            j.update({"implicit_chosen": r_chosen, "implicit_rejected": r_rejected,
                      "corrected": r_rejected > r_chosen, "policy_tie": r_rejected == r_chosen})
        _write_round_data(out, judged, data_dir)
        n = len(judged)
        n_corrected = sum(j["corrected"] for j in judged)
        implicit = [(j["implicit_chosen"], j["implicit_rejected"]) for j in judged
                    if math.isfinite(j["implicit_chosen"] - j["implicit_rejected"])]
        out.metrics.update({
            "n_prompts": len(rows), "n_candidates": len(flat), "n_unlabeled": n_unlabeled, "n_pairs": n,
            "n_corrected": n_corrected, "corrected_fraction": round(n_corrected / n, 4),
            "n_policy_ties": sum(j["policy_tie"] for j in judged),
            "judge_margin": round(sum(j["chosen_score"] - j["rejected_score"] for j in judged) / n, 4),
            # How far the policy already moved: what the dual-clip bounds (policy.tso_*) are compared with.
            "implicit_margin": round(sum(c - r for c, r in implicit) / max(1, len(implicit)), 4),
            "implicit_abs_max": round(max((max(abs(c), abs(r)) for c, r in implicit), default=0.0), 4),
            **{f"chosen_from/{k}": v for k, v in Counter(j["chosen_source"] for j in judged).items()},
            **{f"rejected_from/{k}": v for k, v in Counter(j["rejected_source"] for j in judged).items()},
        })

    return stages.run_stage(cfg, f"{round_label(round_index)}_pairs", section, inputs, body)


def _response(prompt: Any, text: str) -> Any:
    """A response in the data's own format: a string, or one assistant message after a conversational prompt."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _write_round_data(out: StageOutput, judged: list[dict[str, Any]], data_dir: Path) -> None:
    with open(out.file("pairs.jsonl"), "w") as pairs, open(out.file("train.jsonl"), "w") as train, \
            open(out.file("judgements.jsonl"), "w") as judgements:
        for j in judged:
            pairs.write(json.dumps({k: j[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
            train.write(json.dumps({k: j[k] for k in ("example_id", "prompt", "chosen", "rejected")} | {"row": -1})
                        + "\n")
            judgements.write(json.dumps(j) + "\n")
    # The held-out pairs, prompts and task stay the pipeline's, so evaluation of every round measures the same.
    for name in ("heldout.jsonl", "prompts.jsonl", "task.json"):
        if (data_dir / name).is_file():
            out.file(name).write_bytes((data_dir / name).read_bytes())


# -------------------------------------------------------------------------------------------------- train


def train_round_args(tso_cfg: TSOConfig, round_index: int, pairs_dir: Path,
                     policy_dir: Path | str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`stages.train_policy`'s arguments for a round: start from the policy, anchored to it (the new reference)."""
    return (tso_cfg.loss, pairs_dir, policy_dir, policy_dir, None, None), {"label": round_label(round_index)}


def train_round(cfg: RunConfig, tso_cfg: TSOConfig, round_index: int, pairs_dir: Path,
                policy_dir: Path | str) -> Path:
    args, kwargs = train_round_args(tso_cfg, round_index, pairs_dir, policy_dir)
    if tso_cfg.fail_round == round_index:
        # The pipeline's own injection: it raises inside the stage only when the stage would really run.
        cfg = replace(cfg, fail_stage="policy")
    return stages.train_policy(cfg, *args, **kwargs)


# -------------------------------------------------------------------------------------------------- loop


def initial_stages(cfg: RunConfig) -> dict[str, Any]:
    """task, data, SFT reference, policy start: the same stages (and dirs) as the main pipeline's."""
    task_dir = stages.make_synthetic(cfg) if not cfg.data.path else None
    data_dir = stages.prepare_data(cfg, task_dir)
    reference_dir = stages.sft(cfg, data_dir, task_dir, "reference") if cfg.sft.enabled else cfg.reference.path
    init_dir = stages.policy_init(cfg, data_dir, task_dir, reference_dir)
    return {"task_dir": task_dir, "data_dir": data_dir, "reference_dir": reference_dir, "init_dir": init_dir}


def run_round(cfg: RunConfig, tso_cfg: TSOConfig, round_index: int, data_dir: Path, policy_dir: Path | str,
              anchor_dir: Path | str, initial_dir: Path | str, reference_generations: Path) -> dict[str, str]:
    """One round; `anchor_dir` is the reference `policy_dir` was trained against (for feedback correction)."""
    prompts_dir = round_prompts(cfg, tso_cfg, round_index, data_dir)
    candidates_dir = candidates(cfg, tso_cfg, round_index, data_dir, policy_dir, prompts_dir / "prompts.jsonl",
                                initial_dir=initial_dir)
    pairs_dir = build_pairs(cfg, tso_cfg, round_index, candidates_dir, data_dir, policy_dir, anchor_dir)
    new_policy = train_round(cfg, tso_cfg, round_index, pairs_dir, policy_dir)
    label = round_label(round_index)
    generations = stages.generate(cfg, data_dir, new_policy, label)
    evaluation = stages.evaluate(cfg, data_dir, generations, reference_generations, new_policy, initial_dir, label)
    return {"prompts": str(prompts_dir), "candidates": str(candidates_dir), "pairs": str(pairs_dir),
            "policy": str(new_policy), "generations": str(generations), "evaluation": str(evaluation)}


def run_tso(cfg: RunConfig, tso_cfg: TSOConfig) -> dict[str, Any]:
    """All rounds without Prefect; finished stages (so finished rounds) are reused. Returns the summary."""
    start = initial_stages(cfg)
    check_run(cfg, tso_cfg)
    data_dir, init_dir = start["data_dir"], start["init_dir"]
    reference_generations = stages.generate(cfg, data_dir, init_dir, "reference")
    rounds, policy, anchor = [], init_dir, init_dir
    for r in range(1, tso_cfg.rounds + 1):
        dirs = run_round(cfg, tso_cfg, r, data_dir, policy, anchor, init_dir, reference_generations)
        rounds.append(dirs)
        row = round_metrics(dirs)
        log.info("TSO round %d: %d pairs, %d corrected, true reward %s, KL to initial %s", r, row["n_pairs"],
                 row["n_corrected"], row["true_reward"], row["kl_to_initial"])
        anchor, policy = policy, dirs["policy"]
    return write_summary(cfg, tso_cfg, rounds)


def round_metrics(dirs: dict[str, str]) -> dict[str, Any]:
    """One table row from a round's stage manifests."""
    pairs, train = read_manifest(dirs["pairs"])["metrics"], read_manifest(dirs["policy"])["metrics"]
    evaluation = read_manifest(dirs["evaluation"])["metrics"]
    return {"n_prompts": pairs["n_prompts"], "n_candidates": pairs["n_candidates"], "n_pairs": pairs["n_pairs"],
            "n_corrected": pairs["n_corrected"], "corrected_fraction": pairs["corrected_fraction"],
            "n_policy_ties": pairs["n_policy_ties"], "train_loss": train.get("loss"),
            "train_reward_accuracy": train.get("rewards/accuracies"),
            "true_reward": evaluation.get("mean_reward"), "reward_gain": evaluation.get("reward_gain"),
            "kl_to_initial": evaluation.get("kl"), "implicit_accuracy": evaluation.get("implicit_reward_accuracy"),
            "dirs": dirs}


def write_summary(cfg: RunConfig, tso_cfg: TSOConfig, rounds: list[dict[str, str]]) -> dict[str, Any]:
    """runs/<run>/tso_summary.json: the TSO config and one row per round (round 0: the starting policy)."""
    rows = [{"round": r, **round_metrics(dirs)} for r, dirs in enumerate(rounds, start=1)]
    if rows:
        start = read_manifest(rounds[0]["evaluation"])["metrics"].get("reference_reward")
        rows.insert(0, {"round": 0, "true_reward": start, "reward_gain": 0.0 if start is not None else None,
                        "kl_to_initial": 0.0})
    summary = {"run": cfg.name, "tso": to_dict(tso_cfg), "clip": {"chosen_reward_max": cfg.policy.tso_chosen_reward_max,
               "rejected_reward_min": cfg.policy.tso_rejected_reward_min}, "rounds": rows}
    atomic_write_json(cfg.run_dir / "tso_summary.json", summary)
    return summary


def format_rounds(summary: dict[str, Any]) -> str:
    """Markdown table of the per-round metrics."""
    def cell(value: Any, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)

    lines = ["| round | pairs | corrected | true reward | reward gain | KL to initial | implicit acc | train loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary["rounds"]:
        corrected = "-" if "n_corrected" not in row else f"{row['n_corrected']} ({row['corrected_fraction']:.0%})"
        lines.append(f"| {row['round']} | {cell(row.get('n_pairs'))} | {corrected} | {cell(row.get('true_reward'))} | "
                     f"{cell(row.get('reward_gain'))} | {cell(row.get('kl_to_initial'))} | "
                     f"{cell(row.get('implicit_accuracy'))} | {cell(row.get('train_loss'))} |")
    return "\n".join(lines)


__all__ = ["TSOConfig", "INITIAL", "load_tso_run", "check_run", "round_label", "round_prompts",
           "generator_matrix", "candidates", "judge_scores", "pairs_from_ranking", "implicit_rewards", "build_pairs",
           "train_round_args", "train_round", "initial_stages", "run_round", "run_tso", "round_metrics",
           "write_summary", "format_rounds"]

"""TSO's own stages (Chen et al., arXiv 2409.02118; docs/TSO.md): per round, a fresh slice of prompts, the model
matrix's candidate answers, and the judged pairs. Training, generation and evaluation of a round are the
pipeline's own policy / generate / evaluate stages (the graph chains them: stages/graph.py)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from selpo_core.artifacts import StageOutput
from selpo_core.config import RunConfig, TSOConfig, to_dict
from selpo_core.data import read_examples
from selpo_core.stages.plan import StageInput, StagePlan, external
from selpo_core.stages.prepare import data_metrics

INITIAL = "initial"
"""Generator alias: the round-0 policy (the SFT start), a fixed member of the matrix next to the moving policy."""


def round_label(round_index: int) -> str:
    return f"tso_round{round_index}"


def _fields(tso_cfg: TSOConfig, *names: str) -> dict[str, Any]:
    # Each stage keys on the TSO fields it reads, so e.g. a new judge re-runs pairs and training, not generation.
    return {name: to_dict(tso_cfg)[name] for name in names}


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


# ------------------------------------------------------------------------------------------------ prompts


def plan_prompts(cfg: RunConfig, round_index: int, data: StageInput) -> StagePlan:
    label = round_label(round_index)
    section = {"tso": _fields(cfg.tso, "prompts_per_round", "seed"), "round": round_index}
    return StagePlan(f"{label}_prompts", "tso_prompts", f"TSO round {round_index} · prompts", section,
                     {"data": data})


def run_prompts(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """prompts.jsonl ({id, prompt, content}) of one round: disjoint slices of one seeded permutation."""
    tso_cfg, round_index = cfg.tso, plan.section["round"]
    examples = read_examples(Path(inputs["data"]) / "train.jsonl")
    unique = list({_prompt_id(e.prompt): e.prompt for e in examples}.items())
    random.Random(f"tso-prompts:{tso_cfg.seed}").shuffle(unique)
    k = tso_cfg.prompts_per_round or len(unique)
    start = ((round_index - 1) * k) % len(unique)
    picked = [unique[(start + i) % len(unique)] for i in range(min(k, len(unique)))]
    with open(out.file("prompts.jsonl"), "w") as handle:
        for pid, prompt in picked:  # `prompt` (text) is what generation reads; `content` keeps the data format
            handle.write(json.dumps({"id": pid, "prompt": _prompt_text(prompt), "content": prompt}) + "\n")
    out.metrics.update({"n_prompts": len(picked), "n_unique_prompts": len(unique),
                        "wrapped": round_index * k > len(unique)})


# --------------------------------------------------------------------------------------------- candidates


def generator_matrix(tso_cfg: TSOConfig, policy: StageInput, initial: StageInput) -> list[tuple[str, StageInput]]:
    """(name, model) of every generator: the policy first, then the configured ones (the same model only once)."""
    matrix: list[tuple[str, StageInput]] = [("policy", policy)]
    for i, entry in enumerate(tso_cfg.generators):
        name, model = (INITIAL, initial) if entry == INITIAL else \
            (f"g{i}-{Path(entry).name or entry}".replace("/", "-"), external(entry, sub="model"))
        if all(model.fingerprint != other.fingerprint for _, other in matrix):
            matrix.append((name, model))
    return matrix


def candidates_config(cfg: RunConfig, round_index: int) -> Any:
    tso_cfg = cfg.tso
    return replace(cfg.generate, benchmark="plain", n=tso_cfg.samples_per_model, temperature=tso_cfg.temperature,
                   seed=cfg.generate.seed + 1000 * tso_cfg.seed + round_index)


def plan_candidates(cfg: RunConfig, round_index: int, data: StageInput, prompts: StageInput, policy: StageInput,
                    initial: StageInput) -> StagePlan:
    matrix = generator_matrix(cfg.tso, policy, initial)
    generate = {k: v for k, v in to_dict(candidates_config(cfg, round_index)).items()
                if k not in ("prompts", "vllm_python")}
    section = {"tso": _fields(cfg.tso, "include_human", "samples_per_model", "temperature", "seed"),
               "generate": generate, "generators": [name for name, _ in matrix], "round": round_index}
    inputs = {"prompts": replace(prompts, sub="prompts.jsonl"), "data": data}
    inputs.update({f"generator_{name}": model for name, model in matrix})
    return StagePlan(f"{round_label(round_index)}_candidates", "tso_candidates",
                     f"TSO round {round_index} · candidates", section, inputs)


def run_candidates(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """candidates.jsonl: per prompt {id, prompt, candidates: [{text, source, ended}]} from the model matrix."""
    from selpo_core.benchmarks_io import read_generations
    from selpo_core.data import response_text
    from selpo_core.generate import generate_answers

    gen_cfg = replace(candidates_config(cfg, plan.section["round"]), prompts=inputs["prompts"])
    rows = [json.loads(line) for line in Path(inputs["prompts"]).read_text().splitlines() if line.strip()]
    by_id: dict[str, list[dict[str, Any]]] = {row["id"]: [] for row in rows}
    for i, name in enumerate(plan.section["generators"]):
        gen_dir = out.work_dir / "generators" / name
        # Each generator its own sample stream: two similar models with one seed give identical answers.
        stats = generate_answers(replace(gen_cfg, seed=gen_cfg.seed + 100 * i), Path(inputs[f"generator_{name}"]),
                                 inputs["prompts"], gen_dir, model_name=name)
        out.metrics[f"generate_seconds/{name}"] = stats["seconds"]
        for record in read_generations(gen_dir / "generations.jsonl"):
            for sample, reasons in zip(record.answers, record.finish_reasons):
                by_id[record.id].append({"text": sample[-1], "source": name, "ended": reasons[-1] == "eos"})
    if cfg.tso.include_human:
        human: dict[str, list[str]] = {}
        for example in read_examples(Path(inputs["data"]) / "train.jsonl"):
            human.setdefault(_prompt_id(example.prompt), []).append(response_text(example.chosen))
        for pid, texts in by_id.items():
            texts.extend({"text": t, "source": "human", "ended": True}
                         for t in list(dict.fromkeys(human.get(pid, [])))[: cfg.tso.samples_per_model])
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
    n_candidates = sum(v for k, v in counts.items() if k.startswith("from/"))
    out.metrics.update({"n_prompts": len(rows), "n_candidates": n_candidates, **counts})


# -------------------------------------------------------------------------------------------------- pairs


def plan_pairs(cfg: RunConfig, round_index: int, candidates: StageInput, data: StageInput, policy: StageInput,
               anchor: StageInput) -> StagePlan:
    """Judge, pair, correct; `anchor` is the reference `policy` was trained against (its implicit reward)."""
    section = {"tso": _fields(cfg.tso, "judge", "pairing", "pairs_per_prompt", "max_pairs_per_round", "seed"),
               "beta": cfg.policy.beta, "round": round_index}
    inputs = {"candidates": candidates, "data": data, "policy": policy, "anchor": anchor}
    if cfg.tso.judge_path:
        inputs["judge"] = external(cfg.tso.judge_path)
    return StagePlan(f"{round_label(round_index)}_pairs", "tso_pairs", f"TSO round {round_index} · build pairs",
                     section, inputs)


def run_pairs(cfg: RunConfig, plan: StagePlan, inputs: dict[str, str], out: StageOutput) -> None:
    """A data dir for the round's policy stage (train.jsonl, heldout.jsonl) plus pairs.jsonl (TRL format, as the
    data) and judgements.jsonl (scores, sources, implicit rewards, `corrected`: the policy preferred the judge's
    rejected answer, so the judge's label corrects it)."""
    from selpo_core.data import PreferenceExample, example_id
    from selpo_core.tso_judge import judge_scores, pairs_from_ranking, policy_implicit_rewards

    tso_cfg, round_index = cfg.tso, plan.section["round"]
    data_dir = Path(inputs["data"])
    rows = [json.loads(line) for line in (Path(inputs["candidates"]) / "candidates.jsonl").read_text().splitlines()
            if line.strip()]
    flat = [(row["prompt"], cand["text"]) for row in rows for cand in row["candidates"]]
    scores = iter(judge_scores(tso_cfg.judge, inputs.get("judge", ""), data_dir, [p for p, _ in flat],
                               [t for _, t in flat], cfg.evaluate.batch_size))
    judged: list[dict[str, Any]] = []
    n_unlabeled = 0
    for row in rows:
        scored = [(cand, score) for cand in row["candidates"] if (score := next(scores)) is not None]
        n_unlabeled += len(row["candidates"]) - len(scored)
        for c, r in pairs_from_ranking([s for _, s in scored], tso_cfg.pairing, tso_cfg.pairs_per_prompt):
            (chosen, c_score), (rejected, r_score) = scored[c], scored[r]
            prompt = row["prompt"]
            chosen_content, rejected_content = _response(prompt, chosen["text"]), _response(prompt, rejected["text"])
            judged.append({"example_id": example_id(prompt, chosen_content, rejected_content), "prompt": prompt,
                           "chosen": chosen_content, "rejected": rejected_content, "prompt_id": row["id"],
                           "chosen_source": chosen["source"], "rejected_source": rejected["source"],
                           "chosen_score": c_score, "rejected_score": r_score})
    judged = list({j["example_id"]: j for j in judged}.values())
    if tso_cfg.max_pairs_per_round and len(judged) > tso_cfg.max_pairs_per_round:
        keep = sorted(random.Random(f"tso-pairs:{tso_cfg.seed}:{round_index}").sample(
            range(len(judged)), tso_cfg.max_pairs_per_round))
        judged = [judged[i] for i in keep]
    if not judged:
        raise ValueError(f"TSO round {round_index}: the judge ranked no two candidates apart, so there are no "
                         "pairs (more samples_per_model, generators or include_human help)")
    examples = [PreferenceExample(j["example_id"], j["prompt"], j["chosen"], j["rejected"]) for j in judged]
    same_model = plan.inputs["policy"].fingerprint == plan.inputs["anchor"].fingerprint
    rewards = policy_implicit_rewards(cfg, inputs["policy"], None if same_model else inputs["anchor"], examples,
                                      data_metrics(data_dir).get("data/prompt_template"))
    for j in judged:
        r_chosen, r_rejected = rewards.get(j["example_id"], (float("nan"), float("nan")))
        j.update({"implicit_chosen": r_chosen, "implicit_rejected": r_rejected,
                  "corrected": r_rejected > r_chosen, "policy_tie": r_rejected == r_chosen})
    _write_round_data(out, judged, data_dir)
    out.metrics.update(_pair_metrics(rows, flat, n_unlabeled, judged))


def _pair_metrics(rows: list[Any], flat: list[Any], n_unlabeled: int, judged: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(judged)
    n_corrected = sum(j["corrected"] for j in judged)
    implicit = [(j["implicit_chosen"], j["implicit_rejected"]) for j in judged
                if math.isfinite(j["implicit_chosen"] - j["implicit_rejected"])]
    return {
        "n_prompts": len(rows), "n_candidates": len(flat), "n_unlabeled": n_unlabeled, "n_pairs": n,
        "n_corrected": n_corrected, "corrected_fraction": round(n_corrected / n, 4),
        "n_policy_ties": sum(j["policy_tie"] for j in judged),
        "judge_margin": round(sum(j["chosen_score"] - j["rejected_score"] for j in judged) / n, 4),
        # How far the policy already moved: what the dual-clip bounds (policy.tso_*) are compared with.
        "implicit_margin": round(sum(c - r for c, r in implicit) / max(1, len(implicit)), 4),
        "implicit_abs_max": round(max((max(abs(c), abs(r)) for c, r in implicit), default=0.0), 4),
        **{f"chosen_from/{k}": v for k, v in Counter(j["chosen_source"] for j in judged).items()},
        **{f"rejected_from/{k}": v for k, v in Counter(j["rejected_source"] for j in judged).items()},
    }


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

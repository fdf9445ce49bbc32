"""The stage graph, written once: which stage feeds which, and the choices between them (the reference, the
policy's start, each method's anchor, whether a method reads stored reference log-probs).

`plan_graph(cfg)` plans every stage of a run without running anything. `run_graph(graph, targets, run)` runs the
targets and, first, whatever they need: `run` is `LocalRun` (library, CLI, notebooks, torchrun) or a Prefect
task submission (flows/). The SePO pipeline, `run_upto`, the stage flows, method comparisons and TSO's rounds
all run this one graph with different targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selpo_core.artifacts import is_complete, read_manifest
from selpo_core.config import ConfigError, ModelConfig, RunConfig
from selpo_core.objectives import NEEDS_REF_LOGPS
from selpo_core.stages.answers import plan_evaluate, plan_generate
from selpo_core.stages.checks import check_run
from selpo_core.stages.plan import StageInput, StagePlan, external, store_dir
from selpo_core.stages.prepare import plan_data, plan_synthetic
from selpo_core.stages.runner import LocalRun, remove_orphans
from selpo_core.stages.tokens import StoredLogps, plan_score, plan_select, plan_tis_weights, stored_logps
from selpo_core.stages.training import plan_oracle, plan_policy, plan_sft
from selpo_core.stages.tso import plan_candidates, plan_pairs, plan_prompts, round_label

Run = Callable[[StagePlan], Path]

GIVEN = ("data", "sft_reference", "policy_init", "oracle", "score", "select")
"""Nodes a user may replace by a directory of their own (the stage flows' *_dir parameters); also policy_<method>
and generate_<label>."""


@dataclass
class Graph:
    """The planned stages of one run, in pipeline order (a topological order)."""

    cfg: RunConfig
    given: dict[str, str]
    plans: dict[str, StagePlan] = field(default_factory=dict)
    refs: dict[str, StageInput] = field(default_factory=dict)
    """Every node as an input of later stages (a planned stage or a given dir), plus `reference`, `policy_init`."""
    methods: tuple[str, ...] = ()
    tso_rounds: int = 0

    def node(self, name: str, make: Callable[..., StagePlan], *args: Any, sub: str = "", **kwargs: Any) -> StageInput:
        """Plan stage `name` as `make(*args)` (unless the user gave a dir for it) and return it as an input of
        later stages (`sub`: the part of it they read, e.g. the weights in model/)."""
        if name in self.given:
            self.refs[name] = external(self.given[name], sub=sub)
        else:
            plan = make(*args, **kwargs)
            assert plan.name == name, (plan.name, name)
            self.plans[name] = plan
            self.refs[name] = plan.ref(sub)
        return self.refs[name]

    def deps(self, name: str) -> list[str]:
        by_dir = {plan.dirname: other for other, plan in self.plans.items()}
        return [by_dir[value.stage] for value in self.plans[name].inputs.values() if value.stage in by_dir]

    def is_complete(self, name: str) -> bool:
        return is_complete(store_dir(self.cfg.runs_dir) / self.plans[name].dirname)

    def pipeline_targets(self) -> list[str]:
        """Every stage of the SePO pipeline: a run leaves all of them complete (a deleted one is recomputed)."""
        return [name for name in self.plans if "tso_round" not in name]

    def tso_targets(self) -> list[str]:
        """The TSO run: the pipeline's start, the reference's answers and every round."""
        return ["generate_reference", *[f"evaluate_{round_label(r)}" for r in range(1, self.tso_rounds + 1)]]


def _given_model(graph: Graph, name: str) -> StageInput | None:
    return external(graph.given[name], sub="model") if name in graph.given else None


def _base(model_cfg: ModelConfig, task: StageInput | None, field_name: str, sft: bool) -> StageInput:
    """Where a model starts: its path, or (empty) a tiny model over the synthetic task's tokenizer (SFT only)."""
    if model_cfg.path:
        return external(model_cfg.path)
    if task is None or not sft:
        raise ConfigError(f"{field_name}.path is empty: set it to your model (a tiny model is built only for the "
                          "synthetic task with sft.enabled)")
    return task


def _given_logps(score_dir: str) -> dict[str, StoredLogps]:
    """A user's own scores dir as a source of its reference's and its oracle's log-probs."""
    manifest = read_manifest(score_dir)
    return {manifest["inputs"][role]["fingerprint"]: (StageInput(f"{column}:{manifest['key']}", path=score_dir),
                                                      column)
            for role, column in (("reference", "ref_logps"), ("oracle", "oracle_logps"))}


def plan_graph(cfg: RunConfig, *, methods: Sequence[str] | None = None, tso: bool = False,
               given: dict[str, str | None] | None = None) -> Graph:
    """Every stage of the run `cfg`: the pipeline for `methods` (default policy.methods), and TSO's rounds.

    Checks first everything the run will need (checks.py): a ConfigError lists every problem, one per line.
    """
    graph = Graph(cfg, {name: value for name, value in (given or {}).items() if value},
                  methods=tuple(methods or cfg.policy.methods), tso_rounds=cfg.tso.rounds if tso else 0)
    check_run(cfg, graph.methods, tso=tso)
    task = graph.node("synthetic", plan_synthetic, cfg) if not cfg.data.path else None
    separate_policy = "policy_init" in graph.given or cfg.policy_model != cfg.reference
    reference_base = _given_model(graph, "sft_reference") or _base(cfg.reference, task, "reference", cfg.sft.enabled)
    policy_base = (_given_model(graph, "policy_init") or _base(cfg.policy_model, task, "policy_model",
                                                               cfg.sft.enabled)) if separate_policy else None
    # The length rule is applied once, with every tokenizer the run uses (the oracle shares the reference's).
    tokenizers = {"reference": reference_base, **({"policy": policy_base} if policy_base else {})}
    data = graph.node("data", plan_data, cfg, task, tokenizers)
    if "sft_reference" in graph.given or not cfg.sft.enabled:
        reference = reference_base
    else:
        reference = graph.node("sft_reference", plan_sft, cfg, "reference", data, reference_base, sub="model")
    # The policy starts from the reference unless policy_model names another (e.g. larger) model.
    if policy_base is None:
        policy_init = reference
    elif "policy_init" in graph.given or not cfg.sft.enabled:
        policy_init = policy_base
    else:
        policy_init = graph.node("sft_policy_model", plan_sft, cfg, "policy_model", data, policy_base, sub="model")
    graph.refs.update(reference=reference, policy_init=policy_init)
    oracle = graph.node("oracle", plan_oracle, cfg, data, reference, sub="model")
    scores = graph.node("score", plan_score, cfg, data, oracle, reference)
    logps = stored_logps(graph.plans["score"]) if "score" in graph.plans else _given_logps(graph.given["score"])
    selection = graph.node("select", plan_select, cfg, data, scores, policy_init)
    token_values = {"tgdpo": (selection, "rewards", 1.0 / cfg.score.beta)}  # the oracle's raw token log-ratios
    if "tis_dpo" in graph.methods:  # TIS-DPO's contrastive pair: the same oracle trained on swapped labels
        reverse = graph.node("oracle_reverse", plan_oracle, cfg, data, reference, reverse=True, sub="model")
        reverse_scores = graph.node("score_reverse", plan_score, cfg, data, reverse, reference, reverse=True)
        weights = graph.node("tis_weights", plan_tis_weights, cfg, data, scores, reverse_scores, policy_init)
        token_values["tis_dpo"] = (weights, "weights", 1.0)
    reference_answers = graph.node("generate_reference", plan_generate, cfg, data, policy_init, "reference")
    for method in graph.methods:
        anchor = method_anchor(cfg, method, policy_init, oracle)
        # Stored log-probs serve a method only when they came from its own anchor (the reference or the oracle).
        stored = logps.get(anchor.fingerprint) if cfg.policy.ref_logps_from_scores else None
        policy = graph.node(f"policy_{method}", plan_policy, cfg, method, data, policy_init, anchor,
                            ref_logps=stored if method in NEEDS_REF_LOGPS else None, selection=selection,
                            token_values=token_values.get(method), sub="model")
        answers = graph.node(f"generate_{method}", plan_generate, cfg, data, policy, method)
        graph.node(f"evaluate_{method}", plan_evaluate, cfg, data, answers, reference_answers, policy, policy_init,
                   method)
    _plan_tso_rounds(graph, data, policy_init, reference_answers)
    return graph


def method_anchor(cfg: RunConfig, method: str, policy_init: StageInput, oracle: StageInput) -> StageInput:
    """The DPO family is anchored to the policy's own start. Selective-DPO's scorer and anchor must be a strong
    model (its paper: larger, or DPO-aligned): by default the oracle, or the model policy.sdpo_reference names."""
    if method == "selective_dpo":
        return external(cfg.policy.sdpo_reference, sub="model") if cfg.policy.sdpo_reference else oracle
    return policy_init


def _plan_tso_rounds(graph: Graph, data: StageInput, initial: StageInput, reference_answers: StageInput) -> None:
    """Round r trains from (and is anchored to) round r-1's policy; its pairs' feedback correction reads that
    policy's implicit reward against the reference it was trained with."""
    cfg = graph.cfg
    policy = anchor = initial
    for r in range(1, graph.tso_rounds + 1):
        label = round_label(r)
        prompts = graph.node(f"{label}_prompts", plan_prompts, cfg, r, data)
        candidates = graph.node(f"{label}_candidates", plan_candidates, cfg, r, data, prompts, policy, initial)
        pairs = graph.node(f"{label}_pairs", plan_pairs, cfg, r, candidates, data, policy, anchor)
        trained = graph.node(f"policy_{label}", plan_policy, cfg, cfg.tso.loss, pairs, policy, policy,
                             ref_logps=None, selection=None, label=label, title=f"TSO round {r} · train", sub="model")
        answers = graph.node(f"generate_{label}", plan_generate, cfg, data, trained, label,
                             title=f"TSO round {r} · generate")
        graph.node(f"evaluate_{label}", plan_evaluate, cfg, data, answers, reference_answers, trained, initial, label,
                   title=f"TSO round {r} · evaluate")
        anchor, policy = policy, trained


def run_graph(graph: Graph, targets: Sequence[str], run: Run) -> dict[str, Path]:
    """Run the targets and what they need, in pipeline order; return {stage name: dir} of every stage touched.

    A stage runs when it is not complete and a target needs it (through incomplete stages only: a finished
    policy does not re-train its oracle). Complete stages on the way are passed to `run` too, which reuses
    them at once (shown as cached), so a run's record lists every stage it stands on.
    """
    remove_orphans(graph.cfg.runs_dir)
    wanted = [name for name in targets if name in graph.plans]
    closure = _reachable(graph, wanted, lambda name: True)
    complete = {name: graph.is_complete(name) for name in closure}
    needed = _reachable(graph, [name for name in wanted if not complete[name]], lambda name: not complete[name])
    return {name: run(plan) for name, plan in graph.plans.items()
            if name in closure and (name in needed or complete[name])}


def _reachable(graph: Graph, start: list[str], follow: Callable[[str], bool]) -> set[str]:
    seen: set[str] = set()
    stack = list(start)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += [dep for dep in graph.deps(name) if follow(dep)]
    return seen


# ----------------------------------------------------------------------------------------- library entry points


STAGE_NODES = {"synthetic": "synthetic", "data": "data", "sft": "sft_reference", "oracle": "oracle", "score": "score",
               "select": "select", "policy": "policy_{method}", "generate": "generate_{method}",
               "evaluate": "evaluate_{method}"}
"""`python -m selpo_core.stages STAGE` -> the graph node it runs."""


def run_pipeline(cfg: RunConfig, run: Run | None = None) -> dict[str, Any]:
    """The whole SePO pipeline without Prefect; returns the summary (also runs/<run>/summary.json)."""
    from selpo_core import report

    local = run or LocalRun(cfg)
    graph = plan_graph(cfg)
    dirs = run_graph(graph, graph.pipeline_targets(), local)
    return report.write_summary(cfg, scores_dir=dirs["score"], selection_dir=dirs["select"],
                                evaluations={m: dirs[f"evaluate_{m}"] for m in graph.methods},
                                stages=getattr(local, "records", {}))


def run_upto(cfg: RunConfig, stage: str, method: str) -> Path:
    """Run (or reuse) stage `stage` (a STAGE_NODES name; `method` for policy/generate/evaluate) and what it needs."""
    if stage == "synthetic" and cfg.data.path:
        raise ConfigError("the synthetic stage runs only when data.path is empty")
    if stage == "sft" and not cfg.sft.enabled:
        raise ConfigError("sft.enabled is false: there is no SFT stage (reference.path is used as it is)")
    name = STAGE_NODES[stage].format(method=method)
    graph = plan_graph(cfg, methods=dict.fromkeys([*cfg.policy.methods, method]))
    return run_graph(graph, [name], LocalRun(cfg))[name]

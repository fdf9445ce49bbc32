"""One flow per stage, for users who bring their own artifacts or want one step at a time.

Every `*_dir` parameter is optional: given, it is used as is (your own data dir, SFT model, oracle, scores...)
in place of the stage that would make it; left empty, that input comes from the store, or is computed first if
it never was. Each flow returns its stage dir and publishes the stage's metrics, a link to its directory and,
for selection, the heatmap.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import flow_run_label
from selpo_core.config import POLICY_METHODS, ConfigError
from selpo_core.stages.answers import plan_generate
from selpo_core.stages.graph import Graph, plan_graph, run_graph
from selpo_core.stages.plan import external
from tasks.report import publish_stage
from tasks.stage import prefect_run, resolve_config, run_config

Overrides = dict[str, Any] | None


def _run_one(config: dict[str, Any], target: str, graph: Graph) -> str:
    """Run `target` (and what it needs) and publish its artifacts."""
    stage_dir = str(run_graph(graph, [target], prefect_run(config, {}))[target])
    publish_stage(config, stage_dir)
    return stage_dir


def _graph(config: dict[str, Any], methods: list[str] | None = None, **given: str | None) -> Graph:
    return plan_graph(run_config(config), methods=methods, given=given)


@flow(name="stage-data", flow_run_name=flow_run_label)
def data_flow(config_path: str | None = None, overrides: Overrides = None, run_name: str | None = None) -> str:
    """Validate and split the preference data (making the synthetic task first when data.path is empty)."""
    config = resolve_config(config_path, overrides, run_name)
    return _run_one(config, "data", _graph(config))


@flow(name="stage-sft", flow_run_name=flow_run_label)
def sft_flow(config_path: str | None = None, overrides: Overrides = None, data_dir: str | None = None,
             which: str = "reference", run_name: str | None = None) -> str:
    """SFT of the reference (which="reference") or of a separate policy model (which="policy_model")."""
    config = resolve_config(config_path, overrides, run_name)
    graph = _graph(config, data=data_dir)
    target = "sft_policy_model" if which == "policy_model" and "sft_policy_model" in graph.plans else "sft_reference"
    return _run_one(config, target, graph)


@flow(name="stage-train-oracle", flow_run_name=flow_run_label)
def oracle_flow(config_path: str | None = None, overrides: Overrides = None, data_dir: str | None = None,
                reference_dir: str | None = None, run_name: str | None = None) -> str:
    """Train the oracle (DPO from the reference on a subset of the pairs)."""
    config = resolve_config(config_path, overrides, run_name)
    return _run_one(config, "oracle", _graph(config, data=data_dir, sft_reference=reference_dir))


@flow(name="stage-score-tokens", flow_run_name=flow_run_label)
def score_flow(config_path: str | None = None, overrides: Overrides = None, oracle_dir: str | None = None,
               reference_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Score every response token with oracle vs reference log-probs."""
    config = resolve_config(config_path, overrides, run_name)
    return _run_one(config, "score", _graph(config, data=data_dir, sft_reference=reference_dir, oracle=oracle_dir))


@flow(name="stage-select-tokens", flow_run_name=flow_run_label)
def select_flow(config_path: str | None = None, overrides: Overrides = None, scores_dir: str | None = None,
                policy_init_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Select the key tokens from stored scores; publishes the token heatmap."""
    config = resolve_config(config_path, overrides, run_name)
    return _run_one(config, "select", _graph(config, data=data_dir, score=scores_dir, policy_init=policy_init_dir))


@flow(name="stage-train-policy", flow_run_name=flow_run_label)
def policy_flow(config_path: str | None = None, overrides: Overrides = None, method: str = "sepo",
                scores_dir: str | None = None, selection_dir: str | None = None, policy_init_dir: str | None = None,
                reference_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Train the policy with one method (sepo, dpo, ipo, simpo, selective_dpo, tdpo1, tdpo2, tso).

    The policy starts from (and, for the DPO family, is anchored to) `policy_init_dir`; `reference_dir` is the
    oracle's reference, used only if the scores must still be computed.
    """
    config = resolve_config(config_path, overrides, run_name)
    graph = _graph(config, [method], data=data_dir, sft_reference=reference_dir, score=scores_dir,
                   select=selection_dir, policy_init=policy_init_dir)
    return _run_one(config, f"policy_{method}", graph)


@flow(name="stage-generate", flow_run_name=flow_run_label)
def generate_flow(config_path: str | None = None, overrides: Overrides = None, label: str = "sepo",
                  model_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Answer the prompts with `model_dir`, or (empty) with the reference start / the policy of method `label`."""
    config = resolve_config(config_path, overrides, run_name)
    if label == "reference":
        graph = _graph(config, data=data_dir, policy_init=model_dir)
    elif label in POLICY_METHODS:
        graph = _graph(config, [label], data=data_dir, **{f"policy_{label}": model_dir})
    elif model_dir:  # any model, under a label of its own
        graph = _graph(config, data=data_dir)
        model = external(model_dir, sub="model")
        graph.node(f"generate_{label}", lambda: plan_generate(run_config(config), graph.refs["data"], model, label))
    else:
        raise ConfigError(f"label={label!r} is not a policy method: give model_dir, the model to answer with")
    return _run_one(config, f"generate_{label}", graph)


@flow(name="stage-evaluate", flow_run_name=flow_run_label)
def evaluate_flow(config_path: str | None = None, overrides: Overrides = None, method: str = "sepo",
                  model_dir: str | None = None, generations_dir: str | None = None,
                  reference_generations_dir: str | None = None, data_dir: str | None = None,
                  run_name: str | None = None) -> str:
    """Evaluate one method's policy and answers against the reference's answers."""
    config = resolve_config(config_path, overrides, run_name)
    graph = _graph(config, [method], data=data_dir, generate_reference=reference_generations_dir,
                   **{f"policy_{method}": model_dir, f"generate_{method}": generations_dir})
    return _run_one(config, f"evaluate_{method}", graph)


# `selpo stage NAME`: the stage names of `python -m selpo_core.stages`.
STAGE_FLOWS = {"data": data_flow, "sft": sft_flow, "oracle": oracle_flow, "score": score_flow,
               "select": select_flow, "policy": policy_flow, "generate": generate_flow, "evaluate": evaluate_flow}

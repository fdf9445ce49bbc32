"""One flow per stage, for users who bring their own artifacts or want one step at a time.

Every `*_dir` parameter is optional: given, it is used as is (your own data dir, SFT model, oracle, scores...);
left empty, that input comes from the run's cache, or is computed first if it never was. Each flow returns
its stage dir and publishes the stage's metrics, a link to its directory and, for selection, the heatmap.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.graph import StageGraph
from flows.pipeline import flow_run_label
from tasks import publish_stage
from tasks.common import resolve_config

Overrides = dict[str, Any] | None


def _finish(config: dict[str, Any], stage_dir: str) -> str:
    publish_stage(config, stage_dir)
    return stage_dir


@flow(name="stage-data", flow_run_name=flow_run_label)
def data_flow(config_path: str | None = None, overrides: Overrides = None, run_name: str | None = None) -> str:
    """Validate and split the preference data (making the synthetic task first when data.path is empty)."""
    config = resolve_config(config_path, overrides, run_name)
    return _finish(config, StageGraph(config).data_dir)


@flow(name="stage-sft", flow_run_name=flow_run_label)
def sft_flow(config_path: str | None = None, overrides: Overrides = None, data_dir: str | None = None,
             which: str = "reference", run_name: str | None = None) -> str:
    """SFT of the reference (which="reference") or of a separate policy model (which="policy_model")."""
    config = resolve_config(config_path, overrides, run_name)
    graph = StageGraph(config, given={"data_dir": data_dir})
    return _finish(config, graph.reference_dir if which == "reference" else graph.policy_init_dir)


@flow(name="stage-train-oracle", flow_run_name=flow_run_label)
def oracle_flow(config_path: str | None = None, overrides: Overrides = None, data_dir: str | None = None,
                reference_dir: str | None = None, run_name: str | None = None) -> str:
    """Train the oracle (DPO from the reference on a subset of the pairs)."""
    config = resolve_config(config_path, overrides, run_name)
    graph = StageGraph(config, given={"data_dir": data_dir, "reference_dir": reference_dir})
    return _finish(config, graph.oracle_dir)


@flow(name="stage-score-tokens", flow_run_name=flow_run_label)
def score_flow(config_path: str | None = None, overrides: Overrides = None, oracle_dir: str | None = None,
               reference_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Score every response token with oracle vs reference log-probs."""
    config = resolve_config(config_path, overrides, run_name)
    graph = StageGraph(config, given={"data_dir": data_dir, "reference_dir": reference_dir, "oracle_dir": oracle_dir})
    return _finish(config, graph.scores_dir)


@flow(name="stage-select-tokens", flow_run_name=flow_run_label)
def select_flow(config_path: str | None = None, overrides: Overrides = None, scores_dir: str | None = None,
                policy_init_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Select the key tokens from stored scores; publishes the token heatmap."""
    config = resolve_config(config_path, overrides, run_name)
    graph = StageGraph(config, given={"data_dir": data_dir, "scores_dir": scores_dir,
                                      "policy_init_dir": policy_init_dir})
    return _finish(config, graph.selection_dir)


@flow(name="stage-train-policy", flow_run_name=flow_run_label)
def policy_flow(config_path: str | None = None, overrides: Overrides = None, method: str = "sepo",
                scores_dir: str | None = None, selection_dir: str | None = None, policy_init_dir: str | None = None,
                reference_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Train the policy with one method (sepo, dpo, ipo, simpo, selective_dpo, tdpo1, tdpo2, tso).

    The policy starts from (and, for the DPO family, is anchored to) `policy_init_dir`; `reference_dir` is the
    oracle's reference, used only if the scores must still be computed.
    """
    config = resolve_config(config_path, overrides, run_name)
    graph = StageGraph(config, given={"data_dir": data_dir, "reference_dir": reference_dir, "scores_dir": scores_dir,
                                      "selection_dir": selection_dir, "policy_init_dir": policy_init_dir})
    return _finish(config, graph.policy_dir(method))


@flow(name="stage-generate", flow_run_name=flow_run_label)
def generate_flow(config_path: str | None = None, overrides: Overrides = None, label: str = "sepo",
                  model_dir: str | None = None, data_dir: str | None = None, run_name: str | None = None) -> str:
    """Answer the prompts with `model_dir`, or (empty) with the reference start / the policy of method `label`."""
    config = resolve_config(config_path, overrides, run_name)
    return _finish(config, StageGraph(config, given={"data_dir": data_dir}).generations_dir(label, model_dir))


@flow(name="stage-evaluate", flow_run_name=flow_run_label)
def evaluate_flow(config_path: str | None = None, overrides: Overrides = None, method: str = "sepo",
                  model_dir: str | None = None, generations_dir: str | None = None,
                  reference_generations_dir: str | None = None, data_dir: str | None = None,
                  run_name: str | None = None) -> str:
    """Evaluate one method's policy and answers against the reference's answers."""
    config = resolve_config(config_path, overrides, run_name)
    graph = StageGraph(config, given={"data_dir": data_dir, f"policy_dir[{method}]": model_dir,
                                      f"generations_dir[{method}]": generations_dir,
                                      "reference_generations_dir": reference_generations_dir})
    return _finish(config, graph.evaluation_dir(method))


# `selpo stage NAME`: the stage names of `python -m selpo_core.stages`.
STAGE_FLOWS = {"data": data_flow, "sft": sft_flow, "oracle": oracle_flow, "score": score_flow,
               "select": select_flow, "policy": policy_flow, "generate": generate_flow, "evaluate": evaluate_flow}

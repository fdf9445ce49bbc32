"""One flow per stage, for users who bring their own artifacts or want one step at a time.

Every `*_dir` parameter is optional: given, it is used as is (your own data dir, SFT model, oracle, scores...)
in place of the stage that would make it; left empty, that input comes from the store, or is computed first if
it never was. Each flow returns its stage dir and publishes the stage's metrics, a link to its directory and,
for selection, the heatmap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import flow

from flows.params import NO_OVERRIDES, Overrides, PolicyMethod, SftModel, Text, flow_run_label, resolve
from selpo_core.config import POLICY_METHODS, ConfigError
from selpo_core.stages.answers import plan_generate
from selpo_core.stages.graph import Graph, plan_graph, run_graph
from selpo_core.stages.plan import external
from tasks.report import publish_stage
from tasks.stage import prefect_run, run_config

COMMON_ARGS = """
        config_path: run config YAML, relative to the directory `selpo serve` runs in; empty: the built-in
            synthetic demo.
        overrides: config fields to change, e.g. {"policy.beta": 0.2}.
        run_name: the run's name (empty: the config's name); its results go to the folder of that name in runs_dir.
        data_dir: your own prepared data dir (a data stage's output); empty: from the store."""


F = TypeVar("F", bound=Callable[..., Any])


def documented(fn: F) -> F:
    """Add the shared parameters to a stage flow's `Args:` (Prefect shows them under the fields of the form)."""
    head, _, own = (fn.__doc__ or "").partition("Args:")
    fn.__doc__ = f"{head.rstrip()}\n\n    Args:{COMMON_ARGS}{own.rstrip()}\n    "
    return fn


def _run_one(config: dict[str, Any], target: str, graph: Graph) -> str:
    """Run `target` (and what it needs) and publish its artifacts."""
    stage_dir = str(run_graph(graph, [target], prefect_run(config, {}))[target])
    publish_stage(config, stage_dir)
    return stage_dir


def _graph(config: dict[str, Any], methods: list[str] | None = None, **given: str | None) -> Graph:
    return plan_graph(run_config(config), methods=methods, given=given)


@flow(name="stage-data", flow_run_name=flow_run_label)
@documented
def data_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, run_name: Text = "") -> str:
    """Validate and split the preference data (making the synthetic task first when data.path is empty)."""
    config = resolve(config_path, overrides, run_name)
    return _run_one(config, "data", _graph(config))


@flow(name="stage-sft", flow_run_name=flow_run_label)
@documented
def sft_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, data_dir: Text = "",
             which: SftModel = "reference", run_name: Text = "") -> str:
    """SFT of the reference (which="reference") or of a separate policy model (which="policy_model").

    Args:
        which: the model to fine-tune: "reference" or "policy_model" (when the config names a separate one).
    """
    config = resolve(config_path, overrides, run_name)
    graph = _graph(config, data=data_dir)
    target = "sft_policy_model" if which == "policy_model" and "sft_policy_model" in graph.plans else "sft_reference"
    return _run_one(config, target, graph)


@flow(name="stage-train-oracle", flow_run_name=flow_run_label)
@documented
def oracle_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, data_dir: Text = "",
                reference_dir: Text = "", run_name: Text = "") -> str:
    """Train the oracle (DPO from the reference on a subset of the pairs).

    Args:
        reference_dir: your own SFT reference (a model dir or an sft stage's dir); empty: from the store.
    """
    config = resolve(config_path, overrides, run_name)
    return _run_one(config, "oracle", _graph(config, data=data_dir, sft_reference=reference_dir))


@flow(name="stage-score-tokens", flow_run_name=flow_run_label)
@documented
def score_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, oracle_dir: Text = "",
               reference_dir: Text = "", data_dir: Text = "", run_name: Text = "") -> str:
    """Score every response token with oracle vs reference log-probs.

    Args:
        oracle_dir: your own oracle (a model dir or an oracle stage's dir); empty: from the store.
        reference_dir: your own SFT reference; empty: from the store.
    """
    config = resolve(config_path, overrides, run_name)
    return _run_one(config, "score", _graph(config, data=data_dir, sft_reference=reference_dir, oracle=oracle_dir))


@flow(name="stage-select-tokens", flow_run_name=flow_run_label)
@documented
def select_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, scores_dir: Text = "",
                policy_init_dir: Text = "", data_dir: Text = "", run_name: Text = "") -> str:
    """Select the key tokens from stored scores; publishes the token heatmap.

    Args:
        scores_dir: your own scores (a score stage's dir); empty: from the store.
        policy_init_dir: the policy's start, whose tokenizer the selection is moved onto; empty: from the store.
    """
    config = resolve(config_path, overrides, run_name)
    return _run_one(config, "select", _graph(config, data=data_dir, score=scores_dir, policy_init=policy_init_dir))


@flow(name="stage-train-policy", flow_run_name=flow_run_label)
@documented
def policy_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, method: PolicyMethod = "sepo",
                scores_dir: Text = "", selection_dir: Text = "", policy_init_dir: Text = "", reference_dir: Text = "",
                data_dir: Text = "", run_name: Text = "") -> str:
    """Train the policy with one method (sepo, dpo, ipo, simpo, selective_dpo, tdpo1, tdpo2, tso).

    The policy starts from (and, for the DPO family, is anchored to) `policy_init_dir`; `reference_dir` is the
    oracle's reference, used only if the scores must still be computed.

    Args:
        method: the policy method to train.
        scores_dir: your own scores (a score stage's dir); empty: from the store.
        selection_dir: your own key-token selection (a select stage's dir); empty: from the store.
        policy_init_dir: the policy's start (a model dir); empty: the SFT reference from the store.
        reference_dir: the oracle's reference; empty: from the store.
    """
    config = resolve(config_path, overrides, run_name)
    graph = _graph(config, [method], data=data_dir, sft_reference=reference_dir, score=scores_dir,
                   select=selection_dir, policy_init=policy_init_dir)
    return _run_one(config, f"policy_{method}", graph)


@flow(name="stage-generate", flow_run_name=flow_run_label)
@documented
def generate_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, label: str = "sepo",
                  model_dir: Text = "", data_dir: Text = "", run_name: Text = "") -> str:
    """Answer the prompts with `model_dir`, or (empty) with the reference start / the policy of method `label`.

    Args:
        label: "reference", a policy method, or any name for the answers of `model_dir`.
        model_dir: the model to answer with; empty: the one `label` names, from the store.
    """
    config = resolve(config_path, overrides, run_name)
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
@documented
def evaluate_flow(config_path: Text = "", overrides: Overrides = NO_OVERRIDES, method: str = "sepo",
                  model_dir: Text = "", generations_dir: Text = "", reference_generations_dir: Text = "",
                  data_dir: Text = "", run_name: Text = "") -> str:
    """Evaluate one method's policy and answers against the reference's answers.

    Args:
        method: the policy method (or generation label) to evaluate.
        model_dir: your own policy; empty: from the store.
        generations_dir: your own answers (a generate stage's dir); empty: from the store.
        reference_generations_dir: the reference's answers; empty: from the store.
    """
    config = resolve(config_path, overrides, run_name)
    graph = _graph(config, [method], data=data_dir, generate_reference=reference_generations_dir,
                   **{f"policy_{method}": model_dir, f"generate_{method}": generations_dir})
    return _run_one(config, f"evaluate_{method}", graph)


# `selpo stage NAME`: the stage names of `python -m selpo_core.stages`.
STAGE_FLOWS = {"data": data_flow, "sft": sft_flow, "oracle": oracle_flow, "score": score_flow,
               "select": select_flow, "policy": policy_flow, "generate": generate_flow, "evaluate": evaluate_flow}

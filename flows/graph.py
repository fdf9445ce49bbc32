"""The pipeline's stage graph as lazily resolved task results, shared by every flow.

`StageGraph(config).scores_dir` runs (or reuses from the cache) the score task and, first, whatever it needs.
The dependencies mirror `selpo_core.stages.run_pipeline`: the same stage calls, as Prefect tasks. A flow for
a single stage therefore asks only for its own output; upstream stages come from the cache, or run if they
never did; a user's own artifacts are passed in `given` and replace the stages that would make them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task

from tasks import (
    evaluate,
    generate,
    make_synthetic,
    prepare_data,
    score_tokens,
    select_tokens,
    sft,
    train_oracle,
    train_policy,
)
from tasks.common import run_stage_task


class StageGraph:
    """Stage dirs of one resolved config, each computed at most once per flow run.

    `records` collects {seconds, cached, state, dir} per stage in execution order (summary.json's "stages").
    """

    def __init__(self, config: dict[str, Any], given: dict[str, str | None] | None = None) -> None:
        self.config = config
        self.given = {name: value for name, value in (given or {}).items() if value}
        self.records: dict[str, dict[str, Any]] = {}
        self._dirs: dict[str, str | None] = {}

    def _once(self, name: str, compute: Callable[[], str | None]) -> Any:
        if name in self.given:
            return self.given[name]
        if name not in self._dirs:
            self._dirs[name] = compute()
        return self._dirs[name]

    def _run(self, record_as: str, stage_task: Task[..., str], **params: Any) -> str:
        return run_stage_task(stage_task, record_as, self.records, self.config, **params)

    @property
    def task_dir(self) -> str | None:
        """The synthetic task, made only when no preference data is configured."""
        return self._once("task_dir", lambda: None if self.config["data"]["path"] else
                          self._run("synthetic", make_synthetic))

    @property
    def data_dir(self) -> str:
        return self._once("data_dir", lambda: self._run("data", prepare_data, task_dir=self.task_dir))

    @property
    def reference_dir(self) -> str:
        """SFT of the reference, or the configured model as it is when SFT is disabled."""
        def compute() -> str:
            if not self.config["sft"]["enabled"]:
                return self.config["reference"]["path"]
            return self._run("sft", sft, data_dir=self.data_dir, task_dir=self.task_dir, which="reference")

        return self._once("reference_dir", compute)

    @property
    def policy_init_dir(self) -> str:
        """The policy starts from the reference unless `policy_model` names another model (weak-to-strong)."""
        def compute() -> str:
            if self.config["policy_model"] == self.config["reference"]:
                return self.reference_dir
            if not self.config["sft"]["enabled"]:
                return self.config["policy_model"]["path"]
            return self._run("sft_policy_model", sft, data_dir=self.data_dir, task_dir=self.task_dir,
                             which="policy_model")

        return self._once("policy_init_dir", compute)

    @property
    def oracle_dir(self) -> str:
        return self._once("oracle_dir", lambda: self._run(
            "oracle", train_oracle, data_dir=self.data_dir, reference_dir=self.reference_dir))

    @property
    def scores_dir(self) -> str:
        return self._once("scores_dir", lambda: self._run(
            "score", score_tokens, data_dir=self.data_dir, oracle_dir=self.oracle_dir,
            reference_dir=self.reference_dir))

    @property
    def selection_dir(self) -> str:
        return self._once("selection_dir", lambda: self._run(
            "select", select_tokens, data_dir=self.data_dir, scores_dir=self.scores_dir,
            policy_init_dir=self.policy_init_dir))

    def policy_dir(self, method: str) -> str:
        # The DPO family's anchor is the policy's own start (as in run_pipeline), not the oracle's reference.
        return self._once(f"policy_dir[{method}]", lambda: self._run(
            f"policy_{method}", train_policy, method=method, data_dir=self.data_dir,
            policy_init_dir=self.policy_init_dir, reference_dir=self.policy_init_dir, scores_dir=self.scores_dir,
            selection_dir=self.selection_dir))

    def generations_dir(self, label: str, model_dir: str | None = None) -> str:
        """Answers of `model_dir` (default: the policy's starting model for "reference", else that method's policy)."""
        def compute() -> str:
            model = model_dir or (self.policy_init_dir if label == "reference" else self.policy_dir(label))
            return self._run(f"generate_{label}", generate, data_dir=self.data_dir, model_dir=model, label=label)

        return self._once(f"generations_dir[{label}]", compute)

    @property
    def reference_generations_dir(self) -> str:
        return self._once("reference_generations_dir", lambda: self.generations_dir("reference"))

    def evaluation_dir(self, method: str) -> str:
        def compute() -> str:
            policy = self.policy_dir(method)
            generations = self.generations_dir(method)
            return self._run(f"evaluate_{method}", evaluate, data_dir=self.data_dir, generations_dir=generations,
                             reference_generations_dir=self.reference_generations_dir, model_dir=policy,
                             reference_dir=self.policy_init_dir, label=method)

        return self._once(f"evaluation_dir[{method}]", compute)

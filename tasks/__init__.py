"""Prefect task adapters: each resolves a config, calls one selpo_core stage, returns a path.

Caching, retries and result persistence live here (tasks/common.py); the stage logic lives in selpo_core.
"""

from tasks.data import make_synthetic, prepare_data
from tasks.evaluation import evaluate, generate
from tasks.report import publish_stage, write_summary
from tasks.scoring import score_tokens, select_tokens
from tasks.training import sft, train_oracle, train_policy

__all__ = ["evaluate", "generate", "make_synthetic", "prepare_data", "publish_stage", "score_tokens", "select_tokens",
           "sft", "train_oracle", "train_policy", "write_summary"]

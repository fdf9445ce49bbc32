"""Prefect flows: compose the stage tasks into selpo's pipelines (the whole pipeline, a method comparison, and
one flow per stage). Deployments live in deployments/, never here."""

from flows.pipeline import compare_methods, sepo_pipeline
from flows.stage_flows import (
    STAGE_FLOWS,
    data_flow,
    evaluate_flow,
    generate_flow,
    oracle_flow,
    policy_flow,
    score_flow,
    select_flow,
    sft_flow,
)
from flows.tso import tso_flow

__all__ = ["STAGE_FLOWS", "compare_methods", "data_flow", "evaluate_flow", "generate_flow", "oracle_flow",
           "policy_flow", "score_flow", "select_flow", "sepo_pipeline", "sft_flow", "tso_flow"]

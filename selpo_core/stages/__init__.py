"""The pipeline's stages without Prefect: plans (plan.py), the graph written once (graph.py), the runner
(runner.py), and the stage bodies by family: prepare (synthetic task, data), training (SFT, oracle, policy),
tokens (score, select), answers (generate, evaluate), tso (TSO's rounds). `python -m selpo_core.stages` runs
one stage, or all, in this process (also under torchrun, or in the vLLM venv).

    from selpo_core.stages.graph import plan_graph, run_graph, run_pipeline, run_upto
"""

"""The generate stage on vLLM end to end through the public command lines, on a tiny config whose models have
head size 64: `selpo run` (the Prefect flow; generate.backend=auto must pick the vLLM venv and say so in the
log and the stage manifests) writing AlpacaEval answers, then `python -m selpo_core.stages generate` for
Arena-Hard v2.0 and MT-Bench questions, reusing the finished upstream stages. Every answer file passes the
format checks of the transformers tests (tests/answer_formats.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from answer_formats import check_answer_files
from vllm_helpers import (
    HEAD_DIM_64,
    REPO,
    prompt_texts,
    vllm_python_fixture,  # noqa: F401  (fixtures, by name)
)

pytestmark = pytest.mark.vllm

TINY = REPO / "configs" / "tiny.yaml"


def overrides(runs: Path, vllm_python: Path, **generate: Any) -> list[str]:
    sets = {f"{model}.{k}": v for model in ("reference", "policy_model") for k, v in HEAD_DIM_64.items()}
    sets |= {"runs_dir": str(runs), "policy.methods": "[sepo]", "generate.backend": "auto",
             "generate.vllm_python": str(vllm_python)}
    sets |= {f"generate.{k}": v for k, v in generate.items()}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def run_cli(cmd: list[str], home: Path) -> str:
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(home / "prefect"), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
                "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd[:4])} exited with {proc.returncode}:\n{tail}", pytrace=False)
    return output


def manifest(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "manifest.json").read_text())


def only(pattern: str, runs: Path) -> Path:
    (found,) = sorted((runs / "vllm-e2e").glob(pattern))
    return found


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("vllm-stage")
    runs = home / "runs"
    selpo = Path(sys.executable).with_name("selpo")
    log = run_cli([str(selpo), "run", str(TINY), "--name", "vllm-e2e",
                   *overrides(runs, vllm_python, benchmark="alpaca_eval")], home)
    return {"home": home, "runs": runs, "log": log, "python": vllm_python}


def check_vllm_manifest(stage_dir: Path) -> dict[str, Any]:
    metrics = manifest(stage_dir)["metrics"]
    assert metrics["backend"] == "vllm" and metrics["backend_device"] in ("cpu", "cuda")
    assert "vLLM venv" in metrics["backend_reason"] and metrics["tokens_per_second"] > 0
    return metrics


def test_selpo_run_generates_through_vllm_and_says_so(pipeline: dict[str, Any]) -> None:
    runs = pipeline["runs"]
    assert "generation backend: vllm-subprocess" in pipeline["log"]
    assert "vLLM engine started" in pipeline["log"]  # the child's selpo lines reach the run log
    prompts_file = only("data-*", runs) / "prompts.jsonl"
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    for label in ("reference", "sepo"):
        stage = only(f"generate_{label}-*", runs)
        metrics = check_vllm_manifest(stage)
        assert metrics["files"] == ["generations.jsonl", "alpaca_eval.json"]
        check_answer_files(stage, "alpaca_eval", rows, label, n_samples=1)
    assert (runs / "vllm-e2e" / "summary.json").is_file()  # evaluation read the vLLM answers


@pytest.mark.parametrize("benchmark", ["arena_hard", "mt_bench"])
def test_stage_cli_writes_arena_hard_v2_and_mt_bench(pipeline: dict[str, Any], benchmark: str) -> None:
    texts = prompt_texts(6)
    if benchmark == "arena_hard":
        rows = [{"uid": f"{i:016x}", "category": "hard_prompt", "subcategory": "s", "prompt": t}
                for i, t in enumerate(texts)]
    else:
        rows = [{"question_id": 81 + i, "category": category, "turns": texts[2 * i : 2 * i + 2]}
                for i, category in enumerate(("writing", "math", "stem"))]
    questions = pipeline["home"] / f"{benchmark}_question.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = set((pipeline["runs"] / "vllm-e2e").iterdir())
    run_cli([sys.executable, "-m", "selpo_core.stages", "generate", "--config", str(TINY), "--set", "name=vllm-e2e",
             *overrides(pipeline["runs"], pipeline["python"], benchmark=benchmark, prompts=str(questions), n=2)],
            pipeline["home"])
    new = set((pipeline["runs"] / "vllm-e2e").iterdir()) - before
    assert [p.name.split("-")[0] for p in new] == ["generate_sepo"], "upstream stages must be reused, not re-run"
    (stage,) = new
    metrics = check_vllm_manifest(stage)
    assert metrics["files"] == ["generations.jsonl", f"{benchmark}.jsonl"]
    records = check_answer_files(stage, benchmark, rows, "sepo", n_samples=2)
    if benchmark == "mt_bench":  # math is greedy (FastChat's table): both samples alike
        math = next(r for r in records if r.category == "math")
        assert math.answers[0] == math.answers[1]

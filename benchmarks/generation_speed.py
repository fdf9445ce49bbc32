"""Generation throughput: selpo's vLLM backend (in .venv-vllm, `make vllm-env`) vs its transformers backend.

Same model (perf_common's 42M Llama, head size 64, random init, vocab 32000 with a word tokenizer), same prompts
(random words, 16-96 tokens), greedy, `--new-tokens` per answer (a random model rarely ends early), same dtype.
tokens/s counts generated tokens over generation alone: model load and vLLM's engine start are reported apart.
Greedy answers are compared token for token, a check that both backends did the same work.

    python -m benchmarks.generation_speed                  # 64 prompts x 64 tokens, fp32 (+ bf16 where native)
    python -m benchmarks.generation_speed --quick          # 16 prompts x 32 tokens, precision auto's dtype

bf16 runs only where it is native (AVX512-BF16 / AMX; `--precisions fp32,bf16` forces it): on AVX2-only CPUs it is
emulated, ~75x slower than fp32. Each result states its model FLOP/s (2 x the parameters doing matmuls, the tied
LM head included, per generated token; prompt prefill not counted) as a fraction of the measured matmul peak of its
dtype (`peak_fraction`; decoding is memory-bound, so this is small by nature).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import perf_common as pc

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def save_model(directory: Path, size: str, vocab: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = pc.build_llama(pc.MODEL_SIZES[size], vocab=vocab, seed=0)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(directory)
    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def run(model: Path, n_prompts: int, new_tokens: int, precision: str, python: Path, work: Path) -> dict[str, Any]:
    import torch

    from selpo_core.benchmarks_io import BenchmarkPrompt
    from selpo_core.generate import TransformersBackend, generate_records
    from selpo_core.generate_spec import SamplingSpec
    from selpo_core.generate_vllm import VLLMOptions
    from selpo_core.vllm_venv import run_generation_subprocess

    rng = random.Random(0)
    prompts = [BenchmarkPrompt(str(i), [" ".join(f"t{rng.randrange(3, 32000)}" for _ in range(rng.randint(16, 96)))])
               for i in range(n_prompts)]
    spec = SamplingSpec(temperature=0, max_new_tokens=new_tokens)
    started = time.perf_counter()
    hf = TransformersBackend(model, device="cpu", dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[precision],
                             batch_size=n_prompts, progress=False)
    hf_load = time.perf_counter() - started
    started = time.perf_counter()
    hf_records = generate_records(hf, prompts, spec)
    hf_seconds = time.perf_counter() - started
    started = time.perf_counter()
    vllm_records, times = run_generation_subprocess(python, model, prompts, spec, work,
                                                    options=VLLMOptions(precision=precision))
    vllm_wall = time.perf_counter() - started
    tokens = sum(n for r in hf_records for s in r.n_tokens for n in s)
    vllm_tokens = sum(n for r in vllm_records for s in r.n_tokens for n in s)
    agree = sum(a.answers == b.answers for a, b in zip(hf_records, vllm_records, strict=True))
    from transformers import AutoConfig, LlamaForCausalLM

    from selpo_core.hardware import flop_parameters

    with torch.device("meta"):
        matmul_params = flop_parameters(LlamaForCausalLM(AutoConfig.from_pretrained(model)))[0]

    def peak_fraction(tokens_per_second: float) -> float:
        return pc.peak_fraction(2.0 * matmul_params * tokens_per_second, precision, "cpu")

    return {"precision": precision, "prompts": n_prompts, "new_tokens": new_tokens,
            "transformers_peak_fraction": peak_fraction(tokens / hf_seconds),
            "vllm_peak_fraction": peak_fraction(vllm_tokens / times["seconds"]),
            "transformers_tokens_per_second": tokens / hf_seconds, "transformers_load_seconds": hf_load,
            "vllm_tokens_per_second": vllm_tokens / times["seconds"], "vllm_start_seconds": times["start_seconds"],
            "vllm_wall_seconds": vllm_wall, "speedup": (vllm_tokens / times["seconds"]) / (tokens / hf_seconds),
            "greedy_answers_equal": f"{agree}/{n_prompts}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts x 32 tokens, precision auto's dtype only")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--precisions", default=None,
                        help="comma list of fp32,bf16 (default fp32 + bf16 where native; quick: precision auto's)")
    parser.add_argument("--size", default="42M", help="perf_common model size (vLLM on CPU needs head size 64: 42M)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    pc.quiet()
    from selpo_core.config import GenerateConfig
    from selpo_core.vllm_venv import resolve_vllm_python

    python = resolve_vllm_python(GenerateConfig().vllm_python)
    if python is None:
        raise SystemExit("generation_speed needs the vLLM venv: run `make vllm-env`")
    n_prompts, new_tokens = args.prompts or (16 if args.quick else 64), args.new_tokens or (32 if args.quick else 64)
    auto = pc.auto_dtype("cpu")[1]
    default = auto if args.quick else ("fp32,bf16" if auto == "bf16" else "fp32")
    precisions = (args.precisions or default).split(",")
    note = pc.busy_machine_note()
    print(f"generation_speed: {args.size}, {n_prompts} prompts x {new_tokens} greedy tokens"
          + (f"\n  NOTE {note}" if note else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="selpo-bench-gen-") as tmp:
        model = save_model(Path(tmp) / "model", args.size, pc.VOCAB_SIZE)
        results = [run(model, n_prompts, new_tokens, p, python, Path(tmp) / f"work-{p}") for p in precisions]
    print(pc.table(["precision", "transformers tok/s", "vLLM tok/s", "x", "% peak (hf / vLLM)", "vLLM engine start s",
                    "greedy equal"],
                   [[r["precision"], pc.fmt(r["transformers_tokens_per_second"]), pc.fmt(r["vllm_tokens_per_second"]),
                     f"{r['speedup']:.1f}", f"{100 * r['transformers_peak_fraction']:.1f}% / "
                     f"{100 * r['vllm_peak_fraction']:.1f}%", f"{r['vllm_start_seconds']:.1f}",
                     r["greedy_answers_equal"]]
                    for r in results]))
    summary = f"SUMMARY generation_speed [cpu, precision auto = {auto}]: " + "; ".join(
        f"{r['precision']} vLLM {pc.fmt(r['vllm_tokens_per_second'])} tok/s vs transformers "
        f"{pc.fmt(r['transformers_tokens_per_second'])} ({r['speedup']:.1f}x), engine start "
        f"{r['vllm_start_seconds']:.1f} s, greedy equal {r['greedy_answers_equal']}" for r in results)
    path = pc.write_results("generation_speed", {"settings": {"size": args.size, "prompts": n_prompts,
                                                              "new_tokens": new_tokens, "busy_note": note},
                                                 "results": results, "summary": summary},
                            Path(args.out) if args.out else None)
    print(f"\nwrote {path}\n{summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

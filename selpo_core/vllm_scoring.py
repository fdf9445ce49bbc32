"""Token scoring through vLLM (`score.backend: vllm`): prompt log-probs of the actual tokens.

For each response, log pi(y_t | prompt, y_<t) of every response token under the oracle and the reference,
the same numbers selpo's torch scorer (scoring.py) computes, from vLLM's `prompt_logprobs` (raw log-probs,
fp32 log-softmax of the model's logits) with `max_tokens=1`. It is the path that matters for large models
on a GPU, where vLLM's paged attention and batching beat padded forwards. Only the actual tokens' log-probs
come back: TDPO's full-vocabulary KL needs the reference's whole distribution at every position, so the
policy stage computes it with a torch forward of the reference whatever `score.backend` is.

Protocol (the scorer runs in the vLLM venv, `score.vllm_python`, as a subprocess):
    <vllm python> -m selpo_core.vllm_scoring --work DIR --model oracle=ORACLE_DIR --model reference=REF_DIR
        --options-json '{...}'
`DIR` (`<shard dir>/.vllm-<key of the pending shards>`) holds `<shard digest>.in.npz`, one per shard: its
sequences (`ids` int32 flat, `offsets` int64 [rows + 1], `starts` int64 [rows]: where each response begins).
The child writes `DIR/<digest>.<model>.npz` (`logps` float32 flat over the response tokens, `offsets` int64
[rows + 1]) atomically, one model at a time (one engine in memory), and skips outputs that already exist,
so a crashed run resumes shard by shard. `DIR/timing.<model>.json` holds {"seconds"} of scoring and
{"start_seconds"} of engine start.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selpo_core.generate_spec import BackendUnavailable
from selpo_core.generate_vllm import MAKE_HINT, VLLMOptions, read_model_shape, start_engine, unsupported_reason
from selpo_core.vllm_venv import resolve_vllm_python, run_vllm_python, vllm_build

log = logging.getLogger("selpo.vllm")
MODELS = ("oracle", "reference")


# ----------------------------------------------------------------------------------- parent (any venv)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")  # np.savez appends .npz to other names
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _shard_input(shard: Any) -> dict[str, np.ndarray]:
    sequences = [np.concatenate([r.prompt_ids, r.ids]).astype(np.int32) for r in shard.responses]
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sequences], out=offsets[1:])
    starts = np.asarray([len(r.prompt_ids) for r in shard.responses], dtype=np.int64)
    return {"ids": np.concatenate(sequences), "offsets": offsets, "starts": starts}


def _read_output(path: Path, shard: Any) -> list[np.ndarray]:
    with np.load(path) as data:
        logps, offsets = data["logps"], data["offsets"]
    values = [logps[offsets[i] : offsets[i + 1]].astype(np.float32) for i in range(len(offsets) - 1)]
    if [len(v) for v in values] != [len(r.ids) for r in shard.responses]:
        raise RuntimeError(f"{path}: vLLM returned log-probs of other lengths than the shard's responses")
    return values


def score_shards(
    pending: Sequence[Any],
    oracle_dir: Path,
    reference_dir: Path,
    cfg: Any,
    shard_dir: Path,
    counter: Any,
    finish: Callable[[Any, list[np.ndarray], list[np.ndarray], float, Path], None],
) -> None:
    """Score `pending` shards (scoring._Shard) with both models in the vLLM venv; `finish` writes each shard.

    `cfg` is the ScoreConfig; `counter` (scoring._Counter) gets the real tokens and the scoring seconds.
    """
    python = resolve_vllm_python(cfg.vllm_python)
    if python is None:
        raise BackendUnavailable(f"score.backend=vllm but there is no vLLM venv at {cfg.vllm_python!r} "
                                 f"(score.vllm_python); {MAKE_HINT}")
    device = vllm_build(python)
    for name, model in zip(MODELS, (oracle_dir, reference_dir), strict=True):
        reason = unsupported_reason(read_model_shape(model), device)
        if reason is not None:
            raise BackendUnavailable(f"score.backend=vllm cannot run the {name} {model}: {reason}; "
                                     "use score.backend=torch")
    # One work dir per set of pending shards: ranks scoring different shards never share one, and a re-run
    # of the same shards finds the outputs its crashed predecessor left.
    key = hashlib.sha256("|".join(s.digest for s in pending).encode()).hexdigest()[:12]
    work = Path(shard_dir) / f".vllm-{key}"
    work.mkdir(parents=True, exist_ok=True)
    longest = 0
    for shard in pending:
        path = work / f"{shard.digest}.in.npz"
        if not path.is_file():
            _write_npz(path, **_shard_input(shard))
        longest = max(longest, max(r.total for r in shard.responses))
    # One more position than the longest sequence: vLLM generates (and discards) one token per request.
    options = VLLMOptions(precision=cfg.precision, max_model_len=longest + 1)
    cmd = [str(python), "-m", "selpo_core.vllm_scoring", "--work", str(work), "--options-json", options.to_json(),
           "--model", f"oracle={oracle_dir}", "--model", f"reference={reference_dir}"]
    run_vllm_python(cmd, label="score")
    for shard in pending:
        oracle, ref = (_read_output(work / f"{shard.digest}.{name}.npz", shard) for name in MODELS)
        finish(shard, oracle, ref, cfg.beta, Path(shard_dir))
        counter.real += sum(r.total for r in shard.responses)
        counter.padded += sum(r.total for r in shard.responses)  # paged attention: nothing is padded
    for name in MODELS:
        timing = json.loads((work / f"timing.{name}.json").read_text())
        counter.seconds += timing["seconds"]
        log.info("vLLM scoring (%s): %.1fs, engine start %.1fs", name, timing["seconds"], timing["start_seconds"])
    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------ child (vLLM venv)


def prompt_logprobs(llm: Any, sequences: Sequence[np.ndarray], starts: Sequence[int]) -> list[np.ndarray]:
    """log p(token t | tokens < t) for t in [start, len) of each sequence, from one engine call."""
    import vllm
    from vllm.inputs import TokensPrompt

    # prompt_logprobs=0: only the actual token's log-prob (vLLM always includes it); no text needed.
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s.tolist()) for s in sequences], params, use_tqdm=False)
    values = []
    for seq, start, out in zip(sequences, starts, outputs, strict=True):
        if start < 1:
            raise ValueError("a response needs a prompt token before it (position 0 has no prediction)")
        rows = out.prompt_logprobs
        values.append(np.asarray([rows[t][int(seq[t])].logprob for t in range(start, len(seq))], dtype=np.float32))
    return values


def main(argv: list[str] | None = None) -> None:
    """Entry point of the scoring subprocess (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m selpo_core.vllm_scoring", description=main.__doc__)
    parser.add_argument("--work", required=True, help="directory of <digest>.in.npz inputs and outputs")
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR, scored in this order")
    parser.add_argument("--options-json", default="{}", help="VLLMOptions as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the parent adds the time
    work, options = Path(args.work), VLLMOptions.from_json(args.options_json)
    inputs = sorted(work.glob("*.in.npz"))
    for spec in args.model:
        name, model_dir = spec.split("=", 1)
        todo = [p for p in inputs if not (work / p.name.replace(".in.npz", f".{name}.npz")).is_file()]
        start_seconds, seconds = 0.0, 0.0
        if todo:
            # No prefix cache: prompt log-probs are needed at every position of every sequence.
            engine = start_engine(model_dir, options, tokenizer=False, enable_prefix_caching=False)
            llm, start_seconds = engine.llm, engine.start_seconds
            for path in todo:
                with np.load(path) as data:
                    ids, offsets, starts = data["ids"], data["offsets"], data["starts"]
                sequences = [ids[offsets[i] : offsets[i + 1]] for i in range(len(starts))]
                started = time.perf_counter()
                values = prompt_logprobs(llm, sequences, starts.tolist())
                seconds += time.perf_counter() - started
                out_offsets = np.zeros(len(values) + 1, dtype=np.int64)
                np.cumsum([len(v) for v in values], out=out_offsets[1:])
                _write_npz(work / path.name.replace(".in.npz", f".{name}.npz"),
                           logps=np.concatenate(values), offsets=out_offsets)
            del llm, engine
            gc.collect()  # one engine at a time: the next model's engine needs the memory
        log.info("scored %d shards with %s in %.1fs (engine start %.1fs)", len(todo), name, seconds, start_seconds)
        (work / f"timing.{name}.json").write_text(json.dumps({"seconds": seconds, "start_seconds": start_seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["score_shards", "prompt_logprobs", "main"]

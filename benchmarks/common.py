"""Small helpers shared by the quality benchmarks.

Run a pipeline config with overrides through `selpo_core.stages` (every stage is cached by its key: the config it
reads and its inputs, so runs that share a prefix, e.g. the same SFT reference, reuse it when they share `runs_dir`),
loop over seeds, summarise with mean / std / min / max, and write JSON with the machine it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before selpo_core / transformers are imported: no hub traffic, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from selpo_core.artifacts import atomic_write_json, code_version, read_manifest  # noqa: E402
from selpo_core.config import RunConfig, load_run_config  # noqa: E402
from selpo_core.report import input_dir  # noqa: E402
from selpo_core.stages import graph as stage_graph  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_RUNS_DIR = "runs/bench"
"""Shared by every quality benchmark (same `name` too), so they reuse each other's SFT references and oracles."""
RUN_NAME = "bench"

# Checkpoints and TensorBoard files change no number; skipping them saves I/O on a busy disk.
NO_CHECKPOINTS: dict[str, Any] = {
    f"{section}.train.{field}": value
    for section in ("sft", "oracle", "policy")
    for field, value in (("save_every", 0), ("report_to", "none"))
}

# `--quick`: a smaller task and a few steps, only to prove the script runs end to end (numbers mean little).
QUICK: dict[str, Any] = {
    "synthetic.n_filler": 60, "synthetic.n_positive": 8, "synthetic.n_negative": 8, "synthetic.n_sft": 400,
    "synthetic.n_pairs": 240, "synthetic.n_heldout_prompts": 16, "synthetic.min_words": 6,
    "synthetic.max_words": 12, "data.heldout_fraction": 0.1,
    "sft.train.max_steps": 30, "sft.train.batch_size": 16, "sft.train.warmup_steps": 3,
    "oracle.train.max_steps": 20, "oracle.train.batch_size": 8, "oracle.train.warmup_steps": 2,
    "policy.train.max_steps": 15, "policy.train.batch_size": 8, "policy.train.warmup_steps": 2,
    "generate.max_new_tokens": 16, "generate.batch_size": 16,
}


def seed_overrides(seed: int) -> dict[str, Any]:
    """One benchmark seed = a new draw of everything: task (vocabulary, corpus, pairs), held-out split, model
    inits, SFT/oracle/policy data order, oracle subset, sampling."""
    return {
        "synthetic.seed": seed, "data.seed": seed, "reference.seed": seed, "policy_model.seed": seed,
        "sft.train.seed": seed, "oracle.subset_seed": seed, "oracle.train.seed": seed, "policy.train.seed": seed,
        "generate.seed": seed,
    }


def model_overrides(section: str, size: tuple[int, int]) -> dict[str, Any]:
    """`reference` / `policy_model` tiny width and depth (heads stay at the default 4)."""
    hidden, layers = size
    return {f"{section}.tiny_hidden_size": hidden, f"{section}.tiny_layers": layers}


def parse_size(text: str) -> tuple[int, int]:
    """'64x2' -> (64, 2): tiny_hidden_size x tiny_layers."""
    hidden, _, layers = text.lower().partition("x")
    return int(hidden), int(layers or 1)


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def make_config(args: argparse.Namespace, *overrides: dict[str, Any]) -> RunConfig:
    """Base YAML (args.config, default: all defaults = the demo task) + benchmark settings + overrides + --set."""
    merged: dict[str, Any] = {"runs_dir": args.runs_dir, "name": RUN_NAME, **NO_CHECKPOINTS}
    if args.quick:
        merged.update(QUICK)
    for extra in overrides:
        merged.update(extra)
    # Command-line --set wins over everything the script chose (a malformed one fails with the config's message).
    return load_run_config(args.config, [f"{key}={json.dumps(value)}" for key, value in merged.items()] + args.set)


@dataclass
class StageResult:
    path: Path
    cached: bool
    seconds: float

    @property
    def metrics(self) -> dict[str, Any]:
        return manifest_metrics(self.path)


_VERBOSE = False


def run_upto(cfg: RunConfig, stage: str, method: str = "sepo") -> StageResult:
    """Run (or reuse) every stage up to `stage`; `cached` is True when nothing had to be computed.

    Unless --verbose, the stages' progress bars and warnings (stderr) go to <runs_dir>/bench.log.
    """
    graph = stage_graph.plan_graph(cfg, methods=dict.fromkeys([*cfg.policy.methods, method]))
    cached = graph.is_complete(stage_graph.STAGE_NODES[stage].format(method=method))
    started = time.perf_counter()
    if _VERBOSE:
        path = Path(stage_graph.run_upto(cfg, stage, method))
    else:
        Path(cfg.runs_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.runs_dir) / "bench.log", "a") as log_file, contextlib.redirect_stderr(log_file):
            path = Path(stage_graph.run_upto(cfg, stage, method))
    return StageResult(path=path, cached=cached, seconds=time.perf_counter() - started)


def manifest_metrics(stage_dir: str | Path) -> dict[str, Any]:
    return read_manifest(stage_dir).get("metrics", {})


def answer_stats(evaluate_dir: str | Path, which: str = "generations") -> dict[str, float | None]:
    """Mean answer length (tokens) and the fraction of answers that ended with EOS (not at max_new_tokens), of the
    generations an evaluate stage read: `generations` (the policy's) or `reference_generations`."""
    path = input_dir(evaluate_dir, which) / "generations.jsonl"
    tokens: list[int] = []
    ended: list[bool] = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            tokens += [n for sample in record.get("n_tokens", []) for n in sample]
            ended += [reason == "eos" for sample in record.get("finish_reasons", []) for reason in sample]
    return {"answer_tokens": statistics.fmean(tokens) if tokens else None,
            "eos_fraction": statistics.fmean(ended) if ended else None}


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    """mean, sample std (0 for one value), min, max, n over the finite values; NaN when there are none."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0, "values": []}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
        "values": finite,
    }


def pm(stat: dict[str, Any], digits: int = 3) -> str:
    """'0.812 ± 0.010' (mean ± sample std over seeds)."""
    if stat["n"] == 0:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def span(stat: dict[str, Any], digits: int = 3) -> str:
    """'[0.801, 0.823]' (min, max over seeds)."""
    if stat["n"] == 0:
        return "-"
    return f"[{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "selpo_code_version": code_version(),
        "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def write_results(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """benchmarks/results/<name>.json with the machine and the command line beside the numbers."""
    import sys

    path = (out_dir or RESULTS_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "command": " ".join(["python -m", f"benchmarks.{name}", *sys.argv[1:]]),
                "machine": machine_info(), **payload}
    atomic_write_json(path, json_safe(document))
    return path


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), tuples -> lists, Paths -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def base_parser(description: str, default_seeds: int = 3) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run: small task, few steps, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds 0..N-1 (default {default_seeds}; "
                        "--quick: 1)")
    parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="where stage artifacts are cached "
                        f"(default {DEFAULT_RUNS_DIR}; shared by the quality benchmarks)")
    parser.add_argument("--config", default=None, help="base run config YAML (default: built-in defaults, the demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override applied last, e.g. oracle.train.max_steps=300")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default). "
                        "The models are tiny: on a 2-core machine shared with other jobs, 2 threads ran several times "
                        "slower than 1, and the numbers do not depend on it")
    parser.add_argument("-v", "--verbose", action="store_true", help="stage logs and progress bars on stderr")
    parser.set_defaults(default_seeds=default_seeds)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else args.default_seeds
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    args.out_dir = Path(args.out) if args.out else None
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    configure_output(args.verbose)
    return args


def configure_output(verbose: bool) -> None:
    global _VERBOSE
    _VERBOSE = verbose
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        return
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    for noisy in ("accelerate", "transformers", "selpo", "selpo_core"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency of selpo_core
        pass


def progress(message: str) -> None:
    """One short line per finished run, so a long benchmark shows it is alive."""
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

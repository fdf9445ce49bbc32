"""Kill -9 soak: a tiny pipeline killed at seeded random moments, resumed, and compared byte for byte.

Each trial starts `python -m selpo_core.stages all` on the tiny config in a fresh runs dir, SIGKILLs it after a
seeded random delay (so the kill lands in any stage: data, SFT, oracle, scoring, a policy, generation...),
runs it again to completion, and checks that (1) every stage's files have the checksums of an uninterrupted
reference run (TensorBoard event files aside: they hold wall-clock times), and (2) no temp or partial dir is
left in the store.

    python -m benchmarks.kill_soak --trials 20      # writes benchmarks/results/kill_soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STORE = "_stages"
# One thread everywhere: float sums then do not depend on the thread count, so "identical" is checkable.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def pipeline(runs_dir: Path) -> list[str]:
    return [sys.executable, "-m", "selpo_core.stages", "all", "--config", str(TINY), "--set", f"runs_dir={runs_dir}"]


def run_to_completion(runs_dir: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(pipeline(runs_dir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"pipeline in {runs_dir} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def stage_checksums(runs_dir: Path) -> dict[str, dict[str, str]]:
    """{stage dir: {file: sha256}} of every published stage, from their manifests."""
    out = {}
    for manifest_path in sorted((runs_dir / STORE).glob("*/manifest.json")):
        files = json.loads(manifest_path.read_text())["files"]
        out[manifest_path.parent.name] = {name: entry["sha256"] for name, entry in files.items()
                                          if not name.startswith("tb/")}
    return out


def leftovers(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in (runs_dir / STORE).iterdir() if ".tmp-" in p.name or p.name.endswith(".partial"))


def in_progress(runs_dir: Path) -> list[str]:
    """The stages a killed run was writing (their temp or partial dirs)."""
    store = runs_dir / STORE
    if not store.is_dir():
        return ["(before the first stage)"]
    names = {p.name.split(".tmp-")[0].split(".partial")[0].rsplit("-", 1)[0] for p in store.iterdir()
             if ".tmp-" in p.name or p.name.endswith(".partial")}
    return sorted(names) or ["(between stages)"]


def trial(seed: int, reference: dict[str, dict[str, str]], duration: float, work: Path) -> dict[str, Any]:
    runs_dir = work / f"trial-{seed}"
    # Up to 90% of the reference run's time. The box's load changes between the reference and a trial, so a run
    # can end before its kill: then it is started again from nothing with half the delay, until a kill lands.
    delay = random.Random(seed).uniform(0.5, 0.9 * duration)
    attempts = 0
    while attempts < 8:
        attempts += 1
        shutil.rmtree(runs_dir, ignore_errors=True)
        process = subprocess.Popen(pipeline(runs_dir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        finished_first = process.poll() is not None
        if not finished_first:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between the poll and the kill
                finished_first = True
        process.wait()
        if not finished_first:
            break
        delay /= 2
    killed_in = in_progress(runs_dir) if not finished_first else ["(finished before the kill)"]
    resume_seconds = run_to_completion(runs_dir)
    checksums = stage_checksums(runs_dir)
    differing = sorted(name for name in set(reference) | set(checksums) if reference.get(name) != checksums.get(name))
    return {"seed": seed, "kill_after_s": round(delay, 2), "attempts": attempts, "killed_in": killed_in,
            "resume_s": round(resume_seconds, 1), "differing_stages": differing, "leftover_dirs": leftovers(runs_dir)}


def soak(trials: int, first_seed: int = 0, work: Path | None = None) -> dict[str, Any]:
    work = work or Path(tempfile.mkdtemp(prefix="selpo-kill-soak-"))
    reference_dir = work / "reference"
    duration = run_to_completion(reference_dir)
    reference = stage_checksums(reference_dir)
    rows = [trial(seed, reference, duration, work) for seed in range(first_seed, first_seed + trials)]
    return {"trials": rows, "reference_seconds": round(duration, 1), "n_trials": trials,
            "n_identical": sum(not row["differing_stages"] for row in rows),
            "n_clean": sum(not row["leftover_dirs"] for row in rows), "n_stages": len(reference),
            "n_killed": sum(row["killed_in"] != ["(finished before the kill)"] for row in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first trial")
    args = parser.parse_args()
    result = soak(args.trials, args.seed)
    out = ROOT / "benchmarks" / "results" / "kill_soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["trials"]:
        print(f"seed {row['seed']:>3}: killed after {row['kill_after_s']:>5.1f} s in {', '.join(row['killed_in'])}; "
              f"differing {row['differing_stages'] or 'none'}; leftovers {row['leftover_dirs'] or 'none'}")
    print(f"SUMMARY kill_soak: {result['n_identical']}/{result['n_trials']} identical, "
          f"{result['n_clean']}/{result['n_trials']} without stray dirs ({result['n_stages']} stages; "
          f"{result['n_killed']} trials killed mid-run, the others finished before the kill)")


if __name__ == "__main__":
    main()

"""`make demo` quiet and with one other CPU-bound process running, under torch's default threads and selpo's policy.

    python -m benchmarks.demo_load            # 3 runs of each (policy x condition), medians; ~30-60 min on 2 cores
    python -m benchmarks.demo_load --quick    # 1 run of each

Each run is the demo pipeline, `python -m selpo_core.stages all --config configs/demo.yaml` (the same stages as
`make demo` without Prefect's overhead), in a fresh runs dir (nothing cached), with generate.backend=transformers
so a vLLM engine start (minutes, when .venv-vllm exists) is not part of the number.

Policies:
- old: torch's default, one intra-op thread per physical core and libgomp's default wait (spin, then sleep):
  OMP_NUM_THREADS=<physical cores> and torch imported before selpo, so selpo's policy keeps its hands off;
- new: selpo_core.threads at process start (threads = free cores, OMP_WAIT_POLICY=PASSIVE).
Conditions: quiet (whatever else runs on the box: the JSON records the 1-minute load average before each run and
the threads each run chose), loaded (plus one `while True: pass` Python process for the whole run).
Runs take turns (old quiet, old loaded, new quiet, new loaded, then again), so drift in the box's other load hits
every cell alike. Reported: median seconds (and spread) per cell, loaded/quiet per policy, new/old per condition.
Target (issue 15): loaded <= 1.5x quiet. `--set section.field=value` shrinks every run alike (same models, fewer
steps), for a box too crowded for the full demo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import perf_common as pc
from selpo_core.threads import physical_cores

OLD_LAUNCH = ("import runpy, sys, torch  # torch first: selpo then sees torch's default, set by OMP_NUM_THREADS\n"
              "sys.argv = ['selpo_core.stages', *sys.argv[1:]]\n"
              "runpy.run_module('selpo_core.stages', run_name='__main__', alter_sys=True)\n")
BUSY_LOOP = "while True:\n    pass\n"
THREADS_LINE = re.compile(r"torch threads: (\d+) of (\d+) CPUs \(([^;]+); other load ([\d.na]+)")


def demo_command(policy: str, runs_dir: Path, config: Path, sets: list[str]) -> tuple[list[str], dict[str, str]]:
    args = ["all", "--config", str(config), "--set", f"runs_dir={runs_dir}", "--set", "generate.backend=transformers"]
    args += [item for value in sets for item in ("--set", value)]
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(pc.REPO_ROOT))
    if policy == "old":
        env["OMP_NUM_THREADS"] = str(physical_cores())
        return [sys.executable, "-c", OLD_LAUNCH, *args], env
    return [sys.executable, "-m", "selpo_core.stages", *args], env


def one_run(policy: str, loaded: bool, config: Path, sets: list[str], timeout: float) -> dict[str, Any]:
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if loaded else None
    try:
        if busy is not None:
            time.sleep(1.0)  # the competitor is running before the demo starts
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="demo-load-") as tmp:
            command, env = demo_command(policy, Path(tmp) / "runs", config, sets)
            started = time.perf_counter()
            proc = subprocess.run(command, env=env, cwd=pc.REPO_ROOT, capture_output=True, text=True,
                                  timeout=timeout)
            seconds = time.perf_counter() - started
            stages = _stage_seconds(Path(tmp) / "runs")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"demo ({policy}, {'loaded' if loaded else 'quiet'}) failed:\n{proc.stderr[-3000:]}")
    match = THREADS_LINE.search(proc.stderr)
    return {"policy": policy, "loaded": loaded, "seconds": round(seconds, 2), "load_average_1m_before":
            round(load_before, 2), "threads": int(match.group(1)) if match else int(env["OMP_NUM_THREADS"]),
            "threads_source": match.group(3) if match else "OMP_NUM_THREADS",
            "other_load_seen": float(match.group(4)) if match else None, "stage_seconds": stages}


def _stage_seconds(runs_dir: Path) -> dict[str, float]:
    for summary in runs_dir.glob("*/summary.json"):
        stages = json.loads(summary.read_text()).get("stages", {})
        return {name: record.get("seconds") for name, record in stages.items() if isinstance(record, dict)}
    return {}


def cell_stats(runs: list[dict[str, Any]], policy: str, loaded: bool) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs if r["policy"] == policy and r["loaded"] == loaded]
    return {"median_s": round(pc.median(seconds), 2), "spread": round(pc.spread(seconds), 3), "runs": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run per cell")
    parser.add_argument("--runs", type=int, default=None, help="runs per cell (default 3; quick 1)")
    parser.add_argument("--policies", default="old,new", help="comma list of old,new")
    parser.add_argument("--config", type=Path, default=pc.REPO_ROOT / "configs" / "demo.yaml")
    parser.add_argument("--set", action="append", default=[],
                        help="section.field=value for every demo run, e.g. fewer steps on a crowded box")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per demo run")
    parser.add_argument("--out", type=Path, default=None, help="results dir (default benchmarks/results)")
    args = parser.parse_args()
    n = args.runs or (1 if args.quick else 3)
    policies = args.policies.split(",")
    runs = []
    for index in range(n):
        for policy in policies:
            for loaded in (False, True):
                run = one_run(policy, loaded, args.config, args.set, args.timeout)
                runs.append(run)
                print(f"[{index + 1}/{n}] {policy:>3} {'loaded' if loaded else 'quiet ':>6}: {run['seconds']:7.1f} s "
                      f"({run['threads']} threads, {run['threads_source']}, load avg before "
                      f"{run['load_average_1m_before']})", flush=True)
                pc.write_results("demo_load", {"runs_per_cell": n, "partial": True, "runs": runs}, args.out)
    cells = {f"{p}_{'loaded' if loaded else 'quiet'}": cell_stats(runs, p, loaded)
             for p in policies for loaded in (False, True)}
    ratios = {f"{p}_loaded_over_quiet": round(cells[f"{p}_loaded"]["median_s"] / cells[f"{p}_quiet"]["median_s"], 3)
              for p in policies}
    if {"old", "new"} <= set(policies):
        for condition in ("quiet", "loaded"):
            ratios[f"new_over_old_{condition}"] = round(
                cells[f"new_{condition}"]["median_s"] / cells[f"old_{condition}"]["median_s"], 3)
    path = pc.write_results("demo_load", {"runs_per_cell": n, "overrides": args.set, "cells": cells,
                                          "ratios": ratios, "runs": runs,
                                          "target": "loaded <= 1.5x quiet", "busy_note": pc.busy_machine_note()},
                            args.out)
    print(pc.table(["cell", "median s", "spread", "runs"],
                   [[name, c["median_s"], c["spread"], c["runs"]] for name, c in cells.items()]))
    print("SUMMARY demo_load: " + ", ".join(f"{k} {v}" for k, v in ratios.items()) + f" (results: {path})")


if __name__ == "__main__":
    main()

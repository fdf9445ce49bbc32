"""Run every benchmark script in benchmarks/ and collect their SUMMARY lines.

A benchmark script is a module of this folder with a `if __name__ == "__main__":` block (helpers such as common.py
and perf_common.py have none, and this runner skips itself). Each runs as `python -m benchmarks.<name>` in its own
process with the same interpreter, its output streamed as it goes; its last line starting with "SUMMARY" is
collected. A script that fails or prints no SUMMARY is reported as such and the others still run. The collected
lines are printed at the end and written to benchmarks/results/run_all.json. These are benchmarks, not tests: the
exit code is 0 unless a script failed to run.

    python -m benchmarks.run_all                       # every benchmark with its defaults
    python -m benchmarks.run_all --quick               # every benchmark with --quick
    python -m benchmarks.run_all --only scoring_speed,padding
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SELF = Path(__file__).stem


def discover() -> list[str]:
    """Module names of the benchmark scripts, in name order."""
    names = []
    for path in sorted(HERE.glob("*.py")):
        if path.stem in (SELF, "__init__") or path.stem.startswith("_"):
            continue
        if 'if __name__ == "__main__":' in path.read_text():
            names.append(path.stem)
    return names


def run_one(name: str, quick: bool, timeout: float | None) -> dict[str, object]:
    command = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH"))
                                                       if p)}
    print(f"\n===== {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    summary = None
    try:
        with subprocess.Popen(command, cwd=HERE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as proc:
            watchdog = threading.Timer(timeout, proc.kill) if timeout else None
            if watchdog is not None:
                watchdog.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("SUMMARY"):
                    summary = line.strip()
            code = proc.wait()
            if watchdog is not None:
                watchdog.cancel()
    except OSError as err:
        return {"name": name, "returncode": None, "seconds": 0.0, "summary": None, "error": str(err)}
    seconds = time.perf_counter() - started
    timed_out = timeout is not None and seconds >= timeout
    return {"name": name, "returncode": code, "seconds": round(seconds, 1), "summary": summary,
            "error": "timed out" if timed_out else (None if code == 0 else f"exit code {code}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; found: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    names = [n for n in names if n not in skip]
    print(f"benchmarks: {', '.join(names)}" + (" (--quick)" if args.quick else ""), flush=True)

    results = [run_one(name, args.quick, args.timeout) for name in names]
    print("\n===== summaries")
    for result in results:
        line = result["summary"] or f"SUMMARY {result['name']}: no summary ({result['error'] or 'no SUMMARY line'})"
        print(f"{line}   [{result['seconds']} s]")
    out = HERE / "results" / "run_all.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    failed = [r["name"] for r in results if r["error"]]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU threads sized to the cores that are free now, so a box where something else runs does not thrash.

torch's default is one intra-op thread per physical core. Its OpenMP threads meet at a barrier after every
parallel op, so when another process holds one of two cores, each op waits for the descheduled thread: the demo
ran 2.3x slower with one other busy process (issue 15), where one thread would have lost almost nothing.

`apply_thread_policy()` runs once per process (the stage runner calls it before the first stage body runs; the
`python -m selpo_core.stages` entry point sets the wait policy at start): threads = usable CPUs minus the cores
other processes keep busy right now, at least 1. A user's choice wins: OMP_NUM_THREADS / MKL_NUM_THREADS in
the environment, or a `torch.set_num_threads(n)` made before (seen as a thread count different from torch's
default), leave the count alone. OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning on a
core another process needs) is set when the user has not set it and torch's OpenMP runtime is not loaded yet:
libgomp reads it once, when it loads, so it only takes effect where this runs before `import torch`.

The load of other processes is the number of runnable threads in /proc/stat (`procs_running`) minus this
process's own running threads, averaged over a few samples. Not the 1-minute load average: it lags a minute
behind a process that just started (a benchmark's competitor, a parallel test run) and still counts the work
of a run that just ended, which would halve the threads of the next run on a quiet box.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("selpo.threads")

USER_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables with which a user fixes the thread count; when set, selpo never changes it."""


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    """Intra-op threads torch uses after the policy ran (the user's count where they chose one)."""
    cpus: int
    """CPUs this process may run on (its affinity mask)."""
    other_load: float
    """Runnable threads of other processes, averaged over the samples (nan where not measured)."""
    source: str
    """"free cores" (chosen here), or what fixed the count: "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "torch.set_num_threads"."""
    wait_policy: str
    """OMP_WAIT_POLICY in effect ("" = libgomp's default: spin a while, then sleep)."""


_applied: ThreadChoice | None = None


def choose_threads(cpus: int, other_load: float) -> int:
    """Threads for `cpus` usable CPUs when other processes keep `other_load` of them busy: the free cores,
    rounded to the nearest whole core (a process busy 40% of the time leaves the core usable), at least 1."""
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    busy = math.floor(max(0.0, other_load) + 0.5)
    return max(1, min(cpus, cpus - busy))


def usable_cpus() -> int:
    """CPUs in this process's affinity mask (taskset / cgroup cpusets), else all of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _procs_running(stat: Path = Path("/proc/stat")) -> int | None:
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _own_running_threads(tasks: Path = Path("/proc/self/task")) -> int:
    """Threads of this process in state R (the sampling thread itself is one)."""
    running = 0
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return 1
    for task in entries:
        try:
            # "pid (comm) S ...": comm may hold spaces or parens, the state follows the last ')'.
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                running += 1
        except (OSError, IndexError):
            continue
    return max(1, running)


def other_load(samples: int = 10, interval_s: float = 0.02) -> float:
    """Runnable threads of other processes now (mean of `samples` reads of /proc/stat `interval_s` apart).

    Falls back to the 1-minute load average where /proc/stat is missing (not Linux)."""
    counts = []
    for index in range(samples):
        total = _procs_running()
        if total is None:
            break
        counts.append(max(0, total - _own_running_threads()))
        if index + 1 < samples:
            time.sleep(interval_s)
    if counts:
        return sum(counts) / len(counts)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def physical_cores() -> int:
    """Physical cores of the machine (distinct (package, core) pairs), which is torch's default thread count."""
    seen = set()
    package = core = None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return max(1, os.cpu_count() or 1)
    for line in [*lines, ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key:  # a blank line ends one processor's block
            if core is not None:
                seen.add((package, core))
            package = core = None
    return len(seen) or max(1, os.cpu_count() or 1)


def _user_source() -> str | None:
    """What fixed the thread count, if the user did: an environment variable, or torch.set_num_threads."""
    for name in USER_THREAD_ENV:
        if os.environ.get(name, "").strip():
            return name
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != physical_cores():
        return "torch.set_num_threads"
    return None


def set_passive_wait() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless the user set it; True where it can still take effect (torch not loaded)."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip():
        return False
    if "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def apply_thread_policy() -> ThreadChoice:
    """Size torch's intra-op threads to the free cores, once per process (later calls return the first choice)."""
    global _applied
    if _applied is not None:
        return _applied
    set_passive_wait()
    import torch

    cpus = usable_cpus()
    source = _user_source()
    if source is None:
        load = other_load()
        torch.set_num_threads(choose_threads(cpus, load))
        source = "free cores"
    else:
        load = math.nan
    _applied = ThreadChoice(threads=torch.get_num_threads(), cpus=cpus, other_load=load, source=source,
                            wait_policy=os.environ.get("OMP_WAIT_POLICY", ""))
    log.info("torch threads: %d of %d CPUs (%s; other load %.1f; OMP_WAIT_POLICY=%s)", _applied.threads, cpus,
             source, load, _applied.wait_policy or "default")
    return _applied

"""On-disk artifacts: stage directories, manifests, fingerprints, atomic writes.

Every stage writes into `<run_dir>/<stage>-<key>.tmp-<pid>/` and renames it to `<run_dir>/<stage>-<key>/` only
after its `manifest.json` is written, so a crash never leaves a directory that looks finished. The key is a
fingerprint of (stage config, input fingerprints, code version): equal inputs give the same directory, so a
re-run finds the finished stage, and a changed field gives a new directory without touching the old one.
Long stages that must resume inside (training checkpoints, scoring shards) keep their partial state in
`<run_dir>/<stage>-<key>.partial/`, which survives a crash and is moved into the final directory at the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Version of selpo that produced an artifact: the package version plus a hash of selpo_core's sources.

    Hashing the sources (not git) means an edited checkout never reuses artifacts made by other code. Computed
    once per process, so a stage is planned and written under the same key even while files are edited.
    """
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    from selpo_core import __version__

    return f"{__version__}+{digest.hexdigest()[:12]}"


def stable_hash(value: Any, length: int = 12) -> str:
    """Hash of a JSON-able value, independent of dict order."""
    payload = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> str:
    """Content fingerprint of an input: a stage dir's manifest fingerprint, a file's hash, or a hub id as is.

    Stage directories carry their fingerprint in manifest.json (computed once at write time), so hashing a
    multi-GB model directory happens once, not at every cache lookup.
    """
    target = Path(path)
    manifest = target / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text())["fingerprint"]
    if target.is_file():
        return file_digest(target)[:16]
    if target.is_dir():
        return directory_digest(target)
    return f"id:{path}"  # a hub id: its revision is pinned by the hub, not by us


def directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(directory)).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()[:16]


def stage_key(stage: str, config: Any, inputs: dict[str, str | Path]) -> str:
    """Cache key of a stage run: its config, its inputs' fingerprints, and the code version."""
    return stable_hash(
        {
            "stage": stage,
            "config": config,
            "inputs": {name: fingerprint(path) for name, path in sorted(inputs.items())},
            "code": code_version(),
        }
    )


def is_complete(stage_dir: str | Path) -> bool:
    """True when the directory was renamed into place after its manifest, and every listed file exists."""
    directory = Path(stage_dir)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size == size
               for name, size in manifest.get("files", {}).items())


def read_manifest(stage_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(stage_dir) / MANIFEST).read_text())


@dataclass
class StageOutput:
    """The directory a stage is writing, plus what goes into its manifest."""

    final_dir: Path
    work_dir: Path
    partial_dir: Path
    metrics: dict[str, Any]

    def file(self, name: str) -> Path:
        path = self.work_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@contextmanager
def stage_output(run_dir: Path, stage: str, key: str, *, inputs: dict[str, str | Path], config: Any,
                 main_process: bool = True) -> Iterator[StageOutput]:
    """Write a stage atomically. On success the manifest (inputs, fingerprint, timings, versions) is written
    and the directory renamed into place; on failure the temporary directory is removed but `partial_dir`
    (checkpoints, shards) stays for the next attempt to resume from.

    Under several processes (torchrun) every rank runs the stage body; only the main process publishes its
    directory, the others write into a private one that is discarded (they share `partial_dir`).
    """
    final_dir = run_dir / f"{stage}-{key}"
    work_dir = run_dir / f"{stage}-{key}.tmp-{os.getpid()}"
    partial_dir = run_dir / f"{stage}-{key}.partial"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    partial_dir.mkdir(parents=True, exist_ok=True)
    output = StageOutput(final_dir=final_dir, work_dir=work_dir, partial_dir=partial_dir, metrics={})
    started = time.time()
    try:
        yield output
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    if not main_process:
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    write_manifest(output, stage=stage, key=key, inputs=inputs, config=config, seconds=time.time() - started)
    if final_dir.exists():  # an incomplete leftover (is_complete was False): replace it
        shutil.rmtree(final_dir)
    os.replace(work_dir, final_dir)
    shutil.rmtree(partial_dir, ignore_errors=True)


def write_manifest(output: StageOutput, *, stage: str, key: str, inputs: dict[str, str | Path], config: Any,
                   seconds: float) -> None:
    files = {str(p.relative_to(output.work_dir)): p.stat().st_size
             for p in sorted(output.work_dir.rglob("*")) if p.is_file()}
    from selpo_core import __version__

    manifest = {
        "stage": stage,
        "key": key,
        # The artifact's identity for downstream keys: the key already hashes config, inputs and code.
        "fingerprint": stable_hash({"key": key, "files": files}, 16),
        "inputs": {name: {"path": str(path), "fingerprint": fingerprint(path)} for name, path in inputs.items()},
        "config": config,
        "metrics": output.metrics,
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(__version__),
        "files": files,
    }
    atomic_write_text(output.work_dir / MANIFEST, json.dumps(manifest, indent=2, default=str))


def _versions(selpo_version: str) -> dict[str, str]:
    versions = {"selpo": selpo_version, "code": code_version(), "python": platform.python_version()}
    for name in ("torch", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so a reader never sees half of it: temp file in the same dir, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str))

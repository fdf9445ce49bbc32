"""On-disk artifacts: stage directories, checksummed manifests, fingerprints, atomic writes.

A stage writes into `<stage>-<key>.tmp-<host>-<pid>-<random>/` and renames it to `<stage>-<key>/` only after
its `manifest.json` is written, so a crash never leaves a directory that looks finished. The manifest lists
every file with its size and sha256 and carries a checksum of itself: a finished directory is trusted only
after `verify_stage` has checked all of it (once per process; a damaged one is recomputed by the runner).
Long stages that resume inside (training checkpoints, scoring shards) keep their partial state in
`<stage>-<key>.partial/`, which survives a crash and is removed once the stage is published.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"
PARTIAL_SUFFIX = ".partial"

log = logging.getLogger("selpo.artifacts")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Version of selpo that produced an artifact: the package version plus a hash of selpo_core's sources.

    Hashing the sources (not git) means an edited checkout never reuses artifacts made by other code. Computed
    once per process, so a stage is planned and written under the same key even while files are edited.
    """
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
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


def unique_suffix() -> str:
    """A temp-name suffix no other process can produce: host, pid and a random part (pids repeat across
    containers and hosts that share a runs directory)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------- fingerprints

# (absolute path, (relative name, size, mtime_ns) of every file) -> digest: a user's model directory is hashed
# in full once per process, and again only when one of its files changes.
_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def directory_digest(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    stats = tuple((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    cache_key = (str(directory.resolve()), stats)
    if cache_key not in _DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(directory)).encode())
            digest.update(file_digest(file).encode())
        _DIGESTS[cache_key] = digest.hexdigest()[:16]
    return _DIGESTS[cache_key]


def external_fingerprint(path: str | Path) -> str:
    """Content fingerprint of a user's input: a selpo stage dir's key, a file's or directory's content hash, or
    a hub id as it is (its revision is pinned by the hub, not by us). Never the path itself, so a moved or
    copied input keeps its fingerprint."""
    target = Path(path).expanduser()
    if (target / MANIFEST).is_file():
        return read_manifest(target)["key"]
    if target.is_file():
        stat = target.stat()
        cache_key = (str(target.resolve()), (("", stat.st_size, stat.st_mtime_ns),))
        if cache_key not in _DIGESTS:
            _DIGESTS[cache_key] = file_digest(target)[:16]
        return _DIGESTS[cache_key]
    if target.is_dir():
        return directory_digest(target)
    return f"id:{path}"


# ------------------------------------------------------------------------------------------------ manifests


def read_manifest(stage_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(stage_dir) / MANIFEST).read_text())


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    return stable_hash({k: v for k, v in manifest.items() if k != "checksum"}, 64)


# Stage dirs verified in this process: path -> the (size, mtime_ns) of the manifest and of every file when they
# were hashed. A later check only stats the files: hashing happens once per process unless something changed.
_VERIFIED: dict[str, dict[str, tuple[int, int]]] = {}


def _stats(directory: Path, names: list[str]) -> dict[str, tuple[int, int]] | None:
    stats = {}
    for name in names:
        try:
            stat = (directory / name).stat()
        except OSError:
            return None
        stats[name] = (stat.st_size, stat.st_mtime_ns)
    return stats


def verify_stage(stage_dir: str | Path) -> str | None:
    """None when `stage_dir` is a published stage whose manifest and files all check out; else what is wrong.

    Checks the manifest's own checksum (an edited manifest is not trusted), then every listed file's size and
    sha256. The result is remembered per process, so a stage read many times in a run is hashed once.
    """
    directory = Path(stage_dir)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (not finished)"
    memo = str(directory.resolve())
    known = _VERIFIED.get(memo)
    if known is not None and _stats(directory, list(known)) == known:
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest.json is not valid JSON"
    if manifest.get("checksum") != _manifest_checksum(manifest):
        return "manifest.json was changed after it was written (its checksum does not match)"
    for name, entry in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['size']}"
        if file_digest(file) != entry["sha256"]:
            return f"{name} does not match its checksum (damaged)"
    stats = _stats(directory, [MANIFEST, *manifest.get("files", {})])
    if stats is not None:
        _VERIFIED[memo] = stats
    return None


def is_complete(stage_dir: str | Path) -> bool:
    """True when the directory is a published stage and all of it verifies (see `verify_stage`)."""
    return verify_stage(stage_dir) is None


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
def stage_output(final_dir: Path, *, manifest: dict[str, Any], main_process: bool = True) -> Iterator[StageOutput]:
    """Write a stage atomically into `final_dir`. On success the manifest (`manifest` + metrics, timings,
    versions, file checksums) is written and the directory renamed into place; on failure the temporary
    directory is removed but `partial_dir` (checkpoints, shards) stays for the next attempt to resume from.

    Under several processes (torchrun) every rank runs the stage body; only the main process publishes its
    directory, the others write into a private one that is discarded (they share `partial_dir`).
    """
    work_dir = final_dir.with_name(f"{final_dir.name}{TMP_MARK}{unique_suffix()}")
    partial_dir = final_dir.with_name(final_dir.name + PARTIAL_SUFFIX)
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
    write_manifest(output, manifest, seconds=time.time() - started)
    if final_dir.exists():  # a damaged or unfinished leftover (the runner found it not complete): replace it
        shutil.rmtree(final_dir)
    os.replace(work_dir, final_dir)
    shutil.rmtree(partial_dir, ignore_errors=True)


def write_manifest(output: StageOutput, manifest: dict[str, Any], *, seconds: float) -> None:
    from selpo_core import __version__

    files = {str(p.relative_to(output.work_dir)): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(output.work_dir.rglob("*")) if p.is_file()}
    full = {**manifest, "metrics": output.metrics, "seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(__version__), "files": files}
    full["checksum"] = _manifest_checksum(json.loads(json.dumps(full, default=str)))
    atomic_write_text(output.work_dir / MANIFEST, json.dumps(full, indent=2, default=str))


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
    tmp = path.with_name(f".{path.name}{TMP_MARK}{unique_suffix()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str))

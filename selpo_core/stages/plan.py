"""Stage plans: what a stage is (its key, its dir, its inputs), computed without running anything.

A `StagePlan` is a small JSON-able value: the stage's name (`policy_dpo`), the kind of work (`policy`), the
config it reads (`section`), and its inputs, each either an upstream stage (by its dir name) or a user's path,
with a content fingerprint. The key hashes exactly those plus the code version, so it depends on content,
never on where things lie: a moved or copied runs directory, or another run name, finds the same stages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selpo_core.artifacts import code_version, external_fingerprint, stable_hash

STORE = "_stages"
"""`<runs_dir>/_stages/` holds every stage dir; `<runs_dir>/<run>/` links to the ones the run used."""


@dataclass(frozen=True)
class StageInput:
    """One input of a stage: an upstream stage dir (`stage`, in the store) or a user's `path` (file, dir, hub id).

    `sub` names a part of it (`model`: the weights dir inside a stage dir). `fingerprint` is what enters keys.
    """

    fingerprint: str
    stage: str = ""
    path: str = ""
    sub: str = ""

    def resolve(self, store: Path) -> str:
        """The path (or hub id) a stage body reads."""
        base = str(store / self.stage) if self.stage else self.path
        return str(Path(base) / self.sub) if self.sub else base


def external(path: str, sub: str = "") -> StageInput:
    """A user's file, directory or hub id; a selpo stage dir given by the user counts as that stage."""
    if not path:
        raise ValueError("an input path is empty")
    target = Path(path).expanduser()
    is_stage_dir = (target / "manifest.json").is_file()
    return StageInput(fingerprint=external_fingerprint(target if target.exists() else path), path=str(path),
                      sub=sub if is_stage_dir else "")


@dataclass(frozen=True)
class StagePlan:
    """A stage, planned: `run_dir`-independent, cheap to build, and all a runner needs besides the config."""

    name: str
    """Dir prefix and record name: sft_reference, oracle, policy_dpo, tso_round2_pairs..."""
    kind: str
    """Which stage body runs it: synthetic, data, sft, oracle, score, select, policy, generate, evaluate, tso_*."""
    title: str
    """Readable name (the task run's name in the Prefect UI)."""
    section: dict[str, Any]
    """The config this stage reads, and so its key: exactly what can change its output."""
    inputs: dict[str, StageInput]
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            fingerprints = {name: value.fingerprint for name, value in sorted(self.inputs.items())}
            object.__setattr__(self, "key", stable_hash({"stage": self.name, "kind": self.kind, "config": self.section,
                                                         "inputs": fingerprints, "code": code_version()}))

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.key}"

    def ref(self, sub: str = "") -> StageInput:
        """This stage as an input of another."""
        return StageInput(fingerprint=self.key, stage=self.dirname, sub=sub)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> StagePlan:
        inputs = {name: StageInput(**item) for name, item in value["inputs"].items()}
        return cls(value["name"], value["kind"], value["title"], value["section"], inputs, value["key"])


def store_dir(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / STORE

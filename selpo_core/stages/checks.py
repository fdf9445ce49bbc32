"""Fail fast: before any stage runs, check everything the run will need, and name every problem at once.

One line per problem, each naming its config field: data files that are missing, model dirs that cannot load
(no config.json, only pickled weights, truncated safetensors, a typo in a local path, a hub id not in the
offline cache), generation prompts that are missing, judge and reward-model paths, and the disk space the
training stages' checkpoints will take. Cheap: file headers and sizes only, never a model load.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from selpo_core.config import ConfigError, RunConfig

CHECKPOINT_FACTOR = 6
"""Bytes a training stage in progress holds per byte of its model: two kept checkpoints of weights plus Adam's two
moments (about 3x the weights each)."""


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.endswith((".json", ".jsonl", ".parquet", ".gz"))


def _file_problems(field: str, path: str) -> Iterator[str]:
    if not path or not _looks_local(path):
        return  # empty (not used) or a hub dataset id
    local = Path(path).expanduser()
    if not local.exists():
        yield f"{field}={path!r}: no such file ({local.resolve()})"
    elif local.is_file() and local.stat().st_size == 0:
        yield f"{field}={path!r}: the file is empty"


def _model_problems(field: str, path: str) -> Iterator[str]:
    from selpo_core.models import check_model_source

    if path and (problem := check_model_source(path, what=field)):
        yield problem


def model_fields(cfg: RunConfig, methods: Sequence[str], tso: bool) -> list[tuple[str, str]]:
    """(config field, path) of every model the run loads from outside (its own stages aside)."""
    fields = [("reference.path", cfg.reference.path), ("policy_model.path", cfg.policy_model.path)]
    if "selective_dpo" in methods:
        fields.append(("policy.sdpo_reference", cfg.policy.sdpo_reference))
    fields.append(("evaluate.reward_model", cfg.evaluate.reward_model))
    if tso:
        fields += [("tso.generators", g) for g in cfg.tso.generators if g != "initial"]
        if cfg.tso.judge == "reward_model":
            fields.append(("tso.judge_path", cfg.tso.judge_path))
    return [(field, path) for field, path in fields if path]


def _needs(cfg: RunConfig, models: list[tuple[str, str]]) -> int:
    """Bytes the run will write: each training stage's model, plus one stage's checkpoints in progress."""
    sizes = [sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
             for _, path in models if Path(path).is_dir()]
    if not sizes:
        return 0  # tiny models built in-process: nothing worth counting
    n_training = 2 + len(cfg.policy.methods) + (cfg.sft.enabled * 2)
    return (n_training + CHECKPOINT_FACTOR) * max(sizes)


def _disk_problems(cfg: RunConfig, models: list[tuple[str, str]]) -> Iterator[str]:
    need = _needs(cfg, models)
    if not need:
        return
    where = Path(cfg.runs_dir).expanduser()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        yield (f"runs_dir={cfg.runs_dir!r}: {free / 2**30:.1f} GiB free on {where}, the run needs about "
               f"{need / 2**30:.1f} GiB (trained models and their checkpoints)")


def _same_vocabulary(a: str, b: str) -> bool:
    from selpo_core.models import load_tokenizer

    return Path(a).resolve() == Path(b).resolve() or load_tokenizer(a).get_vocab() == load_tokenizer(b).get_vocab()


def _anchor_problems(cfg: RunConfig, methods: Sequence[str], found: list[str]) -> Iterator[str]:
    """Selective-DPO scores the policy's own tokens with its anchor: both need one tokenizer."""
    anchor = cfg.policy.sdpo_reference or cfg.reference.path  # the default anchor, the oracle, is the reference's
    policy = cfg.policy_model.path or cfg.reference.path
    if "selective_dpo" not in methods or not anchor or not policy or found:
        return
    if not _same_vocabulary(anchor, policy):
        which = "policy.sdpo_reference" if cfg.policy.sdpo_reference else "the oracle (trained from reference.path)"
        yield (f"policy.sdpo_reference: selective_dpo's scorer and anchor, {which}, has another tokenizer than the "
               "policy (policy_model.path); set policy.sdpo_reference to a model with the policy's tokenizer")


def problems(cfg: RunConfig, methods: Sequence[str], *, tso: bool = False) -> list[str]:
    """Every problem the run would hit, one line each."""
    found = [*_file_problems("data.path", cfg.data.path), *_file_problems("data.sft_path", cfg.data.sft_path),
             *_file_problems("generate.prompts", cfg.generate.prompts),
             *_file_problems("evaluate.baseline_answers", cfg.evaluate.baseline_answers)]
    if tso and cfg.tso.judge == "labels":
        found += _file_problems("tso.judge_path", cfg.tso.judge_path)
    if tso and cfg.tso.judge == "truth" and cfg.data.path:
        found.append("tso.judge='truth' needs the synthetic task (data.path empty); with your own data use "
                     "tso.judge=reward_model or labels")
    for field in ("reference", "policy_model"):
        if not getattr(cfg, field).path and (cfg.data.path or not cfg.sft.enabled):
            found.append(f"{field}.path is empty: set it to your model (a tiny model is built only for the "
                         "synthetic task with sft.enabled)")
    models = model_fields(cfg, methods, tso)
    for field, path in models:
        found += _model_problems(field, path)
    found += _disk_problems(cfg, models)
    found += _anchor_problems(cfg, methods, found)
    return found


def check_run(cfg: RunConfig, methods: Sequence[str], *, tso: bool = False) -> None:
    """Raise one ConfigError listing every problem (one per line), before anything runs."""
    found = problems(cfg, methods, tso=tso)
    if found:
        raise ConfigError("\n".join(found))

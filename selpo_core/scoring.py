"""Offline token scoring: oracle and reference log-probs of every response token -> Parquet shards.

r(y_t) = beta * (log pi_oracle(y_t) - log pi_ref(y_t)) for every token (EOS included) of every chosen and
rejected response (docs/METHODS.md, SePO step 2). One Parquet row per response, see SCORE_SCHEMA.

Plan. All responses are ordered by total length (prompt + response), so neighbours pad little, and cut into
shards of `cfg.shard_rows` responses; inside a shard, `token_budget_batches` forms the forward batches. The
plan depends only on the inputs, so a re-run (or another rank) computes the same shards and the same batches,
hence bit-identical values. Shard i goes to `shard_dir/part-{i:05d}.parquet`, written to a temp file and
renamed, with its plan entry (a digest of its inputs, row count, keys, index, shard count, plan digest, and
its token counts) in the Parquet metadata; `plan.json` lists every entry. A re-run skips shards that read back
completely (page checksums and full Arrow validation) with the expected entry, keys and rows, and recomputes a
missing one, and, with a warning naming it, a 0-byte, truncated, corrupt or stale one. `read_scores` uses
plan.json, or, when only the part files were moved somewhere, the entries the shards carry.

Temp files carry host, pid and a random token (selpo_core/atomic.py), so two processes scoring into one
directory never share a temp name; both write identical shards, and whichever rename lands last wins.

Metrics mean the same however the work was split: token counts and `pad_fraction` come from the plan entries
of all shards (what one uninterrupted single-process run would count), while `shards_scored`,
`real_tokens_scored`, `forward_seconds` and `real_tokens_per_second` describe this call's own work.

Data parallel: rank r owns the shards with `i % world_size == r`; the caller runs a barrier before
`read_scores`. Model identity is not in the digest: the shard dir is a stage's partial dir whose key already
fingerprints both models (selpo_core/artifacts.py).

Memory vs speed (`cfg.one_model_at_a_time`):
- side by side (default): both models stay loaded, each batch goes through the oracle then the reference.
  Peak memory = both models' weights + one forward's activations. One pass over the data.
- one model at a time: pass 1 loads the oracle, scores every pending shard and spills its log-probs to
  `.oracle-part-*.parquet` (4 bytes per response token), then frees it; pass 2 loads the reference and
  writes the final shards. Peak memory = one model's weights, for the price of a second model load and the
  spill I/O; the forwards themselves are the same work. Results are bit-identical to side by side (same
  batches). A crash in pass 2 keeps the spills, so the resume loads only the reference.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from selpo_core import progress
from selpo_core.artifacts import atomic_write_json
from selpo_core.atomic import remove_dead_leftovers, temp_path
from selpo_core.batching import token_budget_batches
from selpo_core.config import ScoreConfig
from selpo_core.logps import model_per_token_logps
from selpo_core.models import default_device, load_model, resolve_dtype

if TYPE_CHECKING:
    from selpo_core.data import TokenizedPair

log = logging.getLogger("selpo.scoring")

SIDES = ("chosen", "rejected")
PLAN_FILE = "plan.json"
FORMAT = "selpo-scores/2"  # 2: entries carry token counts
_META_KEY = b"selpo.shard"
_FLOAT_COLUMNS = ("oracle_logps", "ref_logps", "log_ratio", "rewards")
_LIST_COLUMNS = ("token_ids", "offset_start", "offset_end", *_FLOAT_COLUMNS)

SCORE_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),  # "chosen" | "rejected"
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),  # response ids, EOS included
        pa.field("offset_start", pa.list_(pa.int32()), nullable=False),  # char span of each token in `text`
        pa.field("offset_end", pa.list_(pa.int32()), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # the response text the offsets index
        pa.field("oracle_logps", pa.list_(pa.float32()), nullable=False),
        pa.field("ref_logps", pa.list_(pa.float32()), nullable=False),
        pa.field("log_ratio", pa.list_(pa.float32()), nullable=False),  # oracle_logps - ref_logps
        pa.field("rewards", pa.list_(pa.float32()), nullable=False),  # beta * log_ratio
    ]
)
_SPILL_SCHEMA = pa.schema([pa.field("oracle_logps", pa.list_(pa.float32()), nullable=False)])


class ScoresError(RuntimeError):
    """Scores on disk are missing or invalid; the message names the shard."""


# --------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Response:
    example_id: str
    side: str
    prompt_ids: np.ndarray  # int64 [P]
    ids: np.ndarray  # int64 [R], EOS included
    text: str
    offsets: np.ndarray  # int32 [R, 2]

    @property
    def total(self) -> int:
        return len(self.prompt_ids) + len(self.ids)


@dataclass(frozen=True)
class _Shard:
    index: int
    responses: list[_Response]
    digest: str  # inputs of every row + beta + dtype: a stale shard never passes for a current one
    keys_digest: str  # (example_id, side) in row order: recomputable from the shard alone
    shards_total: int = 0
    plan_digest: str = ""  # all shard digests: shards of one plan agree, so a stray old shard shows
    padded_tokens: int = 0  # rows x longest row, summed over the shard's forward batches

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"

    @property
    def spill_name(self) -> str:
        return f".oracle-{self.name}"

    def entry(self) -> dict[str, Any]:
        """What plan.json records of this shard and the shard's own Parquet metadata: a shard is valid
        only when its metadata equals this entry and its content matches rows and keys."""
        return {
            "format": FORMAT,
            "name": self.name,
            "index": self.index,
            "shards_total": self.shards_total,
            "plan_digest": self.plan_digest,
            "rows": len(self.responses),
            "digest": self.digest,
            "keys_digest": self.keys_digest,
            # Token counts go with the shard, so metrics summed over shards are the same after a resume.
            "response_tokens": sum(len(r.ids) for r in self.responses),
            "real_tokens": _real_tokens([self]),  # prompt + response tokens, each response counted once
            "padded_tokens": self.padded_tokens,
        }


def _responses(pairs: Sequence[TokenizedPair]) -> list[_Response]:
    """Both responses of every pair; an exact duplicate pair is scored once (its id is a content hash)."""
    out: list[_Response] = []
    seen: dict[str, TokenizedPair] = {}
    for pair in pairs:
        if pair.example_id in seen:
            first = seen[pair.example_id]
            same = all(
                list(getattr(first, f)) == list(getattr(pair, f))
                for f in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_offsets", "rejected_offsets")
            )
            if not same or (first.chosen_text, first.rejected_text) != (pair.chosen_text, pair.rejected_text):
                raise ValueError(f"example_id {pair.example_id} is used by two different pairs")
            continue
        seen[pair.example_id] = pair
        prompt = np.asarray(list(pair.prompt_ids), dtype=np.int64)
        if prompt.size == 0:  # position 0 has no prediction: the first response token needs a context
            raise ValueError(f"example {pair.example_id} has an empty prompt; scoring needs a prompt token")
        for side in SIDES:
            ids = np.asarray(list(getattr(pair, f"{side}_ids")), dtype=np.int64)
            offsets = np.asarray([tuple(o) for o in getattr(pair, f"{side}_offsets")], dtype=np.int32)
            offsets = offsets.reshape(-1, 2)
            if ids.size == 0 or len(offsets) != len(ids):
                raise ValueError(
                    f"example {pair.example_id} {side}: {len(ids)} tokens but {len(offsets)} offsets "
                    "(a response has >= 1 token, EOS included, and one offset per token)"
                )
            text = getattr(pair, f"{side}_text")
            out.append(_Response(pair.example_id, side, prompt, ids, text, offsets))
    return out


def _feed(digest: Any, data: bytes) -> None:
    # Length prefix: ("ab", "c") and ("a", "bc") must not hash alike.
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _keys_digest(example_ids: Sequence[str], sides: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for example_id, side in zip(example_ids, sides, strict=True):
        _feed(digest, example_id.encode())
        _feed(digest, side.encode())
    return digest.hexdigest()[:32]


def _plan(pairs: Sequence[TokenizedPair], cfg: ScoreConfig, dtype: torch.dtype) -> list[_Shard]:
    responses = _responses(pairs)
    # Ties broken by id and side, so the plan does not depend on the order of the input pairs.
    responses.sort(key=lambda r: (r.total, r.example_id, r.side))
    shards = []
    for index, start in enumerate(range(0, len(responses), cfg.shard_rows)):
        chunk = responses[start : start + cfg.shard_rows]
        digest = hashlib.sha256()
        _feed(digest, f"{FORMAT}|beta={cfg.beta!r}|dtype={dtype}".encode())
        for r in chunk:
            for part in (r.example_id.encode(), r.side.encode(), r.text.encode()):
                _feed(digest, part)
            for array in (r.prompt_ids, r.ids, r.offsets):
                _feed(digest, array.tobytes())
        keys = _keys_digest([r.example_id for r in chunk], [r.side for r in chunk])
        shard = _Shard(index, chunk, digest.hexdigest()[:32], keys)
        # vLLM scores every sequence on its own (paged attention): nothing is padded.
        padded = sum(r.total for r in chunk) if cfg.backend == "vllm" else \
            sum(len(b) * max(chunk[i].total for i in b) for b in _batches(shard, cfg.batch_tokens))
        shards.append(dataclasses.replace(shard, padded_tokens=padded))
    plan_digest = hashlib.sha256("|".join(s.digest for s in shards).encode()).hexdigest()[:32]
    return [dataclasses.replace(s, shards_total=len(shards), plan_digest=plan_digest) for s in shards]


def _plan_json(shards: list[_Shard], cfg: ScoreConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "beta": cfg.beta,
        "dtype": str(dtype),
        "n_responses": sum(len(s.responses) for s in shards),
        "shards_total": len(shards),
        "shards": [s.entry() for s in shards],
    }


# --------------------------------------------------------------------------------------------- shard I/O


def _list_array(arrays: Sequence[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def _write_parquet_atomic(table: pa.Table, path: Path, entry: dict[str, Any]) -> None:
    """Temp file in the same directory, fsync, rename: a reader sees the whole shard or none."""
    table = table.replace_schema_metadata({_META_KEY: json.dumps(entry, sort_keys=True).encode()})
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            # Page checksums let the reader detect flipped bytes inside data pages, not only a bad footer.
            pq.write_table(table, handle, compression="zstd", write_page_checksum=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_meta(path: Path) -> dict[str, Any] | None:
    """The entry a shard carries in its footer, or None when the footer cannot be read."""
    try:
        meta = pq.read_schema(path).metadata or {}
        value = json.loads(meta[_META_KEY])
    except Exception:  # missing, truncated, not Parquet, no or bad metadata: all mean "not a valid shard"
        return None
    return value if isinstance(value, dict) else None


def _read_checked(path: Path, expected: dict[str, Any], schema: pa.Schema) -> tuple[pa.Table | None, str]:
    """(table, "") when `path` reads back whole (page checksums verified), carries `expected` as its
    metadata, has the schema and the expected rows; else (None, why)."""
    if not path.is_file():
        return None, "is missing"
    try:
        table = pq.read_table(path, page_checksum_verification=True)
        table.validate(full=True)  # offsets in bounds, valid UTF-8: nothing below can trip over the data
    except Exception as err:  # truncated, corrupt footer, checksum mismatch, not Parquet at all
        return None, f"is unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
    try:
        meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    if meta != expected:
        return None, "was written for other inputs, settings or plan (metadata mismatch)"
    table = table.replace_schema_metadata(None)
    if not table.schema.equals(schema):
        return None, "has an unexpected schema"
    if table.num_rows != expected["rows"]:
        return None, f"has {table.num_rows} rows, expected {expected['rows']}"
    return table, ""


def _validate_shard(path: Path, expected: dict[str, Any]) -> tuple[pa.Table | None, str]:
    """(table, "") for a shard that reads back whole and matches its plan entry, else (None, why)."""
    table, why = _read_checked(path, expected, SCORE_SCHEMA)
    if table is None:
        return None, why
    ids, sides = table.column("example_id").to_pylist(), table.column("side").to_pylist()
    if _keys_digest(ids, sides) != expected["keys_digest"]:
        return None, "holds other responses than planned (keys mismatch)"
    n_tokens = pc.list_value_length(table.column("token_ids"))
    for name in _LIST_COLUMNS[1:]:
        if not pc.all(pc.equal(pc.list_value_length(table.column(name)), n_tokens)).as_py():
            return None, f"has {name} lists whose lengths differ from token_ids"
    return table, ""


def _read_spill(path: Path, shard: _Shard) -> list[np.ndarray] | None:
    table, _ = _read_checked(path, shard.entry(), _SPILL_SCHEMA)
    if table is None:
        return None
    column = table.column("oracle_logps").to_numpy(zero_copy_only=False)
    values = [np.asarray(v, dtype=np.float32) for v in column]
    if any(len(v) != len(r.ids) for v, r in zip(values, shard.responses, strict=True)):
        return None
    return values


def _shard_table(shard: _Shard, oracle: list[np.ndarray], ref: list[np.ndarray], beta: float) -> pa.Table:
    responses = shard.responses
    log_ratio = [(o - r).astype(np.float32) for o, r in zip(oracle, ref, strict=True)]
    # beta rounded to float32 first, so rewards == float32(beta) * log_ratio exactly, whatever numpy promotes.
    beta32 = np.float32(beta)
    rewards = [(beta32 * lr).astype(np.float32) for lr in log_ratio]
    columns = {
        "example_id": pa.array([r.example_id for r in responses], type=pa.string()),
        "side": pa.array([r.side for r in responses], type=pa.string()),
        "token_ids": _list_array([r.ids.astype(np.int32) for r in responses], pa.int32()),
        "offset_start": _list_array([r.offsets[:, 0] for r in responses], pa.int32()),
        "offset_end": _list_array([r.offsets[:, 1] for r in responses], pa.int32()),
        "text": pa.array([r.text for r in responses], type=pa.string()),
        "oracle_logps": _list_array(oracle, pa.float32()),
        "ref_logps": _list_array(ref, pa.float32()),
        "log_ratio": _list_array(log_ratio, pa.float32()),
        "rewards": _list_array(rewards, pa.float32()),
    }
    return pa.Table.from_pydict(columns, schema=SCORE_SCHEMA)


# ---------------------------------------------------------------------------------------------- forwards


@dataclass
class _Counter:
    real: int = 0
    padded: int = 0
    seconds: float = 0.0


def _batches(shard: _Shard, batch_tokens: int) -> list[list[int]]:
    return token_budget_batches([r.total for r in shard.responses], batch_tokens)


def _forward(model: Any, rows: Sequence[_Response], device: torch.device) -> list[np.ndarray]:
    """Response-token log-probs (float32) of each row: prompt+response, right-padded, one forward."""
    width = max(r.total for r in rows)
    # The pad id is irrelevant: right padding behind attention_mask=0 never reaches a real position.
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for j, r in enumerate(rows):
        input_ids[j, : r.total] = torch.from_numpy(np.concatenate([r.prompt_ids, r.ids]))
        attention_mask[j, : r.total] = 1
        loss_mask[j, len(r.prompt_ids) : r.total] = True
    tensors = (t.to(device) for t in (input_ids, attention_mask, loss_mask))
    logps = model_per_token_logps(model, *tensors).float().cpu().numpy()
    return [logps[j, len(r.prompt_ids) : r.total].copy() for j, r in enumerate(rows)]


def _score_shard(
    models: Sequence[Any], shard: _Shard, cfg: ScoreConfig, device: torch.device, counter: _Counter, bar: tqdm
) -> list[list[np.ndarray]]:
    """Log-probs of every response of `shard` under each model, in shard row order."""
    out: list[list[np.ndarray]] = [[np.zeros(0, np.float32)] * len(shard.responses) for _ in models]
    for batch in _batches(shard, cfg.batch_tokens):
        rows = [shard.responses[i] for i in batch]
        started = time.perf_counter()
        for m, model in enumerate(models):
            for i, values in zip(batch, _forward(model, rows, device), strict=True):
                out[m][i] = values
        real = sum(r.total for r in rows)
        counter.real += real
        counter.padded += len(rows) * max(r.total for r in rows)
        counter.seconds += time.perf_counter() - started
        bar.update(real)
        progress.report(bar.desc, bar.n, bar.total)
    return out


def _load(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    model = load_model(path, dtype=dtype, device=device)
    model.eval()
    model.requires_grad_(False)
    return model


def _release_memory(*, collect: bool) -> None:
    """Give dropped models' memory back before the next load. A full gc pass costs ~1 s in a big process, so
    it runs only where it matters: between the two models, or before the CUDA cache is emptied."""
    if collect or torch.cuda.is_available():
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(total: int, desc: str) -> tqdm:
    # Real (non-pad) prompt+response tokens, so the rate is the throughput users can compare across runs.
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, mininterval=2.0)
    bar.desc = desc  # a disabled bar (TQDM_DISABLE=1) has no desc, and progress.report reads it
    return bar


# ------------------------------------------------------------------------------------------------ public


def score_pairs(
    pairs: Sequence[TokenizedPair],
    oracle_dir: Path,
    reference_dir: Path,
    cfg: ScoreConfig,
    shard_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Score every response of `pairs` into this rank's `shard_dir/part-*.parquet`; return metrics.

    Valid shards from an earlier run are kept; missing ones are computed, invalid ones (0-byte, truncated,
    corrupt, stale) recomputed with a warning naming them. Models are loaded only when something is left to
    score. Metrics:
    - of the whole plan (every shard of every rank; equal after any resume, for any world size):
      n_responses, n_tokens (response tokens), real_tokens (prompt + response, each response once),
      padded_tokens, pad_fraction (1 - real / padded over every forward batch), shards_total;
    - of this call on this rank: shards_reused, shards_scored, real_tokens_scored, forward_seconds,
      real_tokens_per_second (real_tokens_scored / forward_seconds: the forward throughput, each response
      counted once although two models read it; 0.0 when nothing was scored), seconds (wall).
    """
    started = time.perf_counter()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    for leftover in remove_dead_leftovers(shard_dir):
        log.info("removed %s, left by a process that died while writing it", leftover)
    device = default_device()
    dtype = resolve_dtype(cfg.precision, device)
    shards = _plan(pairs, cfg, dtype)
    # Every rank writes the same plan (same inputs); unique temp names and the atomic rename make it harmless.
    atomic_write_json(shard_dir / PLAN_FILE, _plan_json(shards, cfg, dtype))
    if rank == 0:  # shards of an older, longer plan would otherwise travel with the results
        planned = {s.name for s in shards}
        for stale in shard_dir.glob("part-*.parquet"):
            if stale.name not in planned:
                stale.unlink(missing_ok=True)

    mine = [s for s in shards if s.index % world_size == rank]
    pending = [s for s in mine if not _is_done(shard_dir, s, warn=True)]
    counter = _Counter()
    desc = "scoring" if world_size == 1 else f"scoring[rank {rank}]"
    if pending and cfg.backend == "vllm":  # prompt log-probs from vLLM in its own venv: selpo_core/vllm_scoring.py
        from selpo_core.vllm_scoring import score_shards

        score_shards(pending, oracle_dir, reference_dir, cfg, shard_dir, counter, finish=_finish)
    elif pending and cfg.one_model_at_a_time:
        _score_one_at_a_time(pending, oracle_dir, reference_dir, cfg, shard_dir, dtype, device, counter, desc)
    elif pending:
        _score_side_by_side(pending, oracle_dir, reference_dir, cfg, shard_dir, dtype, device, counter, desc)
    _release_memory(collect=False)  # the models went out of scope with the scoring functions
    for shard in mine:  # spills of shards that are final now (e.g. finished by a side-by-side re-run)
        (shard_dir / shard.spill_name).unlink(missing_ok=True)

    return {
        **_summary([s.entry() for s in shards], shard_dir),
        "shards_reused": len(mine) - len(pending),
        "shards_scored": len(pending),
        "real_tokens_scored": counter.real,
        "forward_seconds": counter.seconds,
        "real_tokens_per_second": counter.real / counter.seconds if counter.seconds else 0.0,
        "seconds": time.perf_counter() - started,
    }


def _is_done(shard_dir: Path, shard: _Shard, *, warn: bool) -> bool:
    """True when the shard on disk is valid; a present but invalid one is logged (with `warn`) and redone."""
    path = shard_dir / shard.name
    table, why = _validate_shard(path, shard.entry())
    if table is None and warn and path.exists():
        log.warning("scores shard %s %s; scoring it again", path, why)
    return table is not None


def _summary(entries: Sequence[dict[str, Any]], where: Path) -> dict[str, Any]:
    """Token counts and pad_fraction summed over plan entries: the same for one run, a resume or N ranks."""
    counts = ("rows", "response_tokens", "real_tokens", "padded_tokens")
    totals = dict.fromkeys(counts, 0)
    for entry in entries:
        missing = [name for name in counts if not isinstance(entry.get(name), int) or entry[name] < 0]
        if missing:
            raise ScoresError(f"scores shard {where / str(entry.get('name'))} has no valid {missing[0]} "
                              "in its plan entry (unreadable shard, or written by an older selpo)")
        for name in counts:
            totals[name] += entry[name]
    real, padded = totals["real_tokens"], totals["padded_tokens"]
    return {
        "n_responses": totals["rows"],
        "n_tokens": totals["response_tokens"],
        "real_tokens": real,
        "padded_tokens": padded,
        "pad_fraction": (padded - real) / padded if padded else 0.0,
        "shards_total": len(entries),
    }


def scores_summary(scores_dir: Path) -> dict[str, Any]:
    """The plan-wide metrics of `score_pairs` (n_responses, n_tokens, real_tokens, padded_tokens,
    pad_fraction, shards_total) from a scores dir's plan.json, or from its shards' own entries."""
    scores_dir = Path(scores_dir)
    return _summary(_plan_entries(scores_dir), scores_dir)


def _real_tokens(shards: Sequence[_Shard]) -> int:
    return sum(r.total for s in shards for r in s.responses)


def _finish(
    shard: _Shard, oracle: list[np.ndarray], ref: list[np.ndarray], beta: float, out_dir: Path
) -> None:
    _write_parquet_atomic(_shard_table(shard, oracle, ref, beta), out_dir / shard.name, shard.entry())
    # Its oracle spill (one model at a time) is used up: the shard is final from here on.
    (out_dir / shard.spill_name).unlink(missing_ok=True)


def _score_side_by_side(
    pending: list[_Shard], oracle_dir: Path, reference_dir: Path, cfg: ScoreConfig, shard_dir: Path,
    dtype: torch.dtype, device: torch.device, counter: _Counter, desc: str,
) -> None:  # fmt: skip
    oracle = _load(Path(oracle_dir), dtype, device)
    reference = _load(Path(reference_dir), dtype, device)
    with torch.inference_mode(), _bar(_real_tokens(pending), desc) as bar:
        for shard in pending:
            oracle_logps, ref_logps = _score_shard((oracle, reference), shard, cfg, device, counter, bar)
            _finish(shard, oracle_logps, ref_logps, cfg.beta, shard_dir)


def _score_one_at_a_time(
    pending: list[_Shard], oracle_dir: Path, reference_dir: Path, cfg: ScoreConfig, shard_dir: Path,
    dtype: torch.dtype, device: torch.device, counter: _Counter, desc: str,
) -> None:  # fmt: skip
    # Pass 1: oracle log-probs of shards without a valid spill (a crash in pass 2 keeps the spills).
    need_oracle = [s for s in pending if _read_spill(shard_dir / s.spill_name, s) is None]
    pass_counter = _Counter()
    if need_oracle:
        oracle = _load(Path(oracle_dir), dtype, device)
        with torch.inference_mode(), _bar(_real_tokens(need_oracle), f"{desc} (oracle pass)") as bar:
            for shard in need_oracle:
                (values,) = _score_shard((oracle,), shard, cfg, device, pass_counter, bar)
                spill = pa.table([_list_array(values, pa.float32())], schema=_SPILL_SCHEMA)
                _write_parquet_atomic(spill, shard_dir / shard.spill_name, shard.entry())
        del oracle
        _release_memory(collect=True)
    # Pass 2: reference log-probs, then the final shard; each response's real tokens counted once.
    reference = _load(Path(reference_dir), dtype, device)
    with torch.inference_mode(), _bar(_real_tokens(pending), f"{desc} (reference pass)") as bar:
        for shard in pending:
            oracle_logps = _read_spill(shard_dir / shard.spill_name, shard)
            if oracle_logps is None and _is_done(shard_dir, shard, warn=False):
                continue  # another process scoring this dir finished the shard and removed the spill
            if oracle_logps is None:
                raise ScoresError(f"oracle spill {shard_dir / shard.spill_name} vanished or broke mid-run")
            (ref_logps,) = _score_shard((reference,), shard, cfg, device, counter, bar)
            _finish(shard, oracle_logps, ref_logps, cfg.beta, shard_dir)
    counter.seconds += pass_counter.seconds


def read_scores(scores_dir: Path) -> pa.Table:
    """All shards of `scores_dir` in plan order, each validated; a one-line ScoresError names a bad shard.

    The plan comes from plan.json when present; otherwise from the shards themselves (each carries its plan
    entry: index, shards_total, plan digest), so a directory holding only the part files still reads, and a
    missing index or a shard of another plan is still named.
    """
    scores_dir = Path(scores_dir)
    entries = _plan_entries(scores_dir)
    tables = []
    for entry in entries:
        table, why = _validate_shard(scores_dir / entry["name"], entry)
        if table is None:
            raise ScoresError(
                f"scores shard {scores_dir / entry['name']} {why} "
                f"(the plan has {len(entries)} shards; did every rank finish scoring?)"
            )
        tables.append(table)
    if not tables:
        return SCORE_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def _plan_entries(scores_dir: Path) -> list[dict[str, Any]]:
    plan_path = scores_dir / PLAN_FILE
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ScoresError(f"{plan_path} is not valid JSON: {err}") from None
        if not isinstance(plan, dict) or plan.get("format") != FORMAT:
            found = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
            raise ScoresError(f"{plan_path} has format {found!r}, expected {FORMAT}")
        shards = plan.get("shards")
        if not isinstance(shards, list) or not all(isinstance(e, dict) and "name" in e for e in shards):
            raise ScoresError(f"{plan_path} has no valid 'shards' list")
        return shards
    files = sorted(scores_dir.glob("part-*.parquet"))
    if not files:
        raise ScoresError(f"no {PLAN_FILE} and no part-*.parquet in {scores_dir}: nothing was scored there")
    metas = {path.name: _shard_meta(path) for path in files}
    plans = {(m["plan_digest"], m["shards_total"]) for m in metas.values() if m and "plan_digest" in m}
    if not plans:
        raise ScoresError(f"scores shard {files[0]} is unreadable and {scores_dir} has no {PLAN_FILE}")
    if len(plans) > 1:
        counts = Counter(m["plan_digest"] for m in metas.values() if m and "plan_digest" in m)
        majority = counts.most_common(1)[0][0]
        odd = sorted(n for n, m in metas.items() if m and m.get("plan_digest", majority) != majority)
        raise ScoresError(
            f"scores shard {scores_dir / odd[0]} belongs to another scoring plan than its neighbours"
        )
    ((plan_digest, total),) = plans
    entries = []
    for index in range(total):
        name = f"part-{index:05d}.parquet"
        meta = metas.get(name)
        # A shard with unreadable metadata gets a placeholder entry, so validation names it as broken.
        entries.append(
            meta if meta and meta.get("plan_digest") == plan_digest else {"name": name, "rows": -1}
        )
    return entries


def iter_rows(table: pa.Table, batch_rows: int = 4096) -> Iterator[dict[str, Any]]:
    """Rows of a scores table as dicts, converting in batches (to_pylist of a whole large table is slow)."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield from batch.to_pylist()


def scores_to_pair_lookup(table: pa.Table) -> dict[tuple[str, str], dict[str, Any]]:
    """{(example_id, side): row dict} so training fetches per-token ref log-probs (and `selected`, when the
    table has it) by example. Each (example_id, side) must appear once."""
    lookup: dict[tuple[str, str], dict[str, Any]] = {}
    for row in iter_rows(table):
        key = (row["example_id"], row["side"])
        if key in lookup:
            raise ValueError(f"scores hold {key} twice")
        lookup[key] = row
    return lookup


__all__ = [
    "SCORE_SCHEMA", "ScoresError", "score_pairs", "read_scores", "scores_summary", "scores_to_pair_lookup",
    "iter_rows",
]  # fmt: skip

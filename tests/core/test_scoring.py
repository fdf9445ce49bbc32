"""Scoring: values against a direct full-logits computation, shard planning, resume, corruption, ranks."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pytest import MonkeyPatch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from selpo_core import scoring
from selpo_core.config import ScoreConfig
from selpo_core.data import TokenizedPair
from selpo_core.scoring import SCORE_SCHEMA, ScoresError, read_scores, score_pairs, scores_to_pair_lookup

WORDS = [f"w{i}" for i in range(40)] + ["<b>", "&", '"q"', "a<c"]
N_PAIRS = 20
FP32 = ScoreConfig(beta=0.5, precision="fp32", shard_rows=8, batch_tokens=160)  # 40 responses -> 5 shards


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def _tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; larger weights make log-probs differ visibly between tokens.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    return ids, [tuple(o) for o in enc["offset_mapping"]] + [(len(text), len(text))]


def _make_pairs(tokenizer: PreTrainedTokenizerFast, n: int = N_PAIRS, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
        chosen, rejected = (" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) for _ in range(2))
        c_ids, c_off = _encode(tokenizer, chosen)
        r_ids, r_off = _encode(tokenizer, rejected)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pairs.append(TokenizedPair(
            example_id=f"ex{i:03d}", prompt_ids=prompt_ids, chosen_ids=c_ids, rejected_ids=r_ids,
            chosen_text=chosen, rejected_text=rejected, chosen_offsets=c_off, rejected_offsets=r_off,
        ))  # fmt: skip
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    # One intra-op thread: these matmuls are tiny, and on a busy CI box two OpenMP threads waiting on each
    # other made each forward ~100x slower. Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("scoring_models")
    tokenizer = _tokenizer()
    dirs = {}
    for name, seed in (("oracle", 1), ("reference", 2)):
        _tiny_llama(len(tokenizer), seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    pairs = _make_pairs(tokenizer)
    baseline_dir = root / "baseline"
    metrics = score_pairs(pairs, dirs["oracle"], dirs["reference"], FP32, baseline_dir)
    yield {**dirs, "tokenizer": tokenizer, "pairs": pairs, "baseline": read_scores(baseline_dir),
           "baseline_dir": baseline_dir, "metrics": metrics}  # fmt: skip
    torch.set_num_threads(threads)


def _score(setup: dict, out_dir: Path, cfg: ScoreConfig = FP32, **kwargs: int) -> dict:
    return score_pairs(setup["pairs"], setup["oracle"], setup["reference"], cfg, out_dir, **kwargs)


def _direct_logps(model: LlamaForCausalLM, prompt: list[int], response: list[int]) -> np.ndarray:
    """Independent reference: one unpadded sequence, full fp32 logits, log_softmax, gather."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(prompt)
    return np.array([logp[t - 1, ids[0, t]].item() for t in range(start, start + len(response))], np.float32)


def _direct(setup: dict) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    load = LlamaForCausalLM.from_pretrained
    oracle, ref = (load(setup[name], dtype=torch.float32).eval() for name in ("oracle", "reference"))
    out = {}
    for pair in setup["pairs"]:
        for side in ("chosen", "rejected"):
            ids = getattr(pair, f"{side}_ids")
            out[(pair.example_id, side)] = (
                _direct_logps(oracle, pair.prompt_ids, ids),
                _direct_logps(ref, pair.prompt_ids, ids),
            )
    return out


def test_fp32_scores_match_direct_computation_and_inputs(setup: dict) -> None:
    table = setup["baseline"]
    assert table.schema.equals(SCORE_SCHEMA)
    lookup = scores_to_pair_lookup(table)
    # Every response exactly once.
    assert table.num_rows == 2 * N_PAIRS == len(lookup)
    assert set(lookup) == {(p.example_id, s) for p in setup["pairs"] for s in ("chosen", "rejected")}
    direct = _direct(setup)
    for pair in setup["pairs"]:
        for side in ("chosen", "rejected"):
            row = lookup[(pair.example_id, side)]
            assert row["token_ids"] == list(getattr(pair, f"{side}_ids"))
            assert row["text"] == getattr(pair, f"{side}_text")
            offsets = getattr(pair, f"{side}_offsets")
            assert list(zip(row["offset_start"], row["offset_end"])) == [tuple(o) for o in offsets]
            oracle, ref = (np.array(row[c], np.float32) for c in ("oracle_logps", "ref_logps"))
            want_oracle, want_ref = direct[(pair.example_id, side)]
            np.testing.assert_allclose(oracle, want_oracle, atol=2e-5, rtol=0)
            np.testing.assert_allclose(ref, want_ref, atol=2e-5, rtol=0)
            log_ratio = np.array(row["log_ratio"], np.float32)
            np.testing.assert_array_equal(log_ratio, oracle - ref)
            np.testing.assert_array_equal(np.array(row["rewards"], np.float32), np.float32(0.5) * log_ratio)
    # The models differ and the scale is visible: the test would notice swapped or zeroed columns.
    rewards = np.concatenate([np.array(r, np.float32) for r in table.column("rewards").to_pylist()])
    assert np.abs(rewards).max() > 0.1


def test_metrics(setup: dict) -> None:
    m = setup["metrics"]
    assert m["n_responses"] == 2 * N_PAIRS
    assert m["n_tokens"] == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in setup["pairs"])
    assert m["shards_total"] == 5 and m["shards_reused"] == 0 and m["shards_scored"] == 5
    assert m["real_tokens_per_second"] > 0 and 0 <= m["pad_fraction"] < 0.5 and m["seconds"] > 0


def test_bf16_close_to_fp32(setup: dict, tmp_path: Path) -> None:
    cfg = ScoreConfig(beta=0.5, precision="bf16", shard_rows=50, batch_tokens=512)
    _score(setup, tmp_path, cfg)
    bf16 = scores_to_pair_lookup(read_scores(tmp_path))
    fp32 = scores_to_pair_lookup(setup["baseline"])
    diffs = [
        np.abs(np.array(bf16[key][col]) - np.array(fp32[key][col])).max()
        for key in fp32
        for col in ("oracle_logps", "ref_logps")
    ]
    # bf16 weights and activations (log-softmax fp32): close to fp32, but really a different computation.
    assert max(diffs) < 0.15 and max(diffs) > 0


def test_same_model_gives_zero_rewards(setup: dict, tmp_path: Path) -> None:
    score_pairs(setup["pairs"], setup["reference"], setup["reference"], FP32, tmp_path)
    table = read_scores(tmp_path)
    for column in ("log_ratio", "rewards"):
        values = np.concatenate([np.array(v) for v in table.column(column).to_pylist()])
        assert values.size and not values.any()


def test_plan_independent_of_input_order(setup: dict, tmp_path: Path) -> None:
    shuffled = list(setup["pairs"])
    random.Random(1).shuffle(shuffled)
    score_pairs(shuffled, setup["oracle"], setup["reference"], FP32, tmp_path)
    assert read_scores(tmp_path).equals(setup["baseline"])


def crash_after_writing(monkeypatch: MonkeyPatch, name: str, error: type[BaseException]) -> None:
    """Make the shard writer raise right after `name` is renamed into place: a crash between two shards."""
    real_write = scoring._write_parquet_atomic

    def write(table: pa.Table, path: Path, entry: dict) -> None:
        real_write(table, path, entry)
        if path.name == name:
            raise error(f"simulated crash after writing {name}")

    monkeypatch.setattr(scoring, "_write_parquet_atomic", write)


PLAN_WIDE = ("n_responses", "n_tokens", "real_tokens", "padded_tokens", "pad_fraction", "shards_total")


def test_resume_after_interruption_is_identical(
    setup: dict, tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    crash_after_writing(monkeypatch, "part-00001.parquet", KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _score(setup, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind
    with pytest.raises(ScoresError, match="part-00002.parquet is missing"):
        read_scores(tmp_path)
    monkeypatch.undo()
    metrics = _score(setup, tmp_path)
    assert metrics["shards_reused"] == 2 and metrics["shards_scored"] == 3
    assert read_scores(tmp_path).equals(setup["baseline"])
    # Token counts and pad_fraction cover every shard, not only the 3 re-scored ones: as in one run.
    assert {k: metrics[k] for k in PLAN_WIDE} == {k: setup["metrics"][k] for k in PLAN_WIDE}
    scored_now = sum(e["real_tokens"] for e in _plan(tmp_path)["shards"][2:])
    assert metrics["real_tokens_scored"] == scored_now < metrics["real_tokens"]
    # A resume with nothing left to do still reports the whole run; its own work is zero.
    again = _score(setup, tmp_path)
    assert {k: again[k] for k in PLAN_WIDE} == {k: setup["metrics"][k] for k in PLAN_WIDE}
    assert again["shards_scored"] == again["real_tokens_scored"] == 0 and again["real_tokens_per_second"] == 0.0


def test_plan_wide_metrics_are_sums_over_shards_and_readable_from_the_dir(setup: dict) -> None:
    m = setup["metrics"]
    # Independent count from the inputs: prompt + response tokens of every response.
    real = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in setup["pairs"])
    assert m["real_tokens"] == real == m["real_tokens_scored"]
    assert m["pad_fraction"] == pytest.approx(1 - real / m["padded_tokens"]) and m["padded_tokens"] > real
    summary = scoring.scores_summary(setup["baseline_dir"])
    assert summary == {k: m[k] for k in PLAN_WIDE}


def test_two_ranks_report_the_whole_plan(setup: dict, tmp_path: Path) -> None:
    rank0 = _score(setup, tmp_path, rank=0, world_size=2)
    rank1 = _score(setup, tmp_path, rank=1, world_size=2)
    for metrics in (rank0, rank1):
        assert {k: metrics[k] for k in PLAN_WIDE} == {k: setup["metrics"][k] for k in PLAN_WIDE}
    assert rank0["real_tokens_scored"] + rank1["real_tokens_scored"] == setup["metrics"]["real_tokens"]


def test_zero_byte_and_corrupt_shards_on_resume_are_rescored_with_a_warning(
    setup: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(setup["baseline_dir"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "part-00000.parquet").write_bytes(b"")
    (tmp_path / "part-00002.parquet").write_bytes(b"PAR1 not really")
    with caplog.at_level("WARNING", logger="selpo.scoring"):
        metrics = _score(setup, tmp_path)
    assert metrics["shards_scored"] == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2
    assert str(tmp_path / "part-00000.parquet") in warned[0] and "unreadable" in warned[0]
    assert str(tmp_path / "part-00002.parquet") in warned[1]
    assert read_scores(tmp_path).equals(setup["baseline"])


def test_truncated_and_corrupt_shards_are_detected_and_recomputed(setup: dict, tmp_path: Path) -> None:
    shutil.copytree(setup["baseline_dir"], tmp_path, dirs_exist_ok=True)
    truncated, corrupt = tmp_path / "part-00001.parquet", tmp_path / "part-00003.parquet"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(ScoresError, match="part-00001.parquet is unreadable"):
        read_scores(tmp_path)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 4] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    assert scoring._validate_shard(corrupt, _plan_entry(tmp_path, corrupt.name))[0] is None
    metrics = _score(setup, tmp_path)
    assert metrics["shards_scored"] == 2 and metrics["shards_reused"] == 3
    assert read_scores(tmp_path).equals(setup["baseline"])


def test_no_flipped_byte_passes_as_valid_data(setup: dict, tmp_path: Path) -> None:
    # Many flips inside compressed data pages still decode (to wrong numbers); only the page checksums and
    # the full validation catch them. Every flip must be rejected or leave the data unchanged.
    source = setup["baseline_dir"] / "part-00003.parquet"
    entry = _plan_entry(setup["baseline_dir"], source.name)
    good, _ = scoring._validate_shard(source, entry)
    assert good is not None
    original, target = source.read_bytes(), tmp_path / source.name
    rejected = 0
    for i in range(0, len(original), 7):
        data = bytearray(original)
        data[i] ^= 0xFF
        target.write_bytes(bytes(data))
        table, _ = scoring._validate_shard(target, entry)
        if table is None:
            rejected += 1
        else:
            assert table.equals(good), f"flipping byte {i} gave different data that passed as valid"
    assert rejected > len(original) // 14  # most bytes matter


def _plan(directory: Path) -> dict:
    return json.loads((directory / scoring.PLAN_FILE).read_text())


def _plan_entry(directory: Path, name: str) -> dict:
    return next(e for e in _plan(directory)["shards"] if e["name"] == name)


def test_changed_settings_recompute_every_shard(setup: dict, tmp_path: Path) -> None:
    shutil.copytree(setup["baseline_dir"], tmp_path, dirs_exist_ok=True)
    cfg = ScoreConfig(beta=2.0, precision="fp32", shard_rows=8, batch_tokens=160)
    metrics = _score(setup, tmp_path, cfg)
    assert metrics["shards_reused"] == 0
    table = read_scores(tmp_path)
    assert table.column("log_ratio").equals(setup["baseline"].column("log_ratio"))
    a = np.concatenate([np.array(v) for v in table.column("rewards").to_pylist()])
    b = np.concatenate([np.array(v) for v in setup["baseline"].column("rewards").to_pylist()])
    np.testing.assert_allclose(a, 4 * b, rtol=1e-6)


def test_two_ranks_equal_one(setup: dict, tmp_path: Path) -> None:
    metrics = _score(setup, tmp_path, rank=0, world_size=2)
    assert metrics["shards_scored"] == 3 and metrics["shards_total"] == 5
    with pytest.raises(ScoresError, match="part-00001.parquet is missing"):
        read_scores(tmp_path)
    metrics = _score(setup, tmp_path, rank=1, world_size=2)
    assert metrics["shards_scored"] == 2
    assert read_scores(tmp_path).equals(setup["baseline"])
    with pytest.raises(ValueError, match="rank"):
        _score(setup, tmp_path, rank=2, world_size=2)


def test_read_scores_without_plan_file(setup: dict, tmp_path: Path) -> None:
    # The score stage moves only the part files into its final directory.
    for part in setup["baseline_dir"].glob("part-*.parquet"):
        shutil.copy(part, tmp_path / part.name)
    assert read_scores(tmp_path).equals(setup["baseline"])
    (tmp_path / "part-00004.parquet").unlink()
    with pytest.raises(ScoresError, match="part-00004.parquet is missing"):
        read_scores(tmp_path)
    with pytest.raises(ScoresError, match="nothing was scored"):
        read_scores(tmp_path / "empty")


def test_one_model_at_a_time_identical_and_resumes_with_reference_only(
    setup: dict, tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    cfg = ScoreConfig(beta=0.5, precision="fp32", shard_rows=8, batch_tokens=160, one_model_at_a_time=True)
    loaded: list[str] = []
    real_load = scoring.load_model

    def counting_load(path: Path, **kwargs: object) -> object:
        loaded.append(Path(path).name)
        return real_load(path, **kwargs)

    monkeypatch.setattr(scoring, "load_model", counting_load)
    real_write = scoring._write_parquet_atomic
    crash_after_writing(monkeypatch, "part-00001.parquet", RuntimeError)
    with pytest.raises(RuntimeError, match="simulated"):
        _score(setup, tmp_path, cfg)
    assert loaded == ["oracle", "reference"]
    # Spills of shards 1 (final, but the crash came before its spill was removed) and 2-4 (not final yet).
    assert len(list(tmp_path.glob(".oracle-part-*.parquet"))) == 4
    monkeypatch.setattr(scoring, "_write_parquet_atomic", real_write)
    loaded.clear()
    metrics = _score(setup, tmp_path, cfg)
    assert loaded == ["reference"]  # the oracle pass was kept on disk
    assert metrics["shards_reused"] == 2 and metrics["shards_scored"] == 3
    assert {k: metrics[k] for k in PLAN_WIDE} == {k: setup["metrics"][k] for k in PLAN_WIDE}
    assert not list(tmp_path.glob(".oracle-*"))
    assert read_scores(tmp_path).equals(setup["baseline"])


def test_bad_inputs_are_named(setup: dict, tmp_path: Path) -> None:
    pair = setup["pairs"][0]
    broken = TokenizedPair(**{**pair.__dict__, "chosen_offsets": pair.chosen_offsets[:-1]})
    with pytest.raises(ValueError, match="ex000 chosen"):
        score_pairs([broken], setup["oracle"], setup["reference"], FP32, tmp_path)
    no_prompt = TokenizedPair(**{**pair.__dict__, "prompt_ids": []})
    with pytest.raises(ValueError, match="empty prompt"):
        score_pairs([no_prompt], setup["oracle"], setup["reference"], FP32, tmp_path)
    other = TokenizedPair(**{**pair.__dict__, "chosen_text": pair.chosen_text + " "})
    with pytest.raises(ValueError, match="two different pairs"):
        score_pairs([pair, other], setup["oracle"], setup["reference"], FP32, tmp_path)


def test_duplicate_pairs_scored_once_and_empty_input(setup: dict, tmp_path: Path) -> None:
    pairs = setup["pairs"][:3]
    metrics = score_pairs([*pairs, pairs[0]], setup["oracle"], setup["reference"], FP32, tmp_path / "dup")
    assert metrics["n_responses"] == 6 and read_scores(tmp_path / "dup").num_rows == 6
    metrics = score_pairs([], setup["oracle"], setup["reference"], FP32, tmp_path / "none")
    assert metrics["shards_total"] == 0
    assert read_scores(tmp_path / "none").equals(pa.Table.from_pylist([], schema=SCORE_SCHEMA))


# A scorer in its own process that waits for a start signal, reports the pid it is told to (two containers
# reuse pids; the old `.part-00000.parquet.tmp-<pid>` was then shared) and writes slowly, so two of them
# overlap inside every shard write.
_CONCURRENT_SCORER = """
import os, pickle, sys, time
from pathlib import Path
inputs, out_dir, go, pid, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), \
    Path(sys.argv[5])
os.getpid = lambda: pid
import pyarrow.parquet as pq
import torch
from selpo_core import scoring
torch.set_num_threads(1)
real_write_table = pq.write_table
def slow_write_table(*args, **kwargs):
    time.sleep(0.05)
    real_write_table(*args, **kwargs)
pq.write_table = slow_write_table
pairs, oracle, reference, cfg = pickle.loads(inputs.read_bytes())
ready.touch()
while not go.exists():
    time.sleep(0.005)
scoring.score_pairs(pairs, oracle, reference, cfg, out_dir)
"""


@pytest.mark.slow
def test_two_processes_scoring_one_dir_with_the_same_pid_both_succeed(setup: dict, tmp_path: Path) -> None:
    import os
    import pickle
    import subprocess
    import sys
    import time

    inputs, out_dir, go = tmp_path / "inputs.pkl", tmp_path / "scores", tmp_path / "go"
    inputs.write_bytes(pickle.dumps((setup["pairs"], setup["oracle"], setup["reference"], FP32)))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # Both claim this test's pid: alive, so neither takes the other's temp file for a dead process's leftover.
    args = [str(inputs), str(out_dir), str(go), str(os.getpid())]
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_SCORER, *args, str(flag)], env=env, cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.01)  # both past their imports, polling for the start signal
    go.touch()
    results = [proc.communicate(timeout=240) for proc in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    assert read_scores(out_dir).equals(setup["baseline"])
    assert not list(out_dir.glob(".*"))  # no temp file or spill left behind

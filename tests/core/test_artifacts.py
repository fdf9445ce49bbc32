"""Stage dirs: atomic publish, checksummed manifests, content fingerprints, unique temp names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selpo_core import artifacts
from selpo_core.artifacts import external_fingerprint, is_complete, stage_output, verify_stage


def publish(final: Path, files: dict[str, bytes], config: dict | None = None) -> Path:
    with stage_output(final, manifest={"stage": final.name, "key": "k", "config": config or {}}) as out:
        for name, content in files.items():
            out.file(name).write_bytes(content)
        assert not is_complete(final)  # nothing final while the stage runs
    return final


def test_stage_output_is_atomic_and_complete(tmp_path: Path) -> None:
    final = publish(tmp_path / "demo-k1", {"model/weights.bin": b"123"}, {"a": 1})
    assert is_complete(final)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"]["model/weights.bin"]["size"] == 3
    assert len(manifest["files"]["model/weights.bin"]["sha256"]) == 64
    assert manifest["config"] == {"a": 1}
    assert not (tmp_path / "demo-k1.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-k1"]


def test_failed_stage_leaves_nothing_that_looks_finished_but_keeps_partial(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with stage_output(tmp_path / "demo-k2", manifest={}) as out:
            (out.partial_dir / "checkpoint").write_text("step 3")
            out.file("half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-k2.partial"]
    assert (tmp_path / "demo-k2.partial" / "checkpoint").read_text() == "step 3"


def test_truncated_file_makes_the_stage_incomplete(tmp_path: Path) -> None:
    final = publish(tmp_path / "demo-k3", {"scores.parquet": b"abcdef"})
    (final / "scores.parquet").write_bytes(b"abc")
    assert "has 3 bytes" in verify_stage(final)


def test_a_flipped_byte_of_the_same_size_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = publish(tmp_path / "demo-k4", {"scores.parquet": b"abcdef"})
    monkeypatch.setattr(artifacts, "_VERIFIED", {})  # a fresh process: nothing verified yet
    (final / "scores.parquet").write_bytes(b"abcdeF")
    assert "does not match its checksum" in verify_stage(final)


def test_an_edited_manifest_is_not_trusted(tmp_path: Path) -> None:
    final = publish(tmp_path / "demo-k5", {"a.txt": b"a"})
    manifest = json.loads((final / "manifest.json").read_text())
    manifest["metrics"] = {"accuracy": 1.0}
    (final / "manifest.json").write_text(json.dumps(manifest))
    assert "changed after it was written" in verify_stage(final)


def test_verification_is_remembered_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = publish(tmp_path / "demo-k6", {"big.bin": b"x" * 1000})
    calls: list[Path] = []
    digest = artifacts.file_digest
    monkeypatch.setattr(artifacts, "_VERIFIED", {})
    monkeypatch.setattr(artifacts, "file_digest", lambda path: calls.append(path) or digest(path))
    assert is_complete(final) and is_complete(final)
    assert len(calls) == 1


def test_fingerprints_are_content_not_place(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "pairs.jsonl", tmp_path / "b" / "other-name.jsonl"
    for path in (one, two):
        path.parent.mkdir()
        path.write_text("same\n")
    assert external_fingerprint(one) == external_fingerprint(two)
    two.write_text("changed\n")
    assert external_fingerprint(one) != external_fingerprint(two)
    model_a, model_b = tmp_path / "model-a", tmp_path / "copied"
    for model in (model_a, model_b):
        model.mkdir()
        (model / "config.json").write_text("{}")
    assert external_fingerprint(model_a) == external_fingerprint(model_b)
    assert external_fingerprint("org/model-on-hub") == "id:org/model-on-hub"
    stage = publish(tmp_path / "demo-k7", {"a.txt": b"a"})
    assert external_fingerprint(stage) == "k"  # a selpo stage dir is known by its key


def test_a_user_model_dir_is_hashed_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"w" * 100)
    calls: list[Path] = []
    digest = artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda path: calls.append(path) or digest(path))
    first = external_fingerprint(model)
    assert external_fingerprint(model) == first and len(calls) == 1
    (model / "weights.safetensors").write_bytes(b"v" * 101)
    assert external_fingerprint(model) != first and len(calls) == 2


def test_temp_names_differ_between_writers(tmp_path: Path) -> None:
    names = {artifacts.unique_suffix() for _ in range(100)}
    assert len(names) == 100
    artifacts.atomic_write_text(tmp_path / "x.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]

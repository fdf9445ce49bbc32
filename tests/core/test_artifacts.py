from __future__ import annotations

import json
from pathlib import Path

import pytest

from selpo_core.artifacts import fingerprint, is_complete, stage_key, stage_output


def test_stage_output_is_atomic_and_complete(tmp_path: Path) -> None:
    with stage_output(tmp_path, "demo", "k1", inputs={}, config={"a": 1}) as out:
        out.file("model/weights.bin").write_bytes(b"123")
        assert not is_complete(out.final_dir)  # nothing final while the stage runs
    assert is_complete(tmp_path / "demo-k1")
    manifest = json.loads((tmp_path / "demo-k1" / "manifest.json").read_text())
    assert manifest["files"] == {"model/weights.bin": 3}
    assert manifest["config"] == {"a": 1}
    assert not (tmp_path / "demo-k1.partial").exists()


def test_failed_stage_leaves_nothing_that_looks_finished_but_keeps_partial(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with stage_output(tmp_path, "demo", "k2", inputs={}, config={}) as out:
            (out.partial_dir / "checkpoint").write_text("step 3")
            out.file("half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not (tmp_path / "demo-k2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-k2.partial"]
    assert (tmp_path / "demo-k2.partial" / "checkpoint").read_text() == "step 3"


def test_truncated_file_makes_the_stage_incomplete(tmp_path: Path) -> None:
    with stage_output(tmp_path, "demo", "k3", inputs={}, config={}) as out:
        out.file("scores.parquet").write_bytes(b"abcdef")
    (tmp_path / "demo-k3" / "scores.parquet").write_bytes(b"abc")
    assert not is_complete(tmp_path / "demo-k3")


def test_key_depends_on_config_and_input_content(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("one\n")
    key = stage_key("score", {"beta": 1.0}, {"data": data})
    assert key == stage_key("score", {"beta": 1.0}, {"data": data})
    assert key != stage_key("score", {"beta": 2.0}, {"data": data})
    assert key != stage_key("oracle", {"beta": 1.0}, {"data": data})
    data.write_text("two\n")
    assert key != stage_key("score", {"beta": 1.0}, {"data": data})


def test_stage_fingerprint_comes_from_its_manifest(tmp_path: Path) -> None:
    with stage_output(tmp_path, "demo", "k4", inputs={}, config={}) as out:
        out.file("a.txt").write_text("a")
    manifest = json.loads((tmp_path / "demo-k4" / "manifest.json").read_text())
    assert fingerprint(tmp_path / "demo-k4") == manifest["fingerprint"]
    assert fingerprint("org/model-on-hub") == "id:org/model-on-hub"

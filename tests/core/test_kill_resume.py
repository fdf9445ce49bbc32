"""kill -9 at seeded random moments, then resume: the artifacts are byte-identical to an uninterrupted run and
no temp or partial dir is left (benchmarks/kill_soak.py runs the same with 20+ trials)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.kill_soak import soak


@pytest.mark.slow
def test_killed_runs_resume_to_identical_artifacts(tmp_path: Path) -> None:
    result = soak(trials=2, first_seed=7, work=tmp_path)
    assert result["n_stages"] == 13
    for row in result["trials"]:
        assert row["killed_in"] != ["(finished before the kill)"], row  # the kill landed mid-run
        assert row["differing_stages"] == [], row
        assert row["leftover_dirs"] == [], row

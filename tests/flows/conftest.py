"""Fixtures of the flow tests: ONE Prefect test harness per session (starting it costs 10-20 s), result records
and runs in temporary directories, no flow-run heartbeat, and counting spies on the selpo_core stages."""

from __future__ import annotations

import os

# Before Prefect is imported: its settings and logging are read at import.
for _name, _value in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                      "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "selpo",
                      "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from stage_spies import StageCalls, install_stage_spies  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary Prefect API + SQLite DB for the session; yields the result-storage directory.

    The harness isolates the database but not result files, so PREFECT_RESULTS_LOCAL_STORAGE_PATH goes to a
    temporary directory too (else cache records would leak between sessions through ~/.prefect/storage).
    """
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=120):
        # No heartbeat thread: ~1 s per flow run on 2 cores, and only a server watching for crashes uses it.
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}):
            yield results


@pytest.fixture
def stage_calls(monkeypatch: pytest.MonkeyPatch) -> StageCalls:
    return install_stage_spies(monkeypatch)

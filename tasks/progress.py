"""The UI's view of a long stage: a Prefect progress artifact fed by the library's progress reports
(selpo_core.progress: training steps, scored tokens).

The artifact is created on the first report, so stages without a long loop (and reused stages, which run no
body) add no card. Updates are rate-limited: a tiny model finishes a step every few milliseconds, and each update
is an API call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from selpo_core import progress

UPDATE_EVERY_SECONDS = 2.0


def _amount(value: float) -> str:
    return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e4 else f"{value:.0f}"


class StageProgress:
    """`listener(what, done, total)` for selpo_core.progress: one progress artifact per stage task run."""

    def __init__(self, title: str, every: float = UPDATE_EVERY_SECONDS) -> None:
        self.title, self.every = title, every
        self.artifact_id: UUID | None = None
        self.last_update = 0.0
        self.last: tuple[str, float, float] | None = None

    def description(self, what: str, done: float, total: float) -> str:
        return f"{self.title}: {what} {_amount(done)}/{_amount(total)}"

    def __call__(self, what: str, done: float, total: float) -> None:
        self.last = (what, done, total)
        now = time.monotonic()
        percent = 100.0 * done / total if total else 0.0
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, description=self.description(what, done, total))
            self.last_update = now
        elif now - self.last_update >= self.every or done >= total:
            update_progress_artifact(self.artifact_id, percent, description=self.description(what, done, total))
            self.last_update = now

    def finish(self) -> None:
        """The stage's body returned: show where it ended (a loop's last step may fall between two updates)."""
        if self.artifact_id is not None and self.last is not None:
            what, done, total = self.last
            update_progress_artifact(self.artifact_id, 100.0 * done / total if total else 100.0,
                                     description=self.description(what, done, total))


@contextlib.contextmanager
def stage_progress(title: str) -> Iterator[StageProgress]:
    """Inside a stage task: the library's progress reports become this task run's progress artifact."""
    listener = StageProgress(title)
    with progress.listening(listener):
        yield listener
    listener.finish()

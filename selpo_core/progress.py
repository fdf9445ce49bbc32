"""How far a long loop is (training steps, scored tokens), for a watcher outside the library.

The library only reports; it never knows who listens. The Prefect stage task listens (tasks/progress.py) and
shows a progress artifact in the UI. With nobody listening a report costs one check of an empty list.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Listener = Callable[[str, float, float], None]
"""listener(what, done, total): e.g. ("oracle", 30, 120) steps, ("scoring", 5.1e5, 2.0e6) tokens."""

_listeners: list[Listener] = []


def report(what: str, done: float, total: float) -> None:
    for listener in tuple(_listeners):
        listener(what, done, total)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every report made inside the block (in this process)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)

"""Test hooks on the stage runner (imported by tests/core and tests/flows): count which stages really ran, and
make one fail on purpose. They replace entries of `selpo_core.stages.runner.BODIES`, the body of each kind of
stage, so planning and cache hits are never counted and the library holds no test switch of its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest


class InjectedFailure(RuntimeError):
    """Raised by a stage body a test made fail (to exercise resume)."""


class StageCalls(Counter):
    """How many times each stage (by name: policy_dpo, tso_round2_pairs...) really ran its body."""

    def reset(self) -> None:
        self.clear()

    def ran(self) -> dict[str, int]:
        return {name: count for name, count in self.items() if count}


def install_stage_spies(patch: pytest.MonkeyPatch, fail: Callable[[str], bool] | None = None) -> StageCalls:
    """Wrap every stage body with a counter; stages whose name `fail(name)` accepts raise InjectedFailure
    after being counted (as a crash inside the stage would)."""
    from selpo_core.stages import runner

    calls = StageCalls()
    for kind, body in list(runner.BODIES.items()):
        def spy(cfg: Any, plan: Any, inputs: Any, out: Any, _body: Callable[..., None] = body) -> None:
            calls[plan.name] += 1
            if fail is not None and fail(plan.name):
                raise InjectedFailure(f"failing stage {plan.name} on purpose")
            _body(cfg, plan, inputs, out)

        patch.setitem(runner.BODIES, kind, spy)
    return calls

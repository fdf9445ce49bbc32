"""What the flows' parameters look like in the UI: types Prefect can draw (a text box, a JSON object, a select of
the policy methods) with their defaults, and readable flow-run names.

Prefect 3.8 builds a deployment's form from the flow's signature through pydantic: `str | None = None` becomes an
`anyOf` without a type and a null default, which the UI's parameter table shows as empty Type and Default
columns, and the run form as a str/None switch. So the parameters are plain types with real defaults ("" and an
empty mapping mean "not given"), and `None` is still accepted where older calls pass it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect.runtime import flow_run
from pydantic import BeforeValidator

from selpo_core.config import POLICY_METHODS


def _blank_if_none(value: Any) -> Any:
    return "" if value is None else value


def _empty_if_none(value: Any) -> Any:
    return {} if value is None else value


Text = Annotated[str, BeforeValidator(_blank_if_none)]
"""A string where "" (or None) means "not given"."""
Overrides = Annotated[Mapping[str, Any], BeforeValidator(_empty_if_none)]
"""Config fields to change, e.g. {"policy.beta": 0.2}."""


class _ReadOnlyDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes: a default shared by every call must not be changed by one of them (and, unlike
    a MappingProxyType, it is JSON, so the UI shows the default `{}`)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the default `overrides` is read-only: copy it first")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _refuse  # type: ignore[assignment]


NO_OVERRIDES: Mapping[str, Any] = _ReadOnlyDict()
"""The default of `overrides`: no config field changed."""
PolicyMethod = Literal[tuple(POLICY_METHODS)]  # type: ignore[valid-type]  # the UI offers them as a select
SftModel = Literal["reference", "policy_model"]

# Names that Prefect (coolname, "witty-penguin") or its UI's form ("Handmade-Collie") make up for a new flow
# run. Anything else was typed by a user and is kept as it is.
GENERATED_NAME = re.compile(r"[a-z]+-[a-z]+|[A-Z][a-z]+-[A-Z][a-z]+")
SEPARATOR = " · "


def flow_run_label() -> str:
    """The flow run's name in the UI: a made-up one becomes "<run name> · <flow> · <made-up words>" (readable,
    and unique: two runs of one run_name keep different words); a name the user typed is kept.

    Called again when a run is retried: a name it already gave is left alone.
    """
    current = flow_run.name or ""
    if current and not GENERATED_NAME.fullmatch(current):
        return current
    params = flow_run.parameters
    label = params.get("run_name") or Path(params.get("config_path") or "defaults").stem
    return SEPARATOR.join(filter(None, [label, flow_run.flow_name, current]))


def resolve(config_path: str | None, overrides: Mapping[str, Any] | None, run_name: str | None) -> dict[str, Any]:
    """The flow's resolved config dict; empty parameters mean "not given"."""
    from tasks.stage import resolve_config

    return resolve_config(config_path or None, dict(overrides or {}), run_name or None)

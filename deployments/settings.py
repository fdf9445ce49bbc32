"""Process settings shared by the `selpo` CLI and `python -m deployments.serve`: offline defaults for Prefect, and
`--set key=value` parsing."""

from __future__ import annotations

import os
from typing import Any

# Offline by default: no telemetry, no promotional calls from the UI. Set before Prefect is imported (its
# settings and logging are configured at import), and only where the user has not chosen otherwise.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # No model or dataset is ever fetched behind the user's back: hub ids must be in the local cache.
    "HF_HUB_OFFLINE": "1",
    # The temporary API of `selpo run` migrates a fresh database on first use: on a busy 2-core machine that
    # took longer than Prefect's default 20 s ("Timed out while attempting to connect to ephemeral ...").
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_env_defaults() -> None:
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    # The library logs through "selpo.*": listed here, its lines reach the console and the run's logs in the UI.
    extra = [name for name in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if name.strip()]
    if "selpo" not in extra:
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*extra, "selpo"])


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["policy.beta=0.2", "policy.methods=[sepo,dpo]"]` -> {"policy.beta": 0.2, ...} (values parsed as YAML).

    Kept flat (dotted keys): that is how the flows' `overrides` parameter reads best in the UI too.
    """
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"selpo: --set {item!r} must look like section.field=value")
        overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return overrides

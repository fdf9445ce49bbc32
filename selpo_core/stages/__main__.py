"""`python -m selpo_core.stages STAGE --config FILE [--set k=v ...]`: run STAGE (and what it needs) in this process.

Upstream stages come from the store (finished ones are reused, missing ones run), so a stage runs in a fresh
process, under `torchrun` (every rank runs it; only rank 0 prints), or in the vLLM venv. `--plan FILE` runs
exactly one planned stage (what a launcher hands its ranks). A user error (bad config, data, model dir) ends
with one line; `--debug` or SELPO_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from selpo_core import threads
from selpo_core.config import ConfigError, load_run_config
from selpo_core.stages import dist


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says all a user needs (a field, a file and row, a model dir): no traceback."""
    from selpo_core.data import DataError
    from selpo_core.models import ModelLoadError

    return ConfigError, DataError, ModelLoadError, FileNotFoundError, PermissionError


def configure_logging() -> None:
    """selpo's own progress at INFO; third-party per-file chatter (checkpoint saves, weight loading) hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass


def run(args: argparse.Namespace) -> None:
    from selpo_core.stages.graph import run_pipeline, run_upto

    cfg = load_run_config(args.config, args.overrides)
    if args.plan:
        from selpo_core.stages.plan import StagePlan
        from selpo_core.stages.runner import execute

        with open(args.plan) as handle:
            path = execute(cfg, StagePlan.from_dict(json.load(handle)))
        result = str(path)
    elif args.stage == "all":
        from selpo_core.report import format_table

        result = format_table(run_pipeline(cfg))
    else:
        result = str(run_upto(cfg, args.stage, args.method or cfg.policy.methods[0]))
    if dist.is_main_process():
        print(result, flush=True)


def main(argv: list[str] | None = None) -> int:
    from selpo_core.stages.graph import STAGE_NODES  # imported here, not above: it loads torch (see __main__)

    parser = argparse.ArgumentParser(prog="python -m selpo_core.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", choices=(*STAGE_NODES, "all"), help="the stage to run (or --plan)")
    parser.add_argument("--config", default=None, help="run config YAML (default: the synthetic demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.field=value")
    parser.add_argument("--method", default=None, help="policy method for the policy/generate/evaluate stages")
    parser.add_argument("--plan", default=None, help="a planned stage (JSON) to run exactly, instead of STAGE")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)
    if not (args.stage or args.plan):
        parser.error("name a STAGE or give --plan FILE")
    configure_logging()
    try:
        run(args)
    except user_errors() as err:
        if args.debug or os.environ.get("SELPO_DEBUG"):
            raise
        print(f"selpo: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded behind the user's back
    threads.set_passive_wait()  # before torch loads (main imports it), so libgomp sees it; threads: runner
    sys.exit(main())

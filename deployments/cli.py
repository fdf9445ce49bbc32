"""The `selpo` command line.

    selpo run CONFIG [--set key=value ...] [--name RUN]   whole pipeline, locally (ephemeral Prefect API)
    selpo stage NAME CONFIG [--set ...] [--method M]      one stage via its flow; upstream stages are reused
    selpo server [--port 4200]                             the Prefect API + UI on 127.0.0.1, on any port
    selpo serve [--config CONFIG]                          serve the deployments, and the runs dir over HTTP
    selpo files [--runs-dir runs] [--port 4201]            only the read-only HTTP view of the runs dir
    selpo report RUN_DIR                                   print the results table of runs/<run>/summary.json

`run` and `stage` need no server: Prefect starts a temporary local API. With PREFECT_API_URL pointing at a
running server (`selpo server`), the same runs show in its UI. Every stage is cached:
re-running the same command after a failure resumes at the failed stage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from deployments.settings import apply_env_defaults, parse_sets


@contextlib.contextmanager
def local_run_settings() -> Iterator[None]:
    """Settings for an interactive local run: no flow-run heartbeat (it only lets a server detect crashed
    deployment runs, and costs ~1 s per flow run); the environment variable cannot express "off"."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def cmd_run(args: argparse.Namespace) -> int:
    from flows import sepo_pipeline
    from tasks.report import format_table

    with local_run_settings():
        summary = sepo_pipeline(config_path=args.config, overrides=parse_sets(args.set), run_name=args.name)
    print(format_table(summary))
    print(f"\nsummary: {summary['run']['dir']}/summary.json")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from flows import STAGE_FLOWS

    extra: dict[str, Any] = {}
    if args.stage in ("policy", "evaluate") and args.method:
        extra["method"] = args.method
    if args.stage == "generate" and args.method:
        extra["label"] = args.method
    if args.stage == "sft" and args.which:
        extra["which"] = args.which
    with local_run_settings():
        stage_dir = STAGE_FLOWS[args.stage](config_path=args.config, overrides=parse_sets(args.set),
                                            run_name=args.name, **extra)
    print(stage_dir)
    return 0


LOCAL_API = "http://127.0.0.1:4200/api"


def server_env(port: int) -> dict[str, str]:
    """`prefect server start --port N` alone serves a UI that calls the API on 4200 (the UI's API URL comes from
    PREFECT_SERVER_API_PORT / PREFECT_UI_API_URL, not from --port): set both so any port works."""
    api = f"http://127.0.0.1:{port}/api"
    return {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": api}


def cmd_server(args: argparse.Namespace) -> int:
    """Replace this process with `prefect server start` on 127.0.0.1:PORT, its UI pointing at that port."""
    env = server_env(args.port)
    print(f"selpo server: UI http://127.0.0.1:{args.port}  API {env['PREFECT_UI_API_URL']}\n"
          f"then, in another terminal: PREFECT_API_URL={env['PREFECT_UI_API_URL']} selpo serve", flush=True)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port)]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def cmd_files(args: argparse.Namespace) -> int:
    from deployments.files import RunsFileServer, default_port
    from selpo_core.config import load_run_config

    runs_dir = args.runs_dir or load_run_config(args.config).runs_dir
    server = RunsFileServer(runs_dir, args.port or default_port())
    print(f"selpo files: {server.runs_dir} at {server.url}/ (read-only, 127.0.0.1 only; Ctrl-C stops)", flush=True)
    server.serve_forever()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve against the configured API, or the local `prefect server start` default: a temporary API (what
    `run` uses) would vanish with this process and no UI could ever see the deployments."""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    from deployments.serve import serve_deployments

    api = PREFECT_API_URL.value()
    if not api:
        api = os.environ["PREFECT_API_URL"] = LOCAL_API  # the flow-run subprocesses inherit it
    try:
        urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=5)
    except OSError as err:
        print(f"selpo serve: no Prefect API at {api} ({err}).\nStart one in a second terminal:\n"
              "    selpo server        # = prefect server start --host 127.0.0.1 (port 4200)\n"
              "then run `selpo serve` again (UI: http://127.0.0.1:4200).", file=sys.stderr)
        return 1
    from prefect.settings import temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        serve_deployments(config_path=args.config, overrides=parse_sets(args.set), limit=args.limit,
                          files_port=args.files_port)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    # Reading a summary needs no Prefect: straight from the library, so `selpo report` answers at once.
    from selpo_core.report import format_table, load_summary

    print(format_table(load_summary(args.run_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", default=None, help="run config YAML (default: the built-in demo)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set policy.beta=0.2 (repeatable)")
        p.add_argument("--name", default=None, help="run name: artifacts go to RUNS_DIR/NAME/")

    run = sub.add_parser("run", help="run the whole pipeline locally and print the results table")
    config_args(run)
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage (and whatever upstream stage is not cached yet)")
    stage.add_argument("stage", choices=["data", "sft", "oracle", "score", "select", "policy", "generate",
                                         "evaluate"])
    config_args(stage)
    stage.add_argument("--method", default=None, help="policy method (policy/generate/evaluate; default sepo)")
    stage.add_argument("--which", default=None, choices=["reference", "policy_model"], help="sft: which model")
    stage.set_defaults(func=cmd_stage)

    serve = sub.add_parser("serve", help="serve the deployments from this process (Ctrl-C stops)")
    serve.add_argument("--config", default=None, help="default config_path of the deployments")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="default overrides")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at a time (1: stages share the machine)")
    serve.add_argument("--files-port", type=int, default=None,
                       help="port of the runs dir's HTTP view, linked from the artifacts (default 4201)")
    serve.set_defaults(func=cmd_serve)

    server = sub.add_parser("server", help="start the Prefect API + UI on 127.0.0.1 (any port; Ctrl-C stops)")
    server.add_argument("--port", type=int, default=4200, help="port of the UI and the API (default 4200)")
    server.set_defaults(func=cmd_server)

    files = sub.add_parser("files", help="serve the runs dir read-only over HTTP (what the artifacts link to)")
    files.add_argument("--runs-dir", default=None, help="the runs dir (default: the runs_dir of --config)")
    files.add_argument("--config", default=None, help="run config whose runs_dir to serve (default: the demo's)")
    files.add_argument("--port", type=int, default=None, help="port (default 4201, or $SELPO_FILES_PORT)")
    files.set_defaults(func=cmd_files)

    rep = sub.add_parser("report", help="print the results table of a finished run")
    rep.add_argument("run_dir", help="e.g. runs/demo")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from selpo_core.threads import set_passive_wait

    set_passive_wait()  # before anything loads torch: OpenMP threads then sleep instead of spinning on a busy box
    apply_env_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the flow already logged the traceback; end with one clear line
        print(f"selpo {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        if args.command in ("run", "stage"):
            print("Finished stages are cached: fix the cause and run the same command again to resume.",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""A read-only HTTP view of the runs directory, so the links in the Prefect UI's artifacts open in the browser.

    selpo files [--runs-dir runs] [--port 4201]      # on its own
    selpo serve                                       # starts it too, beside the deployments

Bound to 127.0.0.1 only (reach it from another machine through an SSH tunnel, like the Prefect UI). It answers
GET and HEAD with directory listings and files: the heatmap (HTML), report.md, summary.json, generations.jsonl,
plots. Nothing outside the runs dir is ever served: a run's stage views are links into `<runs_dir>/_stages/`,
followed because their target is inside the runs dir; a link that leads out of it is answered 404.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from tasks.links import DEFAULT_FILES_PORT, FILES_ROOT_ENV, FILES_URL_ENV

HOST = "127.0.0.1"
DEFAULT_PORT = DEFAULT_FILES_PORT
PORT_ENV = "SELPO_FILES_PORT"

# Text types carry a charset so non-ASCII answers read right; .md and .jsonl as text/plain: Chromium downloads
# text/markdown and application/jsonl instead of showing them, and showing them is the point.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".jsonl": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".parquet": "application/octet-stream",
    ".safetensors": "application/octet-stream",
}


def default_port() -> int:
    return int(os.environ.get(PORT_ENV, DEFAULT_PORT))


class RunsHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler (GET/HEAD only, listings) confined to the runs dir, quiet, with our types."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **CONTENT_TYPES}

    def __init__(self, *args: object, directory: str, **kwargs: object) -> None:
        self.root = Path(directory).resolve()
        super().__init__(*args, directory=str(self.root), **kwargs)  # type: ignore[arg-type]

    def translate_path(self, path: str) -> str:
        """The stdlib maps the URL under `directory` without following links; refuse what a link leads out of."""
        translated = super().translate_path(path)
        real = Path(translated).resolve()
        if real != self.root and self.root not in real.parents:
            return str(self.root / ".outside-the-runs-dir")  # does not exist: 404, and says nothing of the target
        return translated

    def end_headers(self) -> None:
        # Run files change while a run is in progress: never let the browser show a stale copy.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        pass  # every GET on the console of `selpo serve` would drown the flow runs' lines


class RunsFileServer:
    """`with RunsFileServer(runs_dir, port) as server:` serves in a background thread; `server.url`."""

    def __init__(self, runs_dir: str | Path, port: int = DEFAULT_PORT) -> None:
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        handler = partial(RunsHandler, directory=str(self.runs_dir))
        self.httpd = http.server.ThreadingHTTPServer((HOST, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RunsFileServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="selpo-files", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RunsFileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()



@contextlib.contextmanager
def serving_runs(runs_dir: str | Path, port: int) -> Iterator[str]:
    """Serve `runs_dir` from a thread of this process while the block runs, and tell the processes it starts
    (the flow runs of `selpo serve`) where, so their artifacts link to it. Yields the base URL."""
    url, root = f"http://{HOST}:{port}", Path(runs_dir).expanduser().resolve()
    server: RunsFileServer | None = None
    try:
        server = RunsFileServer(root, port).start()
        print(f"selpo files: {root} at {server.url}/ (read-only, {HOST} only)", file=sys.stderr)
    except OSError as err:  # most likely `selpo files` of the same runs dir is already up: links still work
        print(f"selpo files: cannot listen on {url} ({err}); artifact links assume it serves {root}",
              file=sys.stderr)
    before = {name: os.environ.get(name) for name in (FILES_URL_ENV, FILES_ROOT_ENV)}
    os.environ[FILES_URL_ENV], os.environ[FILES_ROOT_ENV] = url, str(root)
    try:
        yield url
    finally:
        if server is not None:
            server.stop()
        for name, value in before.items():  # this process's later runs must not link to a server that is gone
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

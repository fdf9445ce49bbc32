"""Links from the UI's artifacts to run files, served over HTTP by `selpo files` (deployments/files.py).

A browser refuses file:// links from an http:// page (and over an SSH tunnel the file is on another machine
anyway), so every link goes through the file server. `selpo serve` starts it and tells its flow runs where it
is (SELPO_FILES_URL) and what it serves (SELPO_FILES_ROOT); unset, links assume `selpo files --runs-dir <the
run's runs_dir>` on the default port.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

FILES_URL_ENV = "SELPO_FILES_URL"
FILES_ROOT_ENV = "SELPO_FILES_ROOT"
DEFAULT_FILES_PORT = 4201
DEFAULT_FILES_URL = f"http://127.0.0.1:{DEFAULT_FILES_PORT}"


def files_url() -> str:
    return os.environ.get(FILES_URL_ENV) or DEFAULT_FILES_URL


def file_url(path: str | Path, runs_dir: str | Path) -> str | None:
    """The file server's URL of `path`, or None when the server cannot reach it (outside what it serves).

    The path is taken as written (links are not resolved), so a run's view `<run>/<stage>-<key>/x.html` stays
    readable; a directory gets a trailing slash (the server lists it).
    """
    root = Path(os.path.abspath(os.environ.get(FILES_ROOT_ENV) or runs_dir))
    target = Path(os.path.abspath(path))
    if target != root and root not in target.parents:
        return None
    relative = target.relative_to(root).as_posix() if target != root else ""
    slash = "/" if target.is_dir() and relative else ""
    return f"{files_url().rstrip('/')}/{urllib.parse.quote(relative)}{slash}"


def run_view(stage_dir: str | Path, run_dir: str | Path) -> Path:
    """A stage dir as the run sees it (`<run>/<stage>-<key>`, a link into the store) when that view exists."""
    view = Path(run_dir) / Path(stage_dir).name
    return view if view.exists() else Path(stage_dir)


def md_link(text: str, path: str | Path, runs_dir: str | Path) -> str:
    """A markdown link to `path` through the file server; the path as code when the server cannot reach it."""
    url = file_url(path, runs_dir)
    return f"[{text}]({url})" if url else f"{text}: `{path}`"

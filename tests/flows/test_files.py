"""The runs dir over HTTP (deployments/files.py) and the artifacts' links to it (tasks/links.py)."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """A store with one stage, a run whose view links into it, and things a link could lead to outside."""
    runs = tmp_path / "runs"
    stage = runs / "_stages" / "select-abc123"
    stage.mkdir(parents=True)
    (stage / "token_heatmap.html").write_text("<html><body>key tokens é</body></html>")
    (stage / "report.md").write_text("| metric | value |\n")
    (stage / "manifest.json").write_text('{"stage": "select"}')
    (stage / "generations.jsonl").write_text('{"answer": "hi"}\n')
    (stage / "plot.png").write_bytes(PNG)
    (stage / "metrics.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    run = runs / "tiny"
    run.mkdir()
    (run / "select-abc123").symlink_to(os.path.relpath(stage, run))
    (tmp_path / "secret.txt").write_text("not yours")
    (run / "escape").symlink_to(tmp_path)  # a link out of the runs dir
    (run / "secret-link.txt").symlink_to(tmp_path / "secret.txt")
    return runs


@pytest.fixture
def server(runs_dir: Path) -> Iterator[str]:
    from deployments.files import RunsFileServer

    with RunsFileServer(runs_dir, port=0) as running:
        yield running.url


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), b""


@pytest.mark.parametrize(("name", "content_type"), [
    ("token_heatmap.html", "text/html; charset=utf-8"),
    ("report.md", "text/plain; charset=utf-8"),  # shown, not downloaded
    ("manifest.json", "application/json; charset=utf-8"),
    ("generations.jsonl", "text/plain; charset=utf-8"),
    ("plot.png", "image/png"),
    ("metrics.svg", "image/svg+xml"),
])
def test_files_of_a_run_view_are_served_through_its_link_into_the_store(server: str, runs_dir: Path, name: str,
                                                                         content_type: str) -> None:
    status, served_type, body = get(f"{server}/tiny/select-abc123/{name}")
    assert (status, served_type) == (200, content_type)
    assert body == (runs_dir / "_stages" / "select-abc123" / name).read_bytes()


def test_directories_are_listed(server: str) -> None:
    status, content_type, body = get(f"{server}/tiny/")
    assert status == 200 and content_type.startswith("text/html")
    assert "select-abc123" in body.decode()
    status, _, body = get(f"{server}/")
    assert status == 200 and "_stages/" in body.decode() and "tiny/" in body.decode()


@pytest.mark.parametrize("path", ["/tiny/escape/secret.txt", "/tiny/escape/", "/tiny/secret-link.txt",
                                  "/../secret.txt", "/tiny/../../secret.txt", "/%2e%2e/secret.txt"])
def test_nothing_outside_the_runs_dir_is_served(server: str, path: str) -> None:
    status, _, body = get(server + path)
    assert status == 404 and b"not yours" not in body


def test_it_is_read_only_and_bound_to_localhost(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    for method in ("POST", "PUT", "DELETE"):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request(method, "/tiny/select-abc123/report.md", body=b"x")
        assert connection.getresponse().status == 501, method
        connection.close()


def test_serving_runs_tells_the_flow_runs_where_the_files_are(runs_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.files import serving_runs
    from tasks.links import FILES_ROOT_ENV, FILES_URL_ENV, file_url

    monkeypatch.delenv(FILES_URL_ENV, raising=False)
    monkeypatch.delenv(FILES_ROOT_ENV, raising=False)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with serving_runs(runs_dir, port) as url:
        assert os.environ[FILES_URL_ENV] == url == f"http://127.0.0.1:{port}"
        link = file_url(runs_dir / "tiny" / "select-abc123" / "token_heatmap.html", runs_dir)
        assert link == f"{url}/tiny/select-abc123/token_heatmap.html"
        assert get(link)[0] == 200
    assert FILES_URL_ENV not in os.environ and FILES_ROOT_ENV not in os.environ  # restored


def test_file_urls_keep_the_run_view_and_refuse_outside_paths(runs_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.links import FILES_ROOT_ENV, FILES_URL_ENV, file_url, md_link, run_view

    monkeypatch.setenv(FILES_URL_ENV, "http://127.0.0.1:9999")
    monkeypatch.delenv(FILES_ROOT_ENV, raising=False)
    assert file_url(runs_dir / "tiny", runs_dir) == "http://127.0.0.1:9999/tiny/"
    assert file_url(runs_dir / "tiny" / "a b.md", runs_dir) == "http://127.0.0.1:9999/tiny/a%20b.md"
    assert file_url(runs_dir.parent / "secret.txt", runs_dir) is None
    assert md_link("secret", runs_dir.parent / "secret.txt", runs_dir) == f"secret: `{runs_dir.parent / 'secret.txt'}`"
    # A stage dir in the store is shown as the run's view of it (what the user browses).
    assert run_view(runs_dir / "_stages" / "select-abc123", runs_dir / "tiny") == runs_dir / "tiny" / "select-abc123"
    assert run_view(runs_dir / "_stages" / "other-1", runs_dir / "tiny") == runs_dir / "_stages" / "other-1"
    # The server serves another dir than the run's: links only for what it serves.
    monkeypatch.setenv(FILES_ROOT_ENV, str(runs_dir / "tiny"))
    assert file_url(runs_dir / "tiny" / "summary.json", runs_dir) == "http://127.0.0.1:9999/summary.json"
    assert file_url(runs_dir / "_stages", runs_dir) is None

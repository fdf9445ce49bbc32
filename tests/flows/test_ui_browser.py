"""The Prefect UI as a user meets it, driven by clicks in headless Chromium (Selenium): `selpo server` on a free
port, `selpo serve` of the tiny config, a run started from the deployment's form that fails on a broken prompt
file, Retry after fixing the file (the finished stages come back cached), the heatmap opened over HTTP from the
report artifact, and a second run under another run name that reuses every stage.

Screenshots go to $SELPO_TEST_ARTIFACTS/ui (else the test's tmp dir). Slow (~3 min on 2 cores) but part of
`make test`; .ci/run installs chromium and chromium-driver, so it runs in CI. Skipped only where Chromium is not
installed (apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flow_helpers import REPO, free_port, start, stop, wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_CHROMIUM = "needs chromium and chromium-driver (apt-get install chromium chromium-driver)"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_CHROMIUM)]

STARTUP_TIMEOUT, RUN_TIMEOUT, PAGE_TIMEOUT = 180, 300, 30
DEPLOYMENT = "SePO pipeline (tiny)"
GOOD_PROMPTS = '{"prompt": "w1 w2 w3"}\n{"prompt": "w4 w5"}\n{"prompt": "w6 w7"}\n'
BROKEN_PROMPTS = '{"prompt": "w1 w2 w3"}\n{"prompt": "w4 w5"\n{"prompt": "w6 w7"}\n'  # row 2: a missing brace
BEFORE_GENERATE = ["make synthetic task", "prepare data", "SFT reference", "train oracle", "score tokens",
                   "select key tokens"]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1100"]


@dataclass
class UI:
    url: str
    api: str
    files: str
    runs_dir: Path
    prompts: Path
    shots: Path
    logs: list[Path]
    driver: Any

    def shot(self, name: str) -> None:
        time.sleep(1)  # the UI fetches and draws after the page loads
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_for_text(self, text: str, timeout: float = PAGE_TIMEOUT) -> None:
        wait_until(lambda: text in self.text(), f"{text!r} on {self.driver.current_url}", timeout, self.logs)

    def click(self, text: str, where: str = "self::button or self::a or @role='menuitem' or @role='tab'",
              timeout: float = PAGE_TIMEOUT) -> None:
        """Click the first visible element (matching the XPath test `where`) whose text is `text`, waiting for it.

        One XPath query per try: asking the browser about each candidate element in turn took minutes."""
        from selenium.webdriver.common.by import By

        xpath = f"//*[({where}) and normalize-space(.)='{text}']"

        def find() -> Any:
            return next((el for el in self.driver.find_elements(By.XPATH, xpath) if el.is_displayed()), None)

        wait_until(find, f"{text!r} to click on {self.driver.current_url}", timeout, self.logs)
        find().click()


def chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='selpo-chromium-')}"]:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[UI]:
    pytest.importorskip("selenium", reason="the dev extra installs selenium")
    shots = Path(os.environ.get("SELPO_TEST_ARTIFACTS") or tmp_path) / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    port, files_port = free_port(), free_port()
    runs_dir, prompts = tmp_path / "runs", tmp_path / "prompts.jsonl"
    prompts.write_text(BROKEN_PROMPTS)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_API_PORT"):
        env.pop(name, None)
    logs = [tmp_path / "server.log", tmp_path / "serve.log"]
    server = start([sys.executable, "-m", "deployments.cli", "server", "--port", str(port)], env, logs[0])
    serve = driver = None
    try:
        url, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
        wait_until(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, "selpo server",
                   STARTUP_TIMEOUT, logs)
        # The UI of a server on another port than 4200 must call that port (`prefect server start --port N`
        # alone makes it call 4200).
        assert json.load(urllib.request.urlopen(f"{url}/ui-settings", timeout=10))["api_url"] == api
        serve = start([sys.executable, "-m", "deployments.cli", "serve", "--config", "configs/tiny.yaml",
                       "--set", f"runs_dir={runs_dir}", "--set", f"generate.prompts={prompts}",
                       "--files-port", str(files_port)], {**env, "PREFECT_API_URL": api}, logs[1])
        wait_until(lambda: "Your deployments are being served" in logs[1].read_text(errors="replace"),
                   "selpo serve", STARTUP_TIMEOUT, logs)
        driver = chromium()
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        yield UI(url, api, f"http://127.0.0.1:{files_port}", runs_dir, prompts, shots, logs, driver)
    finally:
        if driver is not None:
            driver.quit()
        if serve is not None:
            stop(serve)
        stop(server)


def flow_run_named(ui: UI, name: str, states: set[str]) -> Any:
    """The flow run called `name`, once it is in one of `states` (read through the API, polled)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    found: list[Any] = []

    def done() -> bool:
        with temporary_settings({PREFECT_API_URL: ui.api}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        found[:] = [run for run in runs if run.state and run.state.name in states]
        return bool(found)

    wait_until(done, f"flow run {name!r} in {states}", RUN_TIMEOUT, ui.logs)
    return found[0]


def task_runs(ui: UI, flow_run_id: Any) -> list[tuple[str, str]]:
    """(name, state) of every task run of a flow run, once all are final and the summary task is among them. A
    retried flow run holds the task runs of both attempts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    found: list[tuple[str, str]] = []

    def done() -> bool:
        with temporary_settings({PREFECT_API_URL: ui.api}), get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        found[:] = sorted((run.name, run.state.name) for run in runs if run.state is not None)
        return all(run.state is not None and run.state.is_final() for run in runs) and any(
            name == "write summary" or state == "Failed" for name, state in found)

    wait_until(done, "the task runs' final states", PAGE_TIMEOUT, ui.logs)
    return found


def artifact_id(ui: UI, flow_run_id: Any, key: str) -> Any:
    """The id of the flow run's artifact `key` (its card links to the key's history page, not to it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: ui.api}), get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])))
    return artifact.id


def submit_custom_run(ui: UI, run_name: str, run_name_parameter: str = "") -> None:
    """Deployments -> the pipeline -> Run -> Custom run: type a run name (and the run_name parameter), Submit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ui.driver.get(f"{ui.url}/")  # the neutral entry point: Prefect's default (V2) UI
    ui.click("Deployments")
    ui.click(DEPLOYMENT)
    ui.click("Run")
    ui.click("Custom run")
    ui.wait_for_text("Parameters")
    name = ui.driver.find_element(By.CSS_SELECTOR, "input[name=name]")
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys(run_name)
    config_path, run_name_field = ui.driver.find_elements(By.CSS_SELECTOR, "textarea")  # overrides: a JSON editor
    assert config_path.get_attribute("value") == "configs/tiny.yaml"
    if run_name_parameter:
        run_name_field.send_keys(run_name_parameter)
    ui.shot(f"form-{run_name.replace(' ', '-')}")
    ui.click("Submit")


def test_a_run_from_the_form_fails_is_fixed_retried_and_rerun_from_the_cache(ui: UI) -> None:
    from selenium.webdriver.common.by import By

    started = time.monotonic()
    # 1. Deployments that say what they run; the form shows types (no str/None switches).
    ui.driver.get(f"{ui.url}/")
    ui.click("Deployments")
    ui.wait_for_text(DEPLOYMENT)
    ui.wait_for_text("stage 4: score tokens (tiny)")
    ui.shot("01-deployments")
    ui.click(DEPLOYMENT)
    ui.click("Parameters")
    ui.wait_for_text("object")
    ui.shot("02-deployment-parameters")

    # 2. A custom run, named in the form: it fails at the first stage that reads the broken prompt file.
    submit_custom_run(ui, "first UI run")
    failed = flow_run_named(ui, "first UI run", {"Failed"})  # the typed name is kept
    first_attempt = task_runs(ui, failed.id)
    assert first_attempt == sorted([(name, "Completed") for name in BEFORE_GENERATE]
                                   + [("generate [reference]", "Failed")])
    ui.driver.get(f"{ui.url}/v2/runs/flow-run/{failed.id}")
    ui.wait_for_text("Failed")
    ui.shot("03-failed-run")

    # 3. Fix the file, then Retry in the UI: the same flow run goes on from the failed stage.
    ui.prompts.write_text(GOOD_PROMPTS)
    ui.click("Open menu")
    ui.click("Retry", where="@role='menuitem'")
    ui.wait_for_text("Will become")  # "Retry the flow run first UI run? ... Will become: AwaitingRetry"
    time.sleep(1)  # the dialog slides in: a click while it moves can land beside the button
    ui.click("Retry", where="self::button and ancestor::*[@role='alertdialog']")
    wait_until(lambda: "Will become" not in ui.text(), "the Retry dialog to close", PAGE_TIMEOUT, ui.logs)
    retried = flow_run_named(ui, "first UI run", {"Completed"})
    assert retried.id == failed.id and retried.run_count == 2
    second_attempt = sorted(set(task_runs(ui, retried.id)) - set(first_attempt))
    assert [run for run in second_attempt if run[0].endswith(" · cached")] == sorted(
        (f"{name} · cached", "Cached") for name in BEFORE_GENERATE)
    assert ("generate [reference]", "Completed") in second_attempt
    assert ("write summary", "Completed") in second_attempt
    ui.driver.get(f"{ui.url}/v2/runs/flow-run/{retried.id}")
    ui.wait_for_text("Completed")
    ui.shot("04-retried-run-graph")  # the graph is a canvas: its labels are not in the page's text
    ui.click("Task Runs")
    ui.wait_for_text("train oracle · cached")  # reused stages say so in their names
    ui.shot("05-retried-run-task-runs")

    # 4. The report artifact, its plot, and the heatmap link over HTTP (file:// links never open from the UI).
    ui.click("Artifacts")
    ui.wait_for_text("tiny-results")
    ui.shot("06-artifacts")
    ui.driver.get(f"{ui.url}/v2/artifacts/artifact/{artifact_id(ui, retried.id, 'tiny-results')}")
    ui.wait_for_text("Token heatmap (excerpt)")
    plot = next(img for img in ui.driver.find_elements(By.CSS_SELECTOR, "img")
                if "metrics.svg" in (img.get_attribute("src") or ""))
    wait_until(lambda: ui.driver.execute_script("return arguments[0].naturalWidth", plot) > 0, "the metrics plot",
               PAGE_TIMEOUT, ui.logs)
    ui.shot("07-report-artifact")
    heatmap = next(a.get_attribute("href") for a in ui.driver.find_elements(By.CSS_SELECTOR, "a")
                   if a.text.strip() == "token heatmap")
    assert heatmap.startswith(f"{ui.files}/tiny/select-") and heatmap.endswith("/token_heatmap.html")
    ui.driver.get(heatmap)
    assert ui.driver.title == "selpo token rewards (selected tokens boxed)"
    ui.shot("08-heatmap-over-http")
    ui.driver.get(f"{ui.files}/tiny/")
    ui.wait_for_text("summary.json")
    ui.shot("09-run-dir-listing")

    # 5. The same config under another run name: every stage reused, shown as Cached.
    submit_custom_run(ui, "second UI run", run_name_parameter="tiny-second")
    second = flow_run_named(ui, "second UI run", {"Completed"})
    stages = [run for run in task_runs(ui, second.id) if run[0] != "write summary"]
    assert len(stages) == 13 and all(name.endswith(" · cached") and state == "Cached" for name, state in stages)
    ui.driver.get(f"{ui.url}/v2/runs/flow-run/{second.id}?tab=Task+Runs")
    ui.click("Task Runs")
    wait_until(lambda: ui.text().count("Cached") >= 13, "13 Cached task runs", PAGE_TIMEOUT, ui.logs)
    ui.shot("10-second-run-all-cached")
    summary = json.loads((ui.runs_dir / "tiny-second" / "summary.json").read_text())
    assert all(row["cached"] for row in summary["stages"].values())
    print(f"\nbrowser test: {time.monotonic() - started:.0f} s after start-up; screenshots in {ui.shots}")

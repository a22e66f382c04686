"""Real-browser checks of what a user sees after the smoke workflow: the MLflow UI over its
tracking store, and the self-contained Snakemake report.

Chromium runs headless under Selenium and chromedriver, with its proxy set to a closed
loopback port. Chromium sends loopback requests around a proxy, so pages reach the local
MLflow server and no other host. The assertions read the page as rendered after its
JavaScript ran (``document.body.innerText``, images, links), not the HTML a server sent.

The tests are skipped when Chromium, chromedriver or Selenium is missing, unless
DCL_REQUIRE_BROWSER=1 (as in CI), where they fail instead.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from workflow_helpers import REPO, needs_cifar10, snakemake

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("DCL_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    # Nothing is expected to listen on port 9, so every request to another host fails.
    "--proxy-server=http://127.0.0.1:9",
]
# Seconds to wait for a page to render. The test machine has 2 cores and may be training.
WAIT_S = 90


def _missing_browser() -> str | None:
    if CHROMIUM is None:
        return "chromium not on PATH (apt-get install chromium chromium-driver)"
    if CHROMEDRIVER is None:
        return "chromedriver not on PATH (apt-get install chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium not installed (pip install -e '.[test]')"
    return None


MISSING_BROWSER = _missing_browser()

pytestmark = [
    pytest.mark.slow,
    needs_cifar10,
    pytest.mark.skipif(
        MISSING_BROWSER is not None and not REQUIRED,
        reason=f"{MISSING_BROWSER}; DCL_REQUIRE_BROWSER=1 turns this skip into a failure",
    ),
]

# Report entries: file name -> (category in the report's menu, caption in workflow/report/).
REPORT_ENTRIES = {
    "cifar10_top1.csv": ("Tables", "table.rst"),
    "cifar10_knn_top1.csv": ("Tables", "knn_table.rst"),
    "cifar10_batch_size.png": ("Figures", "batch_size.rst"),
    "cifar10_knn_batch_size.png": ("Figures", "batch_size.rst"),
    "cifar10_npc.png": ("Diagnostics", "npc.rst"),
    "cifar10_curves.png": ("Diagnostics", "curves.rst"),
}
FIGURES = [name for name in REPORT_ENTRIES if name.endswith(".png")]
TABLES = [name for name in REPORT_ENTRIES if name.endswith(".csv")]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if MISSING_BROWSER is not None:
        pytest.fail(f"DCL_REQUIRE_BROWSER=1 but {MISSING_BROWSER}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}"]:
        options.add_argument(flag)
    # A driver path skips Selenium Manager, which would otherwise look for drivers online.
    service = Service(CHROMEDRIVER, log_output=str(folder / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def rendered_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def wait_for(driver, condition) -> None:
    """Wait until ``condition(driver)`` is true or WAIT_S seconds pass, without raising.

    The caller's asserts then report what the page shows.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(condition)
    except TimeoutException:
        pass


def text_after_render(driver, url: str, *expected: str) -> str:
    """Open ``url`` and return its rendered text once it contains every ``expected`` string
    (or after WAIT_S seconds)."""
    driver.get(url)
    wait_for(driver, lambda d: all(text in rendered_text(d) for text in expected))
    return rendered_text(driver)


# --- MLflow UI ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_url(smoke_run, tmp_path_factory):
    """Yield the URL of an MLflow server on 127.0.0.1 over the smoke run's sqlite store."""
    root, _ = smoke_run
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "mlartifacts"),
        ],
        cwd=folder,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"},
        stdout=log,
        stderr=subprocess.STDOUT,
        # A new session puts the server and its workers in one group for stop_group.
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(folder / 'server.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up: {(folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        yield url
    finally:
        stop_group(process)
        log.close()


@pytest.fixture(scope="module")
def store(smoke_run):
    """Return the smoke experiment and its pretraining runs, read from the tracking store."""
    from mlflow.tracking import MlflowClient

    root, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke/cifar10")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    return experiment, sorted(runs, key=lambda run: run.info.run_name)


def as_javascript_number(value: float) -> str:
    # From 1e-4 to 1e16, JavaScript prints the same shortest round-trip digits as repr,
    # except that integers get no ".0".
    return str(int(value)) if value.is_integer() else repr(value)


def test_mlflow_runs_page(browser, mlflow_url, store):
    experiment, runs = store
    names = [run.info.run_name for run in runs]
    url = f"{mlflow_url}/#/experiments/{experiment.experiment_id}/runs"
    text = text_after_render(browser, url, *names)
    assert len(names) >= 2
    assert "smoke/cifar10" in text
    for name in names:
        assert name in text


def test_mlflow_run_metric(browser, mlflow_url, store):
    experiment, runs = store
    run = runs[0]
    value = as_javascript_number(run.data.metrics["loss"])
    url = f"{mlflow_url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    text = text_after_render(browser, url, value)
    assert run.info.run_name in text
    assert value in text


def test_mlflow_run_artifact(browser, mlflow_url, store):
    experiment, runs = store
    run = runs[0]
    url = (
        f"{mlflow_url}/#/experiments/{experiment.experiment_id}"
        f"/runs/{run.info.run_id}/artifacts"
    )
    assert "settings.json" in text_after_render(browser, url, "settings.json")


# --- Snakemake report --------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_url(smoke_run):
    """Build the smoke run's Snakemake report and return it as a file:// URL."""
    root, config = smoke_run
    report = root / "report.html"
    result = snakemake(config, "--report", str(report), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return report.as_uri()


def open_entry(driver, report_url: str, name: str):
    """Load the report, open the menu category holding ``name`` and return the row's links."""
    from selenium.webdriver.common.by import By

    category, _ = REPORT_ENTRIES[name]
    driver.get(report_url)
    menu_item = f"//a[span[normalize-space()='{category}']]"
    wait_for(driver, lambda d: d.find_elements(By.XPATH, menu_item))
    driver.find_element(By.XPATH, menu_item).click()
    wait_for(driver, lambda d: d.find_elements(By.XPATH, "//tbody/tr"))
    rows = driver.find_elements(By.XPATH, "//tbody/tr")
    paths = [row.find_element(By.TAG_NAME, "td").text for row in rows]
    matches = [row for row, path in zip(rows, paths) if Path(path).name == name]
    assert len(matches) == 1, f"{name} among {paths} under {category}"
    # Each row has a view link, then an information link.
    return matches[0].find_elements(By.TAG_NAME, "a")


def caption_phrase(name: str) -> str:
    _, caption = REPORT_ENTRIES[name]
    return (REPO / "workflow" / "report" / caption).read_text().splitlines()[0].strip()


@pytest.mark.parametrize("name", list(REPORT_ENTRIES))
def test_report_caption(browser, report_url, name):
    phrase = caption_phrase(name)
    _, info = open_entry(browser, report_url, name)
    info.click()
    wait_for(browser, lambda d: phrase in rendered_text(d))
    text = rendered_text(browser)
    assert name in text
    assert phrase in text


@pytest.mark.parametrize("name", FIGURES)
def test_report_figure(browser, report_url, name):
    view, _ = open_entry(browser, report_url, name)
    view.click()
    png_width = (
        "const img = document.querySelector('img[src^=\"data:image/png\"]');"
        "return img && img.complete ? img.naturalWidth : 0"
    )
    wait_for(browser, lambda d: d.execute_script(png_width) > 0)
    assert browser.execute_script(png_width) > 0


def decode_data_uri(uri: str) -> bytes:
    header, _, data = uri.partition(",")
    if header.endswith(";base64"):
        return base64.b64decode(data)
    return urllib.parse.unquote_to_bytes(data)


@pytest.mark.parametrize("name", TABLES)
def test_report_table(browser, report_url, smoke_run, name):
    root, _ = smoke_run
    view, _ = open_entry(browser, report_url, name)
    href = view.get_attribute("href")
    assert href.startswith("data:text/csv")
    assert decode_data_uri(href) == (root / "tables" / name).read_bytes()


def test_report_is_self_contained(browser, report_url):
    browser.get(report_url)
    wait_for(browser, lambda d: "Diagnostics" in rendered_text(d))
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    linked = browser.execute_script(
        "return Array.from(document.querySelectorAll("
        "'script[src], link[href], iframe[src]')).map(node => node.outerHTML)"
    )
    assert "Diagnostics" in rendered_text(browser)
    assert [url for url in fetched if not url.startswith(("data:", "blob:"))] == []
    assert linked == []

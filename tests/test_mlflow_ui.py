"""The MLflow UI, end to end, in a real headless browser.

A module fixture makes a real store: one ``python -m harness`` run and one small Optuna sweep (a parent
run with two nested trial runs), then serves it with ``mlflow server`` on a free loopback port. Debian's
Chromium, driven by Selenium through the system ChromeDriver (nothing is downloaded: no Selenium
Manager, no browser installer), then checks what a person would look at:

- the experiment page lists the sweep's parent run with an expander, and its two trials appear
  under it, indented, once it is expanded;
- a run's page lists the per-layer sparsity metrics (``sparsity/features.0.weight``, ...) with
  their values;
- the compare view of two trials shows the parameters that differ (``prune.target_sparsity``) and
  plots ``sparsity/overall`` for both runs.

The MLflow REST API is used only to look up ids and the expected values. Screenshots land in each
test's tmp dir; the experiment page's is also copied to ``outputs/test-artifacts/mlflow-ui.png``,
and a failing check leaves a screenshot and the page's HTML there too. With
``MLFLOW_UI_DOCS_SCREENSHOT=1`` the experiment-page test also rewrites ``docs/mlflow-ui.png``.

Chromium and ChromeDriver come from ``.ci/install-chromium.sh`` (run once here when missing, as root);
when they cannot be installed or started, the tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import REPO
from .mlflow_server import stop_session

pytestmark = [pytest.mark.slow, pytest.mark.ui]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_SCRIPT = REPO / ".ci" / "install-chromium.sh"
INSTALL_TIMEOUT_S = 300
CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",  # Chromium refuses to run as root with its sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # Without these Chromium keeps opening connections to Google's services, refused here many at a time.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1400,900",
]
VIEWPORT = {"width": 1400, "height": 2200}  # tall: the compare view renders only the rows in view
WAIT_S = 45  # a React page on a busy 2-core machine
SERVER_START_S = 120
ARTIFACTS = REPO / "outputs" / "test-artifacts"
DOCS_SCREENSHOT = REPO / "docs" / "mlflow-ui.png"

FAST = ["train.epochs=2", "train.finetune_epochs=3", "prune.end_epoch=2"]
REGISTERED = "ui-digits-pruned"  # the single run registers its pruned model under this name
SWEEP = ["hydra/sweeper=harness_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner.name=none",
         "hydra.sweeper.confirm.seeds=0", *FAST,
         "prune.target_sparsity=interval(0.5, 0.9)"]
PER_LAYER = ["features.0.weight", "features.2.weight", "classifier.1.weight", "classifier.3.weight"]


# ----------------------------------------------------------------------------------------------- the browser

_install_result: str | None = None  # "" once installed, a reason once failed; None before trying


def _chromium_missing() -> str:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    return " and ".join(missing)


def _install_chromium() -> str:
    """Run ``.ci/install-chromium.sh`` once per process; "" on success, else the reason it failed."""
    global _install_result
    if _install_result is None:
        if os.geteuid() != 0:
            _install_result = f"not root, so not installing them (run {INSTALL_SCRIPT.relative_to(REPO)} as root)"
        else:
            try:
                proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                                      timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
                _install_result = "" if proc.returncode == 0 else (
                    f"{INSTALL_SCRIPT.name} failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")
            except subprocess.TimeoutExpired:
                _install_result = f"{INSTALL_SCRIPT.name} did not finish within {INSTALL_TIMEOUT_S} s"
            except OSError as exc:
                _install_result = f"{INSTALL_SCRIPT.name} could not run: {exc}"
    return _install_result


def _skip(reason: str) -> None:
    print(f"\n[mlflow-ui] skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Debian Chromium through /usr/bin/chromedriver, with a fresh profile and a 1400x900 viewport."""
    if _chromium_missing():
        failure = _install_chromium()
        if missing := _chromium_missing():
            _skip(f"Chromium/ChromeDriver unavailable: {missing} not found; {failure or 'the install put none there'}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in [*CHROME_ARGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(arg)
    t0 = time.monotonic()
    # The explicit driver path keeps Selenium Manager out; SE_OFFLINE stops it downloading should it run anyway.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        try:
            driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        except (WebDriverException, OSError) as exc:
            message = _first_line(getattr(exc, "msg", None) or str(exc)).split("; For documentation")[0]
            _skip(f"Chromium could not be started: {message}")
    try:
        driver.set_page_load_timeout(60)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**VIEWPORT, "deviceScaleFactor": 1,
                                                                       "mobile": False})
        print(f"\n[mlflow-ui] {driver.capabilities.get('browserVersion')} started in {time.monotonic() - t0:.1f} s")
        yield driver
    finally:
        driver.quit()


# ----------------------------------------------------------------------------------------------- the store and server


@dataclass(frozen=True)
class Run:
    run_id: str
    name: str
    parent_id: str | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass(frozen=True)
class MlflowUI:
    url: str
    experiment_id: str
    single: Run  # the plain `python -m harness` run
    parent: Run  # the sweep's parent run
    trials: list[Run]  # its two children
    single_page: str  # the run's page as the run printed it (``... then open http://127.0.0.1:5000/<page>``)
    outputs: Path  # the store's folder (the single run's files in ``run/``)


@pytest.fixture(scope="module")
def mlflow_ui(browser: WebDriver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowUI]:
    """A real store (one run, one 2-trial sweep) served by ``mlflow server``; everything stopped at the end, always.

    The run and the sweep go at once (the harness takes turns on the store and the dense baseline with file
    locks); the server starts as soon as the store and its experiment exist, and only reads it.
    Takes ``browser`` first so that a machine without Chromium skips before any training runs.
    """
    outputs = tmp_path_factory.mktemp("mlflow-ui-store")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    t0 = time.monotonic()
    jobs = {
        "run": Harness.start([*FAST, f"tracking.register_as={REGISTERED}", f"hydra.run.dir={outputs}/run"], outputs,
                             env, "run"),
        "sweep": Harness.start(["--multirun", *SWEEP, f"hydra.sweep.dir={outputs}/sweep"], outputs, env, "sweep"),
    }
    server = None
    try:
        deadline = time.monotonic() + 300
        while not _has_experiment(outputs / "mlflow.db", "pruning"):
            for job in jobs.values():
                assert job.process.poll() in (None, 0), job.failure()
            assert time.monotonic() < deadline, "no MLflow experiment 'pruning' after 300 s"
            time.sleep(0.5)
        server = MlflowServer.start(outputs, env)
        t_server = time.monotonic() - t0
        for job in jobs.values():
            job.wait(timeout=max(10.0, deadline + 200 - time.monotonic()))
        print(f"\n[mlflow-ui] server up at {t_server:.0f} s, run and sweep done at {time.monotonic() - t0:.0f} s; "
              f"{server.url}")
        printed = re.search(r"then open http://127\.0\.0\.1:5000/(\S+)", jobs["run"].log.read_text())
        assert printed, f"no UI address in the run's output: {jobs['run'].failure()}"
        yield server.describe(printed.group(1), outputs)
    finally:
        for job in jobs.values():
            job.stop()
        with contextlib.suppress(WebDriverException):
            browser.get("about:blank")  # no open connections for the server to wait on while it stops
        if server is not None:
            server.stop()


@dataclass
class Harness:
    """``python -m harness ARGS outputs_dir=...`` in the background, its output in a log file."""

    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, args: list[str], outputs: Path, env: dict[str, str], name: str) -> Harness:
        log = outputs / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, "-m", "harness", *args, f"outputs_dir={outputs}"], cwd=REPO,
                                       env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        return cls(process, log)

    def failure(self) -> str:
        return f"{' '.join(map(str, self.process.args))} exited with {self.process.returncode}:\n" + \
            self.log.read_text(errors="replace")[-3000:]

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(map(str, self.process.args))} still running after {timeout:.0f} s")
        assert self.process.returncode == 0, self.failure()

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _has_experiment(db: Path, name: str) -> bool:
    """Whether the SQLite store exists with its tables and the experiment (read only, never waiting on a lock)."""
    if not db.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)) as conn:
            return conn.execute("SELECT count(*) FROM experiments WHERE name = ?", (name,)).fetchone()[0] > 0
    except sqlite3.Error:
        return False


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, outputs: Path, env: dict[str, str]) -> MlflowServer:
        """``mlflow server`` on a free loopback port, polled until ``/health`` answers."""
        failure = "not started"
        for attempt in range(3):  # a port picked free can be taken before the server binds it: retry
            port = _free_port()
            log = outputs / f"mlflow-server-{attempt}.log"
            cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{outputs}/mlflow.db",
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            # No job runner (8 more processes, for GenAI features): starts in about half the time on 2 cores.
            server_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            with open(log, "w") as out:  # its own session, so stop() ends the workers with it
                process = subprocess.Popen(cmd, cwd=outputs, env=server_env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            server = cls(f"http://127.0.0.1:{port}", process, log)
            deadline = time.monotonic() + SERVER_START_S
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{server.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return server
                time.sleep(0.5)
            server.stop()
            text = log.read_text(errors="replace")
            failure = (f"exited with {process.returncode}" if process.returncode is not None
                       else f"did not answer within {SERVER_START_S} s") + f": {text[-2000:]}"
            if "already in use" not in text:
                break
        raise AssertionError(f"mlflow server {failure}")

    def stop(self) -> None:
        stop_session(self.process, timeout=10)

    def api(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def describe(self, single_page: str, outputs: Path) -> MlflowUI:
        """The ids and expected values of the runs, from the server's REST API."""
        name = urllib.parse.quote("pruning")
        experiment_id = self.api(f"experiments/get-by-name?experiment_name={name}")["experiment"]["experiment_id"]
        found = self.api("runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
        runs = []
        for raw in found:
            tags = {t["key"]: t["value"] for t in raw["data"].get("tags", [])}
            runs.append(Run(raw["info"]["run_id"], raw["info"]["run_name"], tags.get("mlflow.parentRunId"),
                            {p["key"]: p["value"] for p in raw["data"].get("params", [])},
                            {m["key"]: m["value"] for m in raw["data"].get("metrics", [])}, tags))
        parents = [r for r in runs if r.name.startswith("sweep-")]
        assert len(runs) == 4 and len(parents) == 1, [(r.name, r.parent_id) for r in runs]
        (parent,) = parents
        trials = sorted((r for r in runs if r.parent_id == parent.run_id), key=lambda r: r.name)
        singles = [r for r in runs if r.parent_id is None and r is not parent]
        assert len(trials) == 2 and len(singles) == 1, [(r.name, r.parent_id) for r in runs]
        return MlflowUI(self.url, experiment_id, singles[0], parent, trials, single_page, outputs)


# ----------------------------------------------------------------------------------------------- the tests


def test_experiment_page_nests_the_sweep_trials_under_their_parent(browser, mlflow_ui, tmp_path):
    ui = mlflow_ui
    open_fresh(browser, ui.url)
    with artifacts_on_failure(browser, tmp_path, "experiment"):
        browser.get(f"{ui.url}/#/experiments/{ui.experiment_id}/runs?workflowType=machine_learning")
        parent_link = wait_for(browser, lambda d: run_link(d, ui.parent.run_id), "the sweep's parent run in the table")
        wait_for(browser, lambda d: run_link(d, ui.single.run_id), "the single run in the table")
        assert parent_link.text.strip() == ui.parent.name
        # Collapsed at first: the trials are not listed as runs of their own.
        assert not [t for t in ui.trials if run_link(browser, t.run_id)], "trials shown before expanding the parent"
        shot(browser, tmp_path / "experiment-collapsed.png")

        # The parent's row has an expander in its name cell; it reveals the trials.
        expander = parent_link.find_element(By.XPATH, "./ancestor::div[@role='gridcell'][1]//button")
        expander.click()
        links = {t.run_id: wait_for(browser, lambda d, t=t: run_link(d, t.run_id), f"trial run {t.name}")
                 for t in ui.trials}
        parent_link = run_link(browser, ui.parent.run_id)
        single_link = run_link(browser, ui.single.run_id)
        assert {links[t.run_id].text.strip() for t in ui.trials} == {t.name for t in ui.trials}
        # Under it: the trials' rows come right after the parent's (the other run before or after them all),
        # and are indented.
        y = {run_id: link.location["y"] for run_id, link in [*links.items(), ("parent", parent_link),
                                                              ("single", single_link)]}
        rows = sorted(y, key=y.get)
        below = rows[rows.index("parent") + 1:][:2]
        assert set(below) == {t.run_id for t in ui.trials}, y
        x_top = parent_link.location["x"]
        assert single_link.location["x"] == x_top  # both top-level
        assert all(link.location["x"] > x_top for link in links.values()), (
            x_top, [link.location["x"] for link in links.values()])
        shot(browser, tmp_path / "experiment-expanded.png", ARTIFACTS / "mlflow-ui.png")

        if os.environ.get("MLFLOW_UI_DOCS_SCREENSHOT"):
            readme_screenshot(browser, tmp_path / "docs.png")


def test_run_page_lists_the_per_layer_sparsity_metrics(browser, mlflow_ui, tmp_path):
    ui = mlflow_ui
    run = ui.single
    open_fresh(browser, ui.url)
    with artifacts_on_failure(browser, tmp_path, "run"):
        browser.get(f"{ui.url}/#/experiments/{ui.experiment_id}/runs/{run.run_id}")
        wait_for(browser, lambda d: run.name in page_text(d), "the run's name")
        heading = wait_for(browser, lambda d: d.find_elements(
            By.XPATH, "//h4[starts-with(normalize-space(.), 'Metrics (')]"), "the Metrics section")
        assert heading.text.strip() == f"Metrics ({len(run.metrics)})"
        table = heading.find_element(By.XPATH, "./following::div[@role='table'][1]")
        wait_for(browser, lambda d: "sparsity/features.0.weight" in table.text, "sparsity/features.0.weight listed")
        shown = table_rows(table)
        for layer in PER_LAYER:
            key = f"sparsity/{layer}"
            assert key in shown, f"{key} not in the run page's metrics: {sorted(shown)}"
            assert float(shown[key]) == pytest.approx(run.metrics[key], rel=1e-9), key
        assert float(shown["sparsity/overall"]) == pytest.approx(run.metrics["sparsity/overall"], rel=1e-9)
        assert set(shown) == set(run.metrics)
        shot(browser, tmp_path / "run.png")


def test_the_printed_address_opens_the_run_in_model_training_with_the_verdict_and_per_layer_picture_first(
        browser, mlflow_ui, tmp_path):
    ui = mlflow_ui
    run = ui.single
    open_fresh(browser, ui.url)  # a new user's browser: nothing chosen, so MLflow 3.17 starts in GenAI
    with artifacts_on_failure(browser, tmp_path, "run-page"):
        browser.get(f"{ui.url}/{ui.single_page}")
        wait_for(browser, lambda d: run.name in page_text(d), "the run's name")
        # Model training: the breadcrumb says Runs (not Evaluations), the sidebar has the Model registry and no
        # GenAI entries, and the run's tabs include its model metrics.
        wait_for(browser, lambda d: d.find_elements(By.XPATH, "//a[normalize-space(.)='Model registry']"),
                 "the Model training sidebar")
        assert browser.find_elements(By.XPATH, "//a[normalize-space(.)='Runs']"), "no Runs breadcrumb"
        assert not browser.find_elements(By.XPATH, "//*[normalize-space(.)='Evaluations']"), "opened in GenAI"
        assert not browser.find_elements(By.XPATH, "//a[normalize-space(.)='Judges']"), "GenAI sidebar"
        assert browser.find_elements(By.XPATH, "//*[@role='tab'][normalize-space(.)='Model metrics']")

        # The description: the verdict first, then the per-layer picture, loaded, above everything else.
        verdict = "Goal MET" if run.metrics["goal/met"] else "Goal MISSED"
        wait_for(browser, lambda d: verdict in page_text(d), f"'{verdict}' in the description")
        picture = wait_for(browser, lambda d: [i for i in d.find_elements(By.TAG_NAME, "img")
                                               if "path=curves.png" in (i.get_attribute("src") or "")
                                               and d.execute_script("return arguments[0].naturalWidth", i) > 0],
                           "the per-layer picture drawn")
        assert f"run_uuid={run.run_id}" in picture.get_attribute("src")
        metrics_heading = browser.find_element(By.XPATH, "//h4[starts-with(normalize-space(.), 'Metrics (')]")
        verdict_text = browser.find_element(By.XPATH, f"//*[normalize-space(.)='{verdict}']")
        assert verdict_text.location["y"] < picture.location["y"] < metrics_heading.location["y"]
        images = [i for i in browser.find_elements(By.TAG_NAME, "img") if i.is_displayed()]
        assert min(images, key=lambda i: i.location["y"]) == picture, "another picture above the per-layer one"
        shot(browser, tmp_path / "run-page.png", ARTIFACTS / "mlflow-ui-run-page.png")


def test_the_sweep_parent_row_shows_its_best_trials_final_metrics(browser, mlflow_ui, tmp_path):
    ui = mlflow_ui
    (best,) = [t for t in ui.trials if t.tags.get("harness.best") == "true"]
    columns = ["final/sparsity", "final/accuracy", "final/test_accuracy"]
    open_fresh(browser, ui.url)
    with artifacts_on_failure(browser, tmp_path, "parent-row"):
        browser.get(f"{ui.url}/#/experiments/{ui.experiment_id}/runs?workflowType=machine_learning")
        parent_link = wait_for(browser, lambda d: run_link(d, ui.parent.run_id), "the sweep's parent run")
        show_columns(browser, hide=[], show=columns)
        row_id = parent_link.find_element(By.XPATH, "./ancestor::div[@role='row'][1]").get_attribute("row-id")
        assert row_id == ui.parent.run_id
        # the best trial is told apart by its name once the parent is expanded
        parent_link.find_element(By.XPATH, "./ancestor::div[@role='gridcell'][1]//button").click()
        best_link = wait_for(browser, lambda d: run_link(d, best.run_id), "the best trial's row")
        assert best_link.text.strip() == best.name and best.name.endswith(" (best)")
        assert all(not t.name.endswith(" (best)") for t in ui.trials if t is not best)
        for name in columns:
            cell = wait_for(browser, lambda d, name=name: [
                c for c in d.find_elements(By.XPATH, f"//div[@role='row'][@row-id='{row_id}']/div[@role='gridcell']")
                if c.get_attribute("col-id") == f"metrics.`{name}`" and c.text.strip()], f"the parent's {name}")
            assert float(cell.text) == pytest.approx(best.metrics[name], rel=1e-9), name
        shot(browser, tmp_path / "parent-row.png", ARTIFACTS / "mlflow-ui-parent-row.png")


def test_the_registered_model_is_listed_and_loads_with_the_runs_exact_zeros(browser, mlflow_ui, tmp_path):
    import mlflow
    import torch

    ui = mlflow_ui
    open_fresh(browser, ui.url)
    with artifacts_on_failure(browser, tmp_path, "registry"):
        browser.get(f"{ui.url}/#/models?workflowType=machine_learning")
        wait_for(browser, lambda d: d.find_elements(By.XPATH, f"//a[normalize-space(.)='{REGISTERED}']"),
                 f"{REGISTERED} in the Model registry")
        shot(browser, tmp_path / "registry.png")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", ui.url)  # through the server, as a user of the registry would
        model = mlflow.pytorch.load_model(f"models:/{REGISTERED}/1")
    saved = torch.load(ui.outputs / "run" / "pruned_model.pt")
    loaded = model.state_dict()
    weights = [k for k in saved if k.endswith("weight") and saved[k].dim() > 1]
    assert weights and all(torch.equal(loaded[k] == 0, saved[k] == 0) for k in weights)
    assert sum(int((saved[k] == 0).sum()) for k in weights) > 0


def test_compare_view_shows_the_differing_params_and_plots_overall_sparsity(browser, mlflow_ui, tmp_path):
    ui = mlflow_ui
    a, b = ui.trials
    assert a.params["prune.target_sparsity"] != b.params["prune.target_sparsity"]
    differing = {k for k in a.params.keys() | b.params.keys() if a.params.get(k) != b.params.get(k)}
    open_fresh(browser, ui.url)
    with artifacts_on_failure(browser, tmp_path, "compare"):
        runs = urllib.parse.quote(json.dumps([a.run_id, b.run_id]))
        experiments = urllib.parse.quote(json.dumps([ui.experiment_id]))
        browser.get(f"{ui.url}/#/compare-runs?runs={runs}&experiments={experiments}")
        wait_for(browser, lambda d: "Comparing 2 Runs" in page_text(d), "the compare view")

        # Parameters: both values of prune.target_sparsity side by side, in the runs' order.
        rows = wait_for(browser, lambda d: "prune.target_sparsity" in (r := params_rows(d)) and r,
                        "prune.target_sparsity in Parameters")
        assert rows["prune.target_sparsity"] == [a.params["prune.target_sparsity"], b.params["prune.target_sparsity"]]
        assert rows["train.epochs"] == ["2", "2"]
        # "Show diff only" leaves exactly the parameters that differ.
        browser.find_element(By.XPATH, PARAMS_DIFF_SWITCH).click()
        wait_for(browser, lambda d: set(params_rows(d)) == differing, f"only the differing params {sorted(differing)}")
        assert "prune.target_sparsity" in differing

        # Metrics: sparsity/overall is listed with a plot link, and the plot draws both runs.
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});",
                               browser.find_element(By.XPATH, PARAMS_DIFF_SWITCH))
        plot_link = wait_for(browser, scroll_metrics_to("sparsity/overall"), "sparsity/overall in Metrics")
        shot(browser, tmp_path / "compare.png")
        # A script click: the names and the values of this table are two virtualized grids, and the scrolling that
        # a WebDriver click does to reach the link moves only one of them.
        browser.execute_script("arguments[0].click();", plot_link)
        wait_for(browser, lambda d: "/metric" in d.current_url, "the metric plot page")
        wait_for(browser, lambda d: len(drawn_lines(d)) >= 2, "two lines drawn in the plot")
        for run in (a, b):
            wait_for(browser, lambda d, run=run: f"{run.name} (sparsity/overall)" in page_text(d),
                     f"the legend entry of {run.name}")
            latest = wait_for(browser, lambda d, run=run: run_latest_value(d, run.name),
                              f"the Latest value of {run.name}")
            assert latest == pytest.approx(run.metrics["sparsity/overall"], rel=1e-9), run.name
        shot(browser, tmp_path / "compare-plot.png")


# ----------------------------------------------------------------------------------------------- helpers


def scroll_metrics_to(name: str):
    """A wait condition that scrolls the compare view's Metrics grid (it renders only the rows in
    view) a little further each time until the plot link of ``name`` is there."""
    script = """
      const links = [...document.querySelectorAll("a[title='Plot chart']")];
      if (!links.length) return;
      let box = links[0].parentElement;
      while (box && box.scrollHeight <= box.clientHeight + 1) box = box.parentElement;
      if (box) box.scrollTop += 120;"""

    def condition(driver):
        found = driver.find_elements(By.XPATH, f"//a[@title='Plot chart'][normalize-space(.)='{name}']")
        if not found:
            driver.execute_script(script)
        return found

    return condition


def open_fresh(driver: WebDriver, url: str) -> None:
    """Clear the UI's saved state for the server's origin, and keep the assistant panel (it opens itself on the
    first load) shut. The origin's tiny /health page is enough for its localStorage."""
    driver.get(f"{url}/health")
    driver.execute_script(
        "localStorage.clear();"
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str, timeout: float = WAIT_S) -> Any:
    """WebDriverWait until ``condition`` is truthy (its first element for a list); fails with ``what``."""
    try:
        # React re-renders replace elements: a stale one only means "look again".
        value = WebDriverWait(driver, timeout, poll_frequency=0.25,
                              ignored_exceptions=[StaleElementReferenceException]).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout} s waiting for {what} at {driver.current_url}")
    return value[0] if isinstance(value, list) else value


def run_link(driver: WebDriver, run_id: str) -> WebElement | None:
    """The run-name link of ``run_id`` in the runs table (None when not shown)."""
    links = driver.find_elements(By.CSS_SELECTOR, f"a[href$='/runs/{run_id}']")
    return next((link for link in links if link.is_displayed()), None)


def table_rows(table: WebElement) -> dict[str, str]:
    """{first cell: second cell} of a design-system ``role=table`` (the value's full text from its title)."""
    rows = {}
    for row in table.find_elements(By.XPATH, ".//div[@role='row']"):
        cells = row.find_elements(By.XPATH, "./div[@role='cell']")
        if len(cells) >= 2:
            titled = cells[1].find_elements(By.XPATH, ".//*[@title]")
            value = titled[0].get_attribute("title") if titled else cells[1].text
            rows[cells[0].text.strip()] = value.strip()
    return rows


PARAMS_DIFF_SWITCH = "//button[@role='switch'][@aria-label='Parameters - Show diff only']"


def params_rows(driver: WebDriver) -> dict[str, list[str]]:
    """{param: [value per run]} of the compare view's Parameters table: the table beside its "Show diff only"."""
    tables = driver.find_elements(By.XPATH, f"{PARAMS_DIFF_SWITCH}/ancestor::div[.//table][1]//table")
    return html_table_rows(tables[0]) if tables else {}


def html_table_rows(table: WebElement) -> dict[str, list[str]]:
    """{row header: [cell texts]} of an HTML table (rows hidden by a filter are left out)."""
    rows = {}
    for row in table.find_elements(By.XPATH, ".//tr[th]"):
        if row.is_displayed():
            rows[row.find_element(By.XPATH, "./th").text.strip()] = [
                td.text.strip() for td in row.find_elements(By.XPATH, "./td")]
    return rows


def page_text(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def drawn_lines(driver: WebDriver) -> list[WebElement]:
    """The lines of the plotly plot on the page that have at least two points."""
    return [p for p in driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot g.trace path.js-line")
            if len(re.findall(r"[ML]", p.get_attribute("d") or "")) >= 2]


def run_latest_value(driver: WebDriver, run_name: str) -> float | None:
    """The "Latest" value in the metric page's summary table for the row of ``run_name`` (None: not shown yet)."""
    cells = driver.find_elements(By.XPATH, f"//tr[td[normalize-space(.)='{run_name}']]/td")
    match = re.match(r"\s*([-+0-9.eE]+)", cells[1].text) if len(cells) >= 2 else None
    return float(match.group(1)) if match else None


def readme_screenshot(driver: WebDriver, path: Path) -> None:
    """The runs table with the sweep expanded and the columns that matter, as docs/mlflow-ui.png."""
    show_columns(driver, hide=["Dataset", "Source", "Models"],
                 show=["prune.target_sparsity", "final/sparsity", "final/accuracy", "goal/met"])
    header = wait_for(driver, lambda d: d.find_elements(
        By.XPATH, "//div[@role='columnheader'][contains(@col-id, 'Run Name')]"), "the Run Name header")
    wait_for(driver, lambda d: d.find_elements(By.XPATH, "//div[@role='columnheader'][normalize-space(.)='goal/met']"),
             "the added columns")
    handle = header.find_element(By.CSS_SELECTOR, ".ag-header-cell-resize")
    ActionChains(driver).drag_and_drop_by_offset(handle, 190, 0).perform()  # room for the full run names
    driver.execute_script("document.activeElement && document.activeElement.blur();")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 560,
                                                                   "deviceScaleFactor": 1, "mobile": False})
    try:
        time.sleep(1)  # let the table lay itself out for the new size: a picture, nothing is asserted
        shot(driver, path, DOCS_SCREENSHOT)
    finally:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**VIEWPORT, "deviceScaleFactor": 1,
                                                                       "mobile": False})


def show_columns(driver: WebDriver, hide: list[str], show: list[str]) -> None:
    """Toggle columns of the runs table with its Columns selector."""
    wait_for(driver, lambda d: d.find_elements(By.XPATH, "//button[normalize-space(.)='Columns']"), "Columns").click()
    selector = wait_for(driver, lambda d: d.find_elements(
        By.CSS_SELECTOR, "[data-component-id='mlflow.experiment_page.runs_table.column_selector']"), "the selector")
    search = selector.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")
    for name in [*hide, *show]:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.DELETE, name)
        wait_for(driver, lambda d, name=name: selector.find_elements(
            By.XPATH, f".//span[contains(@class, 'tree-title')][normalize-space(.)='{name}']"), name).click()
    search.send_keys(Keys.ESCAPE)


def shot(driver: WebDriver, path: Path, *copies: Path) -> None:
    """A screenshot of the viewport at ``path``, copied to ``copies``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path)), path
    for copy in copies:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    print(f"[mlflow-ui] screenshot {path}" + "".join(f" -> {c}" for c in copies))


@contextlib.contextmanager
def artifacts_on_failure(driver: WebDriver, tmp_path: Path, name: str) -> Iterator[None]:
    """On a failing check, keep a screenshot and the page's HTML in tmp_path and outputs/test-artifacts."""
    for stale in ARTIFACTS.glob(f"mlflow-ui-{name}-failure.*"):  # an earlier run's, now misleading
        stale.unlink(missing_ok=True)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            shot(driver, tmp_path / f"{name}-failure.png", ARTIFACTS / f"mlflow-ui-{name}-failure.png")
            (tmp_path / f"{name}-failure.html").write_text(driver.page_source)
            shutil.copyfile(tmp_path / f"{name}-failure.html", ARTIFACTS / f"mlflow-ui-{name}-failure.html")
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


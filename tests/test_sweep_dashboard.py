"""optuna-dashboard reads a sweep's study well (harness.sweep.dashboard): the objective has its metric name,
feasible and infeasible trials are told apart, each metric is its own sortable column, the goal slack is
shown, and each trial links to its MLflow run.

A real SQLite study is written the way the sweeper writes it, then read back three ways: through Optuna
(the samplers must see the goal constraint exactly once), through the dashboard's own API (its Bottle app
called in process: what the browser gets), and in headless Chromium against ``optuna-dashboard`` started
as a subprocess (``ui``: skipped where Chromium is missing and cannot be installed, see test_mlflow_ui.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
import warnings
import wsgiref.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from optuna.samplers._tpe.sampler import _get_infeasible_trial_score
from optuna.trial import TrialState
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from harness.metrics import FINAL_ACCURACY, FINAL_SPARSITY, GOAL_EXCESS_DROP
from harness.sweep.dashboard import (
    link_run,
    mlflow_run_url,
    name_objectives,
    read_note,
    record_stopped,
    record_trial,
    trial_run_url,
    write_note,
)
from harness.sweep.pruners import BEATS_BEST

from . import test_mlflow_ui
from .mlflow_server import free_port

STUDY = "dash"
OBJECTIVES = [FINAL_SPARSITY]
GOAL_ACCURACY = 0.96  # the lowest val accuracy that meets the goal, as the run records it


def run_url(run_id: str) -> str:
    return mlflow_run_url("sqlite:///outputs/mlflow.db", "1", run_id)


@dataclass
class Written:
    study: optuna.Study
    url: str  # the storage
    feasible: int  # trial numbers
    infeasible: int
    stopped: int


def run_trial(study: optuna.Study, sparsity: float, accuracy: float, excess: float, run_id: str) -> int:
    """One complete trial as the sweeper records it: the run sets ``goal_accuracy`` through its own trial
    object (another process in a sweep), then the sweeper records the result and tells it."""
    trial = study.ask()
    trial.suggest_float("prune.target_sparsity", 0.5, 0.99)
    optuna.trial.Trial(study, trial._trial_id).set_user_attr("goal_accuracy", GOAL_ACCURACY)
    metrics = {FINAL_SPARSITY: sparsity, FINAL_ACCURACY: accuracy, GOAL_EXCESS_DROP: excess}
    record_trial(study, trial, metrics, metrics[GOAL_EXCESS_DROP], run_url(run_id))
    study.tell(trial, sparsity)
    return trial.number


def write_study(db: Path) -> Written:
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    name_objectives(study, OBJECTIVES)
    feasible = run_trial(study, 0.90, 0.97, -0.0104, "run0")
    infeasible = run_trial(study, 0.97, 0.93, 0.0212, "run1")
    run_trial(study, 0.80, 0.98, -0.0208, "run2")
    trial = study.ask()  # stopped by the goal pruner: its run set the named constraint
    trial.suggest_float("prune.target_sparsity", 0.5, 0.99)
    optuna.trial.Trial(study, trial._trial_id).set_constraint(BEATS_BEST, 0.05)
    record_stopped(study, trial, run_url("run3"))
    study.tell(trial, state=TrialState.PRUNED)
    return Written(study, url, feasible, infeasible, trial.number)


@pytest.fixture
def written(tmp_path: Path) -> Written:
    return write_study(tmp_path / "optuna.db")


def frozen(written: Written, number: int) -> optuna.trial.FrozenTrial:
    return optuna.load_study(study_name=STUDY, storage=written.url).trials[number]


def dashboard_api(storage_url: str, path: str) -> dict:
    """GET ``path`` from optuna-dashboard's own app (the one its CLI serves), called in process."""
    app = optuna_dashboard._app.create_app(optuna.storages.RDBStorage(storage_url))
    environ: dict = {"PATH_INFO": path}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:300])
    return json.loads(body)


# ----------------------------------------------------------------------------------------------- Optuna's view


def test_the_goal_constraint_counts_once_for_the_samplers(written):
    study = optuna.load_study(study_name=STUDY, storage=written.url)
    assert study.metric_names == OBJECTIVES
    good, bad = frozen(written, written.feasible), frozen(written, written.infeasible)
    assert good.constraints == {"0": pytest.approx(-0.0104)}
    assert bad.constraints == {"0": pytest.approx(0.0212)}
    assert _get_infeasible_trial_score(bad) == pytest.approx(0.0212)  # TPE's penalty: the excess, not twice it
    assert [t.number for t in optuna.study._constrained_optimization._get_feasible_trials(study.trials)
            if t.state == TrialState.COMPLETE] == [0, 2]
    # A constrained TPE study keeps sampling from these trials (no warning about old/new constraint formats).
    study.sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study.ask().suggest_float("prune.target_sparsity", 0.5, 0.99)


def test_each_metric_is_its_own_number_with_goal_slack_feasibility_and_run_link(written):
    good, bad = frozen(written, written.feasible), frozen(written, written.infeasible)
    assert good.user_attrs[FINAL_ACCURACY] == 0.97 and good.user_attrs[FINAL_SPARSITY] == 0.90
    assert good.user_attrs[GOAL_EXCESS_DROP] == -0.0104
    assert good.user_attrs["goal_slack"] == pytest.approx(0.97 - GOAL_ACCURACY)  # accuracy points above the goal
    assert bad.user_attrs["goal_slack"] == pytest.approx(0.93 - GOAL_ACCURACY)  # below: negative
    assert good.user_attrs["feasible"] is True and bad.user_attrs["feasible"] is False
    assert good.user_attrs["mlflow_run"] == run_url("run0")


def test_the_run_link_is_the_trials_dashboard_note(written):
    study = written.study
    trial = frozen(written, written.infeasible)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs[f"dashboard:{trial._trial_id}:note_ver"] == 1
    assert attrs[f"dashboard:{trial._trial_id}:note_str:0"] == f"[MLflow run]({run_url('run1')})"
    assert optuna_dashboard.get_note(optuna.trial.Trial(study, trial._trial_id)) == f"[MLflow run]({run_url('run1')})"


def test_a_note_someone_wrote_is_kept_and_the_link_added_once(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trial = study.ask()
    long_note = "x" * 5000  # more than two of the dashboard's 2045-character pieces
    write_note(study, trial._trial_id, long_note)
    link_run(study, trial, run_url("r"))
    link_run(study, trial, run_url("r"))  # a retried call
    assert optuna_dashboard.get_note(trial) == f"{long_note}\n\n[MLflow run]({run_url('r')})"
    assert read_note(study, trial._trial_id) == optuna_dashboard.get_note(trial)
    write_note(study, trial._trial_id, "short")  # old pieces beyond the new body are emptied, as the dashboard does
    assert optuna_dashboard.get_note(trial) == "short"


def test_the_run_link_is_an_absolute_address_of_the_mlflow_ui():
    page = "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert mlflow_run_url("sqlite:///outputs/mlflow.db", "3", "abc") == f"http://127.0.0.1:5000/{page}"
    assert mlflow_run_url("https://mlflow.example.org/", "3", "abc") == f"https://mlflow.example.org/{page}"


def test_the_run_url_comes_from_what_the_run_recorded_on_its_trial(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trial = study.ask()
    assert trial_run_url(study, trial, "3") is None  # ran without MLflow
    run_side = optuna.trial.Trial(study, trial._trial_id)  # as harness.sweep.trial.TrialLink records it
    run_side.set_user_attr("mlflow_run_id", "abc")
    run_side.set_user_attr("mlflow_tracking_uri", "http://mlflow:5000")
    assert trial_run_url(study, trial, "3") == "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_a_stopped_trial_shows_the_constraint_it_violated(written):
    stopped = frozen(written, written.stopped)
    assert stopped.constraints == {BEATS_BEST: 0.05}  # the run's named constraint, not repeated in the list
    assert stopped.user_attrs[f"constraint/{BEATS_BEST}"] == 0.05
    assert stopped.user_attrs["stopped_by"] == BEATS_BEST and stopped.user_attrs["feasible"] is False
    assert stopped.user_attrs["mlflow_run"] == run_url("run3")


def test_a_retried_record_changes_nothing(tmp_path, caplog):
    """The sweeper retries a whole call after a lost storage connection: same attrs, same note, no warning."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    trial = study.ask()
    metrics = {FINAL_SPARSITY: 0.9, FINAL_ACCURACY: 0.97, GOAL_EXCESS_DROP: -0.01}
    with caplog.at_level(logging.WARNING, logger="harness.sweep.dashboard"):
        for _ in range(2):
            record_trial(study, trial, metrics, -0.01, run_url("r"))
    study.tell(trial, 0.9)
    assert caplog.text == ""
    assert study.trials[0].constraints == {"0": -0.01}
    assert study._storage.get_study_system_attrs(study._study_id)[f"dashboard:{trial._trial_id}:note_ver"] == 1


def test_a_named_goal_constraint_is_not_written_twice(tmp_path, caplog):
    """A sweeper that still sets the named constraint: the goal stays counted once, and it is said."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    trial = study.ask()
    trial.set_constraint("accuracy_goal", 0.02)
    with caplog.at_level(logging.WARNING, logger="harness.sweep.dashboard"):
        record_trial(study, trial, {FINAL_SPARSITY: 0.9}, 0.02, None)
    study.tell(trial, 0.9)
    assert study.trials[0].constraints == {"accuracy_goal": 0.02}
    assert "accuracy_goal" in caplog.text


def test_a_resumed_study_keeps_its_objective_names(written, caplog):
    study = optuna.load_study(study_name=STUDY, storage=written.url)
    name_objectives(study, OBJECTIVES)  # resumed with the same objective: nothing to do
    with caplog.at_level(logging.WARNING, logger="harness.sweep.dashboard"):
        name_objectives(study, ["final/accuracy"])
    assert optuna.load_study(study_name=STUDY, storage=written.url).metric_names == OBJECTIVES
    assert "final/accuracy" in caplog.text and FINAL_SPARSITY in caplog.text


# ----------------------------------------------------------------------------------------------- the dashboard's view


def test_the_dashboard_api_names_the_objective_and_reports_the_constraints(written):
    listing = dashboard_api(written.url, "/api/studies")["study_summaries"]
    study_id = next(s["study_id"] for s in listing if s["study_name"] == STUDY)
    detail = dashboard_api(written.url, f"/api/studies/{study_id}")
    assert detail["objective_names"] == OBJECTIVES
    trials = {t["number"]: t for t in detail["trials"]}
    assert trials[written.feasible]["constraints"] == [pytest.approx(-0.0104)]
    assert trials[written.infeasible]["constraints"] == [pytest.approx(0.0212)]
    assert trials[written.infeasible]["note"]["body"] == f"[MLflow run]({run_url('run1')})"
    attrs = {a["key"]: a["sortable"] for a in detail["union_user_attrs"]}
    assert attrs[FINAL_ACCURACY] and attrs[FINAL_SPARSITY] and attrs["goal_slack"]  # numbers: sortable columns


# ----------------------------------------------------------------------------------------------- in the browser

DASHBOARD_START_S = 60
browser = test_mlflow_ui.browser  # the fixture: Debian's headless Chromium, the test skipped when it is missing
wait = test_mlflow_ui.wait_for  # until truthy (a list: its first element), else fails naming what it waited for


@dataclass(frozen=True)
class Dashboard:
    url: str
    written: Written
    driver: WebDriver


@pytest.fixture
def dashboard(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dashboard]:
    """``optuna-dashboard`` on a free loopback port, serving the written study; stopped at the end.
    Asks for the browser first so that a machine without Chromium skips before anything starts."""
    driver = request.getfixturevalue("browser")
    written = write_study(tmp_path / "optuna.db")
    port = free_port()
    log = tmp_path / "optuna-dashboard.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "optuna_dashboard._cli", written.url,  # = optuna-dashboard
                                   "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DASHBOARD_START_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/meta", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield Dashboard(url, written, driver)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def plot_traces(driver, element_id: str) -> list[dict]:
    """The traces Plotly drew in the graph ``element_id``: name and y values."""
    return driver.execute_script(
        "const el = document.getElementById(arguments[0]);"
        "return el && el.data ? el.data.map(t => ({name: t.name || '', y: Array.from(t.y || [])})) : [];",
        element_id)


@pytest.mark.slow
@pytest.mark.ui
def test_the_dashboard_shows_the_metric_name_feasibility_and_the_run_link(dashboard, tmp_path):
    browser = dashboard.driver
    browser.get(f"{dashboard.url}/dashboard/studies/1")
    try:
        # The history plot: the objective's name on its y axis; the infeasible trial drawn apart, grey,
        # and left out of the best-value line.
        wait(browser, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#plot-history .g-ytitle text")
                                 if e.text == FINAL_SPARSITY], "the history plot's y axis named final/sparsity")
        traces = wait(browser, lambda d: tuple(plot_traces(d, "plot-history")), "the history plot's traces")
        by_name = {t["name"]: t["y"] for t in traces}
        assert by_name[f"Infeasible Trial of {STUDY}"] == [pytest.approx(0.97)], by_name
        assert by_name[f"{FINAL_SPARSITY} of {STUDY}"] == [pytest.approx(0.90), pytest.approx(0.80)], by_name
        assert max(by_name[f"Best Value of {STUDY}"]) == pytest.approx(0.90), by_name
        # The timeline's legend tells complete (feasible), infeasible and pruned trials apart.
        legend = wait(browser, lambda d: tuple(e.text for e in d.find_elements(
            By.CSS_SELECTOR, "#graph-timeline .legendtext")), "the timeline's legend")
        assert {"Complete", "Infeasible", "Pruned"} <= set(legend), legend

        # The trial's page: its note links to its MLflow run; the goal slack and metrics are listed.
        browser.get(f"{dashboard.url}/dashboard/studies/1/trials?numbers={dashboard.written.infeasible}")
        link = wait(browser, lambda d: [a for a in d.find_elements(By.LINK_TEXT, "MLflow run") if a.is_displayed()],
                    "the trial note's MLflow link")
        assert link.get_attribute("href") == run_url("run1")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "goal_slack -0.03" in text and "feasible False" in text and f"{FINAL_ACCURACY} 0.93" in text
    except BaseException:
        browser.save_screenshot(str(tmp_path / "optuna-dashboard.png"))
        (tmp_path / "optuna-dashboard.html").write_text(browser.page_source)
        raise

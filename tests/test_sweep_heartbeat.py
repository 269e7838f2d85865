"""Heartbeats (harness/sweep/heartbeat.py), on a real SQLite study and MLflow store: a trial whose worker
stopped beating is failed as lost after the grace period, its MLflow run ended FAILED, and replaced;
a trial whose worker beats is never taken, however long it runs. The end-to-end case, a machine
SIGKILLed in a sweep on PostgreSQL and a tracking server, is tests/test_sweep_cluster.py."""

from __future__ import annotations

import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.errors import ConfigError
from harness.sweep.heartbeat import HeartbeatSettings, ask, fail_lost_trials, heartbeat_storage, record
from harness.sweep.loop import Outcome, SweepSettings, run_worker
from harness.sweep.space import parse_search_space
from harness.sweep.study import failed_trials, lost_reason
from hydra_plugins.harness_sweeper.harness_sweeper import HarnessSweeperConf, HeartbeatConf, PrunerConf

from .test_sweep import run_sweep

GRACE_S = 3


def test_a_silent_trial_is_lost_and_replaced_and_a_beating_one_is_kept(tmp_path):
    heartbeat = HeartbeatSettings(interval_s=1, grace_s=GRACE_S)
    conf = HarnessSweeperConf(n_trials=2, objectives=["final/sparsity"], directions=["maximize"],
                              goal_constraint=False, pruner=PrunerConf(name="none"),
                              heartbeat=HeartbeatConf(interval_s=1, grace_s=GRACE_S))
    settings = SweepSettings(study_name="h", storage=f"sqlite:///{tmp_path / 'optuna.db'}", conf=conf)
    study = optuna.create_study(study_name="h", storage=heartbeat_storage(settings.storage, heartbeat),
                                direction="maximize")
    # A trial asked by a worker on another machine, which died after one heartbeat; its MLflow run is RUNNING.
    silent = ask(study)
    record(study, silent)
    silent.set_user_attr("worker", {"host": "another-machine", "pid": 12345})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("pruning"))
    silent.set_user_attr("mlflow_run_id", run.info.run_id)
    silent.set_user_attr("mlflow_tracking_uri", uri)

    kept = []

    def long_trial(trial, overrides):  # runs longer than the grace period, beating meanwhile
        time.sleep(GRACE_S + 2)
        fail_lost_trials(study)
        kept.append(study.trials[trial.number].state)
        return Outcome(metrics={"final/sparsity": 0.5})

    began = time.monotonic()
    report = run_worker(settings, parse_search_space({"x": "interval(0, 1)"}), long_trial)
    trials = optuna.load_study(study_name="h", storage=settings.storage).trials

    assert kept and all(state == TrialState.RUNNING for state in kept)  # its own trial beat, so stayed
    assert trials[silent.number].state == TrialState.FAIL
    assert "heartbeat stopped (worker another-machine pid 12345" in lost_reason(study, trials[silent.number])
    assert failed_trials(study) == []  # lost, not a failure
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2 and len(report.ran) == 2  # replaced
    assert time.monotonic() - began >= GRACE_S
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and "heartbeat stopped" in ended.data.tags["error"]


def test_heartbeat_settings_are_checked():
    with pytest.raises(ConfigError, match=r"hydra.sweeper.heartbeat.interval_s=0: must be a whole number"):
        HeartbeatSettings(interval_s=0, grace_s=10)
    with pytest.raises(ConfigError, match=r"grace_s=30: must be a whole number of seconds >= twice "
                                          r"hydra.sweeper.heartbeat.interval_s=30"):
        HeartbeatSettings(interval_s=30, grace_s=30)


def test_a_bad_grace_period_is_a_one_line_error(tmp_path):
    result = run_sweep(["hydra/sweeper=harness_optuna", "hydra.sweeper.heartbeat.grace_s=5",
                        "prune.target_sparsity=interval(0.5, 0.9)"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: hydra.sweeper.heartbeat.grace_s=5: must be a whole number of seconds >= twice "
        "hydra.sweeper.heartbeat.interval_s=30 (one late heartbeat must not lose a trial)"]

"""Heartbeats: a trial lost with its machine is noticed, and replaced, from any machine of the sweep.

The worker that asked a trial records a heartbeat for it in the study (Optuna's RDB heartbeat,
``RDBStorage.record_heartbeat``) every ``hydra.sweeper.heartbeat.interval_s`` while the trial
runs. Before it asks for a trial, every worker fails the RUNNING trials whose last heartbeat is
older than ``grace_s`` (Optuna's ``fail_stale_trials``; the age is read on the database's clock,
so the machines' clocks do not matter): the machine of their worker died, lost its network or
was stopped. Such a trial is *lost*: its MLflow run is ended FAILED, it is replaced, and it does
not count against ``max_failure_rate``. On the same host a dead worker is seen at once by its pid
(``harness.sweep.study.fail_dead_trials``, when a sweep command starts); the heartbeat is for
every other case.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import optuna

from harness.errors import ConfigError
from harness.sweep.study import LOST_PREFIX, make_storage, reconnecting
from harness.tracking import fail_run

log = logging.getLogger(__name__)
KEY = "hydra.sweeper.heartbeat"
# Lost trials' MLflow runs (tracking URI, run id, reason): found under the study lock, ended after it, so
# that a slow or unreachable tracking server never holds the other workers.
_lost_runs: list[tuple[str, str, str]] = []


@dataclass(frozen=True)
class HeartbeatSettings:
    """``hydra.sweeper.heartbeat`` (its defaults are in the sweeper's schema, HeartbeatConf)."""

    interval_s: int
    grace_s: int

    def __post_init__(self) -> None:
        if isinstance(self.interval_s, bool) or not isinstance(self.interval_s, int) or self.interval_s < 1:
            raise ConfigError(f"{KEY}.interval_s={self.interval_s}: must be a whole number of seconds >= 1")
        if isinstance(self.grace_s, bool) or not isinstance(self.grace_s, int) or self.grace_s < 2 * self.interval_s:
            raise ConfigError(f"{KEY}.grace_s={self.grace_s}: must be a whole number of seconds >= twice "
                              f"{KEY}.interval_s={self.interval_s} (one late heartbeat must not lose a trial)")


def heartbeat_storage(url: str, settings: HeartbeatSettings) -> optuna.storages.RDBStorage:
    """The sweep loop's storage: Optuna's heartbeat settings, and what a lost trial's callback does."""
    return make_storage(url, settings.interval_s, settings.grace_s, _on_lost)


def fail_lost_trials(study: optuna.Study) -> None:
    """Fail the trials whose heartbeat stopped (``_on_lost`` runs for each); a no-op without heartbeat."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def ask(study: optuna.Study) -> optuna.trial.Trial:
    """``study.ask()``, without Optuna's warning that heartbeats are meant for ``Study.optimize``: this
    loop records them itself (:func:`beating`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


def _interval(study: optuna.Study) -> int | None:
    """The heartbeat interval of the study's storage (Optuna wraps the RDB storage in a cache that
    delegates the heartbeat); None without heartbeat."""
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)()


def record(study: optuna.Study, trial: optuna.trial.Trial) -> None:
    """The trial's first heartbeat, when it is asked: a worker that dies at once is noticed too."""
    if _interval(study):
        study._storage.record_heartbeat(trial._trial_id)


@contextlib.contextmanager
def beating(study: optuna.Study, trial: optuna.trial.Trial) -> Iterator[None]:
    """A heartbeat for ``trial`` every interval while the block runs.

    Optuna's own heartbeat thread (used by ``Study.optimize``) ends at the first failed write; this
    one keeps beating through a database restart, which the sweep rides out (``study.reconnecting``)."""
    storage, interval = study._storage, _interval(study)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial._trial_id)
            except Exception as err:  # the next beat tries again; a long outage is what grace_s is for
                log.warning("trial %d: heartbeat not recorded (%s)", trial.number, str(err).splitlines()[0][:200])

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def _on_lost(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's callback for a trial it failed because its heartbeat stopped: say why, and have its MLflow
    run ended FAILED (its own machine cannot; see :func:`end_lost_runs`)."""
    worker = trial.user_attrs.get("worker") or {}
    reason = (f"its heartbeat stopped (worker {worker.get('host', '?')} pid {worker.get('pid', '?')}; "
              f"found by {socket.gethostname()})")
    key = f"{LOST_PREFIX}{trial.number}"  # keeps it out of the failures counted against max_failure_rate
    reconnecting(lambda: study.set_user_attr(key, reason), f"recording why trial {trial.number} was lost")
    log.warning("trial %d lost: %s; it will be replaced", trial.number, reason)
    run_id, uri = trial.user_attrs.get("mlflow_run_id"), trial.user_attrs.get("mlflow_tracking_uri")
    if run_id and uri:
        _lost_runs.append((uri, run_id, f"trial {trial.number} lost: {reason}"))


def end_lost_runs() -> None:
    """End FAILED the MLflow runs of the trials found lost (outside the study lock)."""
    while _lost_runs:
        fail_run(*_lost_runs.pop())

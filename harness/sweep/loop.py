"""The ask/tell loop of a sweep: one trial at a time per worker, against a shared study.

Each worker (the process the user started, the helper processes it starts for
``n_jobs > 1``, or the same command started again elsewhere) loops: under the study lock,
count the trials and ask for one if fewer than ``n_trials`` are finished or running;
run it (keeping its heartbeat, ``harness.sweep.heartbeat``); tell the result. A slot freed by a
finished or pruned trial is refilled at once, and exactly ``n_trials`` trials finish in total,
also across restarts: a trial whose process died is marked FAIL at the next start on its host, or
by any worker once its heartbeat has stopped for the grace period, and replaced.

A PostgreSQL server that restarts mid-sweep is ridden out (``harness.sweep.study.reconnecting``):
each storage call is retried while the connection is lost, a tell is applied once, and the locked
"count, then ask" is done again under a new lock; a trial it asked for but could not record as
this worker's is taken over there, so none is lost and none runs twice.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from harness.errors import Interrupted, RunStopped
from harness.metrics import FINAL_ACCURACY, GOAL_EXCESS_DROP
from harness.sweep.heartbeat import (
    HeartbeatSettings,
    ask,
    beating,
    end_lost_runs,
    fail_lost_trials,
    heartbeat_storage,
    record,
)
from harness.sweep.space import SearchSpace
from harness.sweep.study import (
    FINISHED,
    count,
    fail_dead_trials,
    failed_trials,
    make_pruner,
    make_sampler,
    make_storage,
    mark_worker,
    orphaned_trials,
    reconnecting,
    study_lock,
    tell_once,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSettings:
    study_name: str
    storage: str
    n_trials: int
    objectives: list[str]  # metric names returned by each run, e.g. ["final/sparsity"]
    directions: list[str]  # "maximize" / "minimize", one per objective
    goal_constraint: bool  # trials that miss the accuracy goal are infeasible
    sampler: str = "tpe"
    seed: int | None = 0
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "goal"})  # hydra.sweeper.pruner
    max_failure_rate: float = 0.5  # the sweep stops once this share of n_trials has failed (not pruned)
    heartbeat: HeartbeatSettings | None = None  # hydra.sweeper.heartbeat; None: trials keep none

    @property
    def failure_limit(self) -> int:
        """Failed trials (of the whole study, whatever the workers and restarts) that stop the sweep."""
        return max(1, math.floor(self.max_failure_rate * self.n_trials + 1e-9))


@dataclass(frozen=True)
class Outcome:
    """What one run gave back: its summary metrics, or how it ended early."""

    metrics: dict[str, float] | None = None
    pruned: bool = False
    error: str | None = None
    stop: BaseException | None = None  # an interruption (SIGINT, SIGTERM) to pass on after telling FAIL
    output_dir: str | None = None  # the job's folder (its log)


@dataclass
class WorkerReport:
    ran: list[int] = field(default_factory=list)  # trial numbers this worker ran
    failed: list[int] = field(default_factory=list)
    stale: list[optuna.trial.FrozenTrial] = field(default_factory=list)  # dead trials marked FAIL
    stopped_on_failures: bool = False


def open_study(settings: SweepSettings) -> optuna.Study:
    """Create the study, or load it to resume or to join other workers (one at a time: creating
    the storage's tables concurrently races)."""

    def create() -> optuna.Study:
        storage = (make_storage(settings.storage) if settings.heartbeat is None
                   else heartbeat_storage(settings.storage, settings.heartbeat))
        with study_lock(settings.storage, settings.study_name):
            return optuna.create_study(
                study_name=settings.study_name,
                storage=storage,
                directions=settings.directions,
                sampler=make_sampler(settings.sampler, settings.seed),
                pruner=make_pruner(settings.pruner),
                load_if_exists=True,
            )

    return reconnecting(create, f"opening study {settings.study_name}")


def run_worker(
    settings: SweepSettings,
    space: SearchSpace,
    run_trial: Callable[[optuna.trial.Trial, list[str]], Outcome],
) -> WorkerReport:
    """Ask, run and tell until the study has ``n_trials`` finished (or running) trials."""
    study = open_study(settings)
    report = WorkerReport(stale=reconnecting(lambda: fail_dead_trials(study), "failing dead trials"))
    while True:
        trial, running, report.stopped_on_failures = reconnecting(lambda: _next_trial(study, settings),
                                                                  "asking for a trial")
        end_lost_runs()  # of the trials that _next_trial found lost
        if report.stopped_on_failures:
            break
        if trial is None:
            if running == 0:  # (then n_trials are finished: with none running there was room to ask)
                break
            time.sleep(1.0)  # others are running the last trials; one may fail and need replacing
            continue
        values = reconnecting(functools.partial(space.suggest, trial), f"suggesting trial {trial.number}'s values")
        try:
            with beating(study, trial):
                outcome = run_trial(trial, space.to_overrides(values))
        except BaseException as err:  # Ctrl-C or SIGTERM outside the training loop: never leave it RUNNING
            trial.set_user_attr("lost", f"interrupted ({type(err).__name__})")
            study.tell(trial, state=TrialState.FAIL)
            raise err
        report.ran.append(trial.number)
        if _lost_meanwhile(study, trial):  # this worker stalled past the grace period: another replaced it
            log.warning("trial %d was failed as lost while it ran here (no heartbeat for longer than "
                        "hydra.sweeper.heartbeat.grace_s); its result is dropped", trial.number)
            if outcome.stop is not None:
                raise outcome.stop
            continue
        if outcome.stop is not None:  # replaced when the sweep resumes, not counted as a failure
            _set_attr(trial, "lost", f"interrupted ({outcome.error})")
        _tell(study, trial, outcome, settings)
        if outcome.error is not None:
            report.failed.append(trial.number)
        if outcome.stop is not None:
            raise outcome.stop  # the run was interrupted: the sweep stops too (its command resumes it)
    return report


def _next_trial(study: optuna.Study, settings: SweepSettings) -> tuple[optuna.trial.Trial | None, int, bool]:
    """Under the study lock: the trial this worker runs next (None when none is to start now), how
    many trials run, and whether the sweep stops on failures. Done again as a whole when the storage
    connection is lost (see :func:`harness.sweep.study.study_lock`)."""
    with study_lock(settings.storage, settings.study_name):
        fail_lost_trials(study)  # lost with another machine: their heartbeat stopped (see harness.sweep.heartbeat)
        # Failures count over the whole study (all workers, all restarts); trials lost with their
        # process were replaced and do not count.
        failed, running = len(failed_trials(study)), count(study, (TrialState.RUNNING,))
        if failed >= settings.failure_limit:
            return None, running, True
        busy = count(study, (*FINISHED, TrialState.RUNNING))
        for orphan in orphaned_trials(study, settings.storage):  # asked as the connection was lost, never run
            if busy > settings.n_trials:  # asked by two workers whose locks went with the connection
                study._storage.set_trial_user_attr(orphan._trial_id, "lost",
                                                   "asked while the storage connection was lost; not needed")
                study.tell(orphan.number, state=TrialState.FAIL)
                busy -= 1
                continue
            trial = optuna.trial.Trial(study, orphan._trial_id)
            record(study, trial)
            mark_worker(trial)
            log.info("trial %d: taken over (asked while the storage connection was lost)", trial.number)
            return trial, running, False
        # Once trials fail, the running ones may fail too: start no more than could fail within the limit.
        room = failed == 0 or failed + running < settings.failure_limit
        trial = ask(study) if busy < settings.n_trials and room else None
        if trial is not None:  # a trial asked but not yet marked is an orphan (above), then it has a heartbeat
            record(study, trial)
            mark_worker(trial)
        return trial, running, False


def _lost_meanwhile(study: optuna.Study, trial: optuna.trial.Trial) -> bool:
    state = reconnecting(lambda: study._storage.get_trial(trial._trial_id).state, f"reading trial {trial.number}")
    return state != TrialState.RUNNING


def _set_attr(trial: optuna.trial.Trial, key: str, value: Any) -> None:
    reconnecting(lambda: trial.set_user_attr(key, value), f"recording trial {trial.number}'s {key}")


def _tell(study: optuna.Study, trial: optuna.trial.Trial, outcome: Outcome, settings: SweepSettings) -> None:
    if outcome.pruned:
        tell_once(study, trial, state=TrialState.PRUNED)
        log.info("trial %d pruned", trial.number)
        return
    if outcome.output_dir:
        _set_attr(trial, "output_dir", outcome.output_dir)
    if outcome.error is not None or outcome.metrics is None:
        _set_attr(trial, "error", (outcome.error or "no result")[:2000])
        tell_once(study, trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, outcome.error)
        return
    metrics = outcome.metrics
    _set_attr(trial, "metrics", {k: float(v) for k, v in metrics.items()})
    if settings.goal_constraint and GOAL_EXCESS_DROP in metrics:
        reconnecting(lambda: trial.set_constraint("accuracy_goal", metrics[GOAL_EXCESS_DROP]),
                     f"recording trial {trial.number}'s constraint")
    missing = [name for name in settings.objectives if name not in metrics]
    if missing:
        _set_attr(trial, "error", f"the run returned no {missing[0]!r}")
        tell_once(study, trial, state=TrialState.FAIL)
        return
    values = [float(metrics[name]) for name in settings.objectives]
    tell_once(study, trial, values if len(values) > 1 else values[0])
    log.info("trial %d: %s", trial.number,
             ", ".join(f"{k}={metrics[k]:.4f}" for k in (*settings.objectives, FINAL_ACCURACY) if k in metrics))


def describe_outcome(value: Any, output_dir: str | None = None) -> Outcome:
    """Turn what a Hydra job returned (or raised) into an :class:`Outcome`."""
    if isinstance(value, optuna.TrialPruned):
        return Outcome(pruned=True, output_dir=output_dir)
    if isinstance(value, Interrupted | KeyboardInterrupt):
        return Outcome(error=f"{type(value).__name__}: {value}", stop=value, output_dir=output_dir)
    if isinstance(value, RunStopped):  # an interruption that came back from another process (harness.sweep.jobs)
        return Outcome(error=f"{type(value).__name__}: {value}", stop=KeyboardInterrupt(str(value)),
                       output_dir=output_dir)
    if isinstance(value, BaseException):
        return Outcome(error=f"{type(value).__name__}: {value}", output_dir=output_dir)
    if isinstance(value, dict):
        return Outcome(metrics={k: float(v) for k, v in value.items()}, output_dir=output_dir)
    return Outcome(error=f"the run returned {type(value).__name__}, not its metrics", output_dir=output_dir)

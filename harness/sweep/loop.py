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

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from harness.errors import Interrupted, RunStopped
from harness.metrics import FINAL_ACCURACY, GOAL_EXCESS_DROP
from harness.sweep import dashboard
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
    EXPERIMENT_ATTR,
    FINISHED,
    count,
    fail_dead_trials,
    failed_trials,
    make_pruner,
    make_sampler,
    mark_worker,
    orphaned_trials,
    reconnecting,
    study_lock,
    tell_once,
)

if TYPE_CHECKING:  # the sweeper's schema (its plugin module imports this package late, when a sweep runs)
    from hydra_plugins.harness_sweeper.harness_sweeper import HarnessSweeperConf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSettings:
    """A sweep's study: its name and storage (resolved by the sweeper: defaults, identity) and the
    ``hydra.sweeper`` settings themselves, the schema's one type (objectives and directions resolved)."""

    study_name: str
    storage: str
    conf: HarnessSweeperConf
    space: SearchSpace | None = None  # the search space, for a GridSampler's grid

    @property
    def failure_limit(self) -> int:
        """Failed trials (of the whole study, whatever the workers and restarts) that stop the sweep."""
        return max(1, math.floor(self.conf.max_failure_rate * self.conf.n_trials + 1e-9))

    @property
    def pruner(self) -> dict[str, Any]:
        """``hydra.sweeper.pruner`` with the study's first objective, as stored on the study for the trials."""
        return {"objective": self.conf.objectives[0], **dataclasses.asdict(self.conf.pruner)}

    @property
    def heartbeat(self) -> HeartbeatSettings:
        return HeartbeatSettings(**dataclasses.asdict(self.conf.heartbeat))


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
        storage = heartbeat_storage(settings.storage, settings.heartbeat)
        with study_lock(settings.storage, settings.study_name):
            study = optuna.create_study(
                study_name=settings.study_name,
                storage=storage,
                directions=settings.conf.directions,
                sampler=make_sampler(settings.conf.sampler, settings.space),
                pruner=make_pruner(settings.pruner),
                load_if_exists=True,
            )
            dashboard.name_objectives(study, list(settings.conf.objectives))
            return study

    return reconnecting(create, f"opening study {settings.study_name}")


def run_worker(
    settings: SweepSettings,
    space: SearchSpace,
    run_trial: Callable[[optuna.trial.Trial, list[str]], Outcome],
    extend: Callable[[optuna.trial.Trial], None] | None = None,
) -> WorkerReport:
    """Ask, run and tell until the study has ``n_trials`` finished (or running) trials.

    ``extend(trial)`` (``hydra.sweeper.custom_search_space``) suggests more values after the search
    space's; they join the trial's overrides."""
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
        if extend is not None:
            extend(trial)
            values |= {k: v for k, v in trial.params.items() if k not in values}
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
            if busy > settings.conf.n_trials:  # asked by two workers whose locks went with the connection
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
        trial = ask(study) if busy < settings.conf.n_trials and room else None
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
        reconnecting(lambda: dashboard.record_stopped(study, trial, _run_url(study, trial)),
                     f"recording trial {trial.number}'s stop")
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
    # The goal constraint, once, where Optuna's samplers and optuna-dashboard both read it (harness.sweep.dashboard).
    excess = metrics.get(GOAL_EXCESS_DROP) if settings.conf.goal_constraint else None
    reconnecting(lambda: dashboard.record_trial(study, trial, metrics, excess, _run_url(study, trial)),
                 f"recording trial {trial.number}'s result")
    missing = [name for name in settings.conf.objectives if name not in metrics]
    if missing:
        _set_attr(trial, "error", f"the run returned no {missing[0]!r}")
        tell_once(study, trial, state=TrialState.FAIL)
        return
    values = [float(metrics[name]) for name in settings.conf.objectives]
    tell_once(study, trial, values if len(values) > 1 else values[0])
    shown = dict.fromkeys((*settings.conf.objectives, FINAL_ACCURACY))
    log.info("trial %d: %s", trial.number, ", ".join(f"{k}={metrics[k]:.4f}" for k in shown if k in metrics))


def _run_url(study: optuna.Study, trial: optuna.trial.Trial) -> str | None:
    return dashboard.trial_run_url(study, trial, study.user_attrs.get(EXPERIMENT_ATTR))


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

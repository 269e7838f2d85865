"""The Optuna study of a sweep: storage, sampler and pruner from config, a study-wide lock,
and clean-up of trials whose process died (SIGKILL, a lost machine).

Studies live in an RDB storage so that a sweep resumes where it stopped and several
workers share it: SQLite (``outputs/optuna.db``) on one machine, PostgreSQL across machines.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness.errors import ConfigError
from harness.locking import file_lock, process_alive
from harness.metrics import FINAL_SPARSITY
from harness.sweep.pruners import GoalPruner

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("tpe", "random", "nsga2", "qmc")
PRUNERS = ("goal", "median", "percentile", "successive_halving", "hyperband", "none")
PRUNER_ATTR = "harness.pruner"  # the pruner's settings, stored on the study for the trials' runs


def default_storage(outputs_dir: str | Path) -> str:
    Path(outputs_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(Path(outputs_dir) / 'optuna.db').resolve()}"


@functools.lru_cache(maxsize=8)
def make_storage(url: str) -> optuna.storages.RDBStorage:
    """One storage per URL in a process, shared by the sweep loop and its trials' runs: opening one
    (an engine, Optuna's schema check) takes ~80 ms, a third of a sweep's cost per trial."""
    # SQLite: wait on a lock instead of failing at once when another worker writes.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """Optuna 5's samplers read the constraints that trials set with ``trial.set_constraint``."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    raise ConfigError(f"hydra.sweeper.sampler.name={name}: must be one of {', '.join(SAMPLERS)}")


def make_pruner(settings: dict) -> optuna.pruners.BasePruner:
    """The pruner of ``hydra.sweeper.pruner`` (name, n_startup_trials, n_warmup_steps, recovery_margin)."""
    name = settings.get("name", "goal")
    n_startup_trials, n_warmup_steps = int(settings.get("n_startup_trials", 5)), int(settings.get("n_warmup_steps", 2))
    if name == "goal":
        return GoalPruner(objective=settings.get("objective", FINAL_SPARSITY),
                          recovery_margin=float(settings.get("recovery_margin", 0.02)),
                          min_finished=n_startup_trials)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=n_startup_trials,
                                               n_warmup_steps=n_warmup_steps)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hydra.sweeper.pruner.name={name}: must be one of {', '.join(PRUNERS)}")


@contextlib.contextmanager
def study_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """Serialize "count the trials, then ask for one" across the workers of a study.

    SQLite: a file lock beside the database. PostgreSQL: an advisory lock. Other
    storages: no lock (the trial count may overshoot by the number of workers).
    """
    if storage_url.startswith("sqlite:///"):
        with file_lock(Path(storage_url.removeprefix("sqlite:///") + f".{_digest(study_name)}.lock")):
            yield
        return
    if storage_url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)
        key = int(_digest(study_name), 16) % (2**62)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    yield


def mark_worker(trial: optuna.trial.Trial) -> None:
    """Record which process runs the trial, so that a later start can tell if it died."""
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})


def fail_dead_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Mark FAIL the RUNNING trials whose process on this host is gone; return them.

    They are marked ``lost``: replaced, and not counted against ``max_failure_rate``."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == socket.gethostname() and not process_alive(int(worker.get("pid", -1))):
            with contextlib.suppress(Exception):  # another worker may have just done it
                study._storage.set_trial_user_attr(trial._trial_id, "lost", f"its process {worker.get('pid')} died")
                study.tell(trial.number, state=TrialState.FAIL)
                failed.append(trial)
    return failed


def failed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that failed by themselves (an error), not lost with their process."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "lost" not in t.user_attrs]


def count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:15]


"""The Optuna study of a sweep: storage, sampler and pruner from config, a study-wide lock,
and clean-up of trials whose process died on this host (SIGKILL); ``harness.sweep.heartbeat``
notices those lost with another machine.

Studies live in an RDB storage so that a sweep resumes where it stopped and several
workers share it: SQLite (``outputs/optuna.db``) on one machine, PostgreSQL across machines.
A PostgreSQL server that restarts (or a connection cut) during a sweep is ridden out: the
storage calls of the sweep loop and of the trials' runs go through :func:`reconnecting`, which
retries them for up to ``RECONNECT_S`` while the connection is lost, and only then.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import inspect
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import hydra.utils
import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from harness.errors import ConfigError, unknown_name_message
from harness.locking import file_lock, process_alive
from harness.stores import OPTUNA_TABLES, check_sqlite_store
from harness.sweep.pruners import GoalPruner
from harness.sweep.space import SearchSpace, describe_distribution

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("tpe", "random", "nsga2", "nsgaii", "qmc")
SAMPLER_KEY = "hydra.sweeper.sampler"
MOTPE_REMOVED = (f"{SAMPLER_KEY}: the 'motpe' sampler was removed in Optuna 4.0; use hydra/sweeper/sampler=tpe "
                 "(TPESampler handles several objectives)")
PRUNERS = ("goal", "median", "percentile", "successive_halving", "hyperband", "none")
STORAGE_KEY = "hydra.sweeper.storage"
PRUNER_ATTR = "harness.pruner"  # the pruner's settings, stored on the study for the trials' runs
EXPERIMENT_ATTR = "mlflow_experiment_id"  # the MLflow experiment of the sweep's runs (trials' links)
# Study user attribute "harness.lost:<number>": why that trial was failed as lost after it had finished
# (Optuna's heartbeat fails it first, and a finished trial's own attributes cannot change).
LOST_PREFIX = "harness.lost:"
RECONNECT_S = 60.0  # how long a storage call is retried while the database cannot be reached
# SQLSTATEs of a lost or refused connection: class 08, and the server shutting down, crashing or starting up.
_DISCONNECT_CODES = ("08", "57P01", "57P02", "57P03")

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_storage(outputs_dir: str | Path) -> str:
    Path(outputs_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(Path(outputs_dir) / 'optuna.db').resolve()}"


@functools.lru_cache(maxsize=8)
def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
                 ) -> optuna.storages.RDBStorage:
    """One storage per URL in a process, shared by the sweep loop and its trials' runs: opening one
    (an engine, Optuna's schema check) takes ~80 ms, a third of a sweep's cost per trial. The sweep
    loop's own has Optuna's heartbeat settings (``harness.sweep.heartbeat``)."""
    check_sqlite_store(url, STORAGE_KEY, "Optuna", OPTUNA_TABLES)
    # SQLite: wait on a lock instead of failing at once when another worker writes.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with opening_storage(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's arguments
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period, heartbeat_stale_trial_callback=on_stale)


@contextlib.contextmanager
def opening_storage(url: str) -> Iterator[None]:
    """A storage that cannot be opened (its driver missing, its server unreachable) as one line."""
    try:
        yield
    except ImportError as err:  # the database's driver
        driver = " or name a driver you have in the URL (postgresql+psycopg2://...)" if err.name == "psycopg" else ""
        raise ConfigError(f"{STORAGE_KEY}={_safe(url)}: needs the Python package {err.name} "
                          f"(pip install {err.name}){driver}") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise ConfigError(f"{STORAGE_KEY}={_safe(url)}: cannot open the Optuna storage ({reason})") from None


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True) if "://" in url else url


def make_sampler(spec: Mapping[str, Any], space: SearchSpace | None = None) -> optuna.samplers.BaseSampler:
    """``hydra.sweeper.sampler``: ``{name, seed}``, or ``{_target_: optuna.samplers.<Sampler>, **kwargs}``.
    Optuna 5's TPE, GP and NSGA-II samplers read the constraints that trials set with ``trial.set_constraint``."""
    if "_target_" in spec:
        return _sampler_by_target(dict(spec), space)
    unknown = sorted(set(spec) - {"name", "seed"})
    if unknown:
        raise ConfigError(unknown_name_message(f"{SAMPLER_KEY}.{unknown[0]}", ["name", "seed", "_target_"]))
    name, seed = spec.get("name", "tpe"), spec.get("seed")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name in ("nsga2", "nsgaii"):
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if name == "motpe":
        raise ConfigError(MOTPE_REMOVED)
    raise ConfigError(f"{SAMPLER_KEY}.name={name}: must be one of {', '.join(SAMPLERS)} "
                      f"(or give {SAMPLER_KEY}._target_=optuna.samplers.<Sampler>)")


def _sampler_by_target(spec: dict[str, Any], space: SearchSpace | None) -> optuna.samplers.BaseSampler:
    target = str(spec.pop("_target_"))
    if "name" in spec:
        raise ConfigError(f"{SAMPLER_KEY}.name={spec['name']} and {SAMPLER_KEY}._target_={target}: give one of them")
    if target in ("optuna.samplers.MOTPESampler", "MOTPESampler"):
        raise ConfigError(MOTPE_REMOVED)
    samplers = sorted(n for n in optuna.samplers.__all__ if n.endswith("Sampler") and not n.startswith("Base"))
    short = target.removeprefix("optuna.samplers.")
    if not target.startswith("optuna.samplers.") or short not in samplers:
        close = difflib.get_close_matches(short, samplers, n=3)
        hint = f"closest: {', '.join(close)}; " if close else ""
        raise ConfigError(f"{SAMPLER_KEY}._target_={target}: not an Optuna sampler; {hint}allowed: "
                          + ", ".join(f"optuna.samplers.{n}" for n in samplers))
    cls = getattr(optuna.samplers, short)
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(spec) - set(accepted))
    if unknown:
        raise ConfigError(unknown_name_message(f"{SAMPLER_KEY}.{unknown[0]}", accepted, f"{short} takes"))
    if cls is optuna.samplers.GridSampler and "search_space" not in spec:
        spec["search_space"] = grid_of(space)
    kwargs = {k: hydra.utils.instantiate(v) if isinstance(v, Mapping) and "_target_" in v else v
              for k, v in spec.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{SAMPLER_KEY}: {short}({', '.join(f'{k}={v!r}' for k, v in spec.items())}): "
                          f"{str(err).strip().splitlines()[0]}") from None


def grid_of(space: SearchSpace | None) -> dict[str, list[Any]]:
    """GridSampler's grid: every value of each searched key (discrete distributions only)."""
    grid: dict[str, list[Any]] = {}
    for key, dist in (space.distributions if space else {}).items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            count = round((dist.high - dist.low) / dist.step) + 1
            grid[key] = [round(dist.low + i * dist.step, 12) for i in range(count)]
        else:
            raise ConfigError(f"hydra.sweeper.params.{key}: GridSampler only supports discrete values "
                              f"(choice(...), range(...)); this key is {describe_distribution(dist)}")
    return grid


def grid_size(grid: Mapping[str, list[Any]]) -> int:
    return math.prod(len(values) for values in grid.values())


def ignores_constraints(sampler: optuna.samplers.BaseSampler) -> bool:
    """Samplers that do not read the trials' constraints (the accuracy goal)."""
    return isinstance(sampler, optuna.samplers.RandomSampler | optuna.samplers.QMCSampler
                      | optuna.samplers.GridSampler | optuna.samplers.CmaEsSampler
                      | optuna.samplers.BruteForceSampler)


def make_pruner(settings: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner of ``hydra.sweeper.pruner`` as stored on the study: the schema's PrunerConf (every field,
    its defaults there) plus ``objective``, the study's first objective."""
    name = settings["name"]
    if name == "goal":
        return GoalPruner(objective=settings["objective"], recovery_margin=float(settings["recovery_margin"]),
                          min_finished=int(settings["n_startup_trials"]))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(settings["n_startup_trials"]),
                                           n_warmup_steps=int(settings["n_warmup_steps"]))
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=int(settings["n_startup_trials"]),
                                               n_warmup_steps=int(settings["n_warmup_steps"]))
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

    SQLite: a file lock beside the database. PostgreSQL: an advisory lock, held by its own
    connection; when that connection is lost (the server restarted) the lock went with it, and
    leaving the block raises the disconnection, so that a caller under :func:`reconnecting`
    does its locked work again under a new lock. Other storages: no lock (the trial count may
    overshoot by the number of workers).
    """
    if storage_url.startswith("sqlite:///"):
        with file_lock(Path(storage_url.removeprefix("sqlite:///") + f".{_digest(study_name)}.lock")):
            yield
        return
    if storage_url.startswith("postgresql"):
        engine = sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)
        key = int(_digest(study_name), 16) % (2**62)
        unlock = sqlalchemy.text("SELECT pg_advisory_unlock(:k)")
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                except BaseException:
                    try:
                        conn.execute(unlock, {"k": key})
                    except Exception as err:  # the block's own error is the one to see
                        if not is_disconnect(err):
                            raise
                    raise
                conn.execute(unlock, {"k": key})
        finally:
            engine.dispose()
        return
    yield


def is_disconnect(err: BaseException) -> bool:
    """Whether ``err`` (or the error it was raised from, e.g. inside Optuna's ``StorageInternalError``)
    says that the PostgreSQL connection was lost or could not be made: the server restarting, stopped,
    or out of reach. Any other database error (a bad value, a constraint, SQLite's "database is
    locked") is not one."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, sqlalchemy.exc.DBAPIError):
            orig = cause.orig
            if type(orig).__module__.split(".")[0] not in ("psycopg2", "psycopg"):
                return False
            if cause.connection_invalidated:
                return True
            code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
            if code is None:  # raised by the client library itself: refused, closed, unreachable
                return isinstance(cause, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
            return str(code).startswith(_DISCONNECT_CODES)
        # A session whose connection broke refuses further work until rolled back: the breaking error
        # is the one it was raised while handling (Optuna's fallback query in ``_get_trials`` meets this).
        pending = isinstance(cause, sqlalchemy.exc.PendingRollbackError) and cause.__cause__ is None
        cause = cause.__context__ if pending else cause.__cause__
    return False


def reconnecting(action: Callable[[], T], what: str, patience_s: float = RECONNECT_S) -> T:
    """``action()``, called again (with a short backoff) while it fails because the database
    connection is lost, for up to ``patience_s``; any other error, or one after that, is raised.

    Only for actions that may run twice: reads, and writes that set a value (a user attribute, an
    intermediate value). A write that must happen once checks first, as :func:`tell_once` does."""
    deadline, delay, lost_at = time.monotonic() + patience_s, 0.25, None
    while True:
        try:
            result = action()
        except Exception as err:
            if not is_disconnect(err) or time.monotonic() + delay > deadline:
                raise
            if lost_at is None:
                lost_at = time.monotonic()
            log.warning("storage connection lost while %s (%s); retrying in %.1f s", what, _reason(err), delay)
            time.sleep(delay)
            delay = min(2 * delay, 4.0)
            continue
        if lost_at is not None:
            log.warning("storage reconnected after %.1f s; %s done", time.monotonic() - lost_at, what)
        return result


def tell_once(study: optuna.Study, trial: optuna.trial.Trial | int, values: Any = None,
              state: TrialState | None = None) -> None:
    """``study.tell``, reconnecting; told once: when a retry finds the trial already finished (the
    lost connection dropped only the answer of a tell that went through), it is left as it is."""
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        study.tell(trial, values, state=state, skip_if_finished=attempts > 1)

    number = trial if isinstance(trial, int) else trial.number
    reconnecting(attempt, f"telling trial {number} {state.name if state else 'COMPLETE'}")


def _reason(err: BaseException) -> str:
    """The first line of the database's own message under ``err``."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, sqlalchemy.exc.DBAPIError):
        cause = cause.__cause__
    text = str(getattr(cause, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def mark_worker(trial: optuna.trial.Trial) -> None:
    """Record which process runs the trial, so that a later start can tell if it died."""
    trial.set_user_attr("worker", this_worker())


def this_worker() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def orphaned_trials(study: optuna.Study, storage_url: str) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials that no worker runs although their process lives: asked under the study lock by
    a worker whose storage connection was lost before it could record that it runs them (no ``worker``
    yet), or recorded by this very process, which runs none while it holds the lock. Only meaningful
    under :func:`study_lock`, where no other worker is between its ask and its record: none for a
    storage without that lock."""
    if not storage_url.startswith(("sqlite:///", "postgresql")):
        return []
    me = this_worker()
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") in (None, me)]


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
    """Trials that failed by themselves (an error), not lost with their process or machine."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    lost = {key for key in study.user_attrs if key.startswith(LOST_PREFIX)} if failed else set()
    return [t for t in failed if "lost" not in t.user_attrs and f"{LOST_PREFIX}{t.number}" not in lost]


def lost_reason(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
    """Why ``trial`` was failed as lost (its process died, its heartbeat stopped, ...); None if it was not."""
    return trial.user_attrs.get("lost") or study.user_attrs.get(f"{LOST_PREFIX}{trial.number}")


def count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:15]


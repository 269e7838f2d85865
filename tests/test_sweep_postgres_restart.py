"""PostgreSQL restarted in the middle of a two-worker sweep loses no trial.

A real server on loopback (tests/postgres.py; a server of this module's own, so that no other test
sees it go down) is stopped and started again while both workers of a
``python -m harness --multirun ... hydra.sweeper.n_jobs=2`` sweep are running trials. The sweep
must reconnect and go on: it exits 0, the study holds exactly ``n_trials`` trials, all finished
(none FAIL, none left RUNNING, none replaced), every trial was launched once, and the trials that
were running during the outage kept every epoch's report. The quicker tests below check the parts:
which errors are retried, the study lock across a restart, a tell applied once, and a trial asked
as the connection was lost taken over rather than lost.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy
from optuna.trial import TrialState, create_trial

from harness.sweep.loop import Outcome, SweepSettings, run_worker
from harness.sweep.space import parse_search_space
from harness.sweep.study import is_disconnect, reconnecting, study_lock, tell_once, this_worker
from hydra_plugins.harness_sweeper.harness_sweeper import HarnessSweeperConf, PrunerConf
from tests.postgres import PostgresServer, running_postgres

REPO = Path(__file__).resolve().parent.parent
N_TRIALS = 6
FINETUNE_EPOCHS = 12  # each trial reports val accuracy 12 times over a few seconds
OUTAGE_S = 3.0  # the server is down this long: longer than a trial's gap between two reports
STUDY = "restart"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A server of this module's own: its tests stop and start it."""
    with running_postgres(tmp_path_factory.mktemp("restarted-postgres")) as started:
        yield started


def _pg_ctl(server: PostgresServer, *args: str) -> None:
    cmd = [*server.run_as, str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-w", "-t", "60", *args]
    proc = subprocess.run(cmd, cwd=server.data_dir.parent, capture_output=True, text=True, timeout=90,
                          check=False, env={k: v for k, v in os.environ.items() if not k.startswith("PG")})
    assert proc.returncode == 0, f"pg_ctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}"


def _stop(server: PostgresServer) -> None:
    _pg_ctl(server, "-m", "fast", "stop")


def _start(server: PostgresServer) -> None:
    _pg_ctl(server, "-l", str(server.data_dir.parent / "server.log"), "-o", f"-p {server.port}", "start")


def _start_later(server: PostgresServer, delay_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), _start(server)))
    thread.start()
    return thread


# -- the parts --------------------------------------------------------------------------------------

@pytest.mark.postgres
def test_only_a_lost_connection_is_retried(server: PostgresServer) -> None:
    server.create_database("retried")
    engine = sqlalchemy.create_engine(server.url("retried"), pool_pre_ping=True)
    try:
        with pytest.raises(sqlalchemy.exc.ProgrammingError) as bad_sql:  # a bad statement: raised at once
            reconnecting(lambda: _select(engine, "no_such_column"), "a bad query")
        assert not is_disconnect(bad_sql.value)
        sqlite = sqlalchemy.exc.OperationalError("BEGIN", {}, Exception("database is locked"))
        assert not is_disconnect(optuna.exceptions.StorageInternalError("commit"))
        assert not is_disconnect(sqlite)

        _stop(server)
        with pytest.raises(sqlalchemy.exc.OperationalError) as refused:  # patience spent: raised
            reconnecting(lambda: _select(engine, "1"), "a query", patience_s=0.5)
        assert is_disconnect(refused.value)
        starter = _start_later(server, 2.0)
        t0 = time.monotonic()
        value = reconnecting(lambda: _select(engine, "1"), "a query")  # rides out the outage
        starter.join()
        assert value == 1 and time.monotonic() - t0 >= 1.5
    finally:
        engine.dispose()


def _select(engine: sqlalchemy.Engine, what: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sqlalchemy.text(f"SELECT {what}")).scalar_one()


@pytest.mark.postgres
def test_a_study_lock_lost_with_its_connection_is_taken_again(server: PostgresServer) -> None:
    server.create_database("locked")
    url = server.url("locked")
    entered = []

    def locked_work() -> int:
        with study_lock(url, "s"):
            entered.append(time.monotonic())
            if len(entered) == 1:  # the server restarts while the lock is held: it went with the connection
                _stop(server)
                _start(server)
        return len(entered)

    assert reconnecting(locked_work, "locked work") == 2  # done again, under a new lock
    with study_lock(url, "s"), study_lock(url, "other"):  # and the lock is free again
        pass


@pytest.mark.postgres
def test_a_tell_whose_answer_was_lost_is_not_applied_twice(server: PostgresServer) -> None:
    server.create_database("told")
    study = optuna.create_study(study_name="t", storage=server.url("told"), direction="maximize")
    trial = study.ask()
    real_tell, calls = study.tell, []

    def tell_then_lose_the_answer(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("skip_if_finished"))
        told = real_tell(*args, **kwargs)
        if len(calls) == 1:  # it went through; the answer did not come back
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, psycopg2.OperationalError("server closed the "
                                                                                          "connection unexpectedly"))
        return told

    study.tell = tell_then_lose_the_answer  # type: ignore[method-assign]
    tell_once(study, trial, 0.5)
    assert calls == [False, True]  # the retry skips a trial already finished
    assert [(t.state, t.value) for t in study.trials] == [(TrialState.COMPLETE, 0.5)]


@pytest.mark.postgres
def test_a_trial_asked_as_the_connection_was_lost_is_taken_over_not_lost(server: PostgresServer) -> None:
    server.create_database("orphans")
    conf = HarnessSweeperConf(n_trials=4, objectives=["final/sparsity"], directions=["maximize"],
                              goal_constraint=False, pruner=PrunerConf(name="none"))
    settings = SweepSettings(study_name="o", storage=server.url("orphans"), conf=conf)
    study = optuna.create_study(study_name="o", storage=settings.storage, direction="maximize")
    study.add_trial(create_trial(value=0.5, params={"x": 0.5},
                                 distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    unrecorded = study.ask()  # asked, then the connection went before the worker recorded it as its own
    own = study.ask()  # recorded as this process's, then its lock went with the connection
    own.set_user_attr("worker", this_worker())
    ran = run_worker(settings, parse_search_space({"x": "interval(0, 1)"}),
                     lambda trial, overrides: Outcome(metrics={"final/sparsity": 0.7}))
    trials = optuna.load_study(study_name="o", storage=settings.storage).trials
    assert sorted(ran.ran) == [unrecorded.number, own.number, 3]  # taken over, and one more asked
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    # Two workers that asked while their locks were gone overshoot n_trials: the extra one is dropped, unrun.
    extra = study.ask()
    again = run_worker(settings, parse_search_space({"x": "interval(0, 1)"}),
                       lambda trial, overrides: Outcome(metrics={"final/sparsity": 0.7}))
    dropped = optuna.load_study(study_name="o", storage=settings.storage).trials[extra.number]
    assert again.ran == [] and again.failed == []
    assert dropped.state == TrialState.FAIL and "not needed" in dropped.user_attrs["lost"]


# -- the sweep --------------------------------------------------------------------------------------

def _sweep(url: str, outputs: Path) -> list[str]:
    return [
        sys.executable, "-m", "harness", "--multirun", "+sweep=max_sparsity", "tracking=none",
        f"hydra.sweeper.study_name={STUDY}", f"hydra.sweeper.storage={url}",
        f"hydra.sweeper.n_trials={N_TRIALS}", "hydra.sweeper.n_jobs=2", "hydra.sweeper.confirm.seeds=0",
        # the median pruner reads the study at every report but prunes nothing before 100 finished trials
        "hydra.sweeper.pruner.name=median", "hydra.sweeper.pruner.n_startup_trials=100",
        "train.epochs=1", f"train.finetune_epochs={FINETUNE_EPOCHS}", "prune.end_epoch=1",
        f"outputs_dir={outputs}", f"hydra.sweep.dir={outputs}/sweep",
    ]


def _trials(storage: optuna.storages.RDBStorage) -> dict[int, optuna.trial.FrozenTrial]:
    """The study's trials by number; none while the study does not exist yet."""
    if STUDY not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return {}
    return {t.number: t for t in optuna.load_study(study_name=STUDY, storage=storage).trials}


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restarted_mid_sweep_loses_no_trial(server: PostgresServer, tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    server.create_database("sweeps")
    url = server.url("sweeps")
    outputs = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(_sweep(url, outputs), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        # Wait for one finished trial and one running trial that has reported at least one epoch.
        storage = optuna.storages.RDBStorage(url)
        deadline, running = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None:
            trials = _trials(storage)
            complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
            running = [n for n, t in trials.items() if t.state == TrialState.RUNNING and t.intermediate_values]
            if complete and running:
                break
            time.sleep(0.2)
        storage.engine.dispose()
        assert proc.poll() is None and running, "the sweep ended before a trial was running after another"

        _stop(server)
        time.sleep(OUTAGE_S)
        _start(server)

        try:
            proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep did not end within 150 s of the restart (a worker stuck or dead)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

    logs = (tmp_path / "sweep.log").read_text()
    logs += "".join(p.read_text() for p in sorted((outputs / "sweep").glob("worker-*.log")))
    assert proc.returncode == 0, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    assert "storage connection lost" in logs and "storage reconnected" in logs  # the outage was seen, ridden out

    storage = optuna.storages.RDBStorage(url)
    trials = _trials(storage)
    storage.engine.dispose()
    states = Counter(t.state.name for t in trials.values())
    # Nothing lost: exactly n_trials trials, all finished; none failed, none replaced, none left RUNNING.
    assert len(trials) == N_TRIALS and states["COMPLETE"] + states["PRUNED"] == N_TRIALS, states
    # The trials running during the outage kept going and reported every epoch.
    for number in running:
        assert trials[number].state == TrialState.COMPLETE
        assert len(trials[number].intermediate_values) == FINETUNE_EPOCHS
    # Nothing run twice: each trial number was launched once, across both workers.
    launched = Counter(int(n) for n in re.findall(r"sweep_trial\.number=(\d+) sweep_trial\.parent_run_id=\S+ "
                                                  r"sweep_trial\.confirmation_seed=null", logs))
    assert launched == Counter(range(N_TRIALS)), launched
    assert len({t.user_attrs["worker"]["pid"] for t in trials.values()}) == 2

"""The whole distributed path on loopback: a sweep whose trials run as submitit jobs
(``hydra/launcher=submitit_local``, the code path of ``submitit_slurm``), its study in PostgreSQL,
its runs on a real ``mlflow server`` whose store is PostgreSQL too, and a worker lost with its
machine.

Machine A runs the sweep with two workers (``hydra.sweeper.n_jobs=2``). Machine B runs the same
command, joins the study, and is SIGKILLed with all its processes (worker, submitit job, MLflow
writer) in the middle of a trial, as a machine that dies. B runs in a UTS namespace of its own with
another host name (``unshare --uts``, where the system allows it), so the same-host pid check
cannot see its death: only the heartbeat can. A's workers must fail B's trial once its heartbeat
has been silent for the grace period, end its MLflow run FAILED, and replace it: exactly
``n_trials`` trials finish, every run is nested under the sweep's one parent, nothing is left
RUNNING in Optuna or MLflow.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.sweep.study import LOST_PREFIX
from tests.mlflow_server import Server
from tests.postgres import PostgresServer

REPO = Path(__file__).resolve().parent.parent
N_TRIALS = 3
INTERVAL_S, GRACE_S = 1, 8
OTHER_HOST = "node-b"


def _sweep(storage: str, outputs: Path, sweep_dir: Path, n_jobs: int) -> list[str]:
    return [
        # docs/sweeps.md's SLURM recipe with submitit_local in place of submitit_slurm, and smaller numbers
        sys.executable, "-m", "harness", "--multirun", "+sweep=max_sparsity", "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=30", f"hydra.sweeper.n_trials={N_TRIALS}", f"hydra.sweeper.n_jobs={n_jobs}",
        f"hydra.sweeper.storage={storage}", f"hydra.sweeper.heartbeat.interval_s={INTERVAL_S}",
        f"hydra.sweeper.heartbeat.grace_s={GRACE_S}", "hydra.sweeper.pruner.name=none",
        "hydra.sweeper.confirm.candidates=1", "hydra.sweeper.confirm.seeds=1", "goal.max_drop=0.5",
        "train.epochs=1", "train.finetune_epochs=5", "prune.end_epoch=2",
        f"outputs_dir={outputs}", f"hydra.sweep.dir={sweep_dir}",
    ]


def _other_machine() -> list[str]:
    """The command prefix that runs a process under another host name, or [] where the system refuses."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "--uts", "sh", "-c", f"hostname {OTHER_HOST}"], capture_output=True,
                           timeout=30, check=False)
    if probe.returncode != 0:
        return []
    return ["unshare", "--uts", "sh", "-c", f'hostname {OTHER_HOST} && exec "$@"', "sh"]


def _trials(storage: optuna.storages.RDBStorage) -> list[optuna.trial.FrozenTrial]:
    if "max_sparsity" not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return []
    return optuna.load_study(study_name="max_sparsity", storage=storage).trials


def _wait(condition, what: str, timeout: float, *processes: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert all(p.poll() is None for p in processes), f"a sweep ended while waiting for {what}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[Server]:
    """``mlflow server`` whose backend store is a PostgreSQL database."""
    postgres_server.create_database("cluster_mlflow")
    started = Server(tmp_path / "mlflow", backend_store_uri=postgres_server.url("cluster_mlflow"))
    started.start()
    yield started
    started.stop()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_loopback_replace_a_trial_lost_with_its_machine(postgres_server: PostgresServer,
                                                                       server: Server, tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    postgres_server.create_database("cluster_optuna")
    storage_url = postgres_server.url("cluster_optuna")
    outputs = tmp_path / "out"  # shared by both "machines" (the baseline cache), as a cluster's shared disk
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env |= {"MLFLOW_TRACKING_URI": server.url, "OMP_NUM_THREADS": "1"}  # as the recipe exports it
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("a", "b")}
    prefix = _other_machine()
    a = b = None
    storage = optuna.storages.RDBStorage(storage_url)
    try:
        t0 = time.monotonic()
        a = subprocess.Popen(_sweep(storage_url, outputs, tmp_path / "a", n_jobs=2), cwd=REPO,
                             env=env, stdout=logs["a"], stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: [t for t in _trials(storage) if t.state == TrialState.RUNNING], "machine A's first trial", 180, a)
        b = subprocess.Popen([*prefix, *_sweep(storage_url, outputs, tmp_path / "b", n_jobs=1)],
                             cwd=REPO, env=env, stdout=logs["b"], stderr=subprocess.STDOUT, start_new_session=True)

        def b_mid_trial() -> optuna.trial.FrozenTrial | None:
            return next((t for t in _trials(storage) if t.state == TrialState.RUNNING
                         and t.user_attrs.get("worker", {}).get("pid") == b.pid
                         and t.intermediate_values and "mlflow_run_id" in t.user_attrs), None)

        lost = _wait(b_mid_trial, "machine B in the middle of a trial", 240, a, b)
        os.killpg(b.pid, signal.SIGKILL)  # the machine dies: its worker, its job, its MLflow writer
        b.wait()
        killed_at = datetime.datetime.now()
        try:
            a.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail("machine A's sweep did not end within 420 s of the kill")
        elapsed = time.monotonic() - t0
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs.values():
            log.close()
    out = (tmp_path / "a.log").read_text() + "".join(p.read_text() for p in (tmp_path / "a").glob("worker-*.log"))
    print(f"\n[cluster] host of machine B: {OTHER_HOST if prefix else 'this one (unshare refused)'}; "
          f"sweep done in {elapsed:.0f} s")
    assert a.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]

    # Optuna: exactly n_trials finished; B's trial failed as lost by its stopped heartbeat, after the grace
    # period, and not counted as a failure; nothing RUNNING.
    study = optuna.load_study(study_name="max_sparsity", storage=storage)
    storage.engine.dispose()
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == N_TRIALS, states
    assert states[TrialState.FAIL] == 1 and states[TrialState.RUNNING] == 0, states
    failed = study.trials[lost.number]
    assert failed.state == TrialState.FAIL
    reason = study.user_attrs[f"{LOST_PREFIX}{lost.number}"]
    assert "heartbeat stopped" in reason and f"pid {b.pid}" in reason, reason
    if prefix:
        assert f"worker {OTHER_HOST} " in reason and failed.user_attrs["worker"]["host"] == OTHER_HOST
    assert f"trial {lost.number} lost: its heartbeat stopped" in out
    waited = (failed.datetime_complete - killed_at).total_seconds()
    assert waited >= GRACE_S - INTERVAL_S - 1, waited  # not before the grace period
    replacing = [t for t in study.trials if t.number > lost.number and t.state != TrialState.FAIL]
    assert replacing and all(t.user_attrs["worker"]["pid"] != b.pid for t in replacing)

    # MLflow (the server, PostgreSQL behind it): one parent, every other run nested under it, the lost
    # trial's run ended FAILED by machine A, nothing RUNNING.
    client = MlflowClient(tracking_uri=server.url)
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    parents = [r for r in runs if r.data.tags.get("harness.sweep") == "parent"]
    assert len(parents) == 1
    children = [r for r in runs if r is not parents[0]]
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parents[0].info.run_id}
    trial_runs = [r for r in children if r.data.tags.get("harness.sweep") == "trial"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs) == list(range(N_TRIALS + 1))
    assert len([r for r in children if r.data.tags.get("harness.sweep") == "confirmation"]) == 1
    assert not [r for r in runs if r.info.status == "RUNNING"]
    lost_run = next(r for r in runs if r.info.run_id == lost.user_attrs["mlflow_run_id"])
    assert lost_run.info.status == "FAILED"
    if prefix:  # (on one host, the next run opened may close it first: its process is gone)
        assert "heartbeat stopped" in lost_run.data.tags["error"]

    # The trials ran as submitit jobs, their folders under the sweep dir.
    jobs = [p for p in (tmp_path / "a" / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) >= N_TRIALS, jobs

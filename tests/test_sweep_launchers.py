"""Sweeps through Hydra's launcher plugins: with ``hydra/launcher=submitit_local`` (the code path of
``submitit_slurm``, with local processes) every trial and confirmation is a submitit job, another
process that reaches its trial through the storage and pickles its result back.

The commands are the documented SLURM recipe with only the launcher's name changed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from .conftest import REPO
from .test_sweep import load, mlflow_runs, run_sweep, sweep_command

LOCAL = ["hydra/launcher=submitit_local"]
# max_sparsity's recipe, short; a lax goal so that trials are feasible and their confirmation runs.
SHORT = ["+sweep=max_sparsity", *LOCAL, "hydra.sweeper.pruner.name=none", "hydra.sweeper.confirm.candidates=1",
         "hydra.sweeper.confirm.seeds=1",
         "goal.max_drop=0.5", "train.epochs=2", "train.finetune_epochs=3", "prune.end_epoch=2"]


def submitit_jobs(sweep_dir: Path) -> dict[str, Path]:
    """The submitit job folders under the sweep dir, by job id."""
    return {p.name: p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()}


@pytest.mark.slow
def test_trials_and_confirmations_run_as_submitit_jobs_under_the_sweep_dir(tmp_path):
    result = run_sweep([*SHORT, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2"], tmp_path, timeout=420)
    logs = result.stdout + result.stderr + (tmp_path / "sweep" / "worker-1.log").read_text()
    assert result.returncode == 0, logs[-3000:]
    assert "Traceback" not in logs

    study = load(tmp_path, "max_sparsity")
    assert Counter(t.state for t in study.trials)[TrialState.COMPLETE] == 3 and len(study.trials) == 3
    workers = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert len(workers) == 2  # both workers ran trials

    # Each trial's run was a submitit job: its Hydra job id is a submitit job under the sweep dir, with
    # its log and its pickled result, and its process was not a worker's.
    jobs = submitit_jobs(tmp_path / "sweep")
    runs = mlflow_runs(tmp_path)
    trial_runs = {r.info.run_id: r for r in runs if r.data.tags.get("harness.sweep") == "trial"}
    for trial in study.trials:
        hydra_yaml = yaml.safe_load((tmp_path / "sweep" / str(trial.number) / ".hydra" / "hydra.yaml").read_text())
        job = jobs[str(hydra_yaml["hydra"]["job"]["id"])]
        assert (job / f"{job.name}_0_result.pkl").is_file() and (job / f"{job.name}_0_log.out").is_file()
        assert trial.user_attrs["output_dir"] == str(tmp_path / "sweep" / str(trial.number))
        run = trial_runs[trial.user_attrs["mlflow_run_id"]]
        assert int(run.data.tags["harness.pid"]) not in workers
        assert len(trial.intermediate_values) == 3  # the job reported each epoch to its trial
    confirmations = [r for r in runs if r.data.tags.get("harness.sweep") == "confirmation"]
    assert len(confirmations) == 1 and len(jobs) == 4  # 3 trials and a confirmation, each a job

    # MLflow: one parent, every run nested under it, nothing RUNNING.
    parents = [r for r in runs if r.data.tags.get("harness.sweep") == "parent"]
    assert len(parents) == 1 and len(runs) == 5
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r not in parents} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_a_failing_job_comes_back_as_a_failed_trial_with_its_error_and_folder(tmp_path):
    result = run_sweep([*SHORT, "hydra.sweeper.n_trials=4", "train.lr=1e9"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep max_sparsity stopped after 2 failed trials"), last
    assert f"trial 0 ({tmp_path}/sweep/0): Diverged" in last and "Traceback" not in result.stderr
    # (the sweep file's last starting point stays enqueued, WAITING, for when the sweep is resumed)
    assert [t.state for t in load(tmp_path, "max_sparsity").trials if t.state != TrialState.WAITING] == \
        [TrialState.FAIL] * 2
    assert len(submitit_jobs(tmp_path / "sweep")) == 2
    assert not [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"]


def _job_processes(sweep_dir: Path) -> list[int]:
    """The pids of the submitit job processes (``python -m submitit.core._submit <folder>``) of a sweep."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and any(str(sweep_dir).encode() in part for part in cmdline):
            pids.append(int(proc.name))
    return pids


def _wait_for_running_trial(outputs: Path, process: subprocess.Popen, at_least: int = 0) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.3)
        try:
            trials = load(outputs, "max_sparsity").trials
        except Exception:  # the study does not exist yet
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number >= at_least
                   and t.intermediate_values]
        if running:
            return running[0]
    raise AssertionError("no trial was running")


@pytest.mark.slow
def test_a_killed_job_fails_its_trial_and_ctrl_c_stops_the_sweep_which_resumes(tmp_path):
    args = [*SHORT, "hydra.sweeper.n_trials=3", "hydra.sweeper.max_failure_rate=1.0", "hydra.sweeper.confirm.seeds=0",
            "train.finetune_epochs=8", "prune.end_epoch=4"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen(sweep_command(args, tmp_path), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # A job killed outright (out of memory, say): no result comes back; its trial fails, the sweep goes on.
        first = _wait_for_running_trial(tmp_path, process)
        (job,) = _job_processes(tmp_path / "sweep")
        os.kill(job, signal.SIGKILL)
        # Ctrl-C in the terminal: the whole process group gets SIGINT, the sweep stops.
        _wait_for_running_trial(tmp_path, process, at_least=first.number + 1)
        os.killpg(process.pid, signal.SIGINT)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, out[-3000:]
    # The one traceback is submitit's local controller's own, which Ctrl-C reaches in the same process group.
    assert out.count("Traceback") == out.count("submitit/local/_local.py\", line"), out[-3000:]
    trials = load(tmp_path, "max_sparsity").trials
    # (the last is the one interrupted; a starting point not yet asked stays enqueued, WAITING)
    killed, interrupted = trials[first.number], [t for t in trials if t.state != TrialState.WAITING][-1]
    assert killed.state == TrialState.FAIL and "the job gave back no result" in killed.user_attrs["error"]
    assert "lost" not in killed.user_attrs  # a failure, counted
    assert interrupted.state == TrialState.FAIL and "interrupted" in interrupted.user_attrs["lost"]
    deadline = time.monotonic() + 30  # the killed job's MLflow writer ends its run as it sees it gone
    while [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"]

    # The same command resumes: the interrupted trial is replaced, the failed one stays counted.
    again = run_sweep(args, tmp_path, timeout=420)
    assert again.returncode == 0, again.stderr[-3000:]
    states = Counter(t.state for t in load(tmp_path, "max_sparsity").trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 3 and states[TrialState.FAIL] == 2, states
    assert not [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"]

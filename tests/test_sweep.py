"""Sweeps end to end: the Optuna study, nested MLflow runs, pruning, resume after a kill, and
several workers sharing one study (SQLite, and PostgreSQL on loopback)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial

from harness import runner
from harness.errors import RunStopped
from harness.sweep.loop import Outcome, SweepSettings, describe_outcome, run_worker
from harness.sweep.space import parse_search_space
from harness.sweep.study import PRUNER_ATTR, make_pruner
from harness.sweep.trial import Pruned, TrialLink
from hydra_plugins.harness_sweeper.harness_sweeper import HarnessSweeperConf, PrunerConf

from .conftest import REPO, compose_config

# A quick sweep: 2 dense epochs, 3 fine-tuning epochs, two searched parameters.
QUICK = [
    "hydra/sweeper=harness_optuna", "hydra.sweeper.study_name=quick", "hydra.sweeper.pruner.name=none",
    "hydra.sweeper.confirm.seeds=0",
    "train.epochs=2", "train.finetune_epochs=3", "prune.end_epoch=2",
    "prune.target_sparsity=interval(0.5, 0.95)", "prune.schedule=choice(linear, cubic)",
]


def sweep_command(args: list[str], outputs: Path) -> list[str]:
    return [sys.executable, "-m", "harness", "--multirun", *args, f"outputs_dir={outputs}",
            f"hydra.sweep.dir={outputs}/sweep"]


def run_sweep(args: list[str], outputs: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return subprocess.run(sweep_command(args, outputs), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def load(outputs: Path, name: str = "quick") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{outputs / 'optuna.db'}")


def mlflow_runs(outputs: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("pruning").experiment_id])


@pytest.mark.slow
def test_sweep_runs_trials_nested_under_one_parent_and_reports_the_best(tmp_path):
    result = run_sweep([*QUICK, "hydra.sweeper.n_trials=3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(len(t.intermediate_values) == 3 for t in study.trials)  # val accuracy reported per epoch

    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = study.best_trial
    assert results["best_params"] == best.params
    assert results["best"]["val_accuracy"] == best.user_attrs["metrics"]["final/accuracy"]
    assert results["best"]["test_accuracy"] == best.user_attrs["metrics"]["final/test_accuracy"]
    assert "python -m harness" in results["best"]["command"]
    assert f"prune.target_sparsity={best.params['prune.target_sparsity']!r}" in results["best"]["command"]
    assert "reproduce: python -m harness" in result.stdout

    runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("harness.sweep") == "parent"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2]
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["best/final/sparsity"] == pytest.approx(best.value)
    assert "best/final/test_accuracy" in parent.data.metrics
    assert parent.data.tags["best.command"] == results["best"]["command"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_results.yaml", "accuracy_vs_sparsity.png", "optimization_history.png",
            "param_importances.png"} <= artifacts

    # The same command again: the study is complete, nothing more runs, the result is reported.
    again = run_sweep([*QUICK, "hydra.sweeper.n_trials=3"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(load(tmp_path).trials) == 3
    assert "reproduce: python -m harness" in again.stdout
    assert len([r for r in mlflow_runs(tmp_path) if r.data.tags.get("harness.sweep") == "parent"]) == 1


@pytest.mark.slow
def test_named_sweep_and_two_jobs_share_the_study(tmp_path):
    args = ["+sweep=max_sparsity", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.confirm.seeds=0", "train.epochs=2", "train.finetune_epochs=3", "prune.end_epoch=2"]
    result = run_sweep(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path, "max_sparsity")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(study.trials) == 4
    workers = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert len(workers) == 2  # both processes ran trials
    assert (tmp_path / "sweep" / "worker-1.log").exists()
    assert all(r.info.status in ("FINISHED", "KILLED") for r in mlflow_runs(tmp_path))


@pytest.mark.slow
def test_sweep_resumes_after_sigkill(tmp_path):
    args = [*QUICK, "hydra.sweeper.n_trials=3", "train.finetune_epochs=6", "prune.end_epoch=4"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    process = subprocess.Popen(sweep_command(args, tmp_path), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until one trial finished and the next one is running
        time.sleep(0.5)
        try:
            states = [t.state for t in load(tmp_path).trials]
        except Exception:  # the study does not exist yet
            continue
        running = [t for t in load(tmp_path).trials if t.state == TrialState.RUNNING]
        # killed as soon as the running trial has opened its MLflow run: far from its end, even on a loaded machine
        if states.count(TrialState.COMPLETE) == 1 and running and "mlflow_run_id" in running[0].user_attrs:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = [t for t in load(tmp_path).trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1

    result = run_sweep(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3
    assert study.trials[killed[0].number].state == TrialState.FAIL
    runs = mlflow_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed_run = killed[0].user_attrs.get("mlflow_run_id")
    if killed_run:
        assert next(r for r in runs if r.info.run_id == killed_run).info.status == "FAILED"


def test_bad_sweep_params_are_one_line_errors(tmp_path):
    result = run_sweep(["hydra/sweeper=harness_optuna", "prune.target_sparsity=interval(0.9, 0.5)"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "prune.target_sparsity" in lines[0] and "low < high" in lines[0], result.stderr


def test_a_losing_trial_is_pruned_and_its_run_says_so(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="p", storage=storage, direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0})
    # An earlier trial that was perfect at every epoch: the median pruner stops anything worse.
    study.add_trial(create_trial(value=1.0, intermediate_values={0: 1.0, 1: 1.0, 2: 1.0}))
    trial = study.ask()
    link = TrialLink(storage, "p", trial.number, None)
    cfg = compose_config(["train.epochs=1", "train.finetune_epochs=3", "prune.end_epoch=2",
                          f"outputs_dir={tmp_path}"])
    with pytest.raises(Pruned) as stopped:
        runner.run(cfg, tmp_path / "run", trial=link)
    assert isinstance(stopped.value, RunStopped) and isinstance(stopped.value, optuna.TrialPruned)
    assert describe_outcome(stopped.value) == Outcome(pruned=True)
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"
    assert "pruned by the study's pruner after epoch 0" in run.data.tags["harness.stopped"]
    assert run.data.tags["optuna.trial_number"] == str(trial.number)
    assert study.trials[trial.number].user_attrs["mlflow_run_id"] == run.info.run_id


def test_a_trial_that_cannot_beat_the_best_is_stopped_and_told_to_the_sampler_as_infeasible(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="g", storage=storage, direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"objective": "final/sparsity", **dataclasses.asdict(PrunerConf())})
    study.add_trial(create_trial(value=0.95, intermediate_values={0: 0.98}, user_attrs={},
                                 system_attrs={"constraints:accuracy_goal": -0.01}))
    trial = study.ask()
    link = TrialLink(storage, "g", trial.number, None)
    cfg = compose_config(["train.epochs=1", "train.finetune_epochs=3", "prune.end_epoch=2",
                          "prune.target_sparsity=0.8", "tracking=none", f"outputs_dir={tmp_path}"])
    link.plan(cfg)  # what TrialLink.from_config does for a sweep's job
    with pytest.raises(Pruned, match=r"after epoch 0: its target 0.8000 cannot beat the best sparsity that met "
                                     r"the goal \(0.9500\)"):
        runner.run(cfg, tmp_path / "run", trial=link)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    stopped = study.trials[trial.number]
    assert stopped.constraints == {"beats_best_sparsity": pytest.approx(0.95 - 0.001 - 0.8)}


def test_worker_counts_finished_trials_and_applies_the_goal_constraint(tmp_path):
    conf = HarnessSweeperConf(n_trials=5, objectives=["final/sparsity"], directions=["maximize"],
                              goal_constraint=True, pruner=PrunerConf(name="none"), max_failure_rate=0.2)
    settings = SweepSettings(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", conf=conf)
    space = parse_search_space({"prune.target_sparsity": "interval(0.1, 0.9)"})
    calls = []

    def fake_run(trial, overrides):
        calls.append(overrides)
        s = trial.params["prune.target_sparsity"]
        if len(calls) == 2:
            return Outcome(pruned=True)
        # Sparser than 0.6 misses the accuracy goal in this made-up world.
        return Outcome(metrics={"final/sparsity": s, "goal/excess_drop": s - 0.6, "final/accuracy": 1 - s})

    report = run_worker(settings, space, fake_run)
    study = optuna.load_study(study_name="s", storage=settings.storage)
    assert len(report.ran) == 5 and len(study.trials) == 5
    assert [t.state for t in study.trials].count(TrialState.PRUNED) == 1
    assert study.best_trial.params["prune.target_sparsity"] <= 0.6  # infeasible trials never win
    assert all(o[0].startswith("prune.target_sparsity=") for o in calls)
    # The sweep goes on through failures until max_failure_rate of n_trials have failed.
    settings2 = SweepSettings(study_name="f", storage=settings.storage, conf=dataclasses.replace(conf, n_trials=10))
    failing = run_worker(settings2, space, lambda trial, overrides: Outcome(error="RuntimeError: boom"))
    assert len(failing.failed) == 2 and failing.stopped_on_failures  # 0.2 * 10
    failed = optuna.load_study(study_name="f", storage=settings.storage).trials
    assert all(t.user_attrs["error"] == "RuntimeError: boom" for t in failed)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_worker_processes_share_a_postgres_study(postgres_server, tmp_path):
    postgres_server.create_database("sweeps")
    url = postgres_server.url("sweeps")
    args = [*QUICK, "hydra.sweeper.n_trials=5", f"hydra.sweeper.storage={url}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    processes = [subprocess.Popen(sweep_command([*args, f"hydra.sweep.dir={tmp_path}/w{i}"], tmp_path), cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][-2000:] + outputs[1][-2000:]
    study = optuna.load_study(study_name="quick", storage=url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 5 and len(study.trials) == 5  # none lost, none twice
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2
    children = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("harness.sweep") != "parent"]
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert numbers == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_four_workers_write_the_sqlite_stores_without_locking_errors(tmp_path):
    result = run_sweep([*QUICK, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=4"], tmp_path, timeout=600)
    logs = result.stdout + result.stderr + "".join(p.read_text() for p in (tmp_path / "sweep").glob("worker-*.log"))
    assert result.returncode == 0, logs[-3000:]
    assert "database is locked" not in logs
    study = load(tmp_path)
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 6 and len(study.trials) == 6
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) >= 2
    runs = mlflow_runs(tmp_path)
    assert len(runs) == 7 and all(r.info.status == "FINISHED" for r in runs)


def test_a_multi_objective_trial_reports_nothing_and_is_never_pruned(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="m", storage=storage, directions=["maximize", "maximize"])
    trial = study.ask()
    study.set_user_attr(PRUNER_ATTR, {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0})
    link = TrialLink(storage, "m", trial.number, None)
    link.on_validation(0, 0.1)  # Optuna cannot prune multi-objective studies: no report, no stop
    assert study.trials[0].intermediate_values == {}


@pytest.mark.slow
def test_pareto_sweep_reports_the_front(tmp_path):
    # A command-line sweep override replaces the sweep file's range for that key.
    result = run_sweep(["+sweep=pareto", "hydra.sweeper.n_trials=3", "train.epochs=2", "train.finetune_epochs=3",
                        "prune.end_epoch=range(1, 2)"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path, "pareto")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    front = {s["number"] for s in results["solutions"]}
    assert front == {t.number for t in study.best_trials} and front
    assert all(s["test_accuracy"] is not None and "python -m harness" in s["command"] for s in results["solutions"])
    assert (tmp_path / "sweep" / "accuracy_vs_sparsity.png").exists()


# -- sweeps whose answer can be trusted -----------------------------------------------------------

SMALL = ["+sweep=max_sparsity", "hydra.sweeper.n_trials=3", "hydra.sweeper.confirm.seeds=0", "train.epochs=2",
         "train.finetune_epochs=3", "prune.end_epoch=2"]


def studies(outputs: Path) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{outputs / 'optuna.db'}"))


@pytest.mark.slow
def test_a_different_command_gets_its_own_study_and_the_command_line_wins(tmp_path):
    first = run_sweep(SMALL, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prune.end_epoch=2 on the command line: prune.end_epoch is not searched" in first.stdout
    assert "search space:\n  prune.target_sparsity: float in [0.9, 0.9975]" in first.stdout
    assert not any("prune.end_epoch" in t.params for t in load(tmp_path, "max_sparsity").trials)

    mlp = run_sweep([*SMALL, "model=mlp"], tmp_path)
    assert mlp.returncode == 0, mlp.stderr[-3000:]
    (other,) = [name for name in studies(tmp_path) if name != "max_sparsity"]
    assert other.startswith("max_sparsity-") and len(load(tmp_path, other).trials) == 3  # ran its own trials
    assert "reproduce: python -m harness" in mlp.stdout and "model=mlp" in mlp.stdout
    children = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("optuna.study") == other
                and r.data.tags.get("harness.sweep") == "trial"]
    assert len(children) == 3 and {r.data.tags["harness.model"] for r in children} == {"mlp"}

    named = run_sweep([*SMALL, "model=mlp", "hydra.sweeper.study_name=max_sparsity"], tmp_path)
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert named.stderr.strip().splitlines() == [
        "error: study max_sparsity was started with model=digits_cnn; this command has model=mlp. Leave "
        "hydra.sweeper.study_name out to start (or resume) this command's own study, or name another"]
    # The same command again resumes its own study: nothing more runs.
    again = run_sweep([*SMALL, "model=mlp"], tmp_path)
    assert again.returncode == 0 and len(load(tmp_path, other).trials) == 3 and len(studies(tmp_path)) == 2


@pytest.mark.slow
def test_the_confirmed_best_is_reported_and_its_command_reproduces_the_trial(tmp_path):
    args = [*QUICK, "hydra.sweeper.n_trials=3", "hydra.sweeper.confirm.candidates=2",
            "hydra.sweeper.confirm.seeds=1", "prune.target_sparsity=interval(0.5, 0.7)"]
    result = run_sweep(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best, candidates = results["best"], results["candidates"]
    assert len(candidates) == 2 and results["confirmation_runs"] == 2
    confirmed = best["confirmed"]
    assert [r["finetune_seed"] for r in confirmed["runs"]] == [1, 2] and confirmed["goal_met_on_mean"]
    assert confirmed["val_accuracy_mean"] == pytest.approx(sum(r["val_accuracy"] for r in confirmed["runs"]) / 2)
    assert results["identity"]["digest"] and results["identity"]["choices"]["model"] == "digits_cnn"

    runs = mlflow_runs(tmp_path)
    confirmations = [r for r in runs if r.data.tags.get("harness.sweep") == "confirmation"]
    assert len(confirmations) == 2 and all(r.info.status == "FINISHED" for r in confirmations)
    parent = next(r for r in runs if r.data.tags.get("harness.sweep") == "parent")
    assert {r.data.tags["mlflow.parentRunId"] for r in confirmations} == {parent.info.run_id}
    assert {r.data.params["train.finetune_seed"] for r in confirmations} == {"2"}
    assert parent.data.metrics["best/confirmed/val_accuracy_mean"] == pytest.approx(confirmed["val_accuracy_mean"])
    assert "confirmation: each candidate re-run" in result.stdout

    command = best["command"]
    assert "+sweep" not in command and "sweep_trial" not in command and "--multirun" not in command
    keys = [part.split("=", 1)[0] for part in command.split()[3:]]
    assert len(keys) == len(set(keys))  # every key once
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    rerun = subprocess.run([sys.executable, *command.split()[1:], f"hydra.run.dir={tmp_path}/repro"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (plain,) = [r for r in mlflow_runs(tmp_path) if "harness.sweep" not in r.data.tags]
    assert plain.data.metrics["final/accuracy"] == best["val_accuracy"]
    assert plain.data.metrics["final/sparsity"] == best["sparsity"]


@pytest.mark.slow
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_sweep_whose_trials_all_fail_exits_non_zero(tmp_path, n_jobs):
    result = run_sweep([*QUICK, "hydra.sweeper.n_trials=4", f"hydra.sweeper.n_jobs={n_jobs}", "train.lr=1e9"],
                       tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep quick stopped after 2 failed trials (hydra.sweeper.max_failure_rate=0.5 "
                           "of n_trials=4); the first, trial 0 ("), last
    assert f"trial 0 ({tmp_path}/sweep/0): Diverged" in last and "Traceback" not in result.stderr
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2  # at most 0.5 x 4, whatever the workers
    assert not [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_sigkill_during_confirmation_then_the_same_command_confirms_each_once(tmp_path):
    args = [*QUICK, "hydra.sweeper.n_trials=2", "hydra.sweeper.confirm.candidates=2",
            "hydra.sweeper.confirm.seeds=1", "prune.target_sparsity=interval(0.5, 0.7)"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    process = subprocess.Popen(sweep_command(args, tmp_path), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until the first confirmation is stored and the second has started
        time.sleep(0.3)
        try:
            attrs = load(tmp_path).user_attrs
        except Exception:
            continue
        done = [k for k in attrs if k.startswith("confirm:") and not k.endswith(":run")]
        if len(done) == 1 and len([k for k in attrs if k.endswith(":run")]) == 2:
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert len(done) == 1

    result = run_sweep(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path)
    assert len(study.trials) == 2 and all(t.state == TrialState.COMPLETE for t in study.trials)
    runs = mlflow_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    confirmations = [r for r in runs if r.data.tags.get("harness.sweep") == "confirmation"]
    finished = sorted(r.data.tags["optuna.trial_number"] for r in confirmations if r.info.status == "FINISHED")
    assert finished == ["0", "1"]  # each candidate confirmed once; the killed run is FAILED, not repeated twice
    assert len([r for r in confirmations if r.info.status == "FAILED"]) == 1


@pytest.mark.slow
def test_the_goal_pruner_replayed_on_real_trials_stops_only_trials_that_cannot_win(tmp_path):
    """Real trials run to the end (no pruner), then their curves are replayed, in order, through the
    goal pruner: every trial it stops could not have won, and the best trial is never stopped."""
    pruner = make_pruner({"objective": "final/sparsity", **dataclasses.asdict(PrunerConf())})  # the schema's
    result = run_sweep([*QUICK, "hydra.sweeper.n_trials=6", "train.finetune_epochs=4", "prune.end_epoch=1",
                        "prune.target_sparsity=interval(0.5, 0.99)"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    real = load(tmp_path).trials
    assert all(t.state == TrialState.COMPLETE and len(t.intermediate_values) == 4 for t in real)
    feasible = [t for t in real if all(v <= 0 for v in t.constraints.values())]
    best = max(feasible, key=lambda t: t.value)

    replay = optuna.create_study(direction="maximize")
    stopped = []
    for t in real:
        trial = replay.ask()
        for key in ("plan", "goal_accuracy"):
            trial.set_user_attr(key, t.user_attrs[key])
        for step in sorted(t.intermediate_values):
            trial.report(t.intermediate_values[step], step)
            if pruner.prune(replay, replay._storage.get_trial(trial._trial_id)):
                stopped.append(t)
                replay.tell(trial, state=TrialState.PRUNED)
                break
        else:
            for name, value in t.constraints.items():
                trial.set_constraint(name, value)
            replay.tell(trial, t.value)
    assert best not in stopped
    assert stopped, [(t.params, t.value) for t in real]  # some trial could not win, and was stopped
    assert all(t.value < best.value for t in stopped)

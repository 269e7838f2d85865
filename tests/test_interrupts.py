"""Interrupts and resume: SIGINT/SIGTERM write a checkpoint and end the MLflow run KILLED; resume
continues to the same masks and metrics as an uninterrupted run; a run whose processes were all
SIGKILLed is closed at the next start (its writer process ends it when only the training process
dies: tests/test_mlflow_writer.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.locking import file_lock

from .conftest import REPO, run_cli

ARGS = ["train.epochs=2", "train.finetune_epochs=6", "prune.end_epoch=4", "prune.target_sparsity=0.9"]


def start(args, outputs, run_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    cmd = [sys.executable, "-m", "harness", *args, f"outputs_dir={outputs}", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, with its MLflow writer


def wait_for(process, text, timeout=180, seen=None):
    """Read the process's output until a line holds ``text``; what was read so far (also kept in ``seen``)."""
    seen = [] if seen is None else seen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    process.kill()
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen)[-3000:]}")


def runs(outputs):
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("pruning").experiment_id])


def _experiment_runs(outputs):
    """The runs in the store, read under the lock the harness takes while it creates the store."""
    with file_lock(outputs / "mlflow.db.lock"):
        client = MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
        return client.get_experiment_by_name("pruning") is not None and runs(outputs)[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_writes_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, sig):
    reference = run_cli(ARGS, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = torch.load(tmp_path / "ref" / "run" / "pruned_model.pt", weights_only=True)

    outputs, run_dir = tmp_path / "out", tmp_path / "out" / "run"
    process = start(ARGS, outputs, run_dir)
    wait_for(process, "prune epoch 2/6")
    time.sleep(0.15)  # somewhere inside epoch 3
    process.send_signal(sig)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + sig.value, rest
    assert "Traceback" not in rest
    assert f"stopped: interrupted by {sig.name}" in rest and f"resume={run_dir}" in rest
    assert (run_dir / "checkpoint.pt").exists()
    client, (killed,) = runs(outputs)
    assert killed.info.status == "KILLED"

    resumed = run_cli([f"resume={run_dir}"], outputs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "checkpoint.pt").exists()
    final = torch.load(run_dir / "pruned_model.pt", weights_only=True)
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name  # same masks and the same weights

    client, (run,) = runs(outputs)  # the same MLflow run, continued
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    _, (ref_run,) = runs(tmp_path / "ref")
    for key in ("final/accuracy", "final/test_accuracy", "final/sparsity"):
        assert run.data.metrics[key] == ref_run.data.metrics[key], key
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
    ref_client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ref' / 'mlflow.db'}")
    assert val == [m.value for m in ref_client.get_metric_history(ref_run.info.run_id, "val/accuracy")]


@pytest.mark.slow
def test_a_run_whose_processes_were_killed_with_sigkill_is_closed_as_failed_at_the_next_start(tmp_path):
    process = start(ARGS, tmp_path, tmp_path / "run")
    wait_for(process, "prune epoch 1/6")
    deadline = time.monotonic() + 60
    while not _experiment_runs(tmp_path):  # the writer opens the run while training starts
        assert time.monotonic() < deadline, "the run never opened"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the training process and its MLflow writer
    process.wait()
    _, (orphan,) = runs(tmp_path)
    assert orphan.info.status == "RUNNING"

    again = run_cli(["prune=none", "train.epochs=2"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    client, all_runs = runs(tmp_path)
    closed = client.get_run(orphan.info.run_id)
    assert closed.info.status == "FAILED"
    assert "died" in closed.data.tags["error"]
    assert not [r for r in all_runs if r.info.status == "RUNNING"]

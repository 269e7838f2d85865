"""The MLflow writer process: what a run sends arrives in order and is stored when the run ends;
failures reach the training process; its runs never stay RUNNING when it dies or is interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from harness import mlflow_writer, tracking
from harness.mlflow_writer import TrackingError
from harness.tracking import MlflowTracker

from .conftest import REPO


def test_a_finished_run_holds_everything_sent_in_order(tmp_path, sqlite_uri):
    tracker = MlflowTracker(sqlite_uri, "pruning", run_name="ordered", tags={"team": "a"})
    tracker.log_params({"prune.target_sparsity": 0.9, "long": "x" * 7000})
    for step in range(1, 2501):  # more than one batch of metrics
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.flush()
    artifact = tmp_path / "report.csv"
    artifact.write_text("tensor,sparsity\nfc.weight,0.9\n")
    tracker.log_artifact(artifact)
    tracker.set_tags({"harness.note": "done"})
    tracker.finish()

    client = MlflowClient(tracking_uri=sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ordered"
    assert run.data.params["prune.target_sparsity"] == "0.9"
    assert len(run.data.params["long"]) == 6000  # cut to MLflow's limit, not refused
    assert run.data.tags["team"] == "a" and run.data.tags["harness.note"] == "done"
    assert run.data.tags["harness.pid"] == str(os.getpid())  # the training process, not the writer
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 2501))
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["report.csv"]
    tracker.finish()  # a second call changes nothing
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_a_resumed_run_belongs_to_the_resuming_process_and_is_not_closed_as_an_orphan(sqlite_uri):
    first = MlflowTracker(sqlite_uri, "pruning")
    first.finish("KILLED")  # an interrupted run, owned by a process that has since exited
    client = MlflowClient(tracking_uri=sqlite_uri)
    client.set_tag(first.run_id, "harness.pid", "999999999")
    resumed = MlflowTracker(sqlite_uri, "pruning", resume_run_id=first.run_id)
    other = MlflowTracker(sqlite_uri, "pruning")  # a run starting meanwhile looks for orphans
    other.finish()
    run = client.get_run(resumed.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["harness.pid"] == str(os.getpid())
    resumed.finish()
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


def test_a_failed_write_reaches_the_training_process_and_the_run_ends_failed(sqlite_uri):
    tracker = MlflowTracker(sqlite_uri, "pruning")
    with pytest.raises(TrackingError, match=r"MLflow log_batch failed: .*prune\.target_sparsity"), \
            tracking.finished_or_failed(tracker):
        tracker.log_params({"prune.target_sparsity": 0.9})
        tracker.flush()
        tracker.log_params({"prune.target_sparsity": 0.5})  # MLflow refuses to change a param
        tracker.flush()
        for step in range(1, 10**6):  # the reply arrives while training goes on
            tracker.log_metrics({"train/loss": 1.0}, step)
            tracker.flush()
            time.sleep(0.001)
    run = MlflowClient(tracking_uri=sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "log_batch failed" in run.data.tags["error"]


def test_a_store_that_cannot_open_the_run_stops_training_at_its_first_step(tmp_path):
    (tmp_path / "file").write_text("not a folder")

    def train() -> None:
        tracker = MlflowTracker(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}", "pruning")  # may raise here
        with tracking.finished_or_failed(tracker):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # one training step after another
                tracker.log_metrics({"train/loss": 1.0}, 1)
                time.sleep(0.01)

    with pytest.raises(TrackingError, match="MLflow open failed: FileExistsError"):
        train()


def test_a_failure_is_raised_in_its_own_tracker_only(tmp_path, sqlite_uri):
    good = MlflowTracker(sqlite_uri, "pruning")
    good.log_params({"a": 1})
    good.flush()
    bad = MlflowTracker(sqlite_uri, "pruning")
    bad.log_params({"a": 1})
    bad.flush()
    bad.log_params({"a": 2})  # refused by MLflow, in the writer, while both runs go on
    bad.flush()
    for step in range(1, 50):
        good.log_metrics({"train/loss": 1.0}, step)
        good.flush()
    good.finish()  # never sees the other run's failure
    with pytest.raises(TrackingError, match="log_batch failed"):
        bad.finish()
    client = MlflowClient(tracking_uri=sqlite_uri)
    assert client.get_run(good.run_id).info.status == "FINISHED"
    assert client.get_run(bad.run_id).info.status == "FINISHED"  # ended all the same, never RUNNING


def test_a_writer_that_died_is_reported_and_replaced(sqlite_uri):
    tracker = MlflowTracker(sqlite_uri, "pruning")
    run_id = tracker.run_id
    process = mlflow_writer.writer().process
    process.kill()
    process.wait()
    with pytest.raises(TrackingError, match=r"writer process .* exited"):
        tracker.finish()
    again = MlflowTracker(sqlite_uri, "pruning")  # a new writer, and the old run is still there
    again.finish()
    client = MlflowClient(tracking_uri=sqlite_uri)
    assert client.get_run(again.run_id).info.status == "FINISHED"
    assert client.get_run(run_id).info.status == "RUNNING"  # its process lives: not an orphan yet


SCRIPT = """
import signal, sys, time
from harness.tracking import MlflowTracker
# Ctrl-C as in a terminal's foreground: a shell's background job (pytest started with `&`) hands its
# children SIGINT ignored, and Python keeps it so.
signal.signal(signal.SIGINT, signal.default_int_handler)
tracker = MlflowTracker(sys.argv[1], "pruning")
tracker.log_metrics({"train/loss": 0.5}, 1)
tracker.flush()
try:  # (the id printed inside: a Ctrl-C sent as soon as it is read lands here)
    print(tracker.run_id, flush=True)
    time.sleep(120)
except KeyboardInterrupt:
    tracker.finish("KILLED")
    print("ended", flush=True)
"""


def _start(uri: str) -> tuple[subprocess.Popen, str]:
    errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read by a failing test, closed with the process)
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), uri], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True)
    process.errors = errors
    return process, process.stdout.readline().strip()


def _status(uri: str, run_id: str, until: str, timeout: float = 30.0) -> str:
    client = MlflowClient(tracking_uri=uri)
    deadline = time.monotonic() + timeout
    while (status := client.get_run(run_id).info.status) != until and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def test_a_training_process_killed_with_sigkill_has_its_run_ended_failed_by_its_writer(sqlite_uri):
    process, run_id = _start(sqlite_uri)
    process.kill()  # the training process only: its writer sees the socket close
    process.wait()
    assert _status(sqlite_uri, run_id, until="FAILED") == "FAILED"
    run = MlflowClient(tracking_uri=sqlite_uri).get_run(run_id)
    assert "died" in run.data.tags["error"]
    assert run.data.metrics["train/loss"] == 0.5


def test_ctrl_c_reaches_the_whole_process_group_and_the_writer_still_ends_the_run_killed(sqlite_uri):
    process, run_id = _start(sqlite_uri)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    line = process.stdout.readline().strip()
    if line != "ended":  # say how the script ended (it has failed only under the whole suite's load, so far)
        process.wait(timeout=60)
        process.errors.seek(0)
        pytest.fail(f"no 'ended' line: {line!r}, exit {process.returncode}, stderr: {process.errors.read()[-3000:]}")
    assert process.wait(timeout=30) == 0
    assert MlflowClient(tracking_uri=sqlite_uri).get_run(run_id).info.status == "KILLED"

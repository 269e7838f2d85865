"""A tracking server that goes away in the middle of a run loses nothing: the run goes on, its calls
are held and catch up when the server is back; a server that never returns gets the run's end
summary line and ``<run dir>/unsent/``, which ``python -m harness.mlflow_writer replay`` sends later.

Real processes: ``mlflow server`` (SQLite store, artifacts served), ``python -m harness``, stopped
and started again on the same port and store."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.tracking import MlflowTracker

from .conftest import REPO
from .mlflow_server import Server
from .test_interrupts import wait_for

STEPS_PER_EPOCH = 20  # 1257 training digits / batch 64
DOWN_S = 20


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "server")
    server.start()
    yield server
    server.stop()


def start_run(args: list[str], outputs: Path, finish_wait_s: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    env |= {"HARNESS_TRACKING_FINISH_WAIT_S": str(finish_wait_s), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "harness", *args, f"outputs_dir={outputs}", f"hydra.run.dir={outputs}/run"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def the_run(url: str):
    client = MlflowClient(tracking_uri=url)
    (run,) = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    return client, run


def assert_nothing_lost(client: MlflowClient, run_id: str, epochs: int) -> None:
    """Every optimizer step's loss, every epoch's val accuracy and every mask update, as logged."""
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, epochs * STEPS_PER_EPOCH + 1))
    val = client.get_metric_history(run_id, "val/accuracy")
    assert sorted(m.step for m in val) == [STEPS_PER_EPOCH * e for e in range(1, epochs + 1)]
    updates = list(range(0, 4 * STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH // 2))  # two a epoch, epochs 0..4
    run = client.get_run(run_id)
    sparsity = [key for key in run.data.metrics if key.startswith("sparsity/")]
    assert len(sparsity) == 6  # target, overall and the 4 tensors
    for key in sparsity:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == updates, key
    for key in ("final/accuracy", "final/sparsity", "goal/met"):
        assert key in run.data.metrics, key
    assert run.data.params["prune.end_epoch"] == "4"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "sparsity_report.csv", "pruned_model.pt", "curves.png", "summary.html"} <= artifacts


@pytest.mark.slow
def test_a_server_stopped_for_20_s_mid_run_loses_no_metric_and_the_run_finishes(tmp_path, server):
    epochs = 250  # 40-60 s of fine-tuning on 2 cores: the server is back before the run ends
    args = ["train.epochs=1", f"train.finetune_epochs={epochs}", "prune.end_epoch=4", f"tracking.uri={server.url}"]
    t0 = time.monotonic()
    process = start_run(args, tmp_path / "out", finish_wait_s=120)
    seen: list[str] = []
    wait_for(process, "prune epoch 1/", seen=seen)
    server.stop()
    t_down = time.monotonic()
    time.sleep(DOWN_S)
    server.start()
    t_up = time.monotonic()
    rest, _ = process.communicate(timeout=300)
    out = "".join(seen) + rest
    lines = out.splitlines()
    back = next((i for i, line in enumerate(lines) if "calls caught up" in line), len(lines))
    during = back < max((i for i, line in enumerate(lines) if f"prune epoch {epochs}/{epochs}" in line), default=-1)
    print(f"\n[tracking-server] down at {t_down - t0:.0f} s for {t_up - t_down:.0f} s (restart included), "
          f"caught up {'during the run' if during else 'at its end'}, run done at {time.monotonic() - t0:.0f} s")

    assert process.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert f"tracking server {server.url} unreachable" in out and "logging continues locally" in out
    assert f"tracking server {server.url} back;" in out and "calls caught up" in out
    assert "did not reach" not in out
    assert not (tmp_path / "out" / "run" / "unsent").exists()
    client, run = the_run(server.url)
    assert run.info.status == "FINISHED"
    assert_nothing_lost(client, run.info.run_id, epochs)


@pytest.mark.slow
def test_a_server_that_never_returns_leaves_the_run_in_its_folder_to_send_later(tmp_path, server):
    epochs = 6
    args = ["train.epochs=1", f"train.finetune_epochs={epochs}", "prune.end_epoch=4", f"tracking.uri={server.url}"]
    process = start_run(args, tmp_path / "out", finish_wait_s=6)
    seen: list[str] = []
    wait_for(process, "prune epoch 1/", seen=seen)
    server.stop()
    rest, _ = process.communicate(timeout=240)
    out = "".join(seen) + rest

    # The run ends normally: its work is on disk and one line says what the server did not get.
    assert process.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert f"tracking server {server.url} unreachable" in out
    run_dir = tmp_path / "out" / "run"
    unsent = run_dir / "unsent"
    (line,) = [line for line in out.splitlines() if "did not reach" in line]
    assert f"did not reach {server.url}; kept in {unsent}/" in line and "RUNNING" in line and "replay" in line
    with open(unsent / "metrics.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    kept_steps = sorted(int(r["step"]) for r in rows if r["key"] == "train/loss")
    assert kept_steps and kept_steps[-1] == epochs * STEPS_PER_EPOCH  # the rest went before the server stopped
    assert kept_steps == list(range(kept_steps[0], kept_steps[-1] + 1))
    assert "final/accuracy" in {r["key"] for r in rows}
    artifacts = (unsent / "artifacts.txt").read_text().splitlines()
    assert {Path(p).name for p in artifacts} >= {"config.yaml", "pruned_model.pt", "summary.html"}
    assert all(Path(p).is_file() and Path(p).parent == run_dir for p in artifacts)
    run_json = json.loads((unsent / "run.json").read_text())
    assert run_json["status"] == "FINISHED" and run_json["tracking_uri"] == server.url

    # The server, back after the run: still RUNNING as it last saw it; the replay sends the rest.
    server.start()
    client, run = the_run(server.url)
    assert run.info.status == "RUNNING" and run.info.run_id == run_json["run_id"]
    replay = subprocess.run([sys.executable, "-m", "harness.mlflow_writer", "replay", str(unsent)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert not unsent.exists() and (run_dir / "unsent.sent" / "metrics.csv").exists()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert_nothing_lost(client, run.info.run_id, epochs)


@pytest.mark.slow
def test_held_calls_catch_up_while_the_run_goes_on_and_training_never_waits(tmp_path, server, caplog):
    tracker = MlflowTracker(server.url, "pruning", spool_dir=tmp_path / "run")
    tracker.log_params({"prune.target_sparsity": 0.9})
    tracker.flush()
    assert tracker.run_id

    def outage() -> None:
        server.stop()
        time.sleep(3)
        server.start()

    away = threading.Thread(target=outage)
    step, slowest, caught_up_at = 0, 0.0, None
    deadline = time.monotonic() + 120
    while caught_up_at is None or step < caught_up_at + 500:  # training goes on after the catch-up
        assert time.monotonic() < deadline, caplog.text
        step += 1
        began = time.monotonic()
        tracker.log_metrics({"train/loss": 1.0 / step}, step)  # sends a batch every 5 s
        slowest = max(slowest, time.monotonic() - began)
        if step == 200:
            away.start()
        if caught_up_at is None and "calls caught up" in caplog.text:
            caught_up_at = step
        time.sleep(0.002)
    away.join()
    began = time.monotonic()
    tracker.finish()

    assert time.monotonic() - began < 5  # nothing left to wait for
    assert slowest < 2  # a step never waited for the server (MLflow alone retries a call for minutes)
    assert f"tracking server {server.url} unreachable" in caplog.text
    assert "did not reach" not in caplog.text and not (tmp_path / "run" / "unsent").exists()
    client = MlflowClient(tracking_uri=server.url)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, step + 1))


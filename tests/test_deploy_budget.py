"""The deployment measurement within a budget: latency timed for at most deploy.time_limit_s, on
deploy.batch_size test images, or not at all (deploy.measure=false: MACs and the checkpoint still)."""

from __future__ import annotations

import re
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from harness import runner
from harness.errors import ConfigError
from harness.export import compare_latency_within, count_macs, deployment_report

from .conftest import FAST, compose_config

LATENCY = ("latency/dense_ms", "latency/pruned_ms", "speedup")
REST = ("size/dense_bytes", "size/compressed_bytes", "macs/dense", "macs/nonzero")


def _convs(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.ReLU())
                           for i in range(3)])


def test_the_timing_stops_when_the_next_round_would_not_fit():
    dense, pruned = _convs(48), _convs(32)
    x = torch.randn(8, 3, 48, 48)
    limit = 0.4
    start = time.perf_counter()
    timed = compare_latency_within(dense, pruned, x, limit, max_rounds=1000, warmup=3, threads=1)
    wall = time.perf_counter() - start
    one_round = (timed.a_ms + timed.b_ms) / 1e3
    assert 0.005 < one_round < limit / 3  # the models are big enough to be stopped by the budget
    assert 1 <= timed.rounds < 1000
    assert timed.seconds <= wall
    assert wall <= limit + 2 * one_round + 0.05  # the limit plus one round (and timer noise)
    assert timed.seconds >= limit - 2 * one_round  # and the budget is used, not left idle
    assert timed.a_ms > 0 and timed.b_ms > 0


def test_a_model_slower_than_the_budget_is_timed_once():
    slow, fast = _convs(48), _convs(8)
    timed = compare_latency_within(slow, fast, torch.randn(8, 3, 48, 48), 1e-4, threads=1)
    assert timed.rounds == 1
    assert timed.a_ms > timed.b_ms > 0


def test_few_rounds_on_a_fast_model_stop_at_max_rounds():
    model = nn.Linear(8, 4)
    timed = compare_latency_within(model, model, torch.randn(2, 8), 10.0, max_rounds=5, threads=1)
    assert timed.rounds == 5 and timed.seconds < 10.0


def test_a_batch_too_slow_for_the_budget_is_timed_and_counted_on_its_first_images(tmp_path):
    dense, pruned = _convs(48), _convs(32)
    images = torch.randn(64, 3, 48, 48)  # milliseconds per image: 64 of them would take a 0.3 s budget's round
    report = deployment_report(dense, pruned, images, tmp_path / "compressed.pt", channels=False, time_limit_s=0.3)
    timed = int(report.metrics["deploy/batch_size"])
    assert 1 <= timed < 64
    assert any(f"a round on 64 images would not fit in deploy.time_limit_s=0.3; timed on the first {timed}" in note
               for note in report.notes), report.notes
    assert report.metrics["macs/dense"] == count_macs(pruned, images[:timed])[0]  # counted on what was timed
    assert report.metrics["deploy/timing_s"] < 0.3 + 0.3 and report.metrics["deploy/rounds"] >= 1
    assert f"deploy (batch of {timed} test images)" in report.describe()


@pytest.mark.parametrize(("override", "message"), [
    ("deploy.time_limit_s=0", "deploy.time_limit_s=0.0: must be > 0"),
    ("deploy.batch_size=0", "deploy.batch_size=0: must be >= 1"),
])
def test_deploy_values_are_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config([override])


@pytest.mark.slow
def test_a_run_says_what_was_timed_and_on_what_batch(tmp_path, capsys):
    cfg = compose_config([*FAST, f"outputs_dir={tmp_path}", "tracking=none", "deploy.time_limit_s=2",
                          "deploy.batch_size=100"])
    metrics = runner.run(cfg, tmp_path / "run").metrics
    for key in LATENCY + REST:
        assert metrics[key] > 0, key
    assert metrics["deploy/batch_size"] == 100  # across the test split's batches when needed
    assert 1 <= metrics["deploy/rounds"] <= 15
    assert metrics["deploy/timing_s"] < 2 + 0.5  # a round of the digits CNN takes milliseconds
    out = capsys.readouterr().out
    assert "deploy (batch of 100 test images): " in out and f"median of {int(metrics['deploy/rounds'])} rounds" in out
    assert not (tmp_path / "run" / "mlflow_model").exists()  # tracking=none: nothing extra written


@pytest.mark.slow
def test_measure_false_skips_the_timing_and_keeps_the_rest(tmp_path, capsys):
    cfg = compose_config([*FAST, f"outputs_dir={tmp_path}", "deploy.measure=false", "deploy.batch_size=32",
                          "tracking.log_model=false"])
    result = runner.run(cfg, tmp_path / "run")
    logged = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id).data
    for key in (*LATENCY, "deploy/timing_s"):
        assert key not in result.metrics and key not in logged.metrics, key
    for key in REST:
        assert logged.metrics[key] == result.metrics[key] > 0, key
    assert logged.metrics["deploy/rounds"] == 0 and logged.metrics["deploy/batch_size"] == 32
    assert logged.params["deploy.measure"] == "False" and logged.params["deploy.time_limit_s"] == "10.0"
    assert (tmp_path / "run" / "pruned_model.compressed.pt").exists()
    assert "deploy (batch of 32 test images): latency not measured (deploy.measure=false)" in capsys.readouterr().out

"""What a run shows: sensitivity analysis and per-layer budgets through the config, the deployment
numbers and the one-page summary of every run, and --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from harness import runner

from .conftest import FAST, REPO, compose_config


def run(tmp_path, overrides):
    cfg = compose_config([*FAST, f"outputs_dir={tmp_path}", *overrides])
    return runner.run(cfg, tmp_path / "run")


def test_sensitivity_analysis_is_cached_and_logged(tmp_path):
    result = run(tmp_path, ["analyze=sensitivity", "analyze.sparsities=[0.5,0.9]"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    names = {"features.0.weight", "features.2.weight", "classifier.1.weight", "classifier.3.weight"}
    assert {f"sensitivity/{n}" for n in names} <= set(logged.data.metrics)
    assert {"sensitivity.csv", "sensitivity.png"} <= {a.path for a in client.list_artifacts(result.run_id)}
    rows = (tmp_path / "run" / "sensitivity.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2  # header, then each tensor at each sparsity
    cached = list((tmp_path / "sensitivity").glob("*.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run(tmp_path, ["analyze=sensitivity", "analyze.sparsities=[0.5,0.9]", "tracking=none"])
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not measured again


def test_sensitivity_allocation_meets_the_overall_target_with_per_tensor_budgets(tmp_path):
    result = run(tmp_path, ["prune.allocation=sensitivity", "prune.target_sparsity=0.9",
                            "analyze.sparsities=[0.5,0.8,0.9,0.95]"])
    assert result.metrics["final/sparsity"] == pytest.approx(0.9, abs=0.002)
    params = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id).data.params
    budgets = {k.removeprefix("budget."): float(v) for k, v in params.items() if k.startswith("budget.")}
    assert len(budgets) == 4 and len(set(budgets.values())) > 1  # not uniform
    rows = {r.split(",")[0]: float(r.split(",")[-1]) for r in
            (tmp_path / "run" / "sparsity_report.csv").read_text().splitlines()[1:-1]}
    for name, target in budgets.items():
        assert rows[name] == pytest.approx(target, abs=0.01)


def test_allocation_conflicts_are_config_errors():
    with pytest.raises(Exception, match=r"prune\.allocation=sensitivity: gives each tensor its own pruner"):
        compose_config(["prune.allocation=sensitivity", "prune.scope=global"])


def test_every_run_reports_latency_size_macs_and_a_one_page_summary(tmp_path):
    result = run(tmp_path, ["prune=channel", "tracking=none"])
    metrics = result.metrics
    for key in ("latency/dense_ms", "latency/pruned_ms", "speedup", "size/dense_bytes", "size/compressed_bytes",
                "macs/dense", "macs/nonzero"):
        assert metrics[key] > 0, key
    assert metrics["macs/nonzero"] < metrics["macs/dense"]
    assert metrics["size/compressed_bytes"] < metrics["size/dense_bytes"]
    page = (tmp_path / "run" / "summary.html").read_text()
    assert "Sparsity per tensor" in page and "features.2.weight" in page and "data:image/png;base64," in page
    assert "goal MET" in page or "goal MISSED" in page
    assert (tmp_path / "run" / "pruned_model.compressed.pt").exists()


def test_help_lists_the_config_groups_and_their_options():
    out = subprocess.run([sys.executable, "-m", "harness", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120).stdout
    assert "prune: block, channel, magnitude, nm, none" in out
    assert "analyze: none, sensitivity" in out and "sweep: lightning_optuna, max_sparsity, pareto" in out
    assert "python -m harness prune=nm prune.n=2 prune.m=4" in out

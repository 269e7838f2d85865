"""One run end to end: the command line, the MLflow contract read back, the baseline cache."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import runner, tracking
from harness.baseline import baseline_key, load_or_train
from harness.errors import RunStopped
from harness.tracking import NOTE_TAG, MlflowTracker

from .conftest import FAST, compose_config, run_cli

PRUNED = ["features.0.weight", "features.2.weight", "classifier.1.weight", "classifier.3.weight"]


@pytest.mark.slow
def test_run_prunes_to_target_and_logs_the_mlflow_contract(tmp_path):
    result = run_cli(["prune.target_sparsity=0.9", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "dense" in out and "pruned" in out and "val" in out and "test" in out
    assert "goal MET" in out or "goal MISSED" in out
    assert "trained and cached" in out

    # Sparsity counted as exact zeros in the saved model: 90% +/- 0.5 pp per tensor.
    state = torch.load(tmp_path / "run" / "pruned_model.pt", weights_only=True)
    for name in PRUNED:
        sparsity = (state[name] == 0).float().mean().item()
        assert sparsity == pytest.approx(0.9, abs=0.005), name

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruning")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in out

    steps_per_epoch = 20  # 1257 training digits / batch 64
    for name in PRUNED:
        history = client.get_metric_history(run.info.run_id, f"sparsity/{name}")
        assert [m.step for m in history] == [0, 10, 20, 30, 40]  # two updates per epoch, epochs 0..2
        assert history[-1].value == pytest.approx(0.9, abs=0.005)
    for key in ("sparsity/overall", "sparsity/target"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 5
    val = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in val] == [steps_per_epoch * e for e in (1, 2, 3)]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3 * steps_per_epoch

    metrics = run.data.metrics
    for key in ("baseline/accuracy", "final/accuracy", "final/sparsity", "baseline/test_accuracy",
                "final/test_accuracy", "goal/met", "goal/accuracy_drop"):
        assert key in metrics, key
    assert metrics["final/sparsity"] == pytest.approx(0.9, abs=0.005)
    assert metrics["goal/met"] in (0.0, 1.0)
    assert (metrics["goal/met"] == 1.0) == ("goal MET" in out)
    assert run.data.params["prune.target_sparsity"] == "0.9"
    assert run.data.params["dataset.name"] == "digits"
    assert run.data.params["train.optimizer"] == "sgd"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "sparsity_report.csv", "pruned_model.pt"} <= artifacts
    report = client.download_artifacts(run.info.run_id, "sparsity_report.csv", str(tmp_path))
    with open(report) as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    assert [r["tensor"] for r in rows[:-1]] == PRUNED
    assert all(float(r["sparsity"]) == pytest.approx(0.9, abs=0.005) for r in rows)

    # The same command again reuses the dense baseline: no dense epoch runs.
    again = run_cli(["prune.target_sparsity=0.9", *FAST], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused from cache, no dense epochs run" in again.stdout
    assert "dense epoch 1/" not in again.stdout + again.stderr
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_baseline_cache_hit_and_miss(tmp_path):
    cfg = compose_config(FAST)
    calls = []

    def train(model, _checkpoint):
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(len(calls))
        return 0.5, 0.4

    model = torch.nn.Linear(3, 2)
    first = load_or_train(cfg, model, train, tmp_path)
    assert not first.reused and calls == [1]
    model2 = torch.nn.Linear(3, 2)
    second = load_or_train(cfg, model2, train, tmp_path)
    assert second.reused and calls == [1]
    assert torch.equal(model2.weight, torch.ones(2, 3))
    assert (second.val_accuracy, second.test_accuracy) == (0.5, 0.4)

    changed = compose_config([*FAST, "train.lr=0.04"])
    third = load_or_train(changed, torch.nn.Linear(3, 2), train, tmp_path)
    assert not third.reused and calls == [1, 1]


@pytest.mark.parametrize(("override", "same"), [
    ("prune.target_sparsity=0.5", True),
    ("train.finetune_epochs=9", True),
    ("train.finetune_lr=0.001", True),
    ("train.finetune_steps_per_epoch=3", True),
    ("train.distill_weight=0.5", True),
    ("train.distill_temperature=2", True),
    ("goal.max_drop=0.05", True),
    ("tracking=none", True),
    ("train.epochs=3", False),
    ("train.lr=0.01", False),
    ("train.batch_size=32", False),
    ("seed=1", False),
    ("model=mlp", False),
    ("dataset.val_fraction=0.2", False),
])
def test_baseline_key_covers_what_determines_the_dense_weights(override, same):
    assert (baseline_key(compose_config([override])) == baseline_key(compose_config())) == same


def test_fine_tuning_epochs_can_be_capped_at_a_number_of_steps(tmp_path):
    # LPOT's `iteration` (batches per epoch) is train.finetune_steps_per_epoch: the schedule counts those steps.
    result = run_cli(["prune.target_sparsity=0.8", "train.finetune_steps_per_epoch=4", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 13))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [4, 8, 12]
    # two updates per epoch of 4 steps, epochs 0..2, and the target reached
    sparsity = client.get_metric_history(run.info.run_id, "sparsity/overall")
    assert [m.step for m in sparsity] == [0, 2, 4, 6, 8] and sparsity[-1].value == pytest.approx(0.8, abs=0.005)


def test_dense_only_run_without_tracking(tmp_path):
    cfg = compose_config(["prune=none", "tracking=none", "train.epochs=1", f"outputs_dir={tmp_path}"])
    result = runner.run(cfg, tmp_path / "run")
    assert result.verdict is None and result.run_id is None
    assert result.metrics["final/accuracy"] == result.metrics["baseline/accuracy"]
    assert result.metrics["final/sparsity"] < 0.01
    assert not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "run" / "sparsity_report.csv").exists()


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                               (RunStopped("pruned by the study's pruner after epoch 2"), "KILLED")])
def test_a_run_that_ends_by_an_exception_is_never_left_running(tmp_path, sqlite_uri, error, status):
    tracker = MlflowTracker(sqlite_uri, "pruning")
    with pytest.raises(type(error)), tracking.finished_or_failed(tracker):
        tracker.log_metrics({"train/loss": 1.0}, 1)
        raise error
    run = MlflowClient(tracking_uri=sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.metrics["train/loss"] == 1.0  # buffered metrics were not lost
    if status == "FAILED":
        assert run.data.tags["error"] == "RuntimeError: boom"
        assert run.data.tags[NOTE_TAG] == "**Failed**: RuntimeError: boom"  # the run page's description says why
    if isinstance(error, RunStopped):
        assert run.data.tags[NOTE_TAG] == "**Stopped** before its end: pruned by the study's pruner after epoch 2"

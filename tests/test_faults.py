"""Training faults and determinism: a diverging loss stops the run cleanly; the same config and seed
give identical masks and accuracy; several sweep workers share the SQLite stores."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import runner
from harness.training import Diverged

from .conftest import FAST, compose_config


def test_a_diverging_loss_stops_the_run_with_a_clear_message(tmp_path):
    cfg = compose_config([*FAST, "train.finetune_lr=1e30", "train.momentum=0", f"outputs_dir={tmp_path}"])
    with pytest.raises(Diverged) as err:
        runner.run(cfg, tmp_path / "run")
    assert "train/loss=" in str(err.value) and "lower the learning rate (1e+30)" in str(err.value)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("Diverged: train/loss=")


def test_same_config_and_seed_give_identical_masks_and_accuracy(tmp_path):
    results = []
    for i in range(2):
        cfg = compose_config([*FAST, "tracking=none", "prune.criterion=taylor", f"outputs_dir={tmp_path / str(i)}"])
        result = runner.run(cfg, tmp_path / str(i) / "run")
        state = torch.load(tmp_path / str(i) / "run" / "pruned_model.pt", weights_only=True)
        results.append((result.metrics, state))
    (metrics_a, state_a), (metrics_b, state_b) = results

    def measured(metrics):  # all but the wall-clock timings
        return {k: v for k, v in metrics.items() if not k.startswith("latency/") and k not in ("speedup",
                                                                                               "deploy/timing_s")}

    assert measured(metrics_a) == measured(metrics_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)

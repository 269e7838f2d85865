"""The pruned model as an MLflow model: logged (artifact `model`, with a signature and an input
example), registered with tracking.register_as, and loaded back with the same outputs and exact zeros."""

from __future__ import annotations

import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import runner
from harness.errors import ConfigError
from harness.experiment import prepare

from .conftest import FAST, compose_config


@pytest.mark.slow
def test_the_pruned_model_is_registered_and_loads_with_the_same_outputs_and_zeros(tmp_path, monkeypatch, capsys):
    cfg = compose_config([*FAST, f"outputs_dir={tmp_path}", "tracking.register_as=digits-pruned"])
    result = runner.run(cfg, tmp_path / "run")
    assert "registered as models:/digits-pruned/1" in capsys.readouterr().out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)

    loaded = mlflow.pytorch.load_model("models:/digits-pruned/1").eval()
    exp = prepare(cfg)  # a fresh model of the same config, with the pruned weights put in
    fresh = exp.model.eval()
    fresh.load_state_dict(torch.load(tmp_path / "run" / "pruned_model.pt", weights_only=True))
    images = next(iter(exp.data.test))[0]
    with torch.no_grad():
        assert torch.equal(loaded(images), fresh(images))
    weights = dict(loaded.named_parameters())
    assert weights.keys() == dict(fresh.named_parameters()).keys()
    for name, param in fresh.named_parameters():
        assert torch.equal(weights[name] == 0, param == 0), name
    assert (weights["features.2.weight"] == 0).float().mean().item() == pytest.approx(0.8, abs=0.005)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("digits-pruned", "1")
    assert version.run_id == result.run_id
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"model", "pruned_model.compressed.pt", "pruned_model.pt"} <= artifacts  # the checkpoint beside it
    model_files = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert {"model/MLmodel", "model/input_example.json"} <= model_files
    info = mlflow.models.get_model_info(f"runs:/{result.run_id}/model")
    assert info.signature is not None and info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"][0] == -1
    run = client.get_run(result.run_id)
    assert run.data.tags["harness.registered_model"] == "models:/digits-pruned/1"
    assert run.data.tags["harness.model"] == "model"
    assert run.info.status == "FINISHED"


def test_registering_needs_the_model_logged():
    with pytest.raises(ConfigError, match=r"tracking\.register_as=x: needs tracking\.log_model=true \(or unset\)"):
        compose_config(["tracking.register_as=x", "tracking.log_model=false"])

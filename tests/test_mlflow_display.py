"""What a user sees in MLflow: the experiment opens in MLflow 3's "Model training" view, runs have readable
names, colours and a description with the verdict and the per-tensor sparsity, and a sweep's run reads like
its best trial, links to it and carries an interactive accuracy-against-sparsity page."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from harness.experiment import describe_run, run_name, run_tags
from harness.goal import judge
from harness.mlflow_writer import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from harness.pruning.counting import TensorSparsity
from harness.tracking import NOTE_TAG, RUN_COLOR_TAG, SWEEP_COLOR, MlflowTracker

from .conftest import FAST, compose_config, run_cli
from .test_sweep import QUICK, load, mlflow_runs, run_sweep

KIND_VIEW = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}


def test_run_names_put_the_telling_fields_first():
    assert run_name(compose_config(["prune.scope=global", "prune.target_sparsity=0.9"])) == \
        "global-magnitude-0.9-digits_cnn-digits"
    assert run_name(compose_config(["prune=none"])) == "dense-digits_cnn-digits"
    trial = ["sweep_trial.study=s", "sweep_trial.storage=sqlite:///x.db", "sweep_trial.number=3"]
    cfg = compose_config([*trial, "prune.scope=global", "prune.target_sparsity=0.95"])
    assert run_name(cfg) == "t03-global-magnitude-0.95"
    assert run_tags(cfg)[RUN_COLOR_TAG].startswith("#") and run_tags(cfg)[RUN_COLOR_TAG] != SWEEP_COLOR
    confirmation = compose_config([*trial, "sweep_trial.confirmation_seed=2"])
    assert run_name(confirmation) == "t03-confirm-s2"
    assert run_tags(confirmation)[RUN_COLOR_TAG] == run_tags(cfg)[RUN_COLOR_TAG]  # a trial's runs: one colour
    assert RUN_COLOR_TAG not in run_tags(compose_config([]))


def test_the_writer_marks_new_and_existing_experiments_as_model_training(sqlite_uri):
    client = MlflowClient(tracking_uri=sqlite_uri)
    client.create_experiment("older")  # made before: no kind
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("fresh", "older", "chosen"):
        tracker = MlflowTracker(sqlite_uri, name, run_name="r")
        tracker.finish()
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)
             for name in ("fresh", "older", "chosen")}
    assert kinds == {"fresh": EXPERIMENT_KIND, "older": EXPERIMENT_KIND, "chosen": "genai_development"}


def test_describe_run_writes_the_verdict_metrics_and_tensor_table(sqlite_uri):
    cfg = compose_config(["sweep_trial.study=s", "sweep_trial.storage=sqlite:///x.db", "sweep_trial.number=4",
                          "sweep_trial.parent_run_id=abc123", "prune.target_sparsity=0.9"])
    metrics = {"final/sparsity": 0.9, "final/accuracy": 0.95, "final/test_accuracy": 0.94,
               "baseline/accuracy": 0.97, "baseline/test_accuracy": 0.96}
    verdict = judge(cfg.goal, 0.97, 0.95)
    rows = [TensorSparsity("conv1.weight", (16, 1, 3, 3), 144, 130), TensorSparsity("fc.weight", (10, 64), 640, 576)]
    tracker = MlflowTracker(sqlite_uri, "pruning", run_name=run_name(cfg))
    text = describe_run(tracker, cfg, metrics, verdict, rows, picture="curves.png")
    tracker.finish()
    run = MlflowClient(tracking_uri=sqlite_uri).get_run(tracker.run_id)
    assert run.data.tags[NOTE_TAG] == text
    assert "**Goal MISSED** (judged on val)" in text and "allowed 1.00%" in text
    assert "| final | 0.9000 | 0.9500 | 0.9400 |" in text
    assert "| `conv1.weight` | 16x1x3x3 | 0.9028 |" in text and "| `fc.weight` | 10x64 | 0.9000 |" in text
    assert f"(#/experiments/{tracker.experiment_id}/runs/abc123?workflowType=machine_learning)" in text
    assert "trial 4" in text
    # The per-layer picture right under the verdict: the top of the run's page in the MLflow UI.
    first_lines = text.splitlines()[:3]
    assert f"(get-artifact?path=curves.png&run_uuid={tracker.run_id})" in first_lines[2], first_lines
    assert "get-artifact" not in describe_run(tracker, cfg, metrics, verdict, rows)  # no picture, no image


@pytest.mark.slow
def test_a_run_reads_in_mlflow_with_a_name_kind_and_description(tmp_path):
    result = run_cli([*FAST, "prune.scope=global", "prune.target_sparsity=0.7"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruning")
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "global-magnitude-0.7-digits_cnn-digits"
    note = run.data.tags[NOTE_TAG]  # set by the runner's publish (harness.experiment.describe_run)
    verdict = "MET" if run.data.metrics["goal/met"] else "MISSED"
    assert f"**Goal {verdict}** (judged on val)" in note
    assert f"| final | {run.data.metrics['final/sparsity']:.4f} |" in note
    assert "| tensor | shape | sparsity |" in note and "| `classifier.3.weight` | 10x128 |" in note
    assert f"(get-artifact?path=curves.png&run_uuid={run.info.run_id})" in note
    assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_a_sweep_reads_in_mlflow_like_its_best_trial(tmp_path):
    result = run_sweep([*QUICK, "hydra.sweeper.n_trials=2", "prune.scope=global"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path)
    best = study.best_trial
    runs = mlflow_runs(tmp_path)
    parent = next(r for r in runs if r.data.tags.get("harness.sweep") == "parent")
    trials = {int(r.data.tags["optuna.trial_number"]): r for r in runs if r.data.tags.get("harness.sweep") == "trial"}
    for number, run in trials.items():
        target = study.trials[number].params["prune.target_sparsity"]
        # the best is told apart in the runs list by its name
        suffix = " (best)" if number == best.number else ""
        assert run.info.run_name == f"t{number:02d}-global-magnitude-{target:.4g}{suffix}"
        assert run.data.tags[RUN_COLOR_TAG] != SWEEP_COLOR
    assert parent.info.run_name == "sweep-quick" and parent.data.tags[RUN_COLOR_TAG] == SWEEP_COLOR

    best_run = trials[best.number]
    for name in ("final/sparsity", "final/accuracy", "final/test_accuracy", "goal/met"):
        assert parent.data.metrics[name] == best_run.data.metrics[name]
        assert parent.data.metrics[f"best/{name}"] == best_run.data.metrics[name]
    assert parent.data.tags["best.run_id"] == best_run.info.run_id
    assert {n: r.data.tags.get("harness.best") for n, r in trials.items()} == \
        {n: ("true" if n == best.number else None) for n in trials}
    note = parent.data.tags[NOTE_TAG]
    page = f"#/experiments/{parent.info.experiment_id}/runs/{best_run.info.run_id}?workflowType=machine_learning"
    assert f"[t{best.number:02d}]({page})" in note
    assert "accuracy_vs_sparsity.html" in note

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "accuracy_vs_sparsity.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    page = (tmp_path / "sweep" / "accuracy_vs_sparsity.html").read_text()
    assert "<svg" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for number in trials:
        assert f"trial {number} (t{number:02d})" in page
    assert "reproduce: python -m harness" in page and "accuracy goal" in page


def test_the_best_trial_is_marked_by_name_and_tag_and_a_former_best_loses_both(sqlite_uri, tmp_path):
    parent = MlflowTracker(sqlite_uri, "pruning", run_name="sweep-s", spool_dir=tmp_path)
    children = {}
    for name in ("t00-global-magnitude-0.9", "t01-global-magnitude-0.95"):
        child = MlflowTracker(sqlite_uri, "pruning", run_name=name, tags={"mlflow.parentRunId": parent.run_id},
                              spool_dir=tmp_path)
        child.finish()
        children[name] = child.run_id
    client = MlflowClient(tracking_uri=sqlite_uri)

    def marks() -> dict[str, tuple[str, str | None]]:
        return {run_id: (client.get_run(run_id).info.run_name, client.get_run(run_id).data.tags.get("harness.best"))
                for run_id in children.values()}

    first, second = children.values()
    assert parent.mark_best([first])
    assert marks() == {first: ("t00-global-magnitude-0.9 (best)", "true"),
                       second: ("t01-global-magnitude-0.95", None)}
    assert parent.mark_best([second])  # a resumed sweep found a better one
    assert marks() == {first: ("t00-global-magnitude-0.9", "false"),
                       second: ("t01-global-magnitude-0.95 (best)", "true")}
    assert parent.mark_best([second])  # the same answer again: nothing doubles
    assert marks()[second] == ("t01-global-magnitude-0.95 (best)", "true")
    parent.finish()

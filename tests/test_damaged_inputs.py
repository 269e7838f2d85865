"""Faults, round two, table-driven like tests/test_bad_input.py: keys typed but unknown (with ``+``),
a device that is not here, and damaged or foreign stores each end with one line naming the cause,
exit status 2, no traceback, no MLflow run left RUNNING, and the user's files untouched. Damaged
cache entries (a dense baseline, a sensitivity table) are set aside and rebuilt, never trusted; an
interrupted dense baseline resumes to the same weights."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import runner
from harness.baseline import baseline_key

from .conftest import FAST, compose_config, run_cli
from .test_bad_input import invoke
from .test_interrupts import start, wait_for


def _garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SQLite format 2\x00" + bytes(range(256)) * 20)  # not a database


def _foreign_db(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")


def _mlflow_store(path: Path) -> None:
    """A real MLflow store, as a foreign file for Optuna."""
    path.parent.mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()


SWEEP = ["--multirun", "+sweep=max_sparsity", "hydra.sweeper.n_trials=1"]

# (arguments, {file under tmp: how to damage it}, text the one line must contain); {tmp} is the test's folder.
CASES = [
    (["+nosuch=1"], {}, "nosuch: unknown key; allowed: analyze, dataset"),
    (["+prune.targt_sparsity=0.9"], {}, "prune.targt_sparsity: unknown key; closest: target_sparsity"),
    (["+train.lr_shedule=step"], {}, "train.lr_shedule: unknown key; closest: lr_schedule"),
    (["++goal.maxdrop=0.02"], {}, "goal.maxdrop: unknown key; closest: max_drop"),
    (["+train.extra.depth=2"], {}, "train.extra: unknown key"),
    (["+prune.pruners=[{names:[features.0.weight],target:0.5}]"], {}, "target: unknown key"),
    (["train.device=cuda"], {}, "train.device=cuda: no CUDA device here; use train.device=cpu or auto"),
    (["train.device=cuda:3"], {}, "train.device=cuda:3: no CUDA device here"),
    ([], {"outputs/mlflow.db": _garbage}, "tracking.uri=sqlite:///{tmp}/outputs/mlflow.db: {tmp}/outputs/mlflow.db "
                                          "is not a readable MLflow store"),
    ([], {"outputs/mlflow.db": _foreign_db}, "is a database, but not an MLflow store (it holds invoices); "
                                             "move it aside (the harness never deletes a store)"),
    (["tracking.uri=sqlite:///{tmp}/mine.db"], {"mine.db": _garbage}, "tracking.uri=sqlite:///{tmp}/mine.db: "
                                                                    "{tmp}/mine.db is not a readable MLflow store"),
    ([*SWEEP], {"outputs/optuna.db": _garbage}, "hydra.sweeper.storage=sqlite:///{tmp}/outputs/optuna.db: "
                                                "{tmp}/outputs/optuna.db is not a readable Optuna store"),
    ([*SWEEP, "hydra.sweeper.storage=sqlite:///{tmp}/runs.db"], {"runs.db": _mlflow_store},
     "{tmp}/runs.db is a database, but not an Optuna store"),
    ([*SWEEP, "hydra.sweeper.storage=postgresql://nobody@127.0.0.1:9/nothing"], {},
     "hydra.sweeper.storage=postgresql://nobody@127.0.0.1:9/nothing: "),
    ([*SWEEP, "hydra.sweeper.storage=postgresql+psycopg2://nobody:secret@127.0.0.1:9/nothing"], {},
     "hydra.sweeper.storage=postgresql+psycopg2://nobody:***@127.0.0.1:9/nothing: cannot open the Optuna storage"),
]


@pytest.mark.parametrize(("args", "damage", "expected"), CASES,
                         ids=[" ".join(a) + " " + " ".join(d) for a, d, _ in CASES])
def test_damaged_or_unknown_input_is_one_line_exit_2_and_loses_nothing(tmp_path, monkeypatch, args, damage,
                                                                         expected):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for name, make in damage.items():
        make(tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in damage}
    outputs = tmp_path / "outputs"
    code, stderr = invoke([a.replace("{tmp}", str(tmp_path)) for a in args], outputs, monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected.format(tmp=tmp_path) in lines[0]
    assert {name: (tmp_path / name).read_bytes() for name in damage} == before  # never changed, never deleted
    store = outputs / "mlflow.db"
    if store.exists() and "outputs/mlflow.db" not in damage:
        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not [r for r in client.search_runs(experiments) if r.info.status == "RUNNING"]


def test_the_second_corpus_is_large():
    assert len(CASES) >= 12


def _run(tmp_path: Path, *overrides: str):
    cfg = compose_config([*FAST, "tracking=none", f"outputs_dir={tmp_path / 'outputs'}", *overrides])
    return cfg, runner.run(cfg, tmp_path / "run")


@pytest.mark.parametrize("damaged", ["model.pt", "meta.json"])
def test_a_damaged_dense_baseline_is_set_aside_and_trained_again(tmp_path, caplog, damaged):
    cfg, first = _run(tmp_path)
    folder = tmp_path / "outputs" / "baselines" / baseline_key(cfg)
    weights = torch.load(folder / "model.pt", weights_only=True)
    original = (folder / damaged).read_bytes()
    # One flipped byte in the middle: the file still loads as far as torch or json can tell, or not at all.
    middle = len(original) // 2
    (folder / damaged).write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1:])

    _, second = _run(tmp_path)
    aside = list(folder.glob(f"{damaged}.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() != original  # kept, as it was found
    assert "is damaged" in caplog.text and "set aside" in caplog.text
    retrained = torch.load(folder / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], retrained[k]) for k in weights)  # trained again, to the same weights
    assert second.metrics["baseline/accuracy"] == first.metrics["baseline/accuracy"]
    assert second.metrics["final/accuracy"] == first.metrics["final/accuracy"]


def test_a_damaged_sensitivity_table_is_set_aside_and_measured_again(tmp_path, caplog):
    args = ("analyze=sensitivity", "analyze.sparsities=[0.5,0.9]")
    _run(tmp_path, *args)
    (cached,) = (tmp_path / "outputs" / "sensitivity").glob("*.json")
    table = cached.read_text()
    cached.write_text(table[: len(table) // 2])  # cut short, as by a full disk
    _run(tmp_path, *args)
    assert cached.read_text() == table  # measured again, to the same table
    assert len(list(cached.parent.glob(f"{cached.name}.damaged-*"))) == 1
    assert "is damaged" in caplog.text


@pytest.mark.slow
def test_an_interrupted_dense_baseline_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    args = ["train.epochs=12", "train.finetune_epochs=2", "prune.end_epoch=1", "tracking=none"]
    reference = run_cli(args, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-2000:]
    (ref_folder,) = (tmp_path / "ref" / "baselines").iterdir()

    outputs = tmp_path / "out"
    process = start(args, outputs, outputs / "run")
    wait_for(process, "dense epoch 3/12")
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT.value, rest
    assert "Traceback" not in rest
    (folder,) = (outputs / "baselines").iterdir()
    assert f"the dense baseline's training was saved in {folder / 'interrupted.pt'}" in rest
    assert (folder / "interrupted.pt").exists() and not (folder / "model.pt").exists()

    resumed = run_cli(args, outputs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert "dense epoch 1/12" not in resumed.stderr + resumed.stdout  # no epoch trained twice
    assert not (folder / "interrupted.pt").exists()
    expected = torch.load(ref_folder / "model.pt", weights_only=True)
    got = torch.load(folder / "model.pt", weights_only=True)
    assert all(torch.equal(expected[k], got[k]) for k in expected)

"""Bad input, table-driven: each case ends with one line naming the key, the bad value and what is
allowed, exit status 2, no traceback, and no MLflow run left RUNNING.

The cases run the real entry point (``harness.__main__.main``) in this process, with the real
config files, data files and stores, so the whole corpus stays fast."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from harness.__main__ import main
from harness.models import DigitsCNN


def invoke(args: list[str], outputs: Path, monkeypatch) -> tuple[int, str]:
    GlobalHydra.instance().clear()
    defaults = [f"outputs_dir={outputs}", f"hydra.run.dir={outputs}/run", f"hydra.sweep.dir={outputs}/sweep"]
    given = {a.split("=", 1)[0] for a in args}
    monkeypatch.setattr(sys, "argv", ["harness", *args, *(d for d in defaults if d.split("=", 1)[0] not in given)])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, stderr.getvalue()


def files(tmp: Path) -> dict[str, str]:
    """Data and checkpoint files the cases point at, made on disk."""
    empty = tmp / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    corrupt = tmp / "corrupt"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = corrupt / split / cls
            folder.mkdir(parents=True)
            (folder / "0.png").write_bytes(b"not a png at all")
    bad_ckpt = tmp / "bad.pt"
    bad_ckpt.write_bytes(b"\x00garbage")
    wrong = DigitsCNN(num_classes=3).state_dict()
    torch.save(wrong, tmp / "wrong_shapes.pt")
    (tmp / "afile").write_text("x")
    (tmp / "typo.yaml").write_text("pruning:\n  approach:\n    weight_compression:\n      target_sparsty: 0.5\n")
    (tmp / "tag.yaml").write_text("pruning:\n  approach:\n    weight_compression:\n      pruners:\n"
                                  "        - !Prunr\n            names: [classifier.1.weight]\n")
    return {"empty": str(empty), "corrupt": str(corrupt), "bad_ckpt": str(bad_ckpt),
            "wrong_ckpt": str(tmp / "wrong_shapes.pt"), "afile": str(tmp / "afile"),
            "typo": str(tmp / "typo.yaml"), "tag": str(tmp / "tag.yaml")}


# (arguments, text the one line must contain); {name} is filled from files().
CASES = [
    (["dataset=nosuch"], "dataset=nosuch: no such option; choose one of cifar10, digits, fake, imagefolder"),
    (["model=nosuch"], "model=nosuch: no such option; choose one of digits_cnn, mlp, torchvision"),
    (["prune=nosuch"], "prune=nosuch: no such option"),
    (["prune.foo=1"], "prune.foo: unknown key"),
    (["train.lr_shedule=step"], "closest: lr_schedule"),
    (["seeed=3"], "seeed: unknown key"),
    (["prune.start_epoch=abc"], "prune.start_epoch=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["train.batch_size=1.5"], "train.batch_size=1.5"),
    (["train.optimizer=sgdd"], "expected one of [sgd, adam, adamw]"),
    (["prune.target_sparsity=1.5"], "prune.target_sparsity=1.5: must be in [0, 1)"),
    (["prune.target_sparsity=-0.2"], "prune.target_sparsity=-0.2: must be in [0, 1)"),
    (["prune.initial_sparsity=0.5", "prune.target_sparsity=0.3"], "must be >= initial_sparsity=0.5"),
    (["prune.start_epoch=4", "prune.end_epoch=2"], "prune.end_epoch=2: must be >= start_epoch=4"),
    (["prune.end_epoch=8"], "prune.end_epoch=8: must be <= 7, the last fine-tuning epoch"),
    (["prune.update_frequency=0"], "prune.update_frequency=0.0: must be > 0"),
    (["prune.update_frequency=-1"], "prune.update_frequency=-1.0: must be > 0"),
    (["prune=nm", "prune.n=4", "prune.m=4"], "prune.n=4: N:M needs 1 <= n < m (m=4)"),
    (["prune=nm", "prune.n=6", "prune.m=4"], "prune.n=6: N:M needs 1 <= n < m"),
    (["prune.names=[classifier.1.wieght]"], "prune.names: 'classifier.1.wieght' matches no parameter of the model; "
                                             "closest: classifier.1.weight"),
    (["prune.exclude=[features.9.weight]"], "prune.exclude: 'features.9.weight' matches no parameter"),
    (["prune.names=[a"], "cannot parse override 'prune.names=[a'"),
    (["goal.max_drop=2"], "goal.max_drop=2.0: must be in [0, 1)"),
    (["train.device=tpu"], "train.device=tpu: must be one of auto, cpu, cuda, cuda:N"),
    (["model=torchvision", "model.name=resnet1000"], "model.name=resnet1000: not a torchvision classification "
                                                     "model; closest: resnet101"),
    (["dataset=imagefolder", "dataset.root=/no/such/folder"], "dataset.root=/no/such/folder: no such folder"),
    (["dataset=imagefolder", "dataset.root={empty}"], "has no image files"),
    (["dataset=imagefolder", "dataset.root={corrupt}"], "cannot decode image"),
    (["dataset=cifar10", "dataset.root={empty}"], "no CIFAR-10 batches"),
    (["dataset=cifar10"], "dataset.root"),
    (["model.checkpoint=/no/such.pt"], "model.checkpoint=/no/such.pt: no such file"),
    (["model.checkpoint={bad_ckpt}"], "not a readable PyTorch checkpoint"),
    (["model.checkpoint={wrong_ckpt}"], "classifier.3.weight has shape (3, 128), the model needs (10, 128)"),
    (["tracking.uri=http://127.0.0.1:9"], "tracking.uri=http://127.0.0.1:9: no MLflow tracking server answers"),
    (["hydra.run.dir={afile}/run"], "cannot write or read {afile}/run: Not a directory"),
    (["outputs_dir={afile}/outputs"], "outputs_dir={afile}/outputs: not a writable folder (Not a directory)"),
    (["lpot={typo}"], "target_sparsty: unknown LPOT field (did you mean target_sparsity?)"),
    (["lpot={tag}"], "YAML tag !Prunr is not LPOT's !Pruner"),
    (["lpot=/no/such.yaml"], "lpot=/no/such.yaml: no such file"),
    (["resume=/no/such/run"], "resume=/no/such/run: no checkpoint there"),
    (["--multirun", "hydra/sweeper=harness_optuna", "prune.target_sparsity=interval(0.9, 0.5)"],
     "prune.target_sparsity=interval(0.9, 0.5): interval needs low < high"),
    (["--multirun", "hydra/sweeper=harness_optuna", "prune.schedule=glob(*)"], "prune.schedule"),
    (["--multirun", "hydra/sweeper=harness_optuna", "hydra.sweeper.directions=[up]"],
     "hydra.sweeper.directions=up: must be maximize or minimize"),
]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_running(tmp_path, monkeypatch, args, expected):
    paths = files(tmp_path / "inputs")
    outputs = tmp_path / "outputs"
    args = [a.format(**paths) for a in args]
    expected = expected.format(**paths)
    code, stderr = invoke(args, outputs, monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    store = outputs / "mlflow.db"
    if store.exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not [r for r in client.search_runs(experiments) if r.info.status == "RUNNING"]


def test_the_corpus_is_large():
    assert len(CASES) >= 30

"""Config composition and validation: typed, checked before anything runs, one-line errors."""

from __future__ import annotations

import pytest

from harness.config import GoalCriterion, Optimizer
from harness.errors import user_error_message
from harness.pruning.spec import Schedule

from .conftest import compose_config, run_cli


def test_defaults_compose_into_typed_config():
    cfg = compose_config()
    assert cfg.dataset.name == "digits" and cfg.model.name == "digits_cnn"
    assert cfg.prune.enabled and cfg.prune.schedule == Schedule.cubic
    assert cfg.train.optimizer == Optimizer.sgd and cfg.goal.criterion == GoalCriterion.relative
    assert cfg.goal.max_drop == 0.01


def test_group_options_and_per_pruner_overrides_compose():
    cfg = compose_config([
        "model=torchvision", "model.name=resnet18", "dataset=fake", "prune.schedule=linear",
        "prune.pruners=[{names:[conv1.weight],target_sparsity:0.0},{names:[fc.weight]}]",
    ])
    assert cfg.model.source == "torchvision" and cfg.model.name == "resnet18"
    first, second = cfg.prune.resolve()
    assert first.target_sparsity == 0.0  # an explicit 0.0 is kept, not read as absent
    assert second.target_sparsity == cfg.prune.target_sparsity


# (overrides, text the one-line error must contain)
BAD_OVERRIDES = [
    (["prune.target_sparsity=1.5"], "prune.target_sparsity=1.5: must be in [0, 1)"),
    (["prune.target_sparsity=-0.1"], "prune.target_sparsity=-0.1: must be in [0, 1)"),
    (["prune.initial_sparsity=0.5", "prune.target_sparsity=0.3"], "must be >= initial_sparsity=0.5"),
    (["prune.start_epoch=abc"], "prune.start_epoch=abc"),
    (["prune.start_epoch=4", "prune.end_epoch=2"], "prune.end_epoch=2: must be >= start_epoch=4"),
    (["prune.end_epoch=8"], "prune.end_epoch=8: must be <= 7"),
    (["prune.update_frequency=0"], "prune.update_frequency=0.0: must be > 0"),
    (["prune.schedule=cube"], "expected one of [one_shot, linear, cubic, exponential, cosine]"),
    (["prune.foo=1"], "prune.foo: unknown key"),
    (["prune.taget_sparsity=0.5"], "closest: target_sparsity"),
    (["prune.pruners=[{names:[a],targett_sparsity:0.5}]"], "targett_sparsity: unknown key"),
    (["prune.pruners=[{names:[a],target_sparsity:2}]"], "prune.pruners[0].target_sparsity=2.0"),
    (["dataset=nosuch"], "dataset=nosuch: no such option; choose one of cifar10, digits, fake, imagefolder"),
    (["prune=nosuch"], "prune=nosuch: no such option; choose one of block, channel, magnitude, nm, none"),
    (["dataset=cifar10"], "dataset.root"),
    (["train.optimizer=sgdd"], "expected one of [sgd, adam, adamw]"),
    (["train.lr=-1"], "train.lr=-1.0: must be > 0"),
    (["train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    (["train.nesterov=true", "train.optimizer=adam"], "train.nesterov=True"),
    (["train.device=tpu"], "train.device=tpu"),
    (["goal.max_drop=2"], "goal.max_drop=2.0: must be in [0, 1)"),
    (["goal.criterion=relatve"], "expected one of [relative, absolute]"),
    (["model.name=resnet"], "model.name=resnet: must be one of digits_cnn, mlp"),
    (["seed=x"], "seed=x"),
    (["prune.names=[a"], "cannot parse override"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_gives_one_line_naming_the_key(overrides, expected):
    with pytest.raises(Exception) as err:
        compose_config(overrides)
    message = user_error_message(err.value)
    assert message is not None, f"not recognised as a user error: {err.value!r}"
    assert expected in message
    assert "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize(("override", "key"), [
    ("prune.target_sparsity=1.5", "prune.target_sparsity"),
    ("prune.start_epoch=abc", "prune.start_epoch"),
    ("dataset=nosuch", "dataset"),
    ("prune.names=[features.0.wieght]", "prune.names"),
])
def test_command_line_error_is_one_line_exit_2_and_writes_no_run(tmp_path, override, key):
    result = run_cli([override], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # rejected before any run was opened

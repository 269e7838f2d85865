"""``python -m harness lpot=conf.yaml``: the command line wins over the file, whole group choices
included; the file is read once, by the same reader as the Python API."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.config import CONF_DIR, register_configs, to_config
from harness.lpot_config import apply_lpot_file
from tests.conftest import run_cli

# LPOT 1.6's imagenet pruning example (examples/pytorch/eager/image_recognition/imagenet/cpu/prune/conf.yaml),
# its pruning and tuning parts as they are.
IMAGENET_EXAMPLE = """
model:
  name: imagenet_prune
  framework: pytorch

pruning:
  train:
    start_epoch: 0
    end_epoch: 4
    iteration: 10
    dataloader:
      batch_size: 30
      dataset:
        ImageFolder:
          root: /path/to/imagenet/train              # NOTE: modify to your training dataset location if needed
      transform:
        RandomResizedCrop:
          size: 224
        RandomHorizontalFlip: {}
        ToTensor: {}
        Normalize:
          mean: [0.485, 0.456, 0.406]
          std: [0.229, 0.224, 0.225]

    optimizer:
      SGD:
        learning_rate: 0.1
        momentum: 0.1
        nesterov: True
        weight_decay: 0.1
    criterion:
      CrossEntropyLoss:
        reduction: sum
  approach:
    weight_compression:
      initial_sparsity: 0.0
      target_sparsity: 0.97
      start_epoch: 0
      end_epoch: 4
      pruners:
        - !Pruner
            start_epoch: 1
            end_epoch: 3
            prune_type: basic_magnitude
            names: ['layer1.0.conv1.weight']

        - !Pruner
            start_epoch: 0
            end_epoch: 4
            target_sparsity: 0.6
            prune_type: basic_magnitude
            update_frequency: 2
            names: ['layer1.0.conv2.weight']

tuning:
  accuracy_criterion:
    relative: 0.01
  exit_policy:
    timeout: 0
  random_seed: 9527
"""


def merged(tmp_path: Path, overrides: list[str]):
    path = tmp_path / "conf.yaml"
    path.write_text(IMAGENET_EXAMPLE)
    overrides = [f"lpot={path}", *overrides]
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_config(apply_lpot_file(cfg, overrides))


def test_the_file_fills_what_the_command_line_leaves(tmp_path, capsys):
    cfg = merged(tmp_path, ["model=torchvision", "model.name=resnet18"])
    assert (cfg.dataset.name, cfg.dataset.root, cfg.dataset.image_size) == ("imagefolder", "/path/to/imagenet", 224)
    assert (cfg.train.batch_size, cfg.train.finetune_lr, cfg.train.momentum) == (30, 0.1, 0.1)
    assert cfg.train.finetune_epochs == 5  # 0..3, extended to the last prune end_epoch 4
    assert [p.names for p in cfg.prune.resolve()] == [["layer1.0.conv1.weight"], ["layer1.0.conv2.weight"]]
    out = capsys.readouterr().out
    assert "changed:  each update prunes exactly round(sparsity * n)" in out
    assert out.count("LPOT pruned one more") == 1


def test_a_group_chosen_on_the_command_line_replaces_the_files_whole_group(tmp_path, capsys):
    cfg = merged(tmp_path, ["dataset=fake", "model=torchvision", "model.name=resnet18", "train.finetune_epochs=5"])
    out = capsys.readouterr().out
    assert "not used: pruning.train.dataloader.dataset.ImageFolder.root: dataset=fake wins" in out
    assert "not used: pruning.train.end_epoch: train.finetune_epochs=5 wins" in out
    assert "/path/to/imagenet" not in out  # no used or changed line about the file's dataset
    assert cfg.dataset.name == "fake" and cfg.dataset.root is None
    assert (cfg.dataset.image_size, cfg.dataset.augment) == (32, False)  # conf/dataset/fake.yaml's, not the file's
    assert cfg.train.finetune_epochs == 5 and cfg.train.batch_size == 30  # the key wins; the rest of train stays

    by_name = merged(tmp_path, ["dataset.name=fake"])
    assert (by_name.dataset.name, by_name.dataset.image_size, by_name.dataset.augment) == ("fake", 32, False)

    nm = merged(tmp_path, ["prune=nm", "prune.end_epoch=3", "model=torchvision", "model.name=resnet18"])
    assert nm.prune.pattern.value == "nm" and nm.prune.pruners == []


@pytest.mark.slow
def test_an_unreadable_lpot_file_is_one_line_from_the_command_line(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("pruning:\n  magnitude:\n    prune1:\n      weights: ['fc.weight']\n  init_sparsity: 0\n")
    result = run_cli([f"lpot={old}", "tracking=none"], tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: lpot={old}: pruning.magnitude: LPOT's format before 1.4") and "is not read" in line

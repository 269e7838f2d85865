"""LPOT's Python usages on the harness: the YAML-only form on a small ImageFolder, LPOT 1.4-1.6's
hooks, the older call form, the notices of what the harness changes, and the errors that used to
mislead."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from harness.config import DatasetConfig
from harness.lpot import Pruning, common
from harness.lpot.document import read_lpot
from harness.lpot.migration import migrate
from harness.lpot.yaml_training import yaml_training
from harness.pruning import Pruning as Engine
from tests.test_lpot import CONV1, SEED_YAML, SeedNet, SeqNet, image_batches, lpot_loop, sequence_batches, zeros

CLASSES = ("cat", "dog")


def make_image_folder(root: Path, per_class: int = 12) -> Path:
    """root/train/<class>/<n>.png: small RGB images, one colour family per class."""
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            base = torch.full((20, 20, 3), 60 + 120 * c, dtype=torch.int32)
            pixels = (base + torch.randint(-40, 40, (20, 20, 3), generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy(), "RGB").save(folder / f"{i}.png")
    return root / "train"


def seed_yaml_on(folder: Path, epochs: int = 3, iteration: int = 4) -> str:
    """The seed document's YAML, pointed at ``folder``, with small images and a short run."""
    return (SEED_YAML.replace("/path/to/imagenet/train", str(folder)).replace("size: 224", "size: 16")
            .replace("batch_size: 256", "batch_size: 4").replace("end_epoch: 10", f"end_epoch: {epochs}")
            .replace("iteration: 100", f"iteration: {iteration}"))


def test_the_seed_yaml_runs_yaml_only_from_python_on_an_image_folder(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images")
    conf = tmp_path / "conf.yaml"
    conf.write_text(seed_yaml_on(folder))
    torch.manual_seed(0)
    net = SeedNet()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}

    prune = Pruning(str(conf))
    prune.model = common.Model(net)
    model = prune()

    assert model.model is net
    weight = net.layer1[0].conv1.weight
    assert zeros(weight) == round(0.97 * weight.numel())
    assert zeros(net.stem.weight) == 0 and not torch.equal(net.stem.weight, before["stem.weight"])
    # 3 epochs of at most `iteration` 4 batches (the harness's train split of the folder: 16 images of 24)
    assert prune.engine.global_step == 3 * 4
    assert 0.0 <= prune.score <= 1.0  # top-1 on the val split the command line would use
    assert CONV1 in capsys.readouterr().out


def test_the_yaml_only_form_trains_with_what_the_command_line_maps(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=4)
    conf = tmp_path / "conf.yaml"
    conf.write_text(seed_yaml_on(folder))
    doc = read_lpot(conf)
    cli = migrate(doc).values
    plan = yaml_training(doc)
    assert plan.dataset == DatasetConfig(**cli["dataset"])
    assert plan.dataset.root == str(folder.parent) and plan.dataset.image_size == 16 and plan.dataset.augment
    for key, value in cli["train"].items():
        if key != "finetune_epochs":
            assert getattr(plan.train_cfg, key) == value, key
    assert (plan.train_cfg.momentum, plan.train_cfg.weight_decay, plan.train_cfg.nesterov) == (0.9, 0.0004, False)
    assert len(plan.epochs) == cli["train"]["finetune_epochs"] == 3 and plan.iteration == 4


def test_lpot_16_hooks_mask_the_step_and_the_older_call_form_works(tmp_path):
    conf = {"pruning": {"approach": {"weight_compression": {
        "start_epoch": 0, "end_epoch": 1, "pruners": [{"names": [CONV1], "target_sparsity": 0.5}]}}}}
    data = image_batches(4)

    def run(prune: Pruning, post_grad: bool) -> dict[str, int]:
        seen = {"moved": False, "pre": False, "steps": 0}

        def check(model):
            pruned = prune.engine.masks[CONV1] == 0
            seen["moved"] |= bool((model.layer1[0].conv1.weight[pruned] != 0).any())

        loop = lpot_loop(prune, data, 3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), post_grad=post_grad,
                         after_step=check)  # no momentum: only the gradient moves a weight

        def train_func(model):
            prune.pre_epoch_begin()
            seen["pre"] = prune.engine is not None and prune.engine.model is model
            loop(model)
            prune.post_epoch_end()
            seen["steps"] = prune.engine.global_step

        net = SeedNet()
        scores = []
        model = prune(common.Model(net), train_dataloader=data, pruning_func=train_func, eval_dataloader=data,
                      eval_func=lambda m: scores.append(m) or 0.25)
        assert model.model is net and scores == [net] and prune.score == 0.25
        assert zeros(net.layer1[0].conv1.weight) == 288
        return seen

    with_grad = run(Pruning(conf), post_grad=True)
    without = run(Pruning(conf), post_grad=False)
    assert with_grad["pre"] and without["pre"]
    # Gradients are masked as backward accumulates them: the step leaves pruned weights at 0 either way.
    assert not with_grad["moved"] and not without["moved"]
    assert with_grad["steps"] == without["steps"] == 12  # 3 epochs of 4 optimizer steps


def test_each_changed_behaviour_is_logged_once_with_the_tensors_lpot_would_also_prune(caplog):
    conf = {"pruning": {"approach": {"weight_compression": {
        "target_sparsity": 0.5, "start_epoch": 0, "end_epoch": 1,
        "pruners": [{"prune_type": "basic_magnitude", "initial_sparsity": 0.0, "start_epoch": 0}]}}}}
    conf["pruning"]["approach"]["weight_compression"]["initial_sparsity"] = 0.1
    data = sequence_batches(3)
    prune = Pruning(conf)

    with caplog.at_level(logging.WARNING, logger="harness.lpot"):
        prune(SeqNet(), pruning_func=lpot_loop(prune, data, 2))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LPOT: ")]
    assert len(lines) == len(set(lines))
    (names,) = [line for line in lines if "names absent" in line]
    assert "lstm.weight_ih_l0" in names and "attn.in_proj_weight" in names
    assert any("pruners[0].initial_sparsity=0.0 is used as given" in line and "0.1" in line for line in lines)
    assert any("LPOT pruned one more" in line for line in lines)


class NoLenLoader:
    """An iterable without len(), as LPOT's own PyTorchDataLoader."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_a_fraction_of_an_epoch_with_a_loader_without_len_says_so(tmp_path):
    conf = {"pruning": {"approach": {"weight_compression": {
        "pruners": [{"names": [CONV1], "update_frequency": 0.5, "end_epoch": 1}]}}}}
    prune = Pruning(conf)
    with pytest.raises(ValueError) as err:
        prune(SeedNet(), train_dataloader=NoLenLoader(image_batches(2)), pruning_func=lambda m: None)
    message = str(err.value)
    assert "update_frequency=0.5" in message and "has no len()" in message and "\n" not in message
    assert "set prune.train_dataloader" not in message
    # With a length it runs.
    prune = Pruning(conf)
    prune(SeedNet(), train_dataloader=image_batches(2), pruning_func=lambda m: None)


def test_the_format_before_14_gets_one_line_saying_it_is_not_read():
    old = {"pruning": {"magnitude": {"prune1": {"weights": [CONV1], "target_sparsity": 0.3}},
                       "start_epoch": 0, "end_epoch": 20, "frequency": 2, "init_sparsity": 0}}
    with pytest.raises(ValueError, match=re.escape("pruning.magnitude: LPOT's format before 1.4")) as err:
        read_lpot(old)
    assert "is not read" in str(err.value) and "weight_compression" in str(err.value)


def test_the_engine_reads_no_files(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("target_sparsity: 0.5\n")
    with pytest.raises(TypeError, match="not a file"):
        Engine(str(path))


def test_lpot_dummy_dataset_in_the_yaml_becomes_the_fake_dataset_and_trains(tmp_path):
    text = """
pruning:
  train:
    start_epoch: 0
    end_epoch: 2
    iteration: 3
    dataloader:
      batch_size: 4
      dataset:
        dummy:
          shape: [20, 3, 16, 16]
          label: True
    optimizer:
      SGD:
        learning_rate: 0.01
    criterion:
      CrossEntropyLoss:
        reduction: sum
  approach:
    weight_compression:
      start_epoch: 0
      end_epoch: 1
      pruners:
        - !Pruner
            target_sparsity: 0.5
            prune_type: gradient_sensitivity
            names: ['layer1.0.conv1.weight']
"""
    conf = tmp_path / "conf.yaml"
    conf.write_text(text)
    plan = yaml_training(read_lpot(conf))
    assert (plan.dataset.name, plan.dataset.train_size, plan.dataset.image_size) == ("fake", 20, 16)
    net = SeedNet()
    net.head[2] = torch.nn.Linear(8, 10)  # the fake dataset's 10 classes
    prune = Pruning(conf)
    prune.model = common.Model(net)
    prune()
    assert zeros(net.layer1[0].conv1.weight) == 288
    assert prune.engine.global_step == 2 * 3  # 20 images in batches of 4, at most 3 per epoch
    bad = text.replace("[20, 3, 16, 16]", "[20, 16]")
    with pytest.raises(ValueError, match=re.escape("pruning.train.dataloader.dataset.dummy.shape=[20, 16]")):
        yaml_training(read_lpot(_write(tmp_path, bad)))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_train_func_is_lpot_16s_name_for_pruning_func():
    prune = Pruning({"pruning": {"approach": {"weight_compression": {"pruners": [{"names": [CONV1]}]}}}})
    calls = []
    prune.train_func = calls.append
    assert prune.pruning_func == calls.append
    prune(SeedNet())
    assert len(calls) == 1 and isinstance(calls[0], torch.nn.Module)

"""LPOT migration: the seed document's YAML and Python usage, run on the harness's engine."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.lpot import Pruning, common
from harness.lpot.document import LpotTrain, read_lpot
from harness.lpot.migration import migrate
from harness.pruning.spec import Criterion, Schedule

# The seed document's YAML block, verbatim (LPOT's `reduction: None` included; its two trailing-space
# runs are written \x20 so that the source passes the linter, the string is unchanged).
SEED_YAML = """pruning:                                             # mandotory only for pruning.
  train:
    start_epoch: 0
    end_epoch: 10
    iteration: 100
    frequency: 2
\x20\x20\x20\x20
    dataloader:
      batch_size: 256
      dataset:
        ImageFolder:
          root: /path/to/imagenet/train
      transform:
        RandomResizedCrop:
          size: 224
        RandomHorizontalFlip:
        ToTensor:
        Normalize:
          mean: [0.485, 0.456, 0.406]
          std: [0.229, 0.224, 0.225]\x20
    criterion:
      CrossEntropyLoss:
        reduction: None
    optimizer:
      SGD:
        learning_rate: 0.1
        momentum: 0.9
        weight_decay: 0.0004
        nesterov: False

  approach:
    weight_compression:
      initial_sparsity: 0.0
      target_sparsity: 0.3
      pruners:
        - !Pruner
            initial_sparsity: 0.0
            target_sparsity: 0.97
            prune_type: basic_magnitude              # currently only support basic_magnitude
            names: ['layer1.0.conv1.weight']         # tensor name to be pruned.
            start_epoch: 0
            end_epoch: 2
            update_frequency: 0.1
"""

SEED_DOC = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_739796d8455ea0d9.txt"
CONV1 = "layer1.0.conv1.weight"


def read_lpot_yaml(source):
    return read_lpot(source)


def migrate_lpot(path):
    return migrate(read_lpot(path))


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def keys(lines: list[str]) -> list[str]:
    """The dotted key of each 'key: reason' line."""
    return [line.partition(": ")[0] for line in lines]


# ---- models and data ----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv1(x))


class SeedNet(nn.Module):
    """A small model with the tensor the seed document prunes: layer1.0.conv1.weight (576 weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(torch.relu(self.stem(x))))


class SeqNet(nn.Module):
    """LSTM -> self-attention -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        a, _ = self.attn(h, h, h)
        return self.head(a.mean(dim=1))


def image_batches(n: int = 10, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def sequence_batches(n: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def zeros(t: torch.Tensor) -> int:
    return int((t.detach() == 0).sum())


def lpot_loop(prune: Pruning, data: list, epochs: int, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
              post_grad: bool = False, after_step: Callable[[nn.Module], None] | None = None) -> Callable:
    """A training function in LPOT's own tests' shape, calling the hooks (``on_post_grad`` if asked)."""

    def train_func(model: nn.Module) -> None:
        opt = optimizer(model.parameters()) if optimizer else torch.optim.SGD(model.parameters(), lr=0.01)
        for epoch in range(epochs):
            prune.on_epoch_begin(epoch)
            for step, (x, y) in enumerate(data):
                prune.on_batch_begin(step)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                if post_grad:
                    prune.on_post_grad()
                opt.step()
                if after_step:
                    after_step(model)
                prune.on_batch_end()
            prune.on_epoch_end()

    return train_func


# ---- the YAML -----------------------------------------------------------------------------------


def test_seed_block_is_the_seed_documents():
    if not SEED_DOC.is_file():
        pytest.skip(f"{SEED_DOC} is not in this checkout")
    block = re.search(r"```yaml\n(.*?)```", SEED_DOC.read_text(), re.S)
    assert block is not None and block.group(1) == SEED_YAML


def test_seed_yaml_is_read_verbatim(tmp_path):
    conf = read_lpot_yaml(write(tmp_path, SEED_YAML))

    (pruner,) = conf.spec.resolve()
    assert pruner.names == [CONV1]
    assert pruner.target_sparsity == 0.97
    assert pruner.initial_sparsity == 0.0
    assert (pruner.start_epoch, pruner.end_epoch) == (0, 2)
    assert pruner.update_frequency == 0.1
    assert pruner.criterion == Criterion.magnitude
    assert pruner.schedule == Schedule.linear
    assert conf.spec.target_sparsity == 0.3  # the global value, overridden by the pruner
    assert not [k for k in keys(conf.unmapped) if k.startswith("pruning.approach")]
    assert conf.train.learning_rate == 0.1
    assert "pruning.train.frequency" in keys(conf.unmapped)


def test_seed_yaml_migrates_to_valid_harness_values(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.__main__ import CONF_DIR
    from harness.config import register_configs, to_config

    migration = migrate_lpot(write(tmp_path, SEED_YAML))
    train, dataset, prune = (migration.values[k] for k in ("train", "dataset", "prune"))
    assert train["batch_size"] == 256
    assert train["optimizer"] == "sgd"
    assert train["finetune_lr"] == 0.1
    assert train["momentum"] == 0.9
    assert train["weight_decay"] == 0.0004
    assert train["nesterov"] is False
    assert train["finetune_epochs"] == 10  # LPOT trains epochs 0..9
    assert dataset == {"name": "imagefolder", "root": "/path/to/imagenet", "image_size": 224, "augment": True}
    assert prune["schedule"] == "linear"
    assert prune["pruners"][0]["names"] == [CONV1]
    assert prune["pruners"][0]["target_sparsity"] == 0.97
    assert "pruning.train.optimizer.SGD.learning_rate -> train.finetune_lr=0.1" in migration.used
    unmapped = keys(migration.unmapped)
    assert train["finetune_steps_per_epoch"] == 100  # LPOT's iteration: batches per epoch
    for key in ("pruning.train.frequency",
                "pruning.train.criterion.CrossEntropyLoss.reduction"):
        assert key in unmapped
    assert not [k for k in unmapped if k.startswith("pruning.approach")]

    # The values are valid for the harness's dataclasses, merged as `lpot=...` merges them.
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        composed = compose(config_name="config")
    cfg = to_config(OmegaConf.merge(composed, migration.values))
    assert cfg.train.finetune_epochs == 10 and cfg.dataset.root == "/path/to/imagenet"
    assert cfg.prune.resolve()[0].target_sparsity == 0.97


def test_fine_tuning_is_long_enough_for_the_prune_end_epoch(tmp_path):
    text = SEED_YAML.replace("end_epoch: 10", "end_epoch: 2").replace("end_epoch: 2\n            update",
                                                                      "end_epoch: 4\n            update")
    migration = migrate_lpot(write(tmp_path, text))
    assert migration.values["train"]["finetune_epochs"] == 5  # prune end_epoch 4 <= 5 - 1
    assert any(line.startswith("pruning.train.end_epoch -> train.finetune_epochs=5") and "extended" in line
               for line in migration.used)


UNKNOWNS_YAML = """
model:
  name: resnet18
  framework: pytorch
tuning:
  accuracy_criterion:
    relative: 0.02
  exit_policy:
    timeout: 0
pruning:
  approach:
    activation_compression:
      target_sparsity: 0.5
    weight_compression:
      initial_sparsity: 0.2
      start_epoch: 1
      end_epoch: 3
      pruners:
        - !Pruner
            names: ['fc.weight']
            initial_sparsity: 0.0
            start_epoch: 0
            pattern: tile_pattern_1x4
        - !GradientSensitivityPruner
            names: ['conv.weight']
            method: per_channel
            frequency: 2
"""


def test_unknown_fields_and_tags_are_reported_by_name(tmp_path):
    path = write(tmp_path, UNKNOWNS_YAML)
    conf = read_lpot_yaml(path)
    pruners = "pruning.approach.weight_compression.pruners"
    unmapped = keys(conf.unmapped)
    assert f"{pruners}[0].pattern" in unmapped
    assert f"{pruners}[1].method" in unmapped
    assert f"{pruners}[1].frequency" in unmapped
    assert "pruning.approach.activation_compression" in unmapped
    assert "model" in unmapped and "tuning" in unmapped
    (tag_line,) = [line for line in conf.unmapped if line.startswith(f"{pruners}[1]: ")]
    assert "!GradientSensitivityPruner" in tag_line
    assert not any("!Pruner is" in line for line in conf.unmapped)  # !Pruner itself is not reported

    # Explicit zeros are values (LPOT 1.6 read them as absent and took the global 0.2 and 1).
    first, second = conf.spec.resolve()
    assert (first.initial_sparsity, first.start_epoch) == (0.0, 0)
    assert (second.initial_sparsity, second.start_epoch) == (0.2, 1)

    # The harness side maps the accuracy criterion to the goal and keeps the rest unmapped.
    migration = migrate_lpot(path)
    assert migration.values["goal"] == {"criterion": "relative", "max_drop": 0.02}
    assert "tuning.exit_policy" in keys(migration.unmapped)
    assert f"{pruners}[0].pattern" in keys(migration.unmapped)


@pytest.mark.parametrize(("old", "new", "key"), [
    ("target_sparsity: 0.97", "target_sparsity: high", "weight_compression.pruners[0].target_sparsity='high'"),
    ("initial_sparsity: 0.0\n      target", "initial_sparsity: [0]\n      target",
     "weight_compression.initial_sparsity=[0]"),
    ("end_epoch: 2", "end_epoch: 2.5", "weight_compression.pruners[0].end_epoch=2.5"),
    ("names: ['layer1.0.conv1.weight']", "names: layer1.0.conv1.weight", "weight_compression.pruners[0].names="),
    ("learning_rate: 0.1", "learning_rate: fast", "pruning.train.optimizer.SGD.learning_rate='fast'"),
    ("nesterov: False", "nesterov: 0", "pruning.train.optimizer.SGD.nesterov=0"),
], ids=["pruner-target", "global-initial", "pruner-end-epoch", "names", "learning-rate", "nesterov"])
def test_a_value_of_the_wrong_type_names_its_key(tmp_path, old, new, key):
    text = SEED_YAML.replace(old, new)
    assert text.count(new) == 1
    with pytest.raises(ValueError, match=re.escape(key)):
        read_lpot_yaml(write(tmp_path, text))


def test_out_of_range_values_name_the_lpot_key():
    conf = {"pruning": {"approach": {"weight_compression": {"pruners": [{"target_sparsity": 1.5}]}}}}
    with pytest.raises(ValueError, match=re.escape("weight_compression.pruners[0].target_sparsity=1.5")):
        read_lpot_yaml(conf)
    conf = {"pruning": {"approach": {"weight_compression": {"pruners": [{"prune_type": "pattern_lok"}]}}}}
    with pytest.raises(ValueError, match=re.escape("weight_compression.pruners[0].prune_type='pattern_lok'")):
        read_lpot_yaml(conf)


def test_fields_absent_from_the_whole_file_take_lpot_defaults():
    conf = read_lpot_yaml({"pruning": {"approach": {"weight_compression": {"pruners": [{"names": ["fc.weight"]}]}}}})
    (pruner,) = conf.spec.resolve()
    assert (pruner.initial_sparsity, pruner.target_sparsity) == (0.0, 0.97)
    assert (pruner.start_epoch, pruner.end_epoch, pruner.update_frequency) == (0, 4, 1.0)
    assert pruner.criterion == Criterion.magnitude and pruner.schedule == Schedule.linear
    assert conf.train == LpotTrain() and conf.unmapped == ()


# ---- the Python API ---------------------------------------------------------------------------------


def test_seed_python_usage_prunes_and_trains_the_same_parameters(tmp_path, capsys):
    torch.manual_seed(0)
    net = SeedNet()
    train_dataloader = image_batches()  # 10 batches: update_frequency 0.1 = one update per batch
    initial = net.layer1[0].conv1.weight.detach().clone()
    seen = {"batch_ends": 0, "moved_within_batch": False, "eval_arg": None}
    after_window: dict[str, torch.Tensor] = {}

    prune = Pruning(str(write(tmp_path, SEED_YAML)))

    def train_func(model):  # the seed document's loop, in its shape
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        weight = model.layer1[0].conv1.weight
        for epoch in range(4):
            model.train()
            prune.on_epoch_begin(epoch)
            for step, batch in enumerate(train_dataloader):
                prune.on_batch_begin(step)
                inputs, labels = batch
                loss = loss_fn(model(inputs), labels)
                loss.backward()
                optimizer.step()
                model.zero_grad()
                pruned = prune.engine.masks[CONV1] == 0
                seen["moved_within_batch"] |= bool((weight[pruned] != 0).any())
                prune.on_batch_end()
                seen["batch_ends"] += 1
                assert torch.all(weight[pruned] == 0.0), f"epoch {epoch} step {step}: a pruned weight is not 0"
            if epoch == 2:  # the pruning window (epochs 0..2) is over
                after_window["weight"] = weight.detach().clone()

    def eval_func(model):
        seen["eval_arg"] = model
        return 0.5

    prune.model = common.Model(net)
    prune.train_dataloader = train_dataloader
    prune.pruning_func = train_func
    prune.eval_dataloader = train_dataloader
    prune.eval_func = eval_func
    model = prune()

    assert isinstance(model, common.Model) and model.model is net
    assert seen["eval_arg"] is net and prune.score == 0.5
    assert seen["batch_ends"] == 40
    # LPOT has no on_before_optimizer_step: the step moved pruned weights, on_batch_end zeroed them again.
    assert seen["moved_within_batch"]
    weight = net.layer1[0].conv1.weight
    assert abs(zeros(weight) - 0.97 * weight.numel()) <= 1  # counted from the weights
    live = prune.engine.masks[CONV1] == 1
    assert torch.all(weight[~live] == 0.0)
    assert not torch.equal(weight[live], after_window["weight"][live]), "survivors were not trained"
    assert not torch.equal(weight[live], initial[live])
    assert zeros(net.stem.weight) == 0  # only the named tensor is pruned
    report = capsys.readouterr().out
    assert CONV1 in report and "97.0" in report

    saved = model.save(tmp_path / "out")  # a folder, as in LPOT
    assert saved == tmp_path / "out" / "best_model_weights.pt"
    assert zeros(torch.load(saved)[CONV1]) == zeros(weight)
    assert model.save(tmp_path / "pruned.pt") == tmp_path / "pruned.pt"


def test_the_yaml_builds_the_training_loop_when_no_pruning_func(tmp_path):
    text = SEED_YAML.replace("end_epoch: 10", "end_epoch: 3").replace("iteration: 100", "iteration: 5")
    torch.manual_seed(0)
    net = SeedNet()
    prune = Pruning(write(tmp_path, text))
    prune.model = net  # a plain nn.Module works too
    with pytest.raises(HarnessError, match="/path/to/imagenet"):  # the YAML's own ImageFolder, absent here
        prune()
    prune.train_dataloader = image_batches()
    model = prune()
    weight = model.model.layer1[0].conv1.weight
    assert abs(zeros(weight) - 0.97 * weight.numel()) <= 1
    assert prune.engine.global_step == 15  # 3 epochs of `iteration` 5 batches


def test_start_epoch_equal_to_end_epoch_prunes_one_shot_to_the_target(tmp_path):
    # LPOT 1.6 returned initial_sparsity here and never pruned; the harness prunes to the target.
    conf = {"pruning": {"approach": {"weight_compression": {
        "start_epoch": 1, "end_epoch": 1, "pruners": [{"names": [CONV1], "target_sparsity": 0.5}]}}}}
    net = SeedNet()
    prune = Pruning(conf)
    prune.model = common.Model(net)
    data = image_batches(3)

    def train_func(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for epoch in range(2):
            prune.on_epoch_begin(epoch)
            for step, (x, y) in enumerate(data):
                prune.on_batch_begin(step)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                prune.on_batch_end()
            if epoch == 0:
                assert zeros(model.layer1[0].conv1.weight) == 0

    prune.pruning_func = train_func
    prune()
    assert zeros(net.layer1[0].conv1.weight) == round(0.5 * 576)


def test_recurrent_and_attention_weights_reach_the_configured_sparsity():
    names = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "attn.in_proj_weight", "attn.out_proj.weight"]
    conf = {"pruning": {"approach": {"weight_compression": {
        "target_sparsity": 0.8, "start_epoch": 0, "end_epoch": 2,
        "pruners": [{"names": names, "prune_type": "basic_magnitude", "update_frequency": 1}],
    }}}}
    torch.manual_seed(0)
    net = SeqNet()
    data = sequence_batches()
    prune = Pruning(conf)
    prune.model = common.Model(net)
    prune.train_dataloader = data

    prune.pruning_func = lpot_loop(prune, data, 3, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    model = prune().model
    params = dict(model.named_parameters())
    for name in names:
        assert abs(zeros(params[name]) - 0.8 * params[name].numel()) <= 1, name
    assert zeros(params["head.weight"]) == 0
    assert torch.isfinite(model(data[0][0])).all()  # the LSTM still runs on its pruned weights


def test_nothing_to_train_with_says_what_to_set(tmp_path):
    prune = Pruning(write(tmp_path, SEED_YAML))
    with pytest.raises(ValueError, match=r"prune\.model"):
        prune()
    prune.model = common.Model(SeedNet())
    no_loader = SEED_YAML.replace("    dataloader:", "    unused_loader:").replace("      batch_size: 256", "")
    no_loader = re.sub(r"    unused_loader:.*?    criterion:", "    criterion:", no_loader, flags=re.S)
    prune = Pruning(write(tmp_path, no_loader))
    prune.model = common.Model(SeedNet())
    with pytest.raises(ValueError, match=r"pruning\.train\.dataloader: missing; set prune\.train_dataloader"):
        prune()

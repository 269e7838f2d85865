"""LPOT's "completely configured in the yaml" usage: training built from ``pruning.train``.

The values come from :func:`harness.lpot.migration.training_migration`, the same mapping the
command line merges, and the harness's own builders make the data (:func:`harness.data.build_data`)
and the optimizer (:func:`harness.training.make_optimizer`): a YAML trains the same way from Python
and from ``python -m harness lpot=...``. The loop is LPOT 1.6's (its PyTorch adaptor's ``train``):
epochs ``start_epoch..end_epoch-1``, at most ``iteration`` batches each, every LPOT hook called.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from harness.config import DatasetConfig, TrainConfig
from harness.data import build_data
from harness.lpot.document import TRAIN, LpotDocument, training_epochs
from harness.lpot.migration import training_migration
from harness.training import make_optimizer


class Hooks(Protocol):
    """The LPOT hooks the loop calls (``harness.lpot.Pruning`` has them all)."""

    def pre_epoch_begin(self) -> None: ...
    def on_epoch_begin(self, epoch: int) -> None: ...
    def on_batch_begin(self, batch_id: int) -> None: ...
    def on_post_grad(self) -> None: ...
    def on_batch_end(self) -> None: ...
    def on_epoch_end(self) -> None: ...
    def post_epoch_end(self) -> None: ...


@dataclass(frozen=True)
class YamlTraining:
    """What ``pruning.train`` says to train with.

    Attributes:
        train_cfg: the harness's train values (optimizer, learning rate, batch size...).
        epochs: ``range(start, end)`` in LPOT's numbering.
        iteration: at most this many batches per epoch, or None.
        dataset: the harness dataset the YAML's dataloader maps to, or None when it gives none.
        notices: the lines the mapping made (LPOT behaviours changed on purpose).
    """

    train_cfg: TrainConfig
    epochs: range
    iteration: int | None
    dataset: DatasetConfig | None
    notices: list[str]

    def loaders(self) -> tuple[Iterable[Any], Iterable[Any]]:
        """(train, val) loaders of the YAML's dataset: harness.data's splits, as the command line has them."""
        if self.dataset is None:
            raise ValueError(f"{TRAIN}.dataloader: missing; set prune.train_dataloader, or give the YAML a "
                             "dataloader (dataset ImageFolder, CIFAR10 or dummy)")
        bundle = build_data(self.dataset, self.train_cfg.batch_size, self.train_cfg.eval_batch_size, seed=0)
        return bundle.train, bundle.val


def yaml_training(doc: LpotDocument) -> YamlTraining:
    """Read what a YAML-only run trains with; errors name the LPOT key."""
    if doc.train.optimizer is None or doc.train.learning_rate is None:
        raise ValueError(f"{TRAIN}.optimizer: the YAML gives no SGD, Adam or AdamW with a learning_rate; add one, "
                         "or set prune.pruning_func = train_func")
    migration = training_migration(doc)
    start, end, _ = training_epochs(doc.spec, doc.train)
    dataset = migration.values.get("dataset")
    return YamlTraining(
        train_cfg=TrainConfig(**{k: v for k, v in migration.values["train"].items() if k != "finetune_epochs"}),
        epochs=range(start, end),
        iteration=migration.iteration,
        dataset=DatasetConfig(**dataset) if dataset else None,
        notices=migration.notices,
    )


def train(hooks: Hooks, net: nn.Module, loader: Iterable[Any], plan: YamlTraining) -> None:
    """LPOT 1.6's training loop with its hooks; the loss is averaged over the batch."""
    optimizer = make_optimizer(net.parameters(), plan.train_cfg, plan.train_cfg.finetune_lr)
    loss_fn = nn.CrossEntropyLoss()
    device = next(net.parameters()).device
    hooks.pre_epoch_begin()
    for epoch in plan.epochs:
        net.train()
        hooks.on_epoch_begin(epoch)
        for step, (inputs, targets) in enumerate(loader):
            if plan.iteration is not None and step >= plan.iteration:
                break
            hooks.on_batch_begin(step)
            loss = loss_fn(net(inputs.to(device)), torch.as_tensor(targets).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hooks.on_post_grad()
            optimizer.step()
            hooks.on_batch_end()
        hooks.on_epoch_end()
    hooks.post_epoch_end()

"""Started by tests/test_distributed.py under ``torchrun --nproc_per_node=2``: fine-tune with pruning on
every rank, the way the runner does, and record a checksum of every mask after every mask update and
at every epoch end. Rank 0 gathers all ranks' lists and writes them, as JSON, to the file named by the
first argument; further arguments are config overrides.

``--drift`` makes rank 1 change one weight before the first mask update (a step that is not
synchronized), which the runner's own check (:func:`harness.distributed.check_same_masks`) must catch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from harness import config, distributed
from harness.baseline import load_or_train
from harness.experiment import prepare
from harness.runner import attach_pruning
from harness.training import evaluate, fit


def main(out: Path, overrides: list[str], drift: bool) -> None:
    cfg = config.compose_config(overrides)
    exp = prepare(cfg)
    pruning = attach_pruning(cfg.prune, exp)

    def train_dense(model: torch.nn.Module, _checkpoint: Path) -> tuple[float, float]:
        fit(model, exp.data.train, exp.data.val, cfg.train, epochs=cfg.train.epochs, lr=cfg.train.lr,
            device=exp.device)
        return evaluate(model, exp.data.val, exp.device), evaluate(model, exp.data.test, exp.device)

    load_or_train(cfg, exp.model, train_dense, exp.outputs / "baselines", exp.world)
    seen: list[tuple[str, int, str]] = []
    pruning.add_listener(lambda u: seen.append(("update", u.global_step, distributed.masks_digest(pruning.masks))))
    if drift:
        pruning.add_listener(lambda u: distributed.check_same_masks(pruning.masks, exp.world, f"step {u.global_step}"))

    class EpochEnd:
        drifted = False

        def on_epoch_end(self) -> None:
            seen.append(("epoch", -1, distributed.masks_digest(pruning.masks)))

        def on_batch_begin(self, step: int) -> None:
            if drift and exp.world.rank == 1 and not self.drifted:  # the weight rank 0 prunes first, kept here
                weight = next(iter(pruning.params.values())).detach().view(-1)
                weight[weight.abs().argmin()] = 10.0
                self.drifted = True

    error = None
    try:
        fit(exp.model, exp.data.train, exp.data.val, cfg.train, epochs=cfg.train.finetune_epochs,
            lr=cfg.train.finetune_lr, device=exp.device, callbacks=[pruning, EpochEnd()])
    except distributed.MasksDiffer as err:
        error = str(err)
    everyone: list = [None] * exp.world.size
    dist.all_gather_object(everyone, {"seen": seen, "error": error})
    if exp.world.is_main:
        out.write_text(json.dumps(everyone))
    distributed.leave(0)  # (not a plain exit: see its docstring)


if __name__ == "__main__":
    args = sys.argv[1:]
    drift = "--drift" in args
    args = [a for a in args if a != "--drift"]
    main(Path(args[0]), args[1:], drift)

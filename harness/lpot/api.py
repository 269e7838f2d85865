"""LPOT 1.x's Python API (``Pruning``, ``common.Model``) on the harness's engine.

Both of the seed document's usages run, and LPOT 1.4 to 1.6's hooks and its older call form::

    from harness.lpot import Pruning, common    # was: from lpot.experimental import Pruning, common

    prune = Pruning("conf.yaml")
    prune.model = common.Model(model)
    model = prune()                             # YAML-only: data, optimizer, loss, epochs from pruning.train

    prune.train_dataloader = train_dataloader   # or the user's own loop, calling the hooks
    prune.pruning_func = train_func
    prune.eval_func = eval_func
    model = prune()

    model = prune(model, train_dataloader=..., pruning_func=..., eval_dataloader=..., eval_func=...)

The engine underneath keeps the model's own ``nn.Parameter`` objects (LPOT replaced them, so the
user's optimizer trained stale copies), reads an explicit ``0.0`` as a value, prunes exactly
``round(sparsity * numel)`` weights and masks in place on the device. Each difference from LPOT is
logged once per run (``LPOT: ...``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from harness.lpot.document import NAMES_ABSENT, WEIGHT_COMPRESSION, GroupPruning, LpotDocument, read_lpot
from harness.lpot.yaml_training import YamlTraining, train, yaml_training
from harness.pruning.counting import TensorSparsity
from harness.pruning.pruning import Pruning as Engine
from harness.pruning.selection import prunable_weights, select_tensors
from harness.pruning.spec import Criterion, Pattern, PrunerSpec, PruningSpec, Schedule
from harness.training import evaluate

log = logging.getLogger(__name__)


class Model:
    """LPOT's ``common.Model`` for PyTorch: wraps an ``nn.Module``; ``.model`` gives it back.

    Example::

        wrapped = common.Model(net)
        wrapped.model is net        # True
        wrapped.save("out")         # out/best_model_weights.pt (LPOT's folder layout), a state_dict
    """

    def __init__(self, root: nn.Module) -> None:
        if isinstance(root, Model):
            root = root.model
        if not isinstance(root, nn.Module):
            raise TypeError(f"common.Model({type(root).__name__}): expected a torch.nn.Module")
        self.model = root

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the state_dict: to ``path`` when it names a file (``.pt``, ``.pth``, ``.bin``), else,
        as LPOT did, to ``path/best_model_weights.pt``. Returns the file written."""
        target = Path(path)
        if target.suffix in (".pt", ".pth", ".bin") and not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            target = target / "best_model_weights.pt"
        torch.save(self.model.state_dict(), target)
        return target

    def __repr__(self) -> str:
        return f"common.Model({type(self.model).__name__})"


# LPOT's `common` module, as far as the pruning API uses it: `common.Model(model)`.
common = SimpleNamespace(Model=Model)


class Pruning:
    """LPOT's ``Pruning`` object, driving the harness's engine.

    Args:
        conf: an LPOT YAML path (LPOT passes ``args.config``), its parsed mapping, or an
            :class:`LpotDocument`.

    Attributes:
        model: set with ``common.Model(net)`` or a plain ``nn.Module``; reads back as ``common.Model``.
        train_dataloader: batches of ``(inputs, targets)``; ``len()`` gives the steps per epoch.
            Unset with no ``pruning_func``: built from the YAML's ``pruning.train.dataloader``.
        eval_dataloader: used for top-1 accuracy when ``eval_func`` is not set.
        pruning_func: ``pruning_func(net)`` trains ``net`` (the ``nn.Module``), calling the hooks
            (``train_func`` is LPOT 1.6's other name for it). Unset: LPOT's loop, built from the
            YAML's ``pruning.train``.
        eval_func: ``eval_func(net) -> float``, optional.
        engine: the harness's :class:`harness.pruning.Pruning`, once attached.
        score: what evaluation returned after the last call, or None.

    The hooks: ``pre_epoch_begin()`` (before training), ``on_epoch_begin(epoch)``,
    ``on_batch_begin(step)``, ``on_post_grad()`` (after ``backward``, before ``optimizer.step()``:
    pruned weights then take no part in the step), ``on_batch_end()``, ``on_epoch_end()``,
    ``post_epoch_end()`` (after training); ``on_train_begin``, ``on_before_optimizer_step`` and
    ``on_train_end`` are the engine's names for three of them.
    """

    def __init__(self, conf: str | os.PathLike[str] | Mapping[str, Any] | LpotDocument) -> None:
        self.conf = read_lpot(conf)
        for line in self.conf.unmapped:
            log.warning("LPOT config: %s", line)
        self.engine: Engine | None = None
        self._model: Model | None = None
        self._logged: set[str] = set()
        self.train_dataloader: Any = None
        self.eval_dataloader: Any = None
        self.pruning_func: Callable[[nn.Module], Any] | None = None
        self.eval_func: Callable[[nn.Module], Any] | None = None
        self.score: Any = None

    @property
    def model(self) -> Model | None:
        return self._model

    @model.setter
    def model(self, user_model: Model | nn.Module) -> None:
        self._model = user_model if isinstance(user_model, Model) else Model(user_model)

    @property
    def train_func(self) -> Callable[[nn.Module], Any] | None:
        """LPOT 1.6's other name for ``pruning_func``."""
        return self.pruning_func

    @train_func.setter
    def train_func(self, user_train_func: Callable[[nn.Module], Any] | None) -> None:
        self.pruning_func = user_train_func

    # -- the hooks, for the user's training function ----------------------------------------------

    def pre_epoch_begin(self) -> None:
        self._attached().on_train_begin()

    on_train_begin = pre_epoch_begin

    def on_epoch_begin(self, epoch: int) -> None:
        self._attached().on_epoch_begin(epoch)

    def on_batch_begin(self, batch_id: int) -> None:
        self._attached().on_batch_begin(batch_id)

    def on_post_grad(self) -> None:
        self._attached().on_before_optimizer_step()

    on_before_optimizer_step = on_post_grad

    def on_batch_end(self) -> None:
        self._attached().on_batch_end()

    def on_epoch_end(self) -> None:
        self._attached().on_epoch_end()

    def post_epoch_end(self) -> None:
        self._attached().on_train_end()

    on_train_end = post_epoch_end

    # -- the run ------------------------------------------------------------------------------------

    def __call__(self, model: Model | nn.Module | None = None, train_dataloader: Any = None,
                 pruning_func: Callable[[nn.Module], Any] | None = None, eval_dataloader: Any = None,
                 eval_func: Callable[[nn.Module], Any] | None = None) -> Model:
        """Attach, train, bake the masks in, evaluate, report; return the model.

        The arguments are LPOT's older call form (``lpot.Pruning``); each one given replaces the attribute.
        """
        if model is not None:
            self.model = model
        for name, value in (("train_dataloader", train_dataloader), ("pruning_func", pruning_func),
                            ("eval_dataloader", eval_dataloader), ("eval_func", eval_func)):
            if value is not None:
                setattr(self, name, value)
        if self._model is None:
            raise ValueError("prune.model is not set: prune.model = common.Model(your_torch_model)")
        net = self._model.model
        if self.pruning_func is not None:
            self._attach(net, self._steps_per_epoch(self.train_dataloader, None))
            self.pruning_func(net)
            eval_loader = self.eval_dataloader
        else:
            plan = yaml_training(self.conf)
            loader, eval_loader = (self.train_dataloader, None) if self.train_dataloader is not None \
                else plan.loaders()
            eval_loader = self.eval_dataloader if self.eval_dataloader is not None else eval_loader
            self._attach(net, self._steps_per_epoch(loader, plan.iteration), plan)
            train(self, net, loader, plan)
        engine = self._attached()
        engine.on_train_end()
        engine.finalize()
        if self.eval_func is not None:
            self.score = self.eval_func(net)
        elif eval_loader is not None:
            self.score = evaluate(net, eval_loader, next(net.parameters()).device)
        if self.score is not None:
            log.info("pruned model score: %s", self.score)
        report = format_sparsity(engine.sparsity())
        log.info("%s", report)
        print(report, flush=True)
        return self._model

    def _attached(self) -> Engine:
        if self.engine is None or self.engine.model is None:
            if self._model is None:
                raise RuntimeError("set prune.model = common.Model(model) before calling the hooks")
            self._attach(self._model.model, self._steps_per_epoch(self.train_dataloader, None))
        assert self.engine is not None
        return self.engine

    def _attach(self, net: nn.Module, steps: int | None, plan: YamlTraining | None = None) -> None:
        try:
            self.engine = Engine(_expand_groups(self.conf.spec, self.conf.groups, net))
            self.engine.attach(net, steps_per_epoch=steps)
        except ValueError as err:
            what, needs_steps, _ = str(err).partition(": pass attach(model, steps_per_epoch")
            if needs_steps:
                raise ValueError(f"{WEIGHT_COMPRESSION}: {what} needs the steps per epoch, and "
                                 f"{self._why_no_steps()}") from None
            raise ValueError(f"{WEIGHT_COMPRESSION}.{err}") from None
        for line in [*self.conf.notices, *(plan.notices if plan else [])]:
            self._notice(_names_notice(net) if line == NAMES_ABSENT else line)

    def _why_no_steps(self) -> str:
        if self.train_dataloader is None:
            return "prune.train_dataloader is not set: set it (its len() gives them), before prune() or the hooks"
        return (f"prune.train_dataloader ({type(self.train_dataloader).__name__}) has no len() (LPOT's own loaders "
                "have none): give a loader with len(), or a whole-number update_frequency")

    def _notice(self, line: str) -> None:
        """Log ``line`` once per run: each LPOT behaviour the harness changes on purpose."""
        if line not in self._logged:
            self._logged.add(line)
            log.warning("LPOT: %s", line)

    @staticmethod
    def _steps_per_epoch(loader: Any, iteration: int | None) -> int | None:
        try:
            steps: int | None = len(loader)
        except TypeError:  # None, or an iterable without a length
            steps = None
        if iteration is not None:
            steps = iteration if steps is None else min(steps, iteration)  # the YAML loop stops each epoch there
        return steps or None


def _names_notice(net: nn.Module) -> str:
    """The names-absent notice, with the tensors LPOT would also have pruned in this model."""
    default = prunable_weights(net)
    extra = [name for name, p in net.named_parameters() if p.dim() in (2, 4) and name not in default]
    if not extra:
        return NAMES_ABSENT
    shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
    return f"{NAMES_ABSENT}; LPOT would also have pruned {shown}"


def _expand_groups(spec: PruningSpec, groups: Iterable[GroupPruning], net: nn.Module) -> PruningSpec:
    """Each structured gradient_sensitivity pruner -> one block pruner per tensor, keeping ``target``
    groups of ``stride`` rows (columns) at its end_epoch, scored by the accumulated |grad * w|."""
    groups = {g.pruner: g for g in groups}
    if not groups:
        return spec
    resolved = spec.resolve()
    named = dict(net.named_parameters())
    pruners: list[PrunerSpec] = []
    for i, pruner in enumerate(spec.pruners):
        group = groups.get(i)
        if group is None:
            pruners.append(pruner)
            continue
        r = resolved[i]
        names = select_tensors(r.names, r.exclude, named, list(prunable_weights(net)), f"pruners[{i}].")
        for name in names:
            rows, cols = named[name].shape[0], math.prod(named[name].shape[1:])
            units = math.ceil((cols if group.transpose else rows) / group.stride)
            keep = min(group.target, units)
            shape = [rows, group.stride] if group.transpose else [group.stride, cols]
            pruners.append(PrunerSpec(names=[name], criterion=Criterion.gradient_sensitivity, pattern=Pattern.block,
                                      block_shape=shape, schedule=Schedule.one_shot, initial_sparsity=0.0,
                                      target_sparsity=1.0 - keep / units, start_epoch=r.end_epoch,
                                      end_epoch=r.end_epoch, update_frequency=1.0))
    return dataclasses.replace(spec, pruners=pruners)


def format_sparsity(rows: list[TensorSparsity]) -> str:
    """Per-tensor sparsity, counted from the weights (exact zeros), and the total."""
    width = max([len(r.name) for r in rows] + [7])
    lines = ["pruned tensors (sparsity counted from the weights):"]
    for r in rows:
        lines.append(f"  {r.name:<{width}}  {r.zeros:>9}/{r.numel:<9} zeros  {r.sparsity:7.2%}")
    zeros, numel = sum(r.zeros for r in rows), sum(r.numel for r in rows)
    lines.append(f"  {'overall':<{width}}  {zeros:>9}/{numel:<9} zeros  {zeros / numel if numel else 0.0:7.2%}")
    return "\n".join(lines)

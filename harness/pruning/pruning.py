"""The pruning engine: attach to a model, call the callbacks from any training loop.

Masks live beside the parameters: the model keeps its own ``nn.Parameter`` objects, so
the user's optimizer trains the very tensors that are pruned (LPOT 1.6 replaced them,
and its users' optimizers went on training stale copies). Per optimizer step the cost
is one in-place multiply per pruned tensor for the gradients, done as backward
accumulates each gradient (while it is still in cache), and one for the weights after
the step; with ``optimizer=`` (or :meth:`Pruning.use_optimizer`) and a known optimizer the
second one is not needed (see there).

Example::

    pruning = Pruning({"target_sparsity": 0.9, "end_epoch": 3}).attach(model, steps_per_epoch=len(loader))
    pruning.on_train_begin()
    for epoch in range(epochs):
        pruning.on_epoch_begin(epoch)
        for step, (x, y) in enumerate(loader):
            pruning.on_batch_begin(step)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            pruning.on_before_optimizer_step()
            optimizer.step()
            pruning.on_batch_end()
        pruning.on_epoch_end()
    pruning.on_train_end()

The clock counts optimizer steps, not batches: with gradient accumulation call
``on_before_optimizer_step`` only before real steps, or pass ``optimizer=`` to
:meth:`Pruning.attach`, which also counts exactly the steps a ``GradScaler`` takes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .clock import Clock, PlannedUpdate, capped_sparsity, plan_updates
from .counting import TensorSparsity, count_sparsity, overall_sparsity
from .criteria import Scorer, make_scorer
from .gradients import GradientMasking
from .optimizer_state import MaskedOptimizer
from .patterns import MaskPattern, make_pattern
from .scratch import Scratch
from .selection import claim, prunable_weights, select_tensors, skip_unfit
from .spec import GLOBAL, PruningSpec, ResolvedPruner


@dataclass(frozen=True)
class MaskUpdate:
    """What one mask update did; handed to listeners (e.g. a metrics logger)."""

    global_step: int  # optimizer steps completed before this update
    epoch: int
    step: int  # optimizer steps completed in this epoch before this update
    target: float  # scheduled sparsity over all pruned tensors, weighted by size
    sparsity: dict[str, float]  # per tensor, counted from the weights
    overall: float  # over all pruned tensors, counted from the weights


@dataclass
class _Pruner:
    spec: ResolvedPruner
    names: list[str]
    scorer: Scorer
    pattern: MaskPattern
    clock: Clock


class Pruning:
    """Gradual pruning during training, driven by the training loop's callbacks.

    Args:
        spec: a :class:`PruningSpec`, or a mapping with its fields (a dict, an OmegaConf node, a
            parsed YAML file). The engine reads no files: an LPOT file goes through
            ``harness.lpot.read_lpot(path).spec``.

    Raises:
        ValueError: a field out of range, naming the field, its value and what is allowed.
        TypeError: a path instead of a spec.
    """

    def __init__(self, spec: PruningSpec | Mapping[str, Any] | None = None) -> None:
        if spec is None:
            spec = PruningSpec()
        elif isinstance(spec, str | os.PathLike):
            raise TypeError(f"Pruning({str(spec)!r}): the engine takes a PruningSpec or a mapping of its fields, "
                            "not a file; for an LPOT YAML use harness.lpot.Pruning(path) or "
                            "harness.lpot.read_lpot(path).spec, for a plain one yaml.safe_load it first")
        elif not isinstance(spec, PruningSpec):
            spec = PruningSpec.from_mapping(spec)
        self.spec = spec
        self.pruner_specs = spec.resolve()
        self.model: nn.Module | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.owners: dict[str, int] = {}
        self.skipped: dict[str, str] = {}  # tensors the default selection left out, and why
        self.masks: dict[str, torch.Tensor] = {}
        self._pruners: list[_Pruner] = []
        self._listeners: list[Callable[[MaskUpdate], None]] = []
        self._hooks: list[Any] = []
        self.steps_per_epoch: int | None = None
        self.epoch = 0
        self.global_step = 0
        self._epoch_start_step = 0
        self._explicit_steps = False  # on_before_optimizer_step is being called
        self._provisional_steps = 0  # batch ends counted as steps before the first explicit step
        self._step_pending = False
        self._optimizer: MaskedOptimizer | None = None
        self._gradients = GradientMasking(None, self.params, self.masks, spec.sparse_grads)
        self._scratch = Scratch()  # reused by updates while training

    # -- set-up ---------------------------------------------------------------------------

    def attach(self, model: nn.Module, steps_per_epoch: int | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> Pruning:
        """Resolve each pruner's tensors in ``model`` and start with all-ones masks.

        Args:
            model: the model to prune; its parameters stay the same objects.
            steps_per_epoch: optimizer steps per epoch (e.g. ``len(train_loader)``), needed when an
                ``update_frequency`` is a fraction of an epoch or ``update_frequency_steps`` is set.
            optimizer: optional; its step hooks then mask gradients and weights around every real
                step, count steps exactly (a ``GradScaler``'s skipped steps are not counted) and make
                ``on_before_optimizer_step`` / ``on_batch_end`` unnecessary.
        """
        needs_spe = [p for p in self.pruner_specs
                     if p.update_frequency_steps is not None or not float(p.update_frequency).is_integer()]
        if needs_spe and not steps_per_epoch:
            p = needs_spe[0]
            what = (f"update_frequency_steps={p.update_frequency_steps}" if p.update_frequency_steps
                    else f"update_frequency={p.update_frequency} (a fraction of an epoch)")
            raise ValueError(f"{what}: pass attach(model, steps_per_epoch=len(train_loader))")
        self._gradients.remove()
        named = dict(model.named_parameters())
        self.skipped = {}
        default = list(prunable_weights(model))
        owner: dict[str, int] = {}
        pruners = []
        for i, spec in enumerate(self.pruner_specs):
            prefix = f"pruners[{i}]." if self.spec.pruners else ""
            names = select_tensors(spec.names, spec.exclude, named, default, prefix)
            pattern = make_pattern(spec.pattern, spec.n, spec.m, spec.block_shape, spec.channel_norm)
            if spec.names is None:  # the default selection skips, and reports, what the pattern cannot take
                names = skip_unfit(names, pattern, spec.pattern, named, default, self.skipped)
            claim(names, i, pattern, named, owner, prefix)
            pruners.append(_Pruner(spec, names, make_scorer(spec.criterion, spec.seed), pattern, Clock()))
        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self.owners = owner  # tensor name -> index of its pruner in pruner_specs
        self._pruners = pruners
        self.params = {name: named[name] for p in pruners for name in p.names}
        self.masks = {name: p.pattern.initial_mask(named[name]) for p in pruners for name in p.names}
        self._gradients = GradientMasking(model, self.params, self.masks, self.spec.sparse_grads)
        if optimizer is not None:
            self.use_optimizer(optimizer)
        return self

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mask around every real step of ``optimizer`` through its step hooks (as ``attach(optimizer=)``).

        For SGD, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop and Adagrad (eps > 0) the engine also
        zeroes their per-weight state of the pruned weights at each mask update; a pruned weight
        then has a zero gradient, zero state and a zero value, so the step leaves it at exactly 0
        and the per-step re-masking of the weights is skipped (one pass over the pruned tensors
        per step instead of two). Other optimizers keep the re-masking after each step. The first
        step after each mask update checks that the pruned weights stayed at 0; if something
        between backward and the step changed their gradients (noise added to ``.grad``, say),
        the engine warns once and re-masks after every step from then on.
        """
        self._require_attached()
        for hook in self._hooks:
            hook.remove()
        self._optimizer = MaskedOptimizer(optimizer)
        self._optimizer.masks_changed(self.params, self.masks, list(self.masks))
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self._before_step()),
            optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]

    def add_listener(self, listener: Callable[[MaskUpdate], None]) -> None:
        """Call ``listener(update)`` after every mask update."""
        self._listeners.append(listener)

    # -- callbacks ------------------------------------------------------------------------

    def on_train_begin(self) -> None:
        self._require_attached()
        self._gradients.install()

    def on_epoch_begin(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_start_step = self.global_step
        self._gradients.install()  # for loops that skip on_train_begin
        self._update_due()

    def on_batch_begin(self, step: int = 0) -> None:
        """``step`` is accepted for LPOT's signature; the clock counts optimizer steps itself."""
        self._update_due()

    def on_before_optimizer_step(self) -> None:
        """Mask the gradients (pruned weights take no part in the update); feed gradient criteria."""
        if not self._explicit_steps:
            # Until now each batch end counted as a step; those were micro-batches of this first step.
            self._explicit_steps = True
            self.global_step -= self._provisional_steps
        if not self._hooks:
            self._before_step()
            self._step_pending = True

    def on_batch_end(self) -> None:
        """Re-apply the masks after the optimizer step: momentum, Adam moments and weight decay
        can move a pruned weight even with a zero gradient."""
        if self._hooks:
            return
        if not self._explicit_steps:
            # A loop that never marks its optimizer step (LPOT's loops): gradient criteria see the
            # gradients still there after the step, once per batch.
            self._observe_gradients()
        if self._step_pending or not self._explicit_steps:
            self.global_step += 1
            self._provisional_steps += not self._explicit_steps
        self._step_pending = False
        self.apply_masks()

    def on_epoch_end(self) -> None:
        pass

    def on_train_end(self) -> None:
        self._gradients.remove()
        self._scratch.release()
        self.apply_masks()

    # -- masks ----------------------------------------------------------------------------

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, param in self.params.items():
            param.mul_(self.masks[name])

    def sparsity(self) -> list[TensorSparsity]:
        """Per-tensor sparsity of the pruned tensors, counted from the weights."""
        return count_sparsity(self._require_attached(), list(self.params))

    def scheduled_sparsity(self) -> dict[str, float]:
        """The sparsity each tensor is scheduled to have now."""
        return {name: p.clock.scheduled for p in self._pruners for name in p.names}

    def plan(self, epochs: int) -> list[PlannedUpdate]:
        """Dry run: the updates ``epochs`` epochs would make, without touching any weight."""
        self._require_attached()
        return plan_updates([(p.spec, p.names) for p in self._pruners], epochs, self.steps_per_epoch or 1)

    def finalize(self) -> nn.Module:
        """Bake the masks into the weights and hand back the plain model (its own parameters, no hooks).

        Pruned weights are +0.0: masking a negative weight gives -0.0, which compares equal to 0
        but would cost a compressed checkpoint one more bit per pruned weight to restore."""
        model = self._require_attached()
        self.apply_masks()
        with torch.no_grad():
            for param in self.params.values():
                param.add_(0.0)  # -0.0 + 0.0 is +0.0; every other value stays as it is
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._gradients.remove()
        self._scratch.release()
        self._optimizer = None
        return model

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: m.to(torch.bool).cpu() for name, m in self.masks.items()},
            "clocks": [vars(p.clock).copy() for p in self._pruners],
            "scorers": [p.scorer.state_dict() for p in self._pruners],
            "epoch": self.epoch,
            "global_step": self.global_step,
            "epoch_start_step": self._epoch_start_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._require_attached()
        missing = set(self.masks) - set(state["masks"])
        if missing:
            raise ValueError(f"pruning state has no mask for {sorted(missing)[0]!r}")
        for name, mask in self.masks.items():
            mask.copy_(state["masks"][name].to(mask.dtype))
        for p, clock, scorer in zip(self._pruners, state["clocks"], state["scorers"], strict=True):
            p.clock = Clock(**clock)
            p.scorer.load_state_dict(scorer)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self._epoch_start_step = state["epoch_start_step"]
        self.apply_masks()
        self._masks_changed(list(self.params))

    # -- internals ------------------------------------------------------------------------

    @property
    def _kept_grads(self) -> dict[str, Any]:
        """The weights on the kept-only gradient path (read by harness/bench.py and the tests)."""
        return self._gradients.kept_only

    def _require_attached(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("call Pruning.attach(model) before training")
        return self.model

    @torch.no_grad()
    def _before_step(self) -> None:
        masked_in_backward = self._gradients.installed
        for pruner in self._pruners:
            observe = pruner.scorer.needs_gradients and self.epoch <= pruner.spec.end_epoch
            if masked_in_backward and not observe:
                continue
            for name in pruner.names:
                param = self.params[name]
                if param.grad is None:
                    continue
                if not masked_in_backward:
                    param.grad.mul_(self.masks[name])
                if observe:
                    pruner.scorer.observe(name, param)

    @torch.no_grad()
    def _observe_gradients(self) -> None:
        for pruner in self._pruners:
            if pruner.scorer.needs_gradients and self.epoch <= pruner.spec.end_epoch:
                for name in pruner.names:
                    if self.params[name].grad is not None:
                        pruner.scorer.observe(name, self.params[name])

    def _after_step(self) -> None:
        self.global_step += 1
        if self._optimizer.needs_remasking(self.params, self.masks, self._scratch):
            self.apply_masks()

    def _update_due(self) -> None:
        self._require_attached()
        in_epoch = self.global_step - self._epoch_start_step
        spe = self.steps_per_epoch or 1
        changed = False
        for pruner in self._pruners:
            sparsity = pruner.clock.due(pruner.spec, self.epoch, in_epoch, spe)
            if sparsity is not None:
                self._update(pruner, sparsity)
                pruner.clock.record(pruner.spec, sparsity, self.epoch, in_epoch, spe)
                changed = True
        if changed and self._listeners:
            event = self._event(in_epoch)
            for listener in self._listeners:
                listener(event)

    @torch.no_grad()
    def _update(self, pruner: _Pruner, sparsity: float) -> None:
        spec, pattern, scorer = pruner.spec, pruner.pattern, pruner.scorer
        if spec.scope == GLOBAL:
            params = {name: self.params[name] for name in pruner.names}
            pattern.update_masks(scorer, params, self.masks, sparsity, spec.max_sparsity, self._scratch)
        else:
            capped = capped_sparsity(spec, sparsity)
            for name in pruner.names:
                pattern.update_mask(scorer, name, self.params[name], self.masks[name], capped, self._scratch)
        for name in pruner.names:
            self.params[name].mul_(self.masks[name])
            scorer.after_update(name)
        self._masks_changed(pruner.names)

    def _masks_changed(self, names: list[str]) -> None:
        """After the masks of ``names`` changed (the weights already masked): re-route their gradients,
        and zero the optimizer's state of the newly pruned weights."""
        self._gradients.masks_changed(names)
        if self._optimizer is not None:
            self._optimizer.masks_changed(self.params, self.masks, names)

    def _event(self, in_epoch: int) -> MaskUpdate:
        rows = self.sparsity()
        total = sum(r.numel for r in rows)
        scheduled = self.scheduled_sparsity()
        target = sum(scheduled[r.name] * r.numel for r in rows) / total
        return MaskUpdate(
            global_step=self.global_step,
            epoch=self.epoch,
            step=in_epoch,
            target=target,
            sparsity={r.name: r.sparsity for r in rows},
            overall=overall_sparsity(rows),
        )


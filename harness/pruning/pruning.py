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

import difflib
import fnmatch
import functools
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import sparse_grads
from .criteria import Scorer, make_scorer
from .patterns import MaskPattern, Unstructured, make_pattern, select_global
from .schedules import SCHEDULES
from .spec import GLOBAL, Pattern, PruningSpec, ResolvedPruner, Schedule

PRUNABLE_MODULES = (nn.Linear, nn.modules.conv._ConvNd)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every conv and linear weight, by parameter name (never biases or norm parameters)."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_MODULES) and isinstance(module.weight, nn.Parameter):
            found[f"{module_name}.weight" if module_name else "weight"] = module.weight
    return found


@dataclass(frozen=True)
class TensorSparsity:
    """One tensor's sparsity, counted from its values (exact zeros)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def count_sparsity(model: nn.Module, names: list[str]) -> list[TensorSparsity]:
    """Count exact zeros in the named parameters of ``model``."""
    params = dict(model.named_parameters())
    rows = []
    for name in names:
        t = params[name].detach()
        # count_nonzero: several times faster than summing a bool ``t == 0`` (which widens it to int64)
        rows.append(TensorSparsity(name, tuple(t.shape), t.numel(), t.numel() - int(torch.count_nonzero(t))))
    return rows


def overall_sparsity(rows: list[TensorSparsity]) -> float:
    total = sum(r.numel for r in rows)
    return sum(r.zeros for r in rows) / total if total else 0.0


@dataclass(frozen=True)
class MaskUpdate:
    """What one mask update did; handed to listeners (e.g. a metrics logger)."""

    global_step: int  # optimizer steps completed before this update
    epoch: int
    step: int  # optimizer steps completed in this epoch before this update
    target: float  # scheduled sparsity over all pruned tensors, weighted by size
    sparsity: dict[str, float]  # per tensor, counted from the weights
    overall: float  # over all pruned tensors, counted from the weights


@dataclass(frozen=True)
class PlannedUpdate:
    """One update of a dry run: when, and the sparsity each tensor is scheduled to reach."""

    epoch: int
    step: int
    sparsity: dict[str, float]


@dataclass
class _Clock:
    """Where one pruner stands in its schedule."""

    updated: bool = False
    last_position: int | None = None
    scheduled: float = 0.0


@dataclass
class _Pruner:
    spec: ResolvedPruner
    names: list[str]
    scorer: Scorer
    pattern: MaskPattern
    clock: _Clock


class Pruning:
    """Gradual pruning during training, driven by the training loop's callbacks.

    Args:
        spec: a :class:`PruningSpec`; a mapping with its fields (a dict, an OmegaConf node); or the
            path of a YAML file holding them (an LPOT file, with ``pruning: approach: ...``, works too).

    Raises:
        ValueError: a field out of range, naming the field, its value and what is allowed.
    """

    def __init__(self, spec: PruningSpec | Mapping[str, Any] | str | os.PathLike | None = None) -> None:
        if spec is None:
            spec = PruningSpec()
        elif isinstance(spec, str | os.PathLike):
            spec = _spec_from_yaml(Path(spec))
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
        self._optimizer: torch.optim.Optimizer | None = None
        self._state_follows_masks = False  # the optimizer keeps pruned weights at 0 by itself
        self._check_next_step = False  # verify that it did, after the next step
        self._grad_hooks: list[Any] = []  # mask each gradient as backward accumulates it
        self._buffer: torch.Tensor | None = None  # float32, reused by updates while training
        self._kept_grads: dict[str, sparse_grads.KeptPattern] = {}  # weights on the kept-only gradient path

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
        self._remove_grad_hooks()
        named = dict(model.named_parameters())
        self._model_params = named
        self.skipped = {}
        default = list(prunable_weights(model))
        owner: dict[str, int] = {}
        pruners = []
        for i, spec in enumerate(self.pruner_specs):
            prefix = f"pruners[{i}]." if self.spec.pruners else ""
            names = select_tensors(spec.names, spec.exclude, named, default, prefix)
            pattern = make_pattern(spec.pattern, spec.n, spec.m, spec.block_shape, spec.channel_norm)
            if spec.names is None:  # the default selection skips, and reports, what the pattern cannot take
                names = self._skip_unfit(names, pattern, spec, default)
            for name in names:
                if name in owner:
                    raise ValueError(f"{prefix}names: {name!r} is already pruned by pruners[{owner[name]}]; "
                                     "each tensor belongs to one pruner")
                owner[name] = i
                try:
                    pattern.check(name, named[name].shape)
                except ValueError as err:
                    raise ValueError(f"{prefix}{err}") from None
            pruners.append(_Pruner(spec, names, make_scorer(spec.criterion, spec.seed), pattern, _Clock()))
        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self.owners = owner  # tensor name -> index of its pruner in pruner_specs
        self._pruners = pruners
        self.params = {name: named[name] for p in pruners for name in p.names}
        self.masks = {name: torch.ones_like(t, memory_format=torch.contiguous_format).detach()
                      for name, t in self.params.items()}
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
        self._optimizer = optimizer
        self._state_follows_masks = _elementwise(optimizer)
        self._check_next_step = self._state_follows_masks
        _zero_pruned_state(optimizer, [(self.params[n], self.masks[n]) for n in self.masks])
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self._before_step()),
            optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]

    def _skip_unfit(self, names: list[str], pattern: MaskPattern, spec: ResolvedPruner,
                    default: list[str]) -> list[str]:
        named = dict(self._model_params)
        kept = []
        for name in names:
            if spec.pattern == Pattern.channel and default and name == default[-1]:
                self.skipped[name] = "the output layer: removing its channels would remove classes"
                continue
            try:
                pattern.check(name, named[name].shape)
            except ValueError as err:
                reason = str(err).split(": ", 1)[-1].removesuffix("; exclude it")
                self.skipped[name] = reason.removeprefix(f"{name} ")
                continue
            kept.append(name)
        if not kept:
            raise ValueError(f"names: no tensor of the model can take pattern={spec.pattern.value} "
                             f"({'; '.join(f'{k}: {v}' for k, v in self.skipped.items())})")
        return kept

    def add_listener(self, listener: Callable[[MaskUpdate], None]) -> None:
        """Call ``listener(update)`` after every mask update."""
        self._listeners.append(listener)

    # -- callbacks ------------------------------------------------------------------------

    def on_train_begin(self) -> None:
        self._require_attached()
        self._add_grad_hooks()

    def on_epoch_begin(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_start_step = self.global_step
        self._add_grad_hooks()  # for loops that skip on_train_begin
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
        if self._step_pending or not self._explicit_steps:
            self.global_step += 1
            self._provisional_steps += not self._explicit_steps
        self._step_pending = False
        self.apply_masks()

    def on_epoch_end(self) -> None:
        pass

    def on_train_end(self) -> None:
        self._remove_grad_hooks()
        self._buffer = None
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
        spe = self.steps_per_epoch or 1
        clocks = [_Clock() for _ in self._pruners]
        planned = []
        for epoch in range(epochs):
            for step in range(spe):
                due: dict[str, float] = {}
                for pruner, clock in zip(self._pruners, clocks, strict=True):
                    value = _due_sparsity(pruner.spec, clock, epoch, step, spe)
                    if value is not None:
                        cap = pruner.spec.max_sparsity
                        if cap is not None and pruner.spec.scope != GLOBAL:
                            value = min(value, cap)
                        due |= dict.fromkeys(pruner.names, value)
                        clock.updated, clock.last_position = True, _position(pruner.spec, epoch, step, spe)[0]
                if due:
                    planned.append(PlannedUpdate(epoch, step, due))
        return planned

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
        self._remove_grad_hooks()
        self._buffer = None
        self._optimizer, self._state_follows_masks = None, False
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
            p.clock = _Clock(**clock)
            p.scorer.load_state_dict(scorer)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self._epoch_start_step = state["epoch_start_step"]
        self.apply_masks()
        if self._grad_hooks:
            self._route_kept_grads(list(self.params))
        if self._optimizer is not None:
            _zero_pruned_state(self._optimizer, [(self.params[n], self.masks[n]) for n in self.masks])
            self._check_next_step = self._state_follows_masks

    # -- internals ------------------------------------------------------------------------

    def _require_attached(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("call Pruning.attach(model) before training")
        return self.model

    def _add_grad_hooks(self) -> None:
        """Mask each pruned tensor's gradient as soon as backward has accumulated it: the same
        multiply as before the step, but on a gradient that was just written and is still in cache.
        Registered for training only (``on_train_begin`` to ``on_train_end``), so that a model that
        is attached first and trained dense later (the runner's baseline) pays nothing."""
        if self._grad_hooks:
            return
        for name, param in self.params.items():
            if not param.requires_grad:  # frozen: no gradient to mask (its weights are masked at updates)
                continue
            # The mask tensor is updated in place, never replaced, so the hook can hold it.
            self._grad_hooks.append(param.register_post_accumulate_grad_hook(
                functools.partial(self._mask_gradient, name, self.masks[name])))
        self._route_kept_grads(list(self.params))

    def _remove_grad_hooks(self) -> None:
        for hook in self._grad_hooks:
            hook.remove()
        self._grad_hooks = []
        self._route_kept_grads([])

    def _mask_gradient(self, name: str, mask: torch.Tensor, param: torch.Tensor) -> None:
        pattern = self._kept_grads.get(name)
        if pattern is not None and pattern.produced(param.grad):
            return  # the kept-only gradient, as backward made it: already masked
        with torch.no_grad():
            param.grad.mul_(mask)

    def _route_kept_grads(self, names: list[str]) -> None:
        """Put ``names`` on the kept-only weight gradient path where it pays (sparse_grads.py), or
        take them off it; with no names (training ended), take every tensor off."""
        if not names:
            for name in list(self._kept_grads):
                sparse_grads.uninstall(self._owner(name))
            self._kept_grads = {}
            return
        for name in names:
            module, param, mask = self._owner(name), self.params[name], self.masks[name]
            if self.spec.sparse_grads and self._grad_hooks and sparse_grads.eligible(module, param, mask):
                self._kept_grads[name] = sparse_grads.install(module, mask)
            elif self._kept_grads.pop(name, None) is not None:
                sparse_grads.uninstall(module)

    def _owner(self, name: str) -> nn.Module:
        return self._require_attached().get_submodule(name.rpartition(".")[0])

    @torch.no_grad()
    def _before_step(self) -> None:
        masked_in_backward = bool(self._grad_hooks)
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

    def _after_step(self) -> None:
        self.global_step += 1
        if not self._state_follows_masks:
            self.apply_masks()
        elif self._check_next_step:
            self._check_next_step = False
            self._check_pruned_stayed_zero()

    @torch.no_grad()
    def _check_pruned_stayed_zero(self) -> None:
        """After the first step past a mask update: fall back to re-masking after every step if
        the optimizer moved a pruned weight (its gradient was changed after backward)."""
        moved = [name for name, param in self.params.items() if _pruned_moved(param, self.masks[name],
                                                                               self._scratch_for(param))]
        if moved:
            warnings.warn(f"pruning: the optimizer step moved pruned weights of {moved[0]} (a gradient changed "
                          "after backward?); re-masking the weights after every step from now on", stacklevel=2)
            self._state_follows_masks = False
            self.apply_masks()

    def _scratch(self, numel: int, device: torch.device) -> torch.Tensor:
        """A 1-D float32 buffer of ``numel``, kept from update to update while training: the first
        touch of fresh memory costs several times a pass over it (page faults)."""
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.device != device:
            self._buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return self._buffer[:numel]

    def _scratch_for(self, param: torch.Tensor) -> torch.Tensor:
        return self._scratch(param.numel(), param.device).view(param.shape)

    def _update_due(self) -> None:
        self._require_attached()
        in_epoch = self.global_step - self._epoch_start_step
        changed = False
        for pruner in self._pruners:
            sparsity = _due_sparsity(pruner.spec, pruner.clock, self.epoch, in_epoch, self.steps_per_epoch or 1)
            if sparsity is not None:
                self._update(pruner, sparsity)
                pruner.clock.last_position = _position(pruner.spec, self.epoch, in_epoch,
                                                       self.steps_per_epoch or 1)[0]
                changed = True
        if changed and self._listeners:
            event = self._event(in_epoch)
            for listener in self._listeners:
                listener(event)

    @torch.no_grad()
    def _update(self, pruner: _Pruner, sparsity: float) -> None:
        spec, pattern, scorer = pruner.spec, pruner.pattern, pruner.scorer
        if spec.scope == GLOBAL:
            unit_scores, unit_sizes, current = {}, {}, {}
            scratch = None
            masks = [self.masks[n] for n in pruner.names]
            if (isinstance(pattern, Unstructured) and all(m.dtype == torch.float32 for m in masks)
                    and len({m.device for m in masks}) == 1):
                # Scores straight into the second half of the engine's buffer, ranking into the first.
                sizes = [self.params[n].numel() for n in pruner.names]
                scratch = self._scratch(2 * sum(sizes), masks[0].device)
                score_areas = scratch[sum(sizes):].split(sizes)
            for i, name in enumerate(pruner.names):
                param = self.params[name]
                if scratch is not None:
                    unit_scores[name] = scorer.scores_into(name, param, score_areas[i].view(param.shape)).view(-1)
                else:
                    unit_scores[name] = pattern.unit_scores(scorer.scores(name, param))
                unit_sizes[name] = pattern.unit_sizes(param.shape)
                current[name] = pattern.unit_keep(self.masks[name])
            keep = select_global(unit_scores, unit_sizes, current, sparsity, spec.max_sparsity, scratch=scratch)
            for name in pruner.names:
                self.masks[name].copy_(pattern.expand(keep[name], self.params[name].shape))
        else:
            capped = min(sparsity, spec.max_sparsity) if spec.max_sparsity is not None else sparsity
            for name in pruner.names:
                param, mask = self.params[name], self.masks[name]
                if isinstance(pattern, Unstructured) and mask.dtype == torch.float32:
                    pattern.update_in_place(scorer.scores_into(name, param, self._scratch_for(param)), capped, mask)
                else:
                    pattern.mask(scorer.scores(name, param), capped, mask, out=mask)
        for name in pruner.names:
            self.params[name].mul_(self.masks[name])
            scorer.after_update(name)
        if self._grad_hooks:
            self._route_kept_grads(pruner.names)
        if self._optimizer is not None:
            _zero_pruned_state(self._optimizer, [(self.params[n], self.masks[n]) for n in pruner.names])
            self._check_next_step = self._state_follows_masks
        pruner.clock.scheduled = sparsity
        pruner.clock.updated = True

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


# Optimizers whose update of a weight depends only on that weight, its gradient and its own
# state entries, and is exactly 0 when all three are 0 (eps > 0 keeps 0 / (0 + eps) at 0).
_ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad)


def _elementwise(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in _ELEMENTWISE and all(g.get("eps", 1.0) > 0 for g in optimizer.param_groups)


@torch.no_grad()
def _zero_pruned_state(optimizer: torch.optim.Optimizer, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Zero the optimizer's per-weight state (momentum, moments) of the pruned weights."""
    for param, mask in pairs:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.mul_(mask)


def _pruned_moved(param: torch.Tensor, mask: torch.Tensor, scratch: torch.Tensor) -> bool:
    """Whether some weight the mask prunes is not 0: ``param * mask`` differs from ``param``."""
    if torch.equal(torch.mul(param.detach(), mask, out=scratch), param.detach()):
        return False
    # Not equal: a pruned weight moved, or a kept one is NaN (NaN != NaN); tell which, exactly.
    return bool(param.detach().ne(0).logical_and_(mask.eq(0)).any())




def _spec_from_yaml(path: Path) -> PruningSpec:
    import yaml

    from .lpot import read_lpot_yaml

    if not path.is_file():
        raise ValueError(f"pruning config {path}: no such file")
    with open(path) as f:
        text = f.read()
    if "pruning:" in text and "approach" in text:
        return read_lpot_yaml(path).spec
    data = yaml.safe_load(text) or {}
    return PruningSpec.from_mapping(data.get("prune", data) if isinstance(data, dict) else {})


def _position(spec: ResolvedPruner, epoch: int, in_epoch: int, spe: int) -> tuple[int, int, int] | None:
    """(position, update interval, span) in one unit, or None when no update can fall here.

    The unit is epochs when the frequency is a whole number of epochs (updates at epoch
    begin, as LPOT does), else optimizer steps.
    """
    if spec.update_frequency_steps is None and float(spec.update_frequency).is_integer():
        if in_epoch != 0:
            return None
        return epoch - spec.start_epoch, int(spec.update_frequency), spec.end_epoch - spec.start_epoch
    every = spec.update_frequency_steps or max(1, round(spec.update_frequency * spe))
    return (epoch - spec.start_epoch) * spe + in_epoch, every, (spec.end_epoch - spec.start_epoch) * spe


def _due_sparsity(spec: ResolvedPruner, clock: _Clock, epoch: int, in_epoch: int, spe: int) -> float | None:
    """The scheduled sparsity if this pruner updates at (epoch, in_epoch), else None."""
    where = _position(spec, epoch, in_epoch, spe)
    if where is None:
        return None
    position, every, span = where
    if clock.updated and clock.last_position == position:
        return None  # another micro-batch of the same optimizer step
    if position > span:
        return None if clock.updated else spec.target_sparsity  # started after end_epoch: catch up once
    if position < 0:
        return None
    if spec.schedule == Schedule.one_shot:
        return None if clock.updated else spec.target_sparsity
    if position % every == 0:
        return SCHEDULES[spec.schedule](spec.initial_sparsity, spec.target_sparsity, position // every, every, span)
    if position == span:  # the end is off the staircase: finish at the target (LPOT never did)
        return spec.target_sparsity
    return None


def select_tensors(patterns: list[str] | None, exclude: list[str] | None, named: Mapping[str, nn.Parameter],
                   default: list[str], prefix: str = "") -> list[str]:
    """Resolve exact names, globs and ``re:`` regexes to parameter names, minus ``exclude``.

    Unset ``patterns`` means every conv and linear weight. Globs and regexes match only
    parameters with two or more dimensions (weight matrices and kernels, never biases or
    norms); an exact name may be any parameter. A pattern that matches nothing is an error
    that lists the closest names.
    """
    chosen = list(default) if patterns is None else []
    for pattern in patterns or []:
        hits = _matching(pattern, named)
        if not hits:
            raise ValueError(_unknown_tensor_message(f"{prefix}names", pattern, list(named)))
        chosen += [h for h in hits if h not in chosen]
    for pattern in exclude or []:
        hits = set(_matching(pattern, named))
        if not hits:
            raise ValueError(_unknown_tensor_message(f"{prefix}exclude", pattern, list(named)))
        chosen = [name for name in chosen if name not in hits]
    if not chosen:
        raise ValueError(f"{prefix}names: no tensor left to prune (the model has no conv or linear weights, "
                         "or exclude removed them all)")
    return chosen


def _matching(pattern: str, named: Mapping[str, nn.Parameter]) -> list[str]:
    if pattern in named:
        return [pattern]
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return [n for n, p in named.items() if p.dim() >= 2 and regex.fullmatch(n)]
    if any(c in pattern for c in "*?["):
        return [n for n, p in named.items() if p.dim() >= 2 and fnmatch.fnmatchcase(n, pattern)]
    return []


def _unknown_tensor_message(key: str, name: str, existing: list[str]) -> str:
    close = difflib.get_close_matches(name.removeprefix("re:"), existing, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"the model has: {', '.join(existing[:6])}, ..."
    return f"{key}: {name!r} matches no parameter of the model; {hint}"

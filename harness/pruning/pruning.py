"""The pruning engine: attach to a model, call the callbacks from any training loop.

Masks live beside the parameters: the model keeps its own ``nn.Parameter`` objects, so
the user's optimizer trains the very tensors that are pruned (LPOT 1.6 replaced them,
and its users' optimizers went on training stale copies). Per optimizer step the cost
is one in-place multiply per pruned tensor for the gradients and one for the weights.

Example::

    pruning = Pruning({"target_sparsity": 0.9, "end_epoch": 3}).attach(model)
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
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .criteria import CRITERIA
from .patterns import unstructured_mask
from .schedules import SCHEDULES
from .spec import PruningSpec, ResolvedPruner

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
        rows.append(TensorSparsity(name, tuple(t.shape), t.numel(), int((t == 0).sum().item())))
    return rows


def overall_sparsity(rows: list[TensorSparsity]) -> float:
    total = sum(r.numel for r in rows)
    return sum(r.zeros for r in rows) / total if total else 0.0


@dataclass(frozen=True)
class MaskUpdate:
    """What one mask update did; handed to listeners (e.g. a metrics logger)."""

    global_step: int  # optimizer steps completed before this update
    epoch: int
    step: int  # batch index within the epoch
    target: float  # scheduled sparsity over all pruned tensors, weighted by size
    sparsity: dict[str, float]  # per tensor, counted from the weights
    overall: float  # over all pruned tensors, counted from the weights


@dataclass
class _Pruner:
    spec: ResolvedPruner
    names: list[str]
    scheduled: float = 0.0
    updated: bool = False


class Pruning:
    """Gradual pruning during training, driven by the training loop's callbacks.

    Args:
        spec: a :class:`PruningSpec`, or a mapping with its fields (e.g. parsed YAML).

    Raises:
        ValueError: a field out of range, naming the field, its value and what is allowed.
    """

    def __init__(self, spec: PruningSpec | Mapping[str, Any] | None = None) -> None:
        if spec is None:
            spec = PruningSpec()
        elif not isinstance(spec, PruningSpec):
            spec = PruningSpec.from_mapping(spec)
        self.spec = spec
        self._resolved = spec.resolve()
        self.model: nn.Module | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._pruners: list[_Pruner] = []
        self._listeners: list[Callable[[MaskUpdate], None]] = []
        self.steps_per_epoch: int | None = None
        self.epoch = 0
        self.step = 0
        self.global_step = 0

    # -- set-up ---------------------------------------------------------------------------

    def attach(self, model: nn.Module, steps_per_epoch: int | None = None) -> Pruning:
        """Resolve each pruner's tensors in ``model`` and start with all-ones masks.

        ``steps_per_epoch`` (e.g. ``len(train_loader)``) is needed when an
        ``update_frequency`` is a fraction of an epoch.
        """
        fractional = [p for p in self._resolved if not float(p.update_frequency).is_integer()]
        if fractional and not steps_per_epoch:
            raise ValueError(
                f"update_frequency={fractional[0].update_frequency} is a fraction of an epoch: "
                "pass attach(model, steps_per_epoch=len(train_loader))"
            )
        named = dict(model.named_parameters())
        default = prunable_weights(model)
        owner: dict[str, int] = {}
        pruners = []
        for i, spec in enumerate(self._resolved):
            prefix = f"pruners[{i}]." if self.spec.pruners else ""
            names = spec.names if spec.names is not None else list(default)
            for name in names:
                if name not in named:
                    raise ValueError(_unknown_tensor_message(prefix + "names", name, list(named)))
                if name in owner:
                    raise ValueError(
                        f"{prefix}names: {name!r} is already pruned by pruners[{owner[name]}]; "
                        "each tensor belongs to one pruner"
                    )
                owner[name] = i
            if not names:
                raise ValueError(f"{prefix}names: the model has no conv or linear weights to prune")
            pruners.append(_Pruner(spec, list(names)))
        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self._pruners = pruners
        self.params = {name: named[name] for p in pruners for name in p.names}
        self.masks = {name: torch.ones_like(t, memory_format=torch.contiguous_format).detach()
                      for name, t in self.params.items()}
        return self

    def add_listener(self, listener: Callable[[MaskUpdate], None]) -> None:
        """Call ``listener(update)`` after every mask update."""
        self._listeners.append(listener)

    # -- callbacks ------------------------------------------------------------------------

    def on_train_begin(self) -> None:
        self._require_attached()

    def on_epoch_begin(self, epoch: int) -> None:
        self.epoch, self.step = int(epoch), 0
        self._update_due()

    def on_batch_begin(self, step: int) -> None:
        self.step = int(step)
        if self.step > 0:  # step 0 was handled by on_epoch_begin
            self._update_due()

    @torch.no_grad()
    def on_before_optimizer_step(self) -> None:
        """Mask the gradients so that pruned weights take no part in the update."""
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.mul_(self.masks[name])

    @torch.no_grad()
    def on_batch_end(self) -> None:
        """Re-apply the masks after the optimizer step: momentum, Adam moments and weight
        decay can move a pruned weight even with a zero gradient."""
        self.global_step += 1
        self.apply_masks()

    def on_epoch_end(self) -> None:
        pass

    def on_train_end(self) -> None:
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
        return {name: p.scheduled for p in self._pruners for name in p.names}

    def finalize(self) -> nn.Module:
        """Bake the masks into the weights and hand back the plain model (no hooks to remove)."""
        model = self._require_attached()
        self.apply_masks()
        return model

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: m.to(torch.bool).cpu() for name, m in self.masks.items()},
            "scheduled": [p.scheduled for p in self._pruners],
            "updated": [p.updated for p in self._pruners],
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._require_attached()
        missing = set(self.masks) - set(state["masks"])
        if missing:
            raise ValueError(f"pruning state has no mask for {sorted(missing)[0]!r}")
        for name, mask in self.masks.items():
            mask.copy_(state["masks"][name].to(mask.dtype))
        for p, scheduled, updated in zip(self._pruners, state["scheduled"], state["updated"], strict=True):
            p.scheduled, p.updated = float(scheduled), bool(updated)
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.apply_masks()

    # -- internals ------------------------------------------------------------------------

    def _require_attached(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("call Pruning.attach(model) before training")
        return self.model

    def _update_due(self) -> None:
        self._require_attached()
        changed = False
        for pruner in self._pruners:
            sparsity = self._due_sparsity(pruner)
            if sparsity is not None:
                self._update(pruner, sparsity)
                changed = True
        if changed and self._listeners:
            event = self._event()
            for listener in self._listeners:
                listener(event)

    def _due_sparsity(self, pruner: _Pruner) -> float | None:
        """The scheduled sparsity if this pruner updates at the current (epoch, step), else None.

        Positions count from ``start_epoch`` in epochs when the frequency is a whole number of
        epochs (updates at epoch begin, as LPOT does), else in optimizer steps.
        """
        s = pruner.spec
        if float(s.update_frequency).is_integer():
            if self.step != 0:
                return None
            every, position, span = int(s.update_frequency), self.epoch - s.start_epoch, s.end_epoch - s.start_epoch
        else:
            spe = self.steps_per_epoch or 1
            every = max(1, round(s.update_frequency * spe))
            position = (self.epoch - s.start_epoch) * spe + self.step
            span = (s.end_epoch - s.start_epoch) * spe
        if position > span and not pruner.updated and self.step == 0:
            return s.target_sparsity  # training started after end_epoch: catch up once
        if position < 0 or position > span:
            return None
        if position % every == 0:
            schedule = SCHEDULES[s.schedule]
            return schedule(s.initial_sparsity, s.target_sparsity, position // every, every, span)
        if position == span:  # the end is off the staircase: finish at the target (LPOT never did)
            return s.target_sparsity
        return None

    @torch.no_grad()
    def _update(self, pruner: _Pruner, sparsity: float) -> None:
        score = CRITERIA[pruner.spec.criterion]
        for name in pruner.names:
            param, mask = self.params[name], self.masks[name]
            mask.copy_(unstructured_mask(score(param), sparsity, mask))
            param.mul_(mask)
        pruner.scheduled = sparsity
        pruner.updated = True

    def _event(self) -> MaskUpdate:
        rows = self.sparsity()
        total = sum(r.numel for r in rows)
        scheduled = self.scheduled_sparsity()
        target = sum(scheduled[r.name] * r.numel for r in rows) / total
        return MaskUpdate(
            global_step=self.global_step,
            epoch=self.epoch,
            step=self.step,
            target=target,
            sparsity={r.name: r.sparsity for r in rows},
            overall=overall_sparsity(rows),
        )


def _unknown_tensor_message(key: str, name: str, existing: list[str]) -> str:
    close = difflib.get_close_matches(name, existing, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"the model has: {', '.join(existing[:6])}, ..."
    return f"{key}: {name!r} is not a parameter of the model; {hint}"

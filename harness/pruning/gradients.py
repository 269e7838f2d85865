"""Masking gradients while training: as backward accumulates each one, or by computing only the
kept weights' gradients of large, highly pruned Linear weights (sparse_grads.py)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import sparse_grads


class GradientMasking:
    """Mask each pruned tensor's gradient as soon as backward has accumulated it: the same
    multiply as before the step, but on a gradient that was just written and is still in cache.
    Installed for training only (``on_train_begin`` to ``on_train_end``), so that a model that
    is attached first and trained dense later (the runner's baseline) pays nothing.

    Args:
        model: the model the tensors belong to (``None`` before the engine is attached).
        params: the pruned parameters, by name.
        masks: their masks, updated in place and never replaced, so that the hooks can hold them.
        kept_only_path: whether weights may take the kept-only gradient path where it pays (``sparse_grads``).
    """

    def __init__(self, model: nn.Module | None, params: Mapping[str, nn.Parameter],
                 masks: Mapping[str, torch.Tensor], kept_only_path: bool) -> None:
        self._model = model
        self._params = params
        self._masks = masks
        self._kept_only_path = kept_only_path
        self._hooks: list[Any] = []
        self.kept_only: dict[str, sparse_grads.KeptPattern] = {}  # weights on the kept-only gradient path

    @property
    def installed(self) -> bool:
        """Whether backward masks the gradients (between ``install`` and ``remove``)."""
        return bool(self._hooks)

    def install(self) -> None:
        if self._hooks:
            return
        for name, param in self._params.items():
            if not param.requires_grad:  # frozen: no gradient to mask (its weights are masked at updates)
                continue
            # The mask tensor is updated in place, never replaced, so the hook can hold it.
            self._hooks.append(param.register_post_accumulate_grad_hook(
                functools.partial(self._mask_gradient, name, self._masks[name])))
        self._route_kept_grads(list(self._params))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._route_kept_grads([])

    def masks_changed(self, names: list[str]) -> None:
        """The masks of ``names`` changed: while installed, re-decide which take the kept-only path."""
        if self._hooks:
            self._route_kept_grads(names)

    def _mask_gradient(self, name: str, mask: torch.Tensor, param: torch.Tensor) -> None:
        pattern = self.kept_only.get(name)
        if pattern is not None and pattern.produced(param.grad):
            return  # the kept-only gradient, as backward made it: already masked
        with torch.no_grad():
            param.grad.mul_(mask)

    def _route_kept_grads(self, names: list[str]) -> None:
        """Put ``names`` on the kept-only weight gradient path where it pays (sparse_grads.py), or
        take them off it; with no names (training ended), take every tensor off."""
        if not names:
            for name in list(self.kept_only):
                sparse_grads.uninstall(self._owner(name))
            self.kept_only = {}
            return
        for name in names:
            module, param, mask = self._owner(name), self._params[name], self._masks[name]
            if self._kept_only_path and self._hooks and sparse_grads.eligible(module, param, mask):
                self.kept_only[name] = sparse_grads.install(module, mask)
            elif self.kept_only.pop(name, None) is not None:
                sparse_grads.uninstall(module)

    def _owner(self, name: str) -> nn.Module:
        return self._model.get_submodule(name.rpartition(".")[0])

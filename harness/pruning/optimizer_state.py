"""The user's optimizer and the masks: its per-weight state must not move a pruned weight.

For the optimizers in ``_ELEMENTWISE`` a pruned weight with a zero gradient, zero state and a
zero value stays exactly 0 through a step, so zeroing that state at each mask update replaces
re-masking the weights after every step. The first step after each update checks that it did.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch

from .scratch import Scratch

# Optimizers whose update of a weight depends only on that weight, its gradient and its own
# state entries, and is exactly 0 when all three are 0 (eps > 0 keeps 0 / (0 + eps) at 0).
_ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad)


def _elementwise(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in _ELEMENTWISE and all(g.get("eps", 1.0) > 0 for g in optimizer.param_groups)


class MaskedOptimizer:
    """The optimizer the engine masks around, and whether its steps keep pruned weights at 0."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.follows_masks = _elementwise(optimizer)  # the optimizer keeps pruned weights at 0 by itself
        self.check_next_step = False  # verify that it did, after the next step

    @torch.no_grad()
    def masks_changed(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                      names: Iterable[str]) -> None:
        """Zero the optimizer's per-weight state (momentum, moments) of the pruned weights of ``names``,
        and check after the next step that they stayed at 0."""
        for name in names:
            param, mask = params[name], masks[name]
            for value in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.mul_(mask)
        self.check_next_step = self.follows_masks

    def needs_remasking(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                        scratch: Scratch) -> bool:
        """After a step: whether the weights must be masked again (always, when the optimizer does
        not keep pruned weights at 0; else only when the check finds that it moved one)."""
        if not self.follows_masks:
            return True
        if self.check_next_step:
            self.check_next_step = False
            return self._pruned_weights_moved(params, masks, scratch)
        return False

    @torch.no_grad()
    def _pruned_weights_moved(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                              scratch: Scratch) -> bool:
        """After the first step past a mask update: fall back to re-masking after every step if
        the optimizer moved a pruned weight (its gradient was changed after backward)."""
        moved = [name for name, param in params.items() if _pruned_moved(param, masks[name], scratch.like(param))]
        if moved:
            warnings.warn(f"pruning: the optimizer step moved pruned weights of {moved[0]} (a gradient changed "
                          "after backward?); re-masking the weights after every step from now on", stacklevel=2)
            self.follows_masks = False
        return bool(moved)


def _pruned_moved(param: torch.Tensor, mask: torch.Tensor, scratch: torch.Tensor) -> bool:
    """Whether some weight the mask prunes is not 0: ``param * mask`` differs from ``param``."""
    if torch.equal(torch.mul(param.detach(), mask, out=scratch), param.detach()):
        return False
    # Not equal: a pruned weight moved, or a kept one is NaN (NaN != NaN); tell which, exactly.
    return bool(param.detach().ne(0).logical_and_(mask.eq(0)).any())

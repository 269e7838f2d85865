"""Patterns: turn scores and a sparsity into a keep-mask (1.0 keeps, 0.0 prunes).

Masks only shrink: a weight pruned earlier stays pruned, whatever its score now.
"""

from __future__ import annotations

import torch


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` prunes: the nearest whole number.

    LPOT thresholded at a percentile with ``<=`` and so pruned one weight more than asked.
    """
    return min(numel, max(0, round(sparsity * numel)))


def unstructured_mask(scores: torch.Tensor, sparsity: float, current_mask: torch.Tensor) -> torch.Tensor:
    """Prune exactly ``round(sparsity * numel)`` weights with the lowest scores.

    Weights already pruned by ``current_mask`` rank below every live weight, so the new
    mask is a subset of the old one whenever the sparsity does not decrease.

    Example::

        unstructured_mask(torch.tensor([3., 1., 2., 4.]), 0.5, torch.ones(4))
        # tensor([1., 0., 0., 1.])
    """
    k = pruned_count(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=current_mask.dtype, device=current_mask.device)
    if k > 0:
        ranked = scores.detach().reshape(-1).to(torch.float32).clone()
        ranked[current_mask.reshape(-1) == 0] = -float("inf")
        mask[torch.topk(ranked, k, largest=False, sorted=False).indices] = 0
    return mask.view(scores.shape)

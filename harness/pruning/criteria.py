"""Criteria: score every weight; the lowest scores are pruned first.

A criterion is a pure function from a weight tensor to a score tensor of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .spec import Criterion

CriterionFn = Callable[[torch.Tensor], torch.Tensor]


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """L1 magnitude, ``|w|``: the criterion of LPOT's ``basic_magnitude`` and of Han et al. 2015."""
    return weight.detach().abs()


CRITERIA: dict[Criterion, CriterionFn] = {
    Criterion.magnitude: magnitude,
}

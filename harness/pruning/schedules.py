"""Sparsity schedules: the sparsity to reach after ``updates_done`` updates.

Every schedule is a pure function of the same arguments::

    fn(initial, target, updates_done, update_every, span) -> sparsity

``update_every`` and ``span`` (end minus start) share one unit, epochs or optimizer
steps, so the progress is ``x = updates_done * update_every / span`` in [0, 1]. Each
schedule is named for the curve it computes:

- ``linear``: ``initial + (target - initial) * x``. With integer epoch frequencies it
  evaluates LPOT's staircase expression in LPOT's operation order, so values agree to
  the last bit.
- ``cubic``: Zhu & Gupta's automated gradual pruning (AGP, 2017),
  ``target + (initial - target) * (1 - x) ** 3``: fast early, gentle near the target.
  (Intel Neural Compressor's "cube" is ``x ** 3``, the mirror image; it is not this.)
"""

from __future__ import annotations

from collections.abc import Callable

from .spec import Schedule

ScheduleFn = Callable[[float, float, int, float, float], float]


def linear(initial: float, target: float, updates_done: int, update_every: float, span: float) -> float:
    if span <= 0:
        return target
    # Same operation order as LPOT's Pruner.update_sparsity, for bit-identical values.
    return initial + (target - initial) * updates_done * update_every / span


def cubic(initial: float, target: float, updates_done: int, update_every: float, span: float) -> float:
    if span <= 0:
        return target
    x = min(1.0, updates_done * update_every / span)
    return target + (initial - target) * (1.0 - x) ** 3


SCHEDULES: dict[Schedule, ScheduleFn] = {
    Schedule.linear: linear,
    Schedule.cubic: cubic,
}


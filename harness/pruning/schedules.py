"""Sparsity schedules: the sparsity to reach after ``updates_done`` updates.

Every schedule is a pure function of the same arguments::

    fn(initial, target, updates_done, update_every, span) -> sparsity

``update_every`` and ``span`` (end minus start) share one unit, epochs or optimizer
steps, so the progress is ``x = updates_done * update_every / span`` in [0, 1]. Each
schedule is named for the curve it computes:

- ``one_shot``: the target at once, at ``start_epoch``.
- ``linear``: ``initial + (target - initial) * x``. With integer epoch frequencies it
  evaluates LPOT's staircase expression in LPOT's operation order, so values agree to
  the last bit.
- ``cubic``: Zhu & Gupta's automated gradual pruning (AGP, 2017),
  ``target + (initial - target) * (1 - x) ** 3``: fast early, gentle near the target.
  (Intel Neural Compressor's "cube" is ``x ** 3``, the mirror image; it is not this.)
- ``exponential``: the density ``1 - s`` shrinks by the same factor at every update,
  ``1 - (1 - initial) * ((1 - target) / (1 - initial)) ** x``.
- ``cosine``: half a cosine from initial to target, ``target + (initial - target) * (1 + cos(pi x)) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .spec import Schedule

ScheduleFn = Callable[[float, float, int, float, float], float]


def _progress(updates_done: int, update_every: float, span: float) -> float:
    return 1.0 if span <= 0 else min(1.0, updates_done * update_every / span)


def one_shot(initial: float, target: float, updates_done: int, update_every: float, span: float) -> float:
    return target


def linear(initial: float, target: float, updates_done: int, update_every: float, span: float) -> float:
    if span <= 0:
        return target
    # Same operation order as LPOT's Pruner.update_sparsity, for bit-identical values.
    return initial + (target - initial) * updates_done * update_every / span


def cubic(initial: float, target: float, updates_done: int, update_every: float, span: float) -> float:
    x = _progress(updates_done, update_every, span)
    return target + (initial - target) * (1.0 - x) ** 3


def exponential(initial: float, target: float, updates_done: int, update_every: float, span: float) -> float:
    x = _progress(updates_done, update_every, span)
    return 1.0 - (1.0 - initial) * ((1.0 - target) / (1.0 - initial)) ** x


def cosine(initial: float, target: float, updates_done: int, update_every: float, span: float) -> float:
    x = _progress(updates_done, update_every, span)
    return target + (initial - target) * (1.0 + math.cos(math.pi * x)) / 2.0


SCHEDULES: dict[Schedule, ScheduleFn] = {
    Schedule.one_shot: one_shot,
    Schedule.linear: linear,
    Schedule.cubic: cubic,
    Schedule.exponential: exponential,
    Schedule.cosine: cosine,
}

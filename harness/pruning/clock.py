"""The schedule clock: when each pruner updates its masks, and to what sparsity; the dry-run plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .schedules import SCHEDULES
from .spec import GLOBAL, ResolvedPruner, Schedule


@dataclass(frozen=True)
class PlannedUpdate:
    """One update of a dry run: when, and the sparsity each tensor is scheduled to reach."""

    epoch: int
    step: int
    sparsity: dict[str, float]


@dataclass
class Clock:
    """Where one pruner stands in its schedule (a checkpoint keeps these three fields)."""

    updated: bool = False
    last_position: int | None = None
    scheduled: float = 0.0

    def due(self, spec: ResolvedPruner, epoch: int, in_epoch: int, spe: int) -> float | None:
        """The scheduled sparsity if this pruner updates at (epoch, in_epoch), else None."""
        where = _position(spec, epoch, in_epoch, spe)
        if where is None:
            return None
        position, every, span = where
        if self.updated and self.last_position == position:
            return None  # another micro-batch of the same optimizer step
        if position > span:
            return None if self.updated else spec.target_sparsity  # started after end_epoch: catch up once
        if position < 0:
            return None
        if spec.schedule == Schedule.one_shot:
            return None if self.updated else spec.target_sparsity
        if position % every == 0:
            return SCHEDULES[spec.schedule](spec.initial_sparsity, spec.target_sparsity, position // every, every, span)
        if position == span:  # the end is off the staircase: finish at the target (LPOT never did)
            return spec.target_sparsity
        return None

    def record(self, spec: ResolvedPruner, sparsity: float, epoch: int, in_epoch: int, spe: int) -> None:
        """The pruner updated to ``sparsity`` at (epoch, in_epoch), where :meth:`due` said it should."""
        self.scheduled = sparsity
        self.updated = True
        self.last_position = _position(spec, epoch, in_epoch, spe)[0]


def capped_sparsity(spec: ResolvedPruner, sparsity: float) -> float:
    """The sparsity each tensor of the pruner goes to: per tensor, at most ``max_sparsity``; a
    global pruner's cap acts inside the selection, which ranks the tensors together."""
    if spec.max_sparsity is not None and spec.scope != GLOBAL:
        return min(sparsity, spec.max_sparsity)
    return sparsity


def plan_updates(pruners: Sequence[tuple[ResolvedPruner, list[str]]], epochs: int, spe: int) -> list[PlannedUpdate]:
    """Dry run: the updates that ``epochs`` epochs of ``spe`` optimizer steps make, from fresh clocks.

    Args:
        pruners: each pruner's spec and the names of its tensors.
        epochs: epochs to plan.
        spe: optimizer steps per epoch.
    """
    clocks = [Clock() for _ in pruners]
    planned = []
    for epoch in range(epochs):
        for step in range(spe):
            due: dict[str, float] = {}
            for (spec, names), clock in zip(pruners, clocks, strict=True):
                value = clock.due(spec, epoch, step, spe)
                if value is not None:
                    due |= dict.fromkeys(names, capped_sparsity(spec, value))
                    clock.record(spec, value, epoch, step, spe)
            if due:
                planned.append(PlannedUpdate(epoch, step, due))
    return planned


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

"""Trial pruning for a constrained search for the highest sparsity that meets an accuracy goal.

Optuna's median and percentile pruners compare a trial's val accuracy with other trials' at
the same epoch. In a max-sparsity search that stops the wrong trials: the sparsest ones dip
while they prune and recover afterwards, and they are the ones the search is for. This
pruner stops a trial only when it cannot win:

* **it cannot beat the best**: the highest sparsity it can reach (its target) is below the
  sparsity of the best trial that already met the goal, so even a perfect run would lose;
* **it cannot recover**: its schedule has ended and its val accuracy is further under the goal
  than twice what any finished trial of the study recovered over as many remaining epochs,
  plus a margin (deeper dips recover more, hence the factor); until a few trials have
  finished, nothing is stopped for this reason.

What it needs from a trial is set as user attributes by the run (``harness.sweep.trial``):
``plan`` (``sparsity_ceiling``, ``schedule_end_epoch``, ``epochs``) and ``goal_accuracy`` (the
lowest val accuracy that meets the goal). Intermediate values are val accuracy per epoch.
"""

from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from harness.metrics import FINAL_SPARSITY

# The constraint a trial stopped by "cannot beat the best" records (> 0: how far its target is under the best).
BEATS_BEST = "beats_best_sparsity"
RECOVERY_FACTOR = 2.0  # a trial may recover twice the most any finished trial did (deeper dips recover more)


class GoalPruner(optuna.pruners.BasePruner):
    """Stop trials that cannot beat the best feasible sparsity, or cannot recover to the goal.

    Args:
        objective: the name of the study's first objective (the rule "cannot beat the best"
            applies when it is ``final/sparsity``, maximized).
        recovery_margin: accuracy added to the largest recovery seen, before a trial is
            judged unable to reach the goal.
        min_finished: finished trials with a curve needed before the recovery rule applies.
        tolerance: a trial whose ceiling is within this of the best still runs (near-ties are
            useful candidates for confirmation).
    """

    # No defaults but the tolerance: they are hydra.sweeper.pruner's (PrunerConf in the sweeper's schema).
    def __init__(self, *, objective: str, recovery_margin: float, min_finished: int, tolerance: float = 1e-3) -> None:
        self.objective = objective
        self.recovery_margin = recovery_margin
        self.min_finished = min_finished
        self.tolerance = tolerance

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or len(study.directions) > 1:
            return False
        plan = trial.user_attrs.get("plan") or {}
        return self.cannot_beat_best(study, plan) or self.cannot_recover(study, trial, plan, step)

    def cannot_beat_best(self, study: optuna.Study, plan: dict) -> bool:
        shortfall = self.shortfall(study, plan)
        return shortfall is not None and shortfall > 0

    def shortfall(self, study: optuna.Study, plan: dict) -> float | None:
        """How far the trial's highest reachable sparsity is under the best feasible one (less the
        tolerance); > 0: it cannot beat the best. None when the rule does not apply."""
        ceiling = plan.get("sparsity_ceiling")
        if ceiling is None or self.objective != FINAL_SPARSITY or study.direction != StudyDirection.MAXIMIZE:
            return None
        best = best_feasible_value(study)
        return None if best is None else best - self.tolerance - ceiling

    def cannot_recover(self, study: optuna.Study, trial: FrozenTrial, plan: dict, step: int) -> bool:
        goal, end, epochs = trial.user_attrs.get("goal_accuracy"), plan.get("schedule_end_epoch"), plan.get("epochs")
        if goal is None or end is None or epochs is None or step < end:
            return False  # while the schedule still prunes, accuracy dips and says little
        left = epochs - 1 - step
        allowance = largest_recovery(study, left, self.min_finished)
        if allowance is None:
            return False
        return trial.intermediate_values[step] < goal - RECOVERY_FACTOR * allowance - self.recovery_margin


def is_feasible(trial: FrozenTrial) -> bool:
    """Whether the trial meets every constraint it set (the accuracy goal); Optuna's own rule."""
    return all(v <= 0 for v in trial.constraints.values())


def best_feasible_value(study: optuna.Study) -> float | None:
    """The best objective value among finished trials that meet every constraint."""
    values = [t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.values and is_feasible(t)]
    if not values:
        return None
    return max(values) if study.direction == StudyDirection.MAXIMIZE else min(values)


def largest_recovery(study: optuna.Study, epochs_left: int, min_finished: int) -> float | None:
    """The most val accuracy any finished trial gained over its last ``epochs_left`` epochs after
    its schedule ended (None until ``min_finished`` trials could show it)."""
    gains = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        plan = t.user_attrs.get("plan") or {}
        end, epochs, curve = plan.get("schedule_end_epoch"), plan.get("epochs"), t.intermediate_values
        if end is None or epochs is None or (epochs - 1) not in curve:
            continue
        gained = [curve[epochs - 1] - curve[s] for s in range(max(end, epochs - 1 - epochs_left), epochs) if s in curve]
        if gained:
            gains.append(max(gained))
    if len(gains) < min_finished:
        return None
    return max(max(gains), 0.0) if all(math.isfinite(g) for g in gains) else None

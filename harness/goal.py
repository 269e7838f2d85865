"""The accuracy goal: how much accuracy the pruned model may lose against the dense one (on val)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import GoalConfig, GoalCriterion


@dataclass(frozen=True)
class Verdict:
    met: bool
    drop: float  # relative or absolute, as the criterion says; negative when pruning helped
    criterion: GoalCriterion
    max_drop: float

    def describe(self) -> str:
        unit = "relative" if self.criterion == GoalCriterion.relative else "absolute"
        word = "MET" if self.met else "MISSED"
        return f"goal {word}: {unit} accuracy drop {self.drop:+.2%} (allowed {self.max_drop:.2%})"


def judge(goal: GoalConfig, dense_accuracy: float, pruned_accuracy: float) -> Verdict:
    """Compare pruned against dense accuracy, both measured on the same split."""
    if goal.criterion == GoalCriterion.relative:
        drop = (dense_accuracy - pruned_accuracy) / dense_accuracy if dense_accuracy > 0 else 0.0
    else:
        drop = dense_accuracy - pruned_accuracy
    return Verdict(drop <= goal.max_drop + 1e-12, drop, goal.criterion, goal.max_drop)


def goal_threshold(goal: GoalConfig, dense_accuracy: float) -> float:
    """The lowest pruned accuracy that meets the goal against ``dense_accuracy``."""
    if goal.criterion == GoalCriterion.relative:
        return dense_accuracy * (1.0 - goal.max_drop)
    return dense_accuracy - goal.max_drop

"""Confirm before reporting: the top candidates re-run with other fine-tuning seeds.

A search picks the sparsest trial that met the goal in one run; near the edge of the goal,
that is often the luckiest run rather than the best setting. So the top feasible candidates
are each re-run ``seeds`` more times with other fine-tuning seeds (``train.finetune_seed``) on
the same cached dense baseline, and the reported best is the sparsest candidate whose *mean*
val accuracy over its runs meets the goal. When none of the top ``candidates`` does, the next
ones are confirmed one at a time, up to ``max_candidates``.

Each confirmation's result is stored on the study (a user attribute per trial and seed), so
a sweep that is stopped and started again runs each confirmation once.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from harness.config import GoalConfig
from harness.goal import Verdict, judge
from harness.metrics import BASELINE_ACCURACY, FINAL_ACCURACY, FINAL_SPARSITY, FINAL_TEST_ACCURACY
from harness.sweep.pruners import is_feasible
from harness.sweep.trial import confirmation_attr

if TYPE_CHECKING:  # the sweeper's schema (its plugin module imports this package late, when a sweep runs)
    from hydra_plugins.harness_sweeper.harness_sweeper import ConfirmConf


@dataclass(frozen=True)
class ConfirmRun:
    finetune_seed: int
    val_accuracy: float | None
    test_accuracy: float | None
    sparsity: float | None
    mlflow_run_id: str | None
    original: bool = False  # the search trial's own run
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v is not False}


@dataclass
class Candidate:
    trial: FrozenTrial
    runs: list[ConfirmRun] = field(default_factory=list)
    verdict: Verdict | None = None  # on the mean val accuracy; None when a run failed

    def mean(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.runs]
        return None if any(v is None for v in values) else statistics.fmean(values)

    def spread(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.runs]
        if any(v is None for v in values):
            return None
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def holds(self) -> bool:
        return self.verdict is not None and self.verdict.met

    def summary(self) -> dict[str, Any]:
        return {"runs": [r.as_dict() for r in self.runs],
                "val_accuracy_mean": self.mean("val_accuracy"), "val_accuracy_std": self.spread("val_accuracy"),
                "test_accuracy_mean": self.mean("test_accuracy"), "test_accuracy_std": self.spread("test_accuracy"),
                "goal_met_on_mean": self.holds}


Outcome = Any  # harness.sweep.loop.Outcome (metrics, or how the run ended)
RunConfirmation = Callable[[FrozenTrial, int], Outcome]


def feasible_candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that met every constraint, best objective first (then higher val accuracy)."""
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.values and is_feasible(t)]
    return sorted(trials, key=lambda t: (sign * t.values[0], -_metric(t, FINAL_ACCURACY), t.number))


def confirm(study: optuna.Study, settings: ConfirmConf, goal: GoalConfig,
            finetune_seed: Callable[[FrozenTrial], int],
            run_confirmation: RunConfirmation) -> tuple[list[Candidate], Candidate | None]:
    """Confirm candidates best first; return them all and the sparsest whose mean meets the goal."""
    confirmed: list[Candidate] = []
    best: Candidate | None = None
    for index, trial in enumerate(feasible_candidates(study)):
        if index >= settings.candidates and (best is not None or index >= settings.max_candidates):
            break
        candidate = _confirm_one(study, trial, settings.seeds, goal, finetune_seed(trial), run_confirmation)
        confirmed.append(candidate)
        if best is None and candidate.holds:
            best = candidate
    return confirmed, best


def _confirm_one(study: optuna.Study, trial: FrozenTrial, seeds: int, goal: GoalConfig, original_seed: int,
                 run_confirmation: RunConfirmation) -> Candidate:
    metrics = trial.user_attrs.get("metrics", {})
    runs = [ConfirmRun(original_seed, metrics.get(FINAL_ACCURACY), metrics.get(FINAL_TEST_ACCURACY),
                       metrics.get(FINAL_SPARSITY), trial.user_attrs.get("mlflow_run_id"), original=True)]
    for seed in range(original_seed + 1, original_seed + 1 + seeds):
        key = confirmation_attr(trial.number, seed)
        stored = study.user_attrs.get(key)
        if stored is None:  # not run yet (or its process died before it finished)
            outcome = run_confirmation(trial, seed)
            if outcome.stop is not None:
                raise outcome.stop  # interrupted: not done, the same command runs it again
            stored = ({"error": outcome.error or "stopped"} if outcome.metrics is None
                      else {k: outcome.metrics.get(k) for k in (FINAL_ACCURACY, FINAL_TEST_ACCURACY,
                                                                FINAL_SPARSITY)})
            study.set_user_attr(key, stored)
        run_id = study.user_attrs.get(f"{key}:run")
        runs.append(ConfirmRun(seed, stored.get(FINAL_ACCURACY), stored.get(FINAL_TEST_ACCURACY),
                               stored.get(FINAL_SPARSITY), run_id, error=stored.get("error")))
    candidate = Candidate(trial, runs)
    mean_val = candidate.mean("val_accuracy")
    baseline = metrics.get(BASELINE_ACCURACY)
    if mean_val is not None and baseline is not None:
        candidate.verdict = judge(goal, baseline, mean_val)
    return candidate


def _metric(trial: FrozenTrial, name: str) -> float:
    return float(trial.user_attrs.get("metrics", {}).get(name, float("nan")))

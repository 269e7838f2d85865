"""What a finished sweep reports: the best trial (or the Pareto front) with val and test
accuracy and the command that reproduces it, ``optimization_results.yaml``, and plots."""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from harness.config import GoalConfig, GoalCriterion
from harness.metrics import (
    BASELINE_ACCURACY,
    BASELINE_TEST_ACCURACY,
    FINAL_ACCURACY,
    FINAL_SPARSITY,
    FINAL_TEST_ACCURACY,
)
from harness.sweep.command import trial_command
from harness.sweep.confirm import Candidate
from harness.sweep.identity import StudyIdentity
from harness.sweep.pruners import is_feasible
from harness.sweep.space import SearchSpace


@dataclass(frozen=True)
class Chosen:
    """A trial the sweep recommends, with what the user needs to act on it."""

    number: int
    params: dict[str, Any]
    values: list[float]
    metrics: dict[str, float]
    command: str
    mlflow_run_id: str | None
    confirmation: Candidate | None = None  # its runs with other fine-tuning seeds, when confirmed


def chosen_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto front for several objectives."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    try:
        return [study.best_trial]
    except ValueError:  # nothing complete, or nothing meets the accuracy goal
        return []


def describe(study: optuna.Study, space: SearchSpace, base: list[str], confirmed: list[Candidate],
             best: Candidate | None) -> list[Chosen]:
    """The recommended trials with their commands: the confirmed best when candidates were confirmed,
    else the best feasible trial or the Pareto front."""
    trials = ([best.trial] if best else []) if confirmed else chosen_trials(study)
    chosen = []
    for trial in trials:
        command = trial_command(base, space.to_overrides({**trial.params, **space.fixed}))
        chosen.append(Chosen(trial.number, dict(trial.params), list(trial.values or []),
                             dict(trial.user_attrs.get("metrics", {})), command,
                             trial.user_attrs.get("mlflow_run_id"), best if confirmed else None))
    return chosen


def write_results(path: Path, study: optuna.Study, chosen: list[Chosen], identity: StudyIdentity,
                  confirmed: list[Candidate]) -> None:
    """``optimization_results.yaml``, shaped like the published Optuna sweeper's, plus val/test accuracy,
    the confirmation runs and the command for each recommended trial."""
    def entry(c: Chosen) -> dict[str, Any]:
        item = {"number": c.number, "params": c.params, "values": c.values,
                "sparsity": c.metrics.get(FINAL_SPARSITY),
                "val_accuracy": c.metrics.get(FINAL_ACCURACY),
                "test_accuracy": c.metrics.get(FINAL_TEST_ACCURACY),
                "baseline_val_accuracy": c.metrics.get(BASELINE_ACCURACY),
                "baseline_test_accuracy": c.metrics.get(BASELINE_TEST_ACCURACY)}
        if c.confirmation is not None:
            item["confirmed"] = c.confirmation.summary()
        return item | {"command": c.command}

    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    results: dict[str, Any] = {"name": "harness_optuna", "study": study.study_name,
                               "trials": {k: v for k, v in states.items() if v}}
    if len(study.directions) > 1:
        results["solutions"] = [entry(c) for c in chosen]
    elif chosen:
        results |= {"best_params": chosen[0].params, "best_value": chosen[0].values[0], "best": entry(chosen[0])}
    else:
        results["best"] = None  # nothing meets the accuracy goal (on the mean of its runs, when confirmed)
    if confirmed:
        results["candidates"] = [{"number": c.trial.number, "sparsity": c.trial.values[0], **c.summary()}
                                 for c in confirmed]
        results["confirmation_runs"] = sum(len(c.runs) - 1 for c in confirmed)
    results["identity"] = {"digest": identity.digest(), **identity.as_dict()}
    path.write_text(yaml.safe_dump(_plain(results), sort_keys=False))


def write_confirmations_csv(path: Path, confirmed: list[Candidate]) -> Path:
    """One row per run of each confirmed candidate (the trial's own run first)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "finetune_seed", "original", "sparsity", "val_accuracy", "test_accuracy",
                         "mlflow_run_id", "error"])
        for c in confirmed:
            for r in c.runs:
                writer.writerow([c.trial.number, r.finetune_seed, r.original, r.sparsity, r.val_accuracy,
                                 r.test_accuracy, r.mlflow_run_id or "", r.error or ""])
    return path


def plot_all(study: optuna.Study, chosen: list[Chosen], folder: Path, goal: GoalConfig | None) -> list[Path]:
    """Optimization history, accuracy against sparsity (goal line, chosen trials), importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    files = []
    if complete:
        path = folder / "accuracy_vs_sparsity.png"
        _plot_frontier(plt, study, complete, chosen, path, goal)
        files.append(path)
    if len(study.directions) == 1 and complete:
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
        files.append(_save(plt, ax, folder / "optimization_history.png"))
    if len(complete) >= 2 and study.trials[0].params:
        try:
            target = None if len(study.directions) == 1 else (lambda t: t.values[0])
            ax = optuna.visualization.matplotlib.plot_param_importances(study, target=target)
            files.append(_save(plt, ax, folder / "param_importances.png"))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass  # importances need trials that differ in their params
    return files


def _plot_frontier(plt: Any, study: optuna.Study, complete: list[FrozenTrial], chosen: list[Chosen],
                   path: Path, goal: GoalConfig | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    feasible = [t for t in complete if is_feasible(t)]
    missed = [t for t in complete if t not in feasible]
    for trials, style, label in ((feasible, "o", "meets the goal"), (missed, "x", "misses the goal")):
        if trials:
            ax.plot([_metric(t, FINAL_SPARSITY) for t in trials], [_metric(t, FINAL_ACCURACY) for t in trials],
                    style, label=label, alpha=0.8)
    baselines = [_metric(t, BASELINE_ACCURACY) for t in complete]
    if goal is not None and baselines:
        base = max(baselines)
        relative = goal.criterion == GoalCriterion.relative
        ax.axhline(base * (1 - goal.max_drop) if relative else base - goal.max_drop, color="gray", ls="--",
                   label=f"accuracy goal ({'relative' if relative else 'absolute'} drop {goal.max_drop:g})")
        ax.axhline(base, color="gray", ls=":", label="dense baseline")
    front = sorted((c.metrics.get(FINAL_SPARSITY, 0.0), c.metrics.get(FINAL_ACCURACY, 0.0)) for c in chosen)
    if front:
        ax.plot(*zip(*front, strict=True), "-*", color="crimson", ms=10,
                label="Pareto front" if len(study.directions) > 1 else "best trial")
    ax.set_xlabel("final sparsity (counted from the weights)")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"Study {study.study_name}: accuracy against sparsity")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save(plt: Any, ax: Any, path: Path) -> Path:
    fig = ax.get_figure()
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric(trial: FrozenTrial, name: str) -> float:
    return float(trial.user_attrs.get("metrics", {}).get(name, float("nan")))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value

"""What a finished sweep reports: the best trial (or the Pareto front) with val and test
accuracy and the command that reproduces it, ``optimization_results.yaml``, and plots."""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from harness.config import GoalConfig, GoalCriterion
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


def chosen_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto front for several objectives."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    try:
        return [study.best_trial]
    except ValueError:  # nothing complete, or nothing meets the accuracy goal
        return []


def describe(study: optuna.Study, space: SearchSpace, base_command: list[str]) -> list[Chosen]:
    chosen = []
    for trial in chosen_trials(study):
        overrides = space.to_overrides({**trial.params, **space.fixed})
        command = shlex.join(["python", "-m", "harness", *base_command, *overrides])
        chosen.append(Chosen(trial.number, dict(trial.params), list(trial.values or []),
                             dict(trial.user_attrs.get("metrics", {})), command,
                             trial.user_attrs.get("mlflow_run_id")))
    return chosen


def write_results(path: Path, study: optuna.Study, chosen: list[Chosen]) -> None:
    """``optimization_results.yaml``, shaped like the published Optuna sweeper's, plus val/test accuracy
    and the command for each recommended trial."""
    def entry(c: Chosen) -> dict[str, Any]:
        return {"number": c.number, "params": c.params, "values": c.values,
                "val_accuracy": c.metrics.get("final/accuracy"),
                "test_accuracy": c.metrics.get("final/test_accuracy"),
                "sparsity": c.metrics.get("final/sparsity"), "command": c.command}

    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    results: dict[str, Any] = {"name": "harness_optuna", "study": study.study_name,
                               "trials": {k: v for k, v in states.items() if v}}
    if len(study.directions) > 1:
        results["solutions"] = [entry(c) for c in chosen]
    elif chosen:
        results |= {"best_params": chosen[0].params, "best_value": chosen[0].values[0], "best": entry(chosen[0])}
    else:
        results["best"] = None  # no complete trial meets the accuracy goal
    path.write_text(yaml.safe_dump(_plain(results), sort_keys=False))


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
    feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    missed = [t for t in complete if t not in feasible]
    for trials, style, label in ((feasible, "o", "meets the goal"), (missed, "x", "misses the goal")):
        if trials:
            ax.plot([_metric(t, "final/sparsity") for t in trials], [_metric(t, "final/accuracy") for t in trials],
                    style, label=label, alpha=0.8)
    baselines = [_metric(t, "baseline/accuracy") for t in complete]
    if goal is not None and baselines:
        base = max(baselines)
        relative = goal.criterion == GoalCriterion.relative
        ax.axhline(base * (1 - goal.max_drop) if relative else base - goal.max_drop, color="gray", ls="--",
                   label=f"accuracy goal ({'relative' if relative else 'absolute'} drop {goal.max_drop:g})")
        ax.axhline(base, color="gray", ls=":", label="dense baseline")
    front = sorted((c.metrics.get("final/sparsity", 0.0), c.metrics.get("final/accuracy", 0.0)) for c in chosen)
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

"""A sweep, start to end: study and parent MLflow run, workers, the ask/tell loop, the summary.

The Hydra plugin (``hydra_plugins/harness_sweeper``) only adapts this to Hydra's Sweeper
interface; everything here works from the sweeper's config, the composed job config and a
function that launches one job with a list of overrides.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from harness.config import GoalConfig, TrackingConfig
from harness.sweep.loop import Outcome, SweepSettings, open_study, run_worker
from harness.sweep.space import encode_value, parse_search_space
from harness.sweep.study import default_storage
from harness.sweep.summary import describe, plot_all, write_results
from harness.tracking import MlflowTracker, Tracker, make_tracker

log = logging.getLogger(__name__)

Launch = Callable[[list[str], int], Outcome]


@dataclass(frozen=True)
class SweeperOptions:
    """The ``hydra.sweeper`` settings (see hydra_plugins/harness_sweeper)."""

    study_name: str | None
    storage: str | None
    n_trials: int
    n_jobs: int
    objectives: list[str]
    directions: list[str]
    goal_constraint: bool
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    max_failure_rate: float
    params: dict[str, Any]
    worker: bool
    parent_run_id: str | None


def run_sweep(options: SweeperOptions, config: DictConfig, arguments: list[str], launch: Launch) -> None:
    """Run (or resume, or join) the sweep; the parent process also reports its result."""
    swept, fixed_args = _split_arguments(arguments)
    space = parse_search_space({**options.params, **swept})
    outputs_dir = Path(config.outputs_dir)
    settings = SweepSettings(
        study_name=options.study_name or "sweep",
        storage=options.storage or default_storage(outputs_dir),
        n_trials=options.n_trials,
        objectives=list(options.objectives),
        directions=list(options.directions),
        goal_constraint=options.goal_constraint,
        sampler=options.sampler.get("name", "tpe"),
        seed=options.sampler.get("seed", 0),
        pruner=options.pruner.get("name", "median"),
        pruner_startup_trials=int(options.pruner.get("n_startup_trials", 5)),
        pruner_warmup_steps=int(options.pruner.get("n_warmup_steps", 2)),
        max_failure_rate=options.max_failure_rate,
    )
    _check_settings(settings)
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings)
    tracking: TrackingConfig = OmegaConf.to_object(config.tracking)  # type: ignore[assignment]
    parent = _parent_run(options, tracking, outputs_dir, study, settings)
    parent_id = parent.run_id if parent else options.parent_run_id

    def run_trial(trial: optuna.trial.Trial, overrides: list[str]) -> Outcome:
        link = [
            f"sweep_trial.storage={encode_value(settings.storage)}",
            f"sweep_trial.study={encode_value(settings.study_name)}",
            f"sweep_trial.number={trial.number}",
            f"sweep_trial.parent_run_id={encode_value(parent_id)}",
            f"sweep_trial.pruner={settings.pruner}",
            f"sweep_trial.pruner_startup_trials={settings.pruner_startup_trials}",
            f"sweep_trial.pruner_warmup_steps={settings.pruner_warmup_steps}",
        ]
        log.info("trial %d: %s", trial.number, " ".join(overrides))
        return launch([*fixed_args, *overrides, *link], trial.number)

    workers = [] if options.worker else _start_workers(options.n_jobs - 1, sweep_dir, parent_id)
    try:
        with _closing(parent):
            run_worker(settings, space, run_trial)  # (the parent run's tracker closed dead trials' runs)
            for process in workers:
                process.wait()
            if parent is None:
                return
            study = open_study(settings)
            _report(study, space, fixed_args, sweep_dir, parent, OmegaConf.to_object(config.goal))
    except BaseException:
        for process in workers:
            process.terminate()
        raise


def _split_arguments(arguments: list[str]) -> tuple[dict[str, str], list[str]]:
    """Command-line overrides with sweep syntax join the search space; the rest go to every trial."""
    swept, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(arguments):
        if override.is_sweep_override():
            swept[override.key_or_group] = override.input_line.split("=", 1)[1]
        else:
            fixed.append(override.input_line)
    return swept, fixed


def _check_settings(settings: SweepSettings) -> None:
    from harness.errors import ConfigError

    if len(settings.objectives) != len(settings.directions):
        raise ConfigError(f"hydra.sweeper.directions={settings.directions}: give one direction per objective "
                          f"(objectives={settings.objectives})")
    bad = [d for d in settings.directions if d not in ("maximize", "minimize")]
    if bad:
        raise ConfigError(f"hydra.sweeper.directions={bad[0]}: must be maximize or minimize")
    if settings.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={settings.n_trials}: must be >= 1")


def _parent_run(options: SweeperOptions, tracking: TrackingConfig, outputs_dir: Path, study: optuna.Study,
                settings: SweepSettings) -> Tracker | None:
    """The sweep's MLflow run: created once per study, reopened when the sweep resumes."""
    if options.worker:
        return None
    existing = study.user_attrs.get("mlflow_parent_run_id")
    tags = {"optuna.study": settings.study_name, "optuna.storage": settings.storage, "harness.sweep": "parent"}
    tracker = make_tracker(tracking, outputs_dir, run_name=f"sweep-{settings.study_name}", tags=tags,
                           resume_run_id=existing)
    if tracker.run_id and tracker.run_id != existing:
        study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
        tracker.log_params({"sweep.n_trials": settings.n_trials, "sweep.objectives": settings.objectives,
                            "sweep.directions": settings.directions, "sweep.sampler": settings.sampler,
                            "sweep.pruner": settings.pruner, "sweep.goal_constraint": settings.goal_constraint})
        tracker.flush()  # in the MLflow UI while the sweep runs
    return tracker


@contextlib.contextmanager
def _closing(tracker: Tracker | None) -> Iterator[None]:
    from harness.runner import finished_or_failed

    if tracker is None:
        yield
        return
    with finished_or_failed(tracker):
        yield


def _start_workers(count: int, sweep_dir: Path, parent_id: str | None) -> list[subprocess.Popen]:
    """Helper processes running the same command against the same study (``n_jobs > 1``)."""
    workers = []
    for i in range(count):
        command = [sys.executable, "-m", "harness", *sys.argv[1:], "hydra.sweeper.n_jobs=1",
                   "hydra.sweeper.worker=true", f"hydra.sweeper.parent_run_id={encode_value(parent_id)}",
                   f"hydra.sweep.dir={encode_value(str(sweep_dir))}"]
        log_file = open(sweep_dir / f"worker-{i + 1}.log", "w")  # noqa: SIM115 (lives as long as the worker)
        workers.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT))
        log.info("started worker %d (pid %d), log in %s", i + 1, workers[-1].pid, log_file.name)
    return workers


def _report(study: optuna.Study, space: Any, fixed_args: list[str], sweep_dir: Path, parent: Tracker,
            goal: GoalConfig) -> None:
    chosen = describe(study, space, fixed_args)
    results = sweep_dir / "optimization_results.yaml"
    write_results(results, study, chosen)
    files = [results, *plot_all(study, chosen, sweep_dir, goal)]
    for path in files:
        parent.log_artifact(path)
    if chosen:
        best = chosen[0]
        parent.log_metrics({f"best/{k}": v for k, v in best.metrics.items()})
        parent.set_tags({"best.trial_number": str(best.number), "best.command": best.command[:5000],
                         "best.mlflow_run_id": best.mlflow_run_id or ""})
    lines = [f"sweep {study.study_name}: {len(study.trials)} trials in {sweep_dir}"]
    if not chosen:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        lines.append("no complete trial meets the accuracy goal" if complete else "no trial completed")
    for c in chosen:
        lines.append(f"trial {c.number}: sparsity {c.metrics.get('final/sparsity', float('nan')):.4f}, "
                     f"val accuracy {c.metrics.get('final/accuracy', float('nan')):.4f}, "
                     f"test accuracy {c.metrics.get('final/test_accuracy', float('nan')):.4f}")
        lines.append(f"  reproduce: {c.command}")
    lines.append(f"results: {results}")
    if isinstance(parent, MlflowTracker):
        lines.append(f"MLflow: {parent.describe()}")
    print("\n".join(lines), flush=True)

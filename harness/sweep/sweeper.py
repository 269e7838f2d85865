"""A sweep, start to end: study and parent MLflow run, workers, the ask/tell loop, the summary.

The Hydra plugin (``hydra_plugins/harness_sweeper``) only adapts this to Hydra's Sweeper
interface; everything here works from the sweeper's config, the composed job config and a
function that launches one job with a list of overrides.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from harness.config import GoalConfig, TrackingConfig
from harness.errors import ConfigError, HarnessError
from harness.metrics import BEST_PREFIX, CONFIRMED_PREFIX, FINAL_ACCURACY, FINAL_SPARSITY, FINAL_TEST_ACCURACY, GOAL_MET
from harness.sweep.command import Compose, job_config, run_overrides, trial_command
from harness.sweep.confirm import Candidate, ConfirmSettings, confirm
from harness.sweep.heartbeat import HeartbeatSettings
from harness.sweep.identity import StudyIdentity, resolve_study_name, store_identity
from harness.sweep.loop import Outcome, SweepSettings, open_study, run_worker
from harness.sweep.space import SearchSpace, encode_value, parse_search_space
from harness.sweep.study import (
    PRUNER_ATTR,
    default_storage,
    failed_trials,
    make_storage,
    opening_storage,
    study_lock,
)
from harness.sweep.summary import Chosen, describe, plot_all, write_confirmations_csv, write_results
from harness.tracking import (
    NOTE_TAG,
    RUN_COLOR_TAG,
    SWEEP_COLOR,
    MlflowTracker,
    Tracker,
    finished_or_failed,
    make_tracker,
    ui_run_page,
)

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
    confirm: dict[str, Any] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    heartbeat: dict[str, Any] = field(default_factory=dict)  # {} (a caller without the schema): no heartbeat


class SweepFailed(HarnessError):
    """The sweep stopped on failed trials, or none of its trials finished."""


def run_sweep(options: SweeperOptions, config: DictConfig, arguments: list[str], launch: Launch,
              compose: Compose) -> None:
    """Run (or resume, or join) the sweep; the parent process also confirms and reports its result.

    ``compose(overrides)`` composes the job config of one plain run (for the reproduce command).
    """
    swept, fixed_args = _split_arguments(arguments)
    params = _command_line_wins(options.params, fixed_args)
    space = parse_search_space({**params, **swept})
    starting_points = _starting_points(options.enqueue, space, options.params)
    outputs_dir = Path(config.outputs_dir)
    identity = StudyIdentity.build(
        config.hydra.runtime.choices, job_config(config), space.describe(), list(options.objectives),
        list(options.directions), options.goal_constraint, options.sampler)
    study, settings, resumed = _open(options, config, identity, starting_points)
    if not options.worker:
        _announce(study, resumed, identity, space, options.n_trials)
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tracking: TrackingConfig = OmegaConf.to_object(config.tracking)  # type: ignore[assignment]
    parent = _parent_run(options, tracking, outputs_dir, study, settings, identity)
    parent_id = parent.run_id if parent else options.parent_run_id

    def link(number: int, confirmation_seed: int | None = None) -> list[str]:
        return [f"sweep_trial.storage={encode_value(settings.storage)}",
                f"sweep_trial.study={encode_value(settings.study_name)}", f"sweep_trial.number={number}",
                f"sweep_trial.parent_run_id={encode_value(parent_id)}",
                f"sweep_trial.confirmation_seed={encode_value(confirmation_seed)}"]

    def run_trial(trial: optuna.trial.Trial, overrides: list[str]) -> Outcome:
        log.info("trial %d: %s", trial.number, " ".join(overrides))
        return launch([*fixed_args, *overrides, *link(trial.number)], trial.number)

    job_numbers = itertools.count(options.n_trials + len(study.trials))  # the confirmations' job folders

    def run_confirmation(trial: FrozenTrial, finetune_seed: int) -> Outcome:
        overrides = [*space.to_overrides({**trial.params, **space.fixed}), f"train.finetune_seed={finetune_seed}"]
        log.info("confirming trial %d with train.finetune_seed=%d", trial.number, finetune_seed)
        return launch([*fixed_args, *overrides, *link(trial.number, finetune_seed)], next(job_numbers))

    workers = [] if options.worker else _start_workers(options.n_jobs - 1, sweep_dir, parent_id, study.study_name)
    try:
        with _closing(parent):
            worked = run_worker(settings, space, run_trial)  # (the parent run's tracker closed dead trials' runs)
            for process in workers:
                process.wait()
            if parent is None:
                return
            study = open_study(settings)
            failure = _failure(study, settings, worked.stopped_on_failures)
            confirmed, best = [], None
            if failure is None and len(settings.directions) == 1 and settings.goal_constraint:
                goal: GoalConfig = OmegaConf.to_object(config.goal)  # type: ignore[assignment]
                confirmed, best = confirm(study, ConfirmSettings(**options.confirm), goal,
                                          lambda t: _finetune_seed(t, config), run_confirmation)
            base = run_overrides(fixed_args, config, compose)
            _report(study, space, base, sweep_dir, parent, OmegaConf.to_object(config.goal), identity,
                     confirmed, best)
            if failure is not None:
                raise SweepFailed(failure)
    except BaseException:
        for process in workers:
            process.terminate()
        raise


def _open(options: SweeperOptions, config: DictConfig, identity: StudyIdentity,
          starting_points: list[dict[str, Any]]) -> tuple[optuna.Study, SweepSettings, bool]:
    """This command's study (found by its identity, or created with its starting points), its settings,
    and whether it existed already. One process at a time, so that two workers create one study."""
    storage = options.storage or default_storage(config.outputs_dir)
    base_name = options.study_name or config.hydra.runtime.choices.get("sweep") or "sweep"
    # Opened under the lock: two commands on a fresh database would both create Optuna's tables.
    with opening_storage(storage), study_lock(storage, "harness.study-names"):
        name, resumed = resolve_study_name(make_storage(storage), base_name, options.study_name is not None, identity)
        settings = SweepSettings(
            study_name=name, storage=storage, n_trials=options.n_trials, objectives=list(options.objectives),
            directions=list(options.directions), goal_constraint=options.goal_constraint,
            sampler=options.sampler.get("name", "tpe"), seed=options.sampler.get("seed", 0),
            pruner={"objective": options.objectives[0], **options.pruner}, max_failure_rate=options.max_failure_rate,
            heartbeat=HeartbeatSettings(**options.heartbeat) if options.heartbeat else None)
        _check_settings(settings)
        study = open_study(settings)
        if not resumed:
            store_identity(study, identity)
            for point in starting_points:
                study.enqueue_trial(point, skip_if_exists=True)
        study.set_user_attr(PRUNER_ATTR, settings.pruner)  # the trials' runs build their pruner from it
    return study, settings, resumed


def _split_arguments(arguments: list[str]) -> tuple[dict[str, str], list[str]]:
    """Command-line overrides with sweep syntax join the search space; the rest go to every trial."""
    swept, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(arguments):
        if override.is_sweep_override():
            swept[override.key_or_group] = override.input_line.split("=", 1)[1]
        else:
            fixed.append(override.input_line)
    return swept, fixed


def _command_line_wins(params: dict[str, Any], fixed_args: list[str]) -> dict[str, Any]:
    """The sweep file's params less the keys the command line fixes; says so for each."""
    typed = {o.key_or_group: o.input_line for o in OverridesParser.create().parse_overrides(fixed_args)}
    for key in sorted(params.keys() & typed.keys()):
        log.info("%s on the command line: %s is not searched (the sweep's params had %s)", typed[key], key,
                 params[key])
    return {k: v for k, v in params.items() if k not in typed}


def _starting_points(points: list[dict[str, Any]], space: SearchSpace, file_params: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """The sweep's starting points (``hydra.sweeper.enqueue``), asked before the sampler's own; keys
    the command line fixed are left out of them, as out of the search."""
    kept = []
    for point in points:
        unknown = sorted(set(point) - set(space.distributions) - set(file_params))
        if unknown:
            raise ConfigError(f"hydra.sweeper.enqueue: {unknown[0]} is not a searched key; searched: "
                              f"{', '.join(space.distributions)}")
        kept.append({k: v for k, v in point.items() if k in space.distributions})
    return kept


def _announce(study: optuna.Study, resumed: bool, identity: StudyIdentity, space: SearchSpace,
              n_trials: int) -> None:
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    state = f"resumed, {done} of {n_trials} trials finished" if resumed else f"new, {n_trials} trials"
    lines = [f"study {study.study_name} ({state}; identity {identity.digest()}), search space:"]
    lines += [f"  {key}: {text}" for key, text in space.describe().items()]
    log.info("\n".join(lines))


def _finetune_seed(trial: FrozenTrial, config: DictConfig) -> int:
    """The fine-tuning seed of the trial's own run (its confirmations use the next ones), as
    ``TrainConfig.finetune_seed_for`` gives it from the trial's values over the sweep's config."""
    finetune_seed = trial.params.get("train.finetune_seed", config.train.finetune_seed)
    return int(finetune_seed) if finetune_seed is not None else int(trial.params.get("seed", config.seed)) + 1


def _failure(study: optuna.Study, settings: SweepSettings, stopped: bool) -> str | None:
    """One line when the sweep stopped on failures or none of its trials finished; else None."""
    failed = failed_trials(study)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if not failed or (finished and not stopped and len(failed) < settings.failure_limit):
        return None
    first = min(failed, key=lambda t: t.number)
    where = first.user_attrs.get("output_dir") or "its MLflow run"
    error = str(first.user_attrs.get("error", "no error recorded")).strip().splitlines()[0]
    how = (f"stopped after {len(failed)} failed trials (hydra.sweeper.max_failure_rate="
           f"{settings.max_failure_rate:g} of n_trials={settings.n_trials})" if len(failed) >= settings.failure_limit
           else f"{len(failed)} trials failed and none finished")
    return f"sweep {study.study_name} {how}; the first, trial {first.number} ({where}): {error}"


def _check_settings(settings: SweepSettings) -> None:
    if len(settings.objectives) != len(settings.directions):
        raise ConfigError(f"hydra.sweeper.directions={settings.directions}: give one direction per objective "
                          f"(objectives={settings.objectives})")
    bad = [d for d in settings.directions if d not in ("maximize", "minimize")]
    if bad:
        raise ConfigError(f"hydra.sweeper.directions={bad[0]}: must be maximize or minimize")
    if settings.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={settings.n_trials}: must be >= 1")


def _parent_run(options: SweeperOptions, tracking: TrackingConfig, outputs_dir: Path, study: optuna.Study,
                settings: SweepSettings, identity: StudyIdentity) -> Tracker | None:
    """The sweep's MLflow run: created once per study, reopened when the sweep resumes or another machine
    joins it (under a lock: two commands started together on two machines make one parent)."""
    if options.worker:
        return None
    with study_lock(settings.storage, f"harness.parent-run:{settings.study_name}"):
        return _open_parent_run(tracking, outputs_dir, study, settings, identity)


def _open_parent_run(tracking: TrackingConfig, outputs_dir: Path, study: optuna.Study, settings: SweepSettings,
                     identity: StudyIdentity) -> Tracker:
    existing = study.user_attrs.get("mlflow_parent_run_id")
    tags = {"optuna.study": settings.study_name, "optuna.storage": settings.storage, "harness.sweep": "parent",
            "harness.study_identity": identity.digest(), RUN_COLOR_TAG: SWEEP_COLOR,
            NOTE_TAG: f"### Sweep `{settings.study_name}`\n\nRunning: {settings.n_trials} trials, nested under this "
                      "run. Its result (the best trial, its metrics and a link to its run) is written here at the end."}
    tracker = make_tracker(tracking, outputs_dir, run_name=f"sweep-{settings.study_name}", tags=tags,
                           resume_run_id=existing)
    if existing and tracker.run_id == existing:  # reopened: its tags are the ones it was created with
        tracker.set_tags({RUN_COLOR_TAG: SWEEP_COLOR})
    if tracker.run_id and tracker.run_id != existing:
        study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
        tracker.log_params({"sweep.n_trials": settings.n_trials, "sweep.objectives": settings.objectives,
                            "sweep.directions": settings.directions, "sweep.sampler": settings.sampler,
                            "sweep.pruner": settings.pruner["name"], "sweep.goal_constraint": settings.goal_constraint,
                            "sweep.identity": identity.digest()})
        tracker.flush()  # in the MLflow UI while the sweep runs
    return tracker


@contextlib.contextmanager
def _closing(tracker: Tracker | None) -> Iterator[None]:
    if tracker is None:
        yield
        return
    with finished_or_failed(tracker):
        yield


def _start_workers(count: int, sweep_dir: Path, parent_id: str | None, study_name: str) -> list[subprocess.Popen]:
    """Helper processes running the same command against the same study (``n_jobs > 1``)."""
    workers = []
    for i in range(count):
        command = [sys.executable, "-m", "harness", *sys.argv[1:], "hydra.sweeper.n_jobs=1",
                   f"hydra.sweeper.study_name={encode_value(study_name)}",
                   "hydra.sweeper.worker=true", f"hydra.sweeper.parent_run_id={encode_value(parent_id)}",
                   f"hydra.sweep.dir={encode_value(str(sweep_dir))}"]
        log_file = open(sweep_dir / f"worker-{i + 1}.log", "w")  # noqa: SIM115 (lives as long as the worker)
        workers.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT))
        log.info("started worker %d (pid %d), log in %s", i + 1, workers[-1].pid, log_file.name)
    return workers


def _report(study: optuna.Study, space: SearchSpace, base: list[str], sweep_dir: Path, parent: Tracker,
            goal: GoalConfig, identity: StudyIdentity, confirmed: list[Candidate], best: Candidate | None) -> None:
    chosen = describe(study, space, base, confirmed, best)
    results = sweep_dir / "optimization_results.yaml"
    write_results(results, study, chosen, identity, confirmed)
    (sweep_dir / "study_identity.yaml").write_text(yaml.safe_dump(identity.as_dict(), sort_keys=False))
    commands = {t.number: trial_command(base, space.to_overrides({**t.params, **space.fixed}))
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    files = [results, sweep_dir / "study_identity.yaml", *plot_all(study, chosen, sweep_dir, goal, commands)]
    if confirmed:
        files.append(write_confirmations_csv(sweep_dir / "confirmations.csv", confirmed))
    for path in files:
        parent.log_artifact(path)
    if chosen:
        top = chosen[0]
        # Under the trials' own names too: the parent's row reads like its best trial's in MLflow's run list.
        parent.log_metrics({**top.metrics, **{f"{BEST_PREFIX}{k}": v for k, v in top.metrics.items()}})
        if best is not None:
            parent.log_metrics({f"{CONFIRMED_PREFIX}{k}": v for k, v in best.summary().items()
                                if isinstance(v, float)})
        parent.set_tags({"best.trial_number": str(top.number), "best.command": top.command[:5000],
                         "best.mlflow_run_id": top.mlflow_run_id or "", "best.run_id": top.mlflow_run_id or ""})
    if isinstance(parent, MlflowTracker):
        parent.mark_best([c.mlflow_run_id for c in chosen if c.mlflow_run_id])
    parent.set_tags({NOTE_TAG: sweep_description(study, chosen, confirmed, best, parent)})
    counts = {s.name.lower(): n for s in TrialState
              if (n := len(study.get_trials(deepcopy=False, states=(s,)))) and s != TrialState.WAITING}
    lines = [f"sweep {study.study_name}: {len(study.trials)} trials "
             f"({', '.join(f'{n} {state}' for state, n in counts.items())}) in {sweep_dir}"]
    lines += _confirmation_lines(confirmed, best)
    if not chosen:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        lines.append("no complete trial meets the accuracy goal" if complete and not confirmed
                     else "no candidate meets the accuracy goal on the mean of its runs" if confirmed
                     else "no trial completed")
    for c in chosen:
        lines.append(f"{'best: ' if len(chosen) == 1 else ''}trial {c.number}: "
                     f"sparsity {c.metrics.get('final/sparsity', float('nan')):.4f}, "
                     f"val accuracy {c.metrics.get('final/accuracy', float('nan')):.4f}, "
                     f"test accuracy {c.metrics.get('final/test_accuracy', float('nan')):.4f}"
                     + (" (this run)" if best is not None else ""))
        lines.append(f"  reproduce: {c.command}")
    lines.append(f"results: {results}")
    if isinstance(parent, MlflowTracker):
        lines.append(f"MLflow: {parent.describe()}")
    print("\n".join(lines), flush=True)


def sweep_description(study: optuna.Study, chosen: list[Chosen], confirmed: list[Candidate],
                      best: Candidate | None, parent: Tracker) -> str:
    """The sweep run's MLflow description (markdown): its trials, the best (linked to its run) with its
    metrics, verdict and reproduce command, the confirmation runs, where the plots are."""
    experiment_id = getattr(parent, "experiment_id", None) or "0"

    def link(text: str, run_id: str | None) -> str:
        return f"[{text}]({ui_run_page(experiment_id, run_id)})" if run_id else text

    def num(metrics: dict[str, float], name: str) -> str:
        return f"{metrics[name]:.4f}" if name in metrics else "-"

    counts = {s.name.lower(): n for s in TrialState
              if (n := len(study.get_trials(deepcopy=False, states=(s,)))) and s != TrialState.WAITING}
    lines = [f"### Sweep `{study.study_name}`", "",
             f"{len(study.trials)} trials ({', '.join(f'{n} {state}' for state, n in counts.items())}), "
             "nested under this run.", ""]
    if not chosen:
        lines.append("**No trial meets the accuracy goal**" + (" on the mean of its runs" if confirmed else "") + ".")
    multi = len(chosen) > 1
    if chosen:
        lines += ["**Pareto front**:" if multi else "**Best trial**:", "",
                  "| trial | sparsity | val accuracy | test accuracy | goal (val) |", "|---|---|---|---|---|"]
    for c in chosen:
        met = c.metrics.get(GOAL_MET)
        verdict = "-" if met is None else ("MET" if met else "MISSED")
        lines.append(f"| {link(f't{c.number:02d}', c.mlflow_run_id)} | {num(c.metrics, FINAL_SPARSITY)} | "
                     f"{num(c.metrics, FINAL_ACCURACY)} | {num(c.metrics, FINAL_TEST_ACCURACY)} | {verdict} |")
    if chosen:
        lines += ["", "This run's `final/...` and `goal/...` metrics are the best trial's (also as `best/...`)"
                  + (", the first of the front's" if multi else "") + ".", ""]
        for c in chosen:
            lines += [f"Reproduce trial {c.number}:", "", f"    {c.command}", ""]
    if confirmed:
        lines += ["**Confirmation** (other fine-tuning seeds, the goal judged on the mean val accuracy):", "",
                  "| trial | runs (val accuracy) | mean val | mean test | goal on the mean |", "|---|---|---|---|---|"]
        for c in confirmed:
            runs = ", ".join(link("-" if r.val_accuracy is None else f"{r.val_accuracy:.4f}", r.mlflow_run_id)
                             for r in c.runs)
            mean, test = c.mean("val_accuracy"), c.mean("test_accuracy")
            lines.append(f"| t{c.trial.number:02d}{' (best)' if c is best else ''} | {runs} | "
                         f"{'-' if mean is None else f'{mean:.4f}'} | {'-' if test is None else f'{test:.4f}'} | "
                         f"{'MET' if c.holds else 'MISSED'} |")
        lines.append("")
    lines.append("Plots in this run's artifacts: `accuracy_vs_sparsity.html` (interactive: hover a point for its "
                 "trial and command), `accuracy_vs_sparsity.png`, `optimization_history.png`.")
    return "\n".join(lines)[:20000] + "\n"


def _confirmation_lines(confirmed: list[Candidate], best: Candidate | None) -> list[str]:
    if not confirmed:
        return []
    lines = ["confirmation: each candidate re-run with other fine-tuning seeds (train.finetune_seed) "
             "on the same dense baseline; the goal is judged on the mean val accuracy"]
    for c in confirmed:
        vals = " ".join("-" if r.val_accuracy is None else f"{r.val_accuracy:.4f}" for r in c.runs)
        mean, spread, test = c.mean("val_accuracy"), c.spread("val_accuracy"), c.mean("test_accuracy")
        verdict = "MET" if c.holds else "MISSED"
        lines.append(f"  trial {c.trial.number}: sparsity {c.trial.values[0]:.4f}, val {vals}"
                     + (f", mean {mean:.4f} ± {spread:.4f}, test mean {test:.4f}" if mean is not None else "")
                     + f": goal {verdict} on the mean" + (" <- best" if c is best else ""))
    return lines

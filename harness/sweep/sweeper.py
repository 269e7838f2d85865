"""A sweep, start to end: study and parent MLflow run, workers, the ask/tell loop, the summary.

The Hydra plugin (``hydra_plugins/harness_sweeper``) only adapts this to Hydra's Sweeper
interface; everything here works from the sweeper's config, the composed job config and a
function that launches one job with a list of overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra.utils
import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from harness.config import GoalConfig, TrackingConfig
from harness.errors import ConfigError, HarnessError
from harness.metrics import (
    BEST_PREFIX,
    CONFIRMED_PREFIX,
    FINAL_ACCURACY,
    FINAL_SPARSITY,
    FINAL_TEST_ACCURACY,
    GOAL_MET,
    RUN_SUMMARY,
)
from harness.sweep.command import Compose, job_config, run_overrides, trial_command
from harness.sweep.confirm import Candidate, confirm
from harness.sweep.identity import StudyIdentity, resolve_study_name, store_identity
from harness.sweep.loop import Outcome, SweepSettings, open_study, run_worker
from harness.sweep.space import SearchSpace, encode_value, parse_search_space
from harness.sweep.study import (
    EXPERIMENT_ATTR,
    PRUNER_ATTR,
    default_storage,
    failed_trials,
    grid_of,
    grid_size,
    ignores_constraints,
    make_sampler,
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

if TYPE_CHECKING:  # the schema's module imports this one late (when a sweep runs), never the reverse
    from hydra_plugins.harness_sweeper.harness_sweeper import HarnessSweeperConf

log = logging.getLogger(__name__)

Launch = Callable[[list[str], int], Outcome]


class SweepFailed(HarnessError):
    """The sweep stopped on failed trials, or none of its trials finished."""


def run_sweep(options: HarnessSweeperConf, config: DictConfig, arguments: list[str], launch: Launch,
              compose: Compose, set_keys: Mapping[str, str] | None = None) -> None:
    """Run (or resume, or join) the sweep; the parent process also confirms and reports its result.

    ``compose(overrides)`` composes the job config of one plain run (for the reproduce command);
    ``set_keys``: the ``hydra.sweeper`` keys the user set, and where (their differences from the published
    plugin are said; a bad sampler names its file).
    """
    set_keys = set_keys or {}
    swept, fixed_args = _split_arguments(arguments)
    params = _command_line_wins(options.params, fixed_args)
    space = parse_search_space({**params, **swept})
    options = resolve(options, config, space, set_keys.get("sampler"))
    extend = _custom_search_space(options.custom_search_space, config)
    starting_points = _starting_points(options.enqueue, space, options.params)
    outputs_dir = Path(config.outputs_dir)
    described = space.describe() | ({"custom_search_space": options.custom_search_space}
                                    if options.custom_search_space else {})
    identity = StudyIdentity.build(
        config.hydra.runtime.choices, job_config(config), described, list(options.objectives),
        list(options.directions), options.goal_constraint, options.sampler)
    study, settings, resumed = _open(options, config, identity, starting_points, space)
    if not options.worker:
        if space.notice():
            log.info(space.notice())
        _say_differences(options, set_keys.keys(), study.sampler)
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
            # (the parent run's tracker closed dead trials' runs)
            worked = run_worker(settings, space, run_trial, extend)
            for process in workers:
                process.wait()
            if parent is None:
                return
            study = open_study(settings)
            failure = _failure(study, settings, worked.stopped_on_failures)
            confirmed, best = [], None
            if failure is None and len(options.directions) == 1 and options.goal_constraint:
                goal: GoalConfig = OmegaConf.to_object(config.goal)  # type: ignore[assignment]
                confirmed, best = confirm(study, options.confirm, goal,
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


def is_plain_task(config: DictConfig) -> bool:
    """A Hydra app other than the harness (no ``sweep_trial``/``outputs_dir``): swept as the published plugin
    sweeps one, its task's return value (a float, or one per direction) being the objective."""
    return "sweep_trial" not in config or "outputs_dir" not in config


def run_plain_sweep(options: HarnessSweeperConf, config: DictConfig, arguments: list[str],
                    launch_batch: Callable[..., list[Any]], set_keys: Mapping[str, str]) -> None:
    """The published plugin's sweep of any Hydra app: batches of ``n_jobs`` trials handed to the launcher,
    the study in ``storage`` (null: in memory); no MLflow, no confirmation, no accuracy goal. Failures
    count over the whole study, as in the harness's own sweeps."""
    swept, fixed_args = _split_arguments(arguments)
    space = parse_search_space({**_command_line_wins(options.params, fixed_args), **swept})
    directions = options.directions or _given_directions(options.direction) or ["minimize"]
    options = resolve(dataclasses.replace(options, goal_constraint=False, direction=None, directions=directions,
                                          objectives=[f"value_{i}" for i in range(len(directions))]),
                      config, space, set_keys.get("sampler"))
    if "goal_constraint" in set_keys or "objectives" in set_keys:
        log.info("hydra.sweeper: goal_constraint and objectives are the harness's; this app's return value is "
                 "the objective")
    if "max_failure_rate" in set_keys:
        log.info("hydra.sweeper: %s", _DIFFERENCES["max_failure_rate"].format(options.max_failure_rate))
    extend = _custom_search_space(options.custom_search_space, config)
    study = optuna.create_study(study_name=options.study_name, storage=options.storage,
                                sampler=make_sampler(options.sampler, space), directions=options.directions,
                                load_if_exists=True)
    limit = max(1, math.floor(options.max_failure_rate * options.n_trials + 1e-9))
    failed, first_error, first_folder, job = 0, None, None, 0
    sweep_dir = Path(config.hydra.sweep.dir)
    while len(study.trials) < options.n_trials and failed < limit:
        trials = [study.ask() for _ in range(min(options.n_jobs, options.n_trials - len(study.trials)))]
        batch = []
        for trial in trials:
            values = space.suggest(trial)
            if extend is not None:
                extend(trial)
                values |= {k: v for k, v in trial.params.items() if k not in values}
            batch.append([*fixed_args, *space.to_overrides(values)])
        returns = launch_batch(batch, initial_job_idx=job)
        job += len(batch)
        for index, (trial, ret) in enumerate(zip(trials, returns, strict=True)):
            try:
                study.tell(trial, _objective_values(ret.return_value, len(options.directions)))
            except Exception as err:  # the job's own error (re-raised by return_value), or a bad return value
                failed += 1
                first_error = first_error or f"trial {trial.number}: {type(err).__name__}: {err}"
                first_folder = first_folder or sweep_dir / str(job - len(batch) + index)
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
    _write_plain_results(study, sweep_dir)
    if failed >= limit and options.max_failure_rate >= 1.0:
        # Every failure was allowed (the published plugin's rate 1.0 never stops): the trials' own log lines
        # told each error; the sweep ends non-zero, pointing at the first one's job folder.
        raise SweepFailed(f"sweep {study.study_name}: all {failed} trials failed (hydra.sweeper.max_failure_rate="
                          f"{options.max_failure_rate:g} let each of them run); the first one's job folder: "
                          f"{first_folder}")
    if failed >= limit:
        raise SweepFailed(f"sweep {study.study_name} stopped after {failed} failed trials (hydra.sweeper."
                          f"max_failure_rate={options.max_failure_rate:g} of n_trials={options.n_trials}); "
                          f"the first, {first_error}")


def _given_directions(direction: Any) -> list[str] | None:
    if direction is None:
        return None
    return [str(d) for d in ([direction] if isinstance(direction, str) else direction)]


def _objective_values(value: Any, count: int) -> float | list[float]:
    """What the task returned as the study's values: one float, or a sequence of one per direction."""
    if count == 1:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"the task returned {value!r}: a sweep needs a number") from None
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"the task returned {len(values)} values for {count} directions")
    return values


def _write_plain_results(study: optuna.Study, sweep_dir: Path) -> None:
    """``optimization_results.yaml`` as the published plugin writes it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    results: dict[str, Any] = {"name": "optuna", "sweeper": "harness_optuna", "study": study.study_name}
    if len(study.directions) > 1:
        results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
        log.info("sweep %s: %d Pareto solutions", study.study_name, len(results["solutions"]))
    else:
        best = study.best_trial if complete else None
        results |= {"best_params": best.params if best else None, "best_value": best.value if best else None}
        log.info("sweep %s: best value %s with %s", study.study_name, results["best_value"], results["best_params"])
    (sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))


def _open(options: HarnessSweeperConf, config: DictConfig, identity: StudyIdentity,
          starting_points: list[dict[str, Any]], space: SearchSpace) -> tuple[optuna.Study, SweepSettings, bool]:
    """This command's study (found by its identity, or created with its starting points), its settings,
    and whether it existed already. One process at a time, so that two workers create one study."""
    storage = options.storage or default_storage(config.outputs_dir)
    base_name = options.study_name or config.hydra.runtime.choices.get("sweep") or "sweep"
    # Opened under the lock: two commands on a fresh database would both create Optuna's tables.
    with opening_storage(storage), study_lock(storage, "harness.study-names"):
        name, resumed = resolve_study_name(make_storage(storage), base_name, options.study_name is not None, identity)
        settings = SweepSettings(study_name=name, storage=storage, conf=options, space=space)
        study = open_study(settings)
        if not resumed:
            store_identity(study, identity)
            for point in starting_points[:options.n_trials]:  # no starting point left waiting past n_trials
                study.enqueue_trial(point, skip_if_exists=True)
        study.set_user_attr(PRUNER_ATTR, settings.pruner)  # the trials' runs build their pruner from it
    return study, settings, resumed


def resolve(options: HarnessSweeperConf, config: DictConfig, space: SearchSpace,
            sampler_from: str | None = None) -> HarnessSweeperConf:
    """The settings with what follows from others: directions from the plugin's ``direction``, objectives
    from the app's ``optimized_metric`` (lightning-hydra-template's key), a GridSampler's n_trials; checked,
    the sampler too (``sampler_from``: where it was written, for its error), before any study is opened."""
    directions = options.directions
    if options.direction is not None:
        given = _given_directions(options.direction) or []
        if directions is not None and list(directions) != given:
            raise ConfigError(f"hydra.sweeper.direction={_text(options.direction)} and hydra.sweeper.directions="
                              f"{_text(directions)} disagree: give one of them")
        directions = given
    metric = OmegaConf.select(config, "optimized_metric", default=None)
    objectives = options.objectives or ([_harness_metric(str(metric))] if metric else [FINAL_SPARSITY])
    resolved = dataclasses.replace(options, objectives=list(objectives),
                                   directions=list(directions or ["maximize"] * len(objectives)))
    _check_settings(resolved)
    try:
        make_sampler(resolved.sampler, space)
    except ConfigError as err:
        where = f"in {sampler_from}: " if sampler_from and sampler_from != "the command line" else ""
        raise ConfigError(f"{where}{err}") from None
    if str(resolved.sampler.get("_target_", "")).endswith("GridSampler") and "search_space" not in resolved.sampler:
        size = grid_size(grid_of(space))
        if size < resolved.n_trials:
            log.info("GridSampler: hydra.sweeper.n_trials=%d lowered to %d, the size of the grid",
                     resolved.n_trials, size)
            resolved = dataclasses.replace(resolved, n_trials=size)
    return resolved


# lightning-hydra-template's names for the val accuracy its sweeps optimize; a run of the harness
# reports the pruned model's val accuracy as final/accuracy.
LIGHTNING_METRICS = {"val/acc_best": FINAL_ACCURACY, "val/acc": FINAL_ACCURACY}


def _harness_metric(name: str) -> str:
    """``optimized_metric`` as a run's summary metric: lightning-hydra-template's names are mapped (said in
    a line); any other name must be one the run reports."""
    if name in LIGHTNING_METRICS:
        log.info("optimized_metric=%s (lightning-hydra-template's name): the sweep optimizes %s, the pruned "
                 "model's val accuracy at the end of its run", name, LIGHTNING_METRICS[name])
        return LIGHTNING_METRICS[name]
    if name not in RUN_SUMMARY:
        close = difflib.get_close_matches(name, RUN_SUMMARY, n=3)
        raise ConfigError(f"optimized_metric={name}: not a metric a run reports; "
                          f"{'closest: ' + ', '.join(close) + '; ' if close else ''}allowed: {', '.join(RUN_SUMMARY)}")
    return name


def _custom_search_space(dotpath: str | None, config: DictConfig) -> Callable[[optuna.trial.Trial], None] | None:
    """``hydra.sweeper.custom_search_space``: ``module.function(config, trial)``, called after the params."""
    if not dotpath:
        return None
    try:
        function = hydra.utils.get_method(dotpath)
    except Exception as err:  # Hydra wraps the import error in its own
        reason = str(err.__cause__ or err).strip().splitlines()[0]
        raise ConfigError(f"hydra.sweeper.custom_search_space={dotpath}: cannot be loaded ({reason}); give "
                          "module.function, importable from the directory the sweep runs in") from None
    return lambda trial: function(config, trial)


# Where a key of the published plugin means something else here: said once at start when the user set it.
_DIFFERENCES = {
    "n_jobs": "n_jobs={}: worker processes on this machine, each asking for its own trials (the published "
              "plugin's: jobs per launcher batch)",
    "max_failure_rate": "max_failure_rate={}: the share of n_trials that may fail over the whole study, all "
                        "workers and restarts (the published plugin's: per batch)",
    "storage": "storage=null: the study is kept in sqlite under outputs_dir, so that it resumes (the published "
               "plugin's: in memory)",
}


def _say_differences(options: HarnessSweeperConf, set_keys: Collection[str],
                     sampler: optuna.samplers.BaseSampler) -> None:
    # (n_jobs=1 runs one trial at a time under both meanings; a storage given is used under both.)
    said = [text.format(getattr(options, key)) for key, text in _DIFFERENCES.items()
            if key in set_keys and not (key == "storage" and options.storage) and not (key == "n_jobs"
                                                                                       and options.n_jobs == 1)]
    if said:
        log.info("hydra.sweeper: %s", "; ".join(said))
    if options.goal_constraint and ignores_constraints(sampler):
        log.info("hydra.sweeper.sampler: %s ignores the accuracy-goal constraint (hydra.sweeper.goal_constraint="
                 "true): it samples infeasible regions as often as feasible ones; the goal still decides the best",
                 type(sampler).__name__)


def _text(value: Any) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list | tuple) else str(value)


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
    conf = settings.conf
    how = (f"stopped after {len(failed)} failed trials (hydra.sweeper.max_failure_rate="
           f"{conf.max_failure_rate:g} of n_trials={conf.n_trials})" if len(failed) >= settings.failure_limit
           else f"{len(failed)} trials failed and none finished")
    return f"sweep {study.study_name} {how}; the first, trial {first.number} ({where}): {error}"


def _check_settings(settings: HarnessSweeperConf) -> None:
    if len(settings.objectives) != len(settings.directions):
        raise ConfigError(f"hydra.sweeper.directions={settings.directions}: give one direction per objective "
                          f"(objectives={settings.objectives})")
    bad = [d for d in settings.directions if d not in ("maximize", "minimize")]
    if bad:
        raise ConfigError(f"hydra.sweeper.directions={bad[0]}: must be maximize or minimize")
    if settings.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={settings.n_trials}: must be >= 1")


def _parent_run(options: HarnessSweeperConf, tracking: TrackingConfig, outputs_dir: Path, study: optuna.Study,
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
            NOTE_TAG: f"### Sweep `{settings.study_name}`\n\nRunning: {settings.conf.n_trials} trials, nested "
                      "under this run. Its result (the best trial, its metrics and a link to its run) is written "
                      "here at the end."}
    tracker = make_tracker(tracking, outputs_dir, run_name=f"sweep-{settings.study_name}", tags=tags,
                           resume_run_id=existing)
    if existing and tracker.run_id == existing:  # reopened: its tags are the ones it was created with
        tracker.set_tags({RUN_COLOR_TAG: SWEEP_COLOR})
    if tracker.run_id and tracker.run_id != existing:
        study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
        study.set_user_attr(EXPERIMENT_ATTR, tracker.experiment_id)  # the trials' links in optuna-dashboard
        conf = settings.conf
        sampler = conf.sampler.get("_target_") or conf.sampler.get("name")
        tracker.log_params({"sweep.n_trials": conf.n_trials, "sweep.objectives": conf.objectives,
                            "sweep.directions": conf.directions, "sweep.sampler": sampler,
                            "sweep.pruner": conf.pruner.name, "sweep.goal_constraint": conf.goal_constraint,
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
        sparsity = c.trial.user_attrs.get("metrics", {}).get(FINAL_SPARSITY, float("nan"))  # (the objective may differ)
        lines.append(f"  trial {c.trial.number}: sparsity {sparsity:.4f}, val {vals}"
                     + (f", mean {mean:.4f} ± {spread:.4f}, test mean {test:.4f}" if mean is not None else "")
                     + f": goal {verdict} on the mean" + (" <- best" if c is best else ""))
    return lines

"""Hydra's Sweeper interface over the harness's Optuna 5 sweep (harness/sweep/).

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace package, so this file
holds the plugin's config schema (``hydra/sweeper=harness_optuna``: the one type of the sweeper's
settings, read by harness/sweep/ as it is), the published Optuna sweeper's sampler group
(``hydra/sweeper/sampler``) and a thin class that hands every job to Hydra's configured launcher.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

# The sampler: ``{name: tpe|random|nsga2|nsgaii|qmc, seed}`` (this project's short form), or the published
# plugin's ``{_target_: optuna.samplers.<Sampler>, <its keyword arguments>}``. Untyped, so that any sampler's
# arguments merge in; harness.sweep.study.make_sampler checks them against the sampler's signature.
DEFAULT_SAMPLER = {"name": "tpe", "seed": 0}

# The published plugin's sampler group (hydra/sweeper/sampler=<name>), with its defaults; "harness" is this
# project's default, DEFAULT_SAMPLER.
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {
    "harness": DEFAULT_SAMPLER,
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "consider_prior": None, "prior_weight": None,
            "consider_magic_clip": None, "consider_endpoints": None, "n_startup_trials": 10,
            "n_ei_candidates": 24, "multivariate": False, "warn_independent_sampling": None},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": None, "x0": None, "sigma0": None,
              "independent_sampler": None, "warn_independent_sampling": True, "consider_pruned_trials": False,
              "restart_strategy": None, "inc_popsize": 2, "use_separable_cma": False, "source_trials": None},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None, "population_size": 50,
               "mutation_prob": None, "crossover_prob": 0.9, "swapping_prob": 0.5, "constraints_func": None},
    "motpe": {"_target_": "optuna.samplers.MOTPESampler"},  # removed in Optuna 4: make_sampler says so
    "grid": {"_target_": "optuna.samplers.GridSampler"},  # its grid: the search space's values
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": None, "independent_sampler": None,
           "n_startup_trials": 10, "deterministic_objective": False, "constraints_func": None,
           "warn_independent_sampling": True},
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "seed": None, "qmc_type": "sobol", "scramble": False,
            "independent_sampler": None, "warn_asynchronous_seeding": True, "warn_independent_sampling": True},
}


@dataclass
class PrunerConf:
    # goal (stop trials that cannot win a constrained max-sparsity search; see harness/sweep/pruners.py)
    # | median | percentile | successive_halving | hyperband | none
    name: str = "goal"
    n_startup_trials: int = 5  # no pruning before this many trials have finished (goal: its recovery rule)
    n_warmup_steps: int = 2  # nor before this many epochs of a trial (median, percentile)
    recovery_margin: float = 0.02  # goal: accuracy allowed beyond the largest recovery seen after a schedule


@dataclass
class ConfirmConf:
    candidates: int = 3  # the top feasible trials re-run before a best is reported
    seeds: int = 2  # more runs of each, with other fine-tuning seeds (train.finetune_seed)
    max_candidates: int = 6  # when none of the top ones holds on its mean, confirm further ones up to this


@dataclass
class HeartbeatConf:
    # How a trial lost with another machine is noticed: its worker records a heartbeat in the study every
    # interval_s; a RUNNING trial without one for grace_s is failed as lost (its MLflow run FAILED) and replaced
    # by any worker. 300 s outlasts a database restart (ridden out for up to 60 s) and a stalled machine with
    # room to spare, and costs a lost trial's slot 5 minutes: little beside a sweep of trials of minutes.
    interval_s: int = 30
    grace_s: int = 300


@dataclass
class HarnessSweeperConf:
    """``hydra.sweeper``: the one place the sweeper's settings and their defaults live."""

    _target_: str = "hydra_plugins.harness_sweeper.harness_sweeper.HarnessSweeper"
    _recursive_: bool = False  # the sampler's _target_ is built by the sweep (checked, with its grid), not by Hydra
    # _self_ first: an option of hydra/sweeper/sampler replaces the default sampler instead of merging under it.
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "harness"}])
    study_name: str | None = None  # default: the +sweep choice, else "sweep" (found again by the study's identity)
    storage: str | None = None  # default: sqlite:///<outputs_dir>/optuna.db (the plugin's null: in memory)
    n_trials: int = 20  # trials to finish in total (COMPLETE or PRUNED), across restarts and workers
    n_jobs: int = 1  # worker processes on this machine (the plugin's: jobs per launcher batch)
    direction: Any = None  # the plugin's key: maximize | minimize, or a list of them; sets directions
    objectives: list[str] | None = None  # metric names of a run; default [optimized_metric] or [final/sparsity]
    directions: list[str] | None = None  # one per objective; default maximize
    goal_constraint: bool = True  # a trial that misses the accuracy goal (on val) is infeasible
    sampler: Any = field(default_factory=lambda: dict(DEFAULT_SAMPLER))
    pruner: PrunerConf = field(default_factory=PrunerConf)
    max_failure_rate: float = 0.5  # the sweep stops once this share of n_trials has failed (whole study)
    params: dict[str, Any] = field(default_factory=dict)
    custom_search_space: str | None = None  # module.function(config, trial), called after params are suggested
    confirm: ConfirmConf = field(default_factory=ConfirmConf)
    enqueue: list[Any] = field(default_factory=list)  # starting points: {searched key: value} asked first
    heartbeat: HeartbeatConf = field(default_factory=HeartbeatConf)
    worker: bool = False  # set on the helper processes started for n_jobs > 1
    parent_run_id: str | None = None  # set on those helpers: the sweep's MLflow run


ConfigStore.instance().store(group="hydra/sweeper", name="harness_optuna", node=HarnessSweeperConf,
                             provider="harness")
for _name, _node in SAMPLER_OPTIONS.items():
    ConfigStore.instance().store(group="hydra/sweeper/sampler", name=_name, node=dict(_node), provider="harness")


def written_sampler(merged: dict[str, Any], choice: str | None) -> dict[str, Any]:
    """The sampler as the user wrote it. Hydra merges a sampler into the one before it, so with a ``_target_``
    the default's ``name`` is dropped, and so are the chosen hydra/sweeper/sampler option's arguments when the
    user named another ``_target_`` (they are not the new sampler's); the seed stays."""
    target = merged.get("_target_")
    if target is None:
        return dict(merged)
    written = {k: v for k, v in merged.items() if not (k == "name" and v == DEFAULT_SAMPLER["name"])}
    option = SAMPLER_OPTIONS.get(choice or "harness", DEFAULT_SAMPLER)
    if target == option.get("_target_"):
        return written
    return {k: v for k, v in written.items() if k in ("_target_", "seed") or k not in option or option[k] != v}


class HarnessSweeper(Sweeper):
    def __init__(self, **options: Any) -> None:
        # Hydra imports this plugin at every start, sweep or not: Optuna loads only when a sweep runs.
        for key in ("_target_", "_recursive_"):
            options.pop(key, None)
        plain = {k: OmegaConf.to_container(v) if isinstance(v, DictConfig | ListConfig) else v
                 for k, v in options.items()}
        sampler = plain.pop("sampler", None)  # as composed, not merged into the default sampler once more
        typed = OmegaConf.merge(OmegaConf.structured(HarnessSweeperConf), plain)
        self.options: HarnessSweeperConf = OmegaConf.to_object(typed)  # type: ignore[assignment]
        if sampler is not None:
            self.options.sampler = sampler
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.config_loader: Any = None
        self.set_keys: dict[str, str] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        from harness.sweep.jobs import LaunchedTask  # late, as in __init__: only a sweep sets up its sweeper

        self.config = config
        choice = config.hydra.runtime.choices.get("hydra/sweeper/sampler")
        self.options.sampler = written_sampler(self.options.sampler, choice)
        self.set_keys = user_set_keys(hydra_context.config_loader, config)
        self.config_loader = hydra_context.config_loader
        # Any launcher: in this process (basic), or a submitit job that pickles the task and its result.
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=LaunchedTask(task_function), config=config)

    def sweep(self, arguments: list[str]) -> None:
        # late, as in __init__: Optuna loads only when a sweep runs
        from harness.sweep.jobs import launch_job
        from harness.sweep.sweeper import is_plain_task, run_plain_sweep, run_sweep

        assert self.config is not None
        if is_plain_task(self.config):  # any Hydra app: its task's return value is the objective
            run_plain_sweep(self.options, self.config, arguments, self.launcher.launch, self.set_keys)
            return

        def launch(overrides: list[str], job_index: int) -> Any:
            return launch_job(self.launcher, overrides, job_index)

        def compose(overrides: list[str]) -> DictConfig:
            return self.config_loader.load_configuration(config_name=self.config.hydra.job.config_name,
                                                         overrides=overrides, run_mode=RunMode.RUN)

        run_sweep(self.options, self.config, arguments, launch, compose, self.set_keys)


def user_set_keys(config_loader: Any, config: DictConfig) -> dict[str, str]:
    """The ``hydra.sweeper`` keys that the user's configs (a sweep file, the primary config) or the command
    line set, each with where (e.g. ``sweep/x``): the ones whose meaning here differs from the published
    plugin's are named at start, and a bad sampler argument says where it was written."""
    keys: dict[str, str] = {}
    try:
        from hydra._internal.config_repository import ConfigRepository  # late: only a sweep reads its files

        repo = ConfigRepository(config_search_path=config_loader.get_search_path())
        defaults = config_loader.compute_defaults_list(config_name=config.hydra.job.config_name,
                                                       overrides=list(config.hydra.overrides.task),
                                                       run_mode=RunMode.MULTIRUN)
        for default in defaults.defaults:
            if default.config_path is None or default.config_path.startswith("hydra/"):
                continue
            loaded = repo.load_config(default.config_path)
            package = default.package or ""
            if loaded is None or not "hydra.sweeper".startswith(package):
                continue
            sweeper = OmegaConf.select(loaded.config, "hydra.sweeper".removeprefix(package).lstrip("."))
            if isinstance(sweeper, DictConfig):
                keys |= dict.fromkeys((str(k) for k in sweeper), default.config_path)
    except Exception:  # a notice only: never stop a sweep on it
        pass
    for override in [*config.hydra.overrides.hydra, *config.hydra.overrides.task]:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.sweeper."):
            keys[key.removeprefix("hydra.sweeper.").split(".")[0]] = "the command line"
    return keys

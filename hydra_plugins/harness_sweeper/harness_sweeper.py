"""Hydra's Sweeper interface over the harness's Optuna 5 sweep (harness/sweep/).

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace package, so this file
holds the plugin's config schema (``hydra/sweeper=harness_optuna``) and a thin class that
hands every job to Hydra's configured launcher.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, OmegaConf

from harness.metrics import FINAL_SPARSITY


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | nsga2 | qmc
    seed: int | None = 0


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
    _target_: str = "hydra_plugins.harness_sweeper.harness_sweeper.HarnessSweeper"
    study_name: str | None = None  # default: "sweep"
    storage: str | None = None  # default: sqlite:///<outputs_dir>/optuna.db
    n_trials: int = 20  # trials to finish in total (COMPLETE or PRUNED), across restarts and workers
    n_jobs: int = 1  # worker processes on this machine
    objectives: list[str] = field(default_factory=lambda: [FINAL_SPARSITY])
    directions: list[str] = field(default_factory=lambda: ["maximize"])
    goal_constraint: bool = True  # a trial that misses the accuracy goal (on val) is infeasible
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    max_failure_rate: float = 0.5  # the sweep stops once this share of n_trials has failed (crashed)
    params: dict[str, Any] = field(default_factory=dict)
    confirm: ConfirmConf = field(default_factory=ConfirmConf)
    enqueue: list[Any] = field(default_factory=list)  # starting points: {searched key: value} asked first
    heartbeat: HeartbeatConf = field(default_factory=HeartbeatConf)
    worker: bool = False  # set on the helper processes started for n_jobs > 1
    parent_run_id: str | None = None  # set on those helpers: the sweep's MLflow run


ConfigStore.instance().store(group="hydra/sweeper", name="harness_optuna", node=HarnessSweeperConf,
                             provider="harness")


class HarnessSweeper(Sweeper):
    def __init__(self, **options: Any) -> None:
        # Hydra imports this plugin at every start, sweep or not: Optuna loads only when a sweep runs.
        from harness.sweep.sweeper import SweeperOptions

        options.pop("_target_", None)
        plain = {k: OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for k, v in options.items()}
        self.options = SweeperOptions(**plain)
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.config_loader: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        from harness.sweep.jobs import LaunchedTask  # late, as in __init__: only a sweep sets up its sweeper

        self.config = config
        self.config_loader = hydra_context.config_loader
        # Any launcher: in this process (basic), or a submitit job that pickles the task and its result.
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=LaunchedTask(task_function), config=config)

    def sweep(self, arguments: list[str]) -> None:
        # late, as in __init__: Optuna loads only when a sweep runs
        from harness.sweep.jobs import launch_job
        from harness.sweep.sweeper import run_sweep

        assert self.config is not None

        def launch(overrides: list[str], job_index: int) -> Any:
            return launch_job(self.launcher, overrides, job_index)

        def compose(overrides: list[str]) -> DictConfig:
            return self.config_loader.load_configuration(config_name=self.config.hydra.job.config_name,
                                                         overrides=overrides, run_mode=RunMode.RUN)

        run_sweep(self.options, self.config, arguments, launch, compose)

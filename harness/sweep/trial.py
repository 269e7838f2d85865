"""The job side of a sweep: the run sees its Optuna trial, reports each epoch's val accuracy,
and stops when the study's pruner says the trial is losing."""

from __future__ import annotations

from typing import Any

import optuna

from harness.errors import RunStopped
from harness.sweep.study import make_pruner, make_storage


class Pruned(RunStopped, optuna.TrialPruned):
    """Raised inside a run that the study's pruner stopped: the runner ends its MLflow run as
    KILLED with the reason, the sweeper tells Optuna the trial was PRUNED."""


class TrialLink:
    """One sweep trial, from inside the run that evaluates it.

    The sweeper passes the trial as plain config (``sweep_trial.*``) so that a run in another
    process or on another machine reaches the same trial through the shared storage.
    """

    def __init__(self, storage: str, study: str, number: int, parent_run_id: str | None,
                 pruner: str, pruner_startup_trials: int, pruner_warmup_steps: int) -> None:
        loaded = optuna.load_study(study_name=study, storage=make_storage(storage),
                                   pruner=make_pruner(pruner, pruner_startup_trials, pruner_warmup_steps))
        trial_id = next(t._trial_id for t in loaded.get_trials(deepcopy=False) if t.number == number)
        self.trial = optuna.trial.Trial(loaded, trial_id)
        self.study, self.number, self.parent_run_id = study, number, parent_run_id
        self.multi_objective = len(loaded.directions) > 1

    @classmethod
    def from_config(cls, cfg: Any) -> TrialLink | None:
        if not cfg.study:
            return None
        return cls(cfg.storage, cfg.study, cfg.number, cfg.parent_run_id, cfg.pruner,
                   cfg.pruner_startup_trials, cfg.pruner_warmup_steps)

    # -- what the runner calls ----------------------------------------------------------------

    def tags(self) -> dict[str, str]:
        tags = {"optuna.study": self.study, "optuna.trial_number": str(self.number)}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # nests the run under the sweep's run
        return tags

    def on_run_started(self, run_id: str | None) -> None:
        if run_id:
            self.trial.set_user_attr("mlflow_run_id", run_id)

    def on_validation(self, epoch: int, accuracy: float) -> None:
        if self.multi_objective:  # Optuna prunes single-objective studies only
            return
        self.trial.report(accuracy, step=epoch)
        if self.trial.should_prune():
            raise Pruned(f"pruned by the study's pruner after epoch {epoch} (val accuracy {accuracy:.4f})")

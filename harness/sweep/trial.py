"""The job side of a sweep: the run sees its Optuna trial, reports each epoch's val accuracy,
and stops when the study's pruner says the trial cannot win.

A confirmation run (a candidate re-run with another fine-tuning seed, see
``harness.sweep.confirm``) is linked to the trial it confirms but reports nothing to it.
Each call to the study rides out a lost storage connection (``harness.sweep.study.reconnecting``):
a PostgreSQL restart does not fail the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from harness.config import TrackingBackend
from harness.errors import RunStopped
from harness.goal import goal_threshold
from harness.sweep.pruners import BEATS_BEST, GoalPruner
from harness.sweep.study import PRUNER_ATTR, make_pruner, make_storage, reconnecting
from harness.tracking import tracking_uri


class Pruned(RunStopped, optuna.TrialPruned):
    """Raised inside a run that the study's pruner stopped: the runner ends its MLflow run as
    KILLED with the reason, the sweeper tells Optuna the trial was PRUNED."""


def confirmation_attr(number: int, finetune_seed: int) -> str:
    """The study user attribute that holds one confirmation run's result."""
    return f"confirm:{number}:{finetune_seed}"


class TrialLink:
    """One sweep trial, from inside the run that evaluates it.

    The sweeper passes the trial as plain config (``sweep_trial.*``) so that a run in another
    process or on another machine reaches the same trial through the shared storage. The
    pruner is the one stored on the study by the sweep (``hydra.sweeper.pruner``).
    """

    def __init__(self, storage: str, study: str, number: int, parent_run_id: str | None,
                 confirmation_seed: int | None = None) -> None:
        loaded, trial_id = reconnecting(lambda: self._load(storage, study, number), f"loading trial {number}")
        self.study_obj = loaded
        self.trial = reconnecting(lambda: optuna.trial.Trial(loaded, trial_id), f"loading trial {number}")
        self.study, self.number, self.parent_run_id = study, number, parent_run_id
        self.confirmation_seed = confirmation_seed
        self.multi_objective = len(loaded.directions) > 1
        self._goal: Any = None
        self._plan: dict[str, Any] = {}
        self.tracking_uri: str | None = None  # where the run's MLflow run lives (set by ``plan``)

    @staticmethod
    def _load(storage: str, study: str, number: int) -> tuple[optuna.Study, int]:
        rdb = make_storage(storage)
        settings = rdb.get_study_user_attrs(rdb.get_study_id_from_name(study)).get(PRUNER_ATTR, {"name": "none"})
        loaded = optuna.load_study(study_name=study, storage=rdb, pruner=make_pruner(settings))
        return loaded, next(t._trial_id for t in loaded.get_trials(deepcopy=False) if t.number == number)

    @classmethod
    def from_config(cls, config: Any) -> TrialLink | None:
        """The link of a run's config (a ``harness.config.Config``), or None outside a sweep."""
        link = config.sweep_trial
        if not link.study:
            return None
        made = cls(link.storage, link.study, link.number, link.parent_run_id, link.confirmation_seed)
        made.plan(config)
        return made

    @property
    def is_confirmation(self) -> bool:
        return self.confirmation_seed is not None

    # -- what the runner calls ----------------------------------------------------------------

    def plan(self, config: Any) -> None:
        """Tell the pruner what this trial can reach: its highest target sparsity and when its
        schedule ends (``harness.sweep.pruners.GoalPruner`` reads these)."""
        self._goal = config.goal
        if config.tracking.backend == TrackingBackend.mlflow:
            self.tracking_uri = tracking_uri(config.tracking, Path(config.outputs_dir))
        if self.is_confirmation or not config.prune.enabled:
            return
        pruners = config.prune.resolve()
        self._plan = {
            "sparsity_ceiling": max(p.target_sparsity for p in pruners),
            "schedule_end_epoch": max(p.end_epoch for p in pruners),
            "epochs": config.train.finetune_epochs,
        }
        self._set_attr("plan", self._plan)

    def tags(self) -> dict[str, str]:
        tags = {"optuna.study": self.study, "optuna.trial_number": str(self.number),
                "harness.sweep": "confirmation" if self.is_confirmation else "trial"}
        if self.is_confirmation:
            tags["harness.finetune_seed"] = str(self.confirmation_seed)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # nests the run under the sweep's run
        return tags

    def on_run_started(self, run_id: str | None) -> None:
        if not run_id:
            return
        if self.is_confirmation:
            key = f"{confirmation_attr(self.number, self.confirmation_seed)}:run"
            reconnecting(lambda: self.study_obj.set_user_attr(key, run_id), f"recording {key}")
        else:
            self._set_attr("mlflow_run_id", run_id)
            if self.tracking_uri:  # a worker on another machine ends the run FAILED if this one is lost
                self._set_attr("mlflow_tracking_uri", self.tracking_uri)

    def on_baseline(self, val_accuracy: float) -> None:
        """The lowest val accuracy that meets the goal, now that the dense baseline is known."""
        if self._goal is not None and not self.is_confirmation:
            self._set_attr("goal_accuracy", goal_threshold(self._goal, val_accuracy))

    def on_validation(self, epoch: int, accuracy: float) -> None:
        if self.multi_objective or self.is_confirmation:  # Optuna prunes single-objective studies only
            return
        # A report sets the epoch's value: sent again after a lost connection, it is still one report.
        reconnecting(lambda: self.trial.report(accuracy, step=epoch), f"reporting trial {self.number}'s epoch {epoch}")
        if not reconnecting(self.trial.should_prune, f"asking the pruner about trial {self.number}"):
            return
        pruner = self.study_obj.pruner
        shortfall = pruner.shortfall(self.study_obj, self._plan) if isinstance(pruner, GoalPruner) else None
        if shortfall is not None and shortfall > 0:
            # Told to the sampler as a violated constraint: Optuna's TPE ranks a pruned trial by its last
            # val accuracy, which is highest for the low targets that cannot win; as infeasible trials
            # they weigh against their region instead, so the search moves above the best.
            reconnecting(lambda: self.trial.set_constraint(BEATS_BEST, shortfall),
                         f"recording trial {self.number}'s constraint")
            ceiling = self._plan["sparsity_ceiling"]
            raise Pruned(f"pruned after epoch {epoch}: its target {ceiling:.4f} cannot beat the best sparsity "
                         f"that met the goal ({ceiling + pruner.tolerance + shortfall:.4f})")
        raise Pruned(f"pruned by the study's pruner after epoch {epoch} (val accuracy {accuracy:.4f})")

    def _set_attr(self, key: str, value: Any) -> None:
        reconnecting(lambda: self.trial.set_user_attr(key, value), f"recording trial {self.number}'s {key}")

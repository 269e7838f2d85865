"""What optuna-dashboard shows of a sweep's study: the objectives' names, each trial's feasibility and
goal slack, its run's metrics as sortable columns, and a link to its MLflow run.

Plain Optuna: the keys written here are the ones optuna-dashboard 0.21 reads, so nothing needs the
dashboard installed at run time.

Where the dashboard looks, and why the goal constraint is written as Optuna's legacy list:

- Feasibility: the dashboard reads only the trial system attr ``constraints`` (a list; the one
  ``constraints_func`` used to fill) and colours a trial infeasible when any value is > 0. Optuna 5's
  named constraints (``trial.set_constraint(name, v)`` -> system attr ``constraints:<name>``) are
  invisible to it.
- Optuna 5 (``optuna.study._constrained_optimization._get_constraints_from_system_attrs``) merges both
  forms into ``FrozenTrial.constraints``: list items under the keys ``"0"``, ``"1"``, ... then every
  ``constraints:<name>``. Writing the goal both ways gives two entries, and TPE (sum of the positive
  values), NSGA-II (same) and GPSampler (one model per key) count the goal twice. A named constraint
  called ``"0"`` would replace the list item, but Optuna then warns "Overwrite an old format
  constraint." on every read.
- So the goal is written once, as the legacy list ``[goal_excess]``: the dashboard sees it and every
  sampler sees it exactly once, as ``FrozenTrial.constraints == {"0": goal_excess}``. The sweeper must
  then no longer call ``trial.set_constraint("accuracy_goal", ...)``. Its name lives on in the
  ``goal_slack`` and ``feasible`` user attrs.
- A trial the goal pruner stopped keeps its named constraint ``beats_best_sparsity`` (set by the run,
  ``harness.sweep.trial``): the dashboard marks feasibility on complete trials only, so adding the list
  there would show nothing and count the constraint twice. :func:`record_stopped` shows it as user attrs.

A finished trial's system attrs cannot change any more, so everything here is written before ``tell``;
the note is a study attr and could be written later, but is written at the same time. Every function is
idempotent (attrs are overwritten, the note gets the link once): the sweeper may retry a whole call after
a lost storage connection.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import optuna

from harness.metrics import FINAL_ACCURACY
from harness.tracking import ui_run_page

log = logging.getLogger(__name__)

LEGACY_CONSTRAINTS = "constraints"  # the trial system attr the dashboard reads (optuna_dashboard._serializer)
NAMED_PREFIX = "constraints:"  # Optuna 5's named constraints (Trial.set_constraint)
NAMED_GOAL = "accuracy_goal"  # the name the sweeper gave the goal when it set it as a named constraint
GOAL_SLACK = "goal_slack"
FEASIBLE = "feasible"
MLFLOW_RUN = "mlflow_run"
# Set by the run (harness.sweep.trial.TrialLink.on_baseline): the lowest val accuracy that meets the goal.
GOAL_ACCURACY = "goal_accuracy"
STOPPED_BY = "stopped_by"
CONSTRAINT_ATTR = "constraint/{}"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store (file or sqlite) by default
NOTE_CHUNK = 2045  # optuna_dashboard._note.SYSTEM_ATTR_MAX_LENGTH: the note is stored in pieces of this size


def name_objectives(study: optuna.Study, objectives: list[str]) -> None:
    """Name the study's objectives (the dashboard shows ``study:metric_names`` on axes and columns).
    A resumed study keeps the names it has; different ones are left as they are, with a log line."""
    current = study.metric_names
    if current == list(objectives):
        return
    if current is not None:
        log.warning("study %s names its objectives %s, not %s; the dashboard keeps showing the old names",
                    study.study_name, current, list(objectives))
        return
    with warnings.catch_warnings():  # "experimental since v3.2.0": said on every sweep, of no use to its user
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))


def record_trial(study: optuna.Study, trial: optuna.Trial, metrics: dict[str, float], goal_excess: float | None,
                 run_url: str | None) -> None:
    """Before ``tell``: the run's metrics as user attrs, the accuracy-goal constraint (once, where both the
    dashboard and the samplers read it) with ``goal_slack`` and ``feasible``, and the link to the run.

    ``goal_excess`` is the run's ``goal/excess_drop`` (the drop beyond the allowed one, <= 0 meets the
    goal), or None when the goal constraint is off or the run judged no goal.
    """
    stored = study._storage.get_trial(trial._trial_id)  # the run wrote attrs through its own trial object
    for name, value in metrics.items():
        if name in stored.user_attrs and not _same(stored.user_attrs[name], float(value)):  # (same: a retry)
            log.warning("trial %d: metric %r not recorded as a user attribute: the sweep already uses that name",
                        trial.number, name)
            continue
        trial.set_user_attr(name, float(value))
    if goal_excess is not None:
        _record_goal(study, trial, stored, float(goal_excess), metrics)
    link_run(study, trial, run_url)


def record_stopped(study: optuna.Study, trial: optuna.Trial, run_url: str | None) -> None:
    """Before ``tell`` of a pruned trial: the constraints its run set (``beats_best_sparsity`` when the goal
    pruner stopped it) as user attrs ``constraint/<name>``, ``stopped_by`` (the violated ones, or
    ``pruner``), ``feasible`` when it set any, and the link to its run."""
    stored = study._storage.get_trial(trial._trial_id)
    constraints = stored.constraints
    for name, value in constraints.items():
        trial.set_user_attr(CONSTRAINT_ATTR.format(name), float(value))
    violated = [name for name, value in constraints.items() if value > 0]
    trial.set_user_attr(STOPPED_BY, ", ".join(violated) or "pruner")
    if constraints:
        trial.set_user_attr(FEASIBLE, not violated)
    link_run(study, trial, run_url)


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, as an absolute address (a note's relative link would open inside
    the dashboard): the tracking server itself, or ``mlflow ui``'s default address for a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/{ui_run_page(experiment_id, run_id)}"


def trial_run_url(study: optuna.Study, trial: optuna.Trial, experiment_id: str | None) -> str | None:
    """The address of the trial's MLflow run, from what its run recorded on the trial
    (``mlflow_run_id``, ``mlflow_tracking_uri``: ``harness.sweep.trial.TrialLink.on_run_started``);
    None when it ran without MLflow or the experiment is not known."""
    attrs = study._storage.get_trial(trial._trial_id).user_attrs
    run_id, uri = attrs.get("mlflow_run_id"), attrs.get("mlflow_tracking_uri")
    if not run_id or not uri or experiment_id is None:
        return None
    return mlflow_run_url(uri, experiment_id, run_id)


def link_run(study: optuna.Study, trial: optuna.Trial, run_url: str | None) -> None:
    """The trial's MLflow run: user attr ``mlflow_run`` and a line in the trial's dashboard note (Markdown,
    rendered as a link). A note someone already wrote is kept; the line is added once."""
    if not run_url:
        return
    trial.set_user_attr(MLFLOW_RUN, run_url)
    line = f"[MLflow run]({run_url})"
    body = read_note(study, trial._trial_id)
    if line in body:
        return
    write_note(study, trial._trial_id, f"{body.rstrip()}\n\n{line}" if body.strip() else line)


def _same(old: Any, new: float) -> bool:
    return isinstance(old, int | float) and (old == new or (math.isnan(old) and math.isnan(new)))


def _record_goal(study: optuna.Study, trial: optuna.Trial, stored: optuna.trial.FrozenTrial, excess: float,
                 metrics: dict[str, float]) -> None:
    if math.isnan(excess):  # Optuna rejects NaN constraints (NSGA-II raises on them)
        log.warning("trial %d: its goal excess is NaN; no goal constraint recorded", trial.number)
        return
    if f"{NAMED_PREFIX}{NAMED_GOAL}" in stored.system_attrs:  # it would count twice for the samplers
        log.warning("trial %d already has the named constraint %r; the goal is not recorded again for the "
                    "dashboard", trial.number, NAMED_GOAL)
    else:
        study._storage.set_trial_system_attr(trial._trial_id, LEGACY_CONSTRAINTS, [excess])
    trial.set_user_attr(FEASIBLE, excess <= 0)
    slack = goal_slack(stored.user_attrs.get(GOAL_ACCURACY), metrics.get(FINAL_ACCURACY))
    if slack is not None:
        trial.set_user_attr(GOAL_SLACK, slack)


def goal_slack(goal_accuracy: Any, val_accuracy: float | None) -> float | None:
    """How far the run's val accuracy is above (+) or below (-) the lowest one that meets the goal, in
    accuracy (0.01 = one point). Not ``-goal_excess``: with the default relative criterion the excess is a
    share of the dense accuracy, not accuracy points."""
    if goal_accuracy is None or val_accuracy is None:
        return None
    # Rounded: shown as text in the dashboard, where -0.029999999999999916 reads worse than -0.03.
    return round(float(val_accuracy) - float(goal_accuracy), 6)


# -- the dashboard's trial note (optuna_dashboard._note: save_note / get_note, same keys and format) --------------


def _note_ver_key(trial_id: int) -> str:
    return f"dashboard:{trial_id}:note_ver"


def _note_str_prefix(trial_id: int) -> str:
    return f"dashboard:{trial_id}:note_str:"


def read_note(study: optuna.Study, trial_id: int) -> str:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    if _note_ver_key(trial_id) not in attrs:
        return ""
    prefix = _note_str_prefix(trial_id)
    count = sum(1 for key in attrs if key.startswith(prefix))
    return "".join(attrs[f"{prefix}{i}"] for i in range(count))


def write_note(study: optuna.Study, trial_id: int, body: str) -> None:
    """Save the note as the dashboard does: version + 1 (an editor open on the old version gets a conflict,
    not an overwrite), the body in chunks, old chunks beyond the new body emptied."""
    storage, study_id = study._storage, study._study_id
    attrs = storage.get_study_system_attrs(study_id)
    storage.set_study_system_attr(study_id, _note_ver_key(trial_id), int(attrs.get(_note_ver_key(trial_id), 0)) + 1)
    prefix = _note_str_prefix(trial_id)
    chunks = [body[i:i + NOTE_CHUNK] for i in range(0, len(body), NOTE_CHUNK)]
    old = sum(1 for key in attrs if key.startswith(prefix))
    for i in range(max(len(chunks), old)):
        storage.set_study_system_attr(study_id, f"{prefix}{i}", chunks[i] if i < len(chunks) else "")

"""Sweeps whose answer can be trusted, on a real Optuna storage: one study per experiment, the
goal-aware pruner, confirmation on other fine-tuning seeds, failures counted per study, and the
reproduce command. The end-to-end versions through the command line are in test_sweep.py."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import TrialState

from harness.config import GoalConfig
from harness.errors import ConfigError
from harness.sweep.command import merge, trial_command
from harness.sweep.confirm import confirm, feasible_candidates
from harness.sweep.identity import StudyIdentity, resolve_study_name, store_identity
from harness.sweep.loop import Outcome, SweepSettings, run_worker
from harness.sweep.pruners import GoalPruner
from harness.sweep.space import parse_search_space
from harness.sweep.study import make_pruner, make_storage
from harness.sweep.trial import confirmation_attr
from hydra_plugins.harness_sweeper.harness_sweeper import ConfirmConf, HarnessSweeperConf, PrunerConf

SPACE = {"prune.target_sparsity": "interval(0.5, 0.99)"}


def identity(model: str = "digits_cnn", space: dict | None = None, **config) -> StudyIdentity:
    parsed = parse_search_space(space or SPACE)
    return StudyIdentity.build({"model": model, "dataset": "digits", "hydra/sweeper": "harness_optuna"},
                               {"model": {"name": model}, "train": {"finetune_epochs": 8}, "outputs_dir": "x",
                                "prune": {"target_sparsity": 0.8}, **config},
                               {k: repr(v) for k, v in parsed.distributions.items()}, ["final/sparsity"],
                               ["maximize"], True, {"name": "tpe", "seed": 0})


def new_study(storage: str, name: str, ident: StudyIdentity) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=make_storage(storage), direction="maximize")
    store_identity(study, ident)
    return study


# -- one study per experiment --------------------------------------------------------------------

def test_the_same_experiment_finds_its_study_and_another_gets_its_own(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cnn = identity()
    assert resolve_study_name(make_storage(url), "max_sparsity", False, cnn) == ("max_sparsity", False)
    new_study(url, "max_sparsity", cnn)
    assert resolve_study_name(make_storage(url), "max_sparsity", False, identity()) == ("max_sparsity", True)

    mlp = identity("mlp")
    name, exists = resolve_study_name(make_storage(url), "max_sparsity", False, mlp)
    assert (name, exists) == (f"max_sparsity-{mlp.digest()[:8]}", False)
    new_study(url, name, mlp)
    assert resolve_study_name(make_storage(url), "max_sparsity", False, mlp) == (name, True)
    # Where outputs go, and the searched key's own default, are not part of what a trial means.
    assert identity(outputs_dir="elsewhere").digest() == cnn.digest()
    assert identity(prune={"target_sparsity": 0.5}).digest() == cnn.digest()
    # A fixed value, the search space or the sampler seed are.
    assert identity(train={"finetune_epochs": 9}).digest() != cnn.digest()
    assert identity(space={"prune.target_sparsity": "interval(0.5, 0.98)"}).digest() != cnn.digest()


def test_a_named_study_of_another_experiment_is_a_one_line_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    new_study(url, "max_sparsity", identity())
    with pytest.raises(ConfigError) as err:
        resolve_study_name(make_storage(url), "max_sparsity", True, identity("mlp"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("study max_sparsity was started with model=digits_cnn; this command has model=mlp")
    assert "model.name" not in message  # the group's option says it
    assert "hydra.sweeper.study_name" in message
    with pytest.raises(ConfigError, match=r"started with train.finetune_epochs=8; this command has "
                                          r"train.finetune_epochs=9"):
        resolve_study_name(make_storage(url), "max_sparsity", True, identity(train={"finetune_epochs": 9}))
    assert resolve_study_name(make_storage(url), "max_sparsity", True, identity()) == ("max_sparsity", True)


# -- the goal pruner ------------------------------------------------------------------------------

def finish(study: optuna.Study, curve: list[float], ceiling: float, end: int, excess: float) -> None:
    trial = study.ask()
    trial.set_user_attr("plan", {"sparsity_ceiling": ceiling, "schedule_end_epoch": end, "epochs": len(curve)})
    trial.set_user_attr("goal_accuracy", 0.97)
    for step, value in enumerate(curve):
        trial.report(value, step)
    trial.set_constraint("accuracy_goal", excess)
    study.tell(trial, ceiling)


def replay(study: optuna.Study, pruner: GoalPruner, curve: list[float], ceiling: float, end: int) -> int | None:
    """Report ``curve`` epoch by epoch for a new trial; return the epoch it was stopped at, or None."""
    trial = study.ask()
    trial.set_user_attr("plan", {"sparsity_ceiling": ceiling, "schedule_end_epoch": end, "epochs": len(curve)})
    trial.set_user_attr("goal_accuracy", 0.97)
    for step, value in enumerate(curve):
        trial.report(value, step)
        frozen = study._storage.get_trial(trial._trial_id)
        if pruner.prune(study, frozen):
            study.tell(trial, state=TrialState.PRUNED)
            return step
    trial.set_constraint("accuracy_goal", 0.97 - curve[-1])  # feasible when it ends at the goal or above
    study.tell(trial, ceiling)
    return None


DIP = [0.98, 0.97, 0.95, 0.93, 0.95, 0.97, 0.98, 0.98]  # prunes until epoch 3, then recovers


def test_goal_pruner_stops_trials_that_cannot_beat_the_best_feasible_sparsity(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    pruner = make_pruner({"objective": "final/sparsity", **dataclasses.asdict(PrunerConf())})  # the schema's
    assert replay(study, pruner, DIP, ceiling=0.95, end=3) is None  # nothing to beat yet
    assert replay(study, pruner, DIP, ceiling=0.90, end=3) == 0  # cannot beat 0.95: stopped at once
    assert replay(study, pruner, DIP, ceiling=0.9495, end=3) is None  # a near-tie still runs (tolerance)
    finish(study, [0.9] * 8, ceiling=0.99, end=3, excess=0.05)  # sparser, but it missed the goal
    assert replay(study, pruner, DIP, ceiling=0.96, end=3) is None  # infeasible trials set no bar
    # The sparsest trials dip while they prune: the median pruner's comparison would stop them here.
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    sparsest = [0.96, 0.9, 0.88, 0.87, 0.92, 0.97, 0.98, 0.985]  # under the goal when its schedule ends
    assert replay(study, median, sparsest, ceiling=0.99, end=3) == 0
    assert replay(study, pruner, sparsest, ceiling=0.99, end=3) is None


def test_goal_pruner_stops_a_trial_too_far_under_the_goal_to_recover_and_never_the_best(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    pruner = GoalPruner(objective="final/sparsity", recovery_margin=0.02, min_finished=3)
    hopeless = [0.98, 0.9, 0.7, 0.6, 0.62, 0.63, 0.64, 0.64]
    assert replay(study, pruner, hopeless, ceiling=0.999, end=3) is None  # too few finished trials to judge
    finish(study, DIP, ceiling=0.80, end=3, excess=-0.01)  # recovered 0.05 after its schedule
    assert replay(study, pruner, hopeless, ceiling=0.999, end=3) is None  # 2 finished: still too few to judge
    finish(study, DIP, ceiling=0.85, end=3, excess=-0.01)
    # Now: at the end of its schedule (epoch 3) 0.6 is under 0.97 - 2 x 0.05 - 0.02: it cannot recover.
    assert replay(study, pruner, hopeless, ceiling=0.999, end=3) == 3
    # A trial that recovers like the others is never stopped, and becomes the best.
    assert replay(study, pruner, DIP, ceiling=0.95, end=3) is None
    assert [t.values[0] for t in feasible_candidates(study)] == [0.95, 0.85, 0.8]


def test_trials_stopped_below_the_best_steer_tpe_above_it():
    # Optuna's TPE ranks a pruned trial by its last val accuracy: the low targets that cannot win
    # (stopped at their first epoch, accuracy still high) would look like the good region. Told as
    # infeasible (their shortfall under the best), they weigh against it instead.
    dist = {"t": optuna.distributions.FloatDistribution(0.9, 0.999)}

    def next_target(told: bool, seed: int) -> float:
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True))
        study.add_trial(optuna.trial.create_trial(params={"t": 0.997}, distributions=dist, value=0.997,
                                                  system_attrs={"constraints:accuracy_goal": -0.01}))
        for i in range(14):  # 0.9 ... 0.9845, all under the best, stopped at their first epoch
            t = 0.9 + 0.0065 * i
            attrs = {"constraints:beats_best_sparsity": 0.996 - t} if told else {}
            study.add_trial(optuna.trial.create_trial(params={"t": t}, distributions=dist, state=TrialState.PRUNED,
                                                      intermediate_values={0: 0.985 - 0.001 * i}, system_attrs=attrs))
        return study.ask(dist).params["t"]

    told = sum(next_target(True, seed) >= 0.996 for seed in range(40))
    untold = sum(next_target(False, seed) >= 0.996 for seed in range(40))
    assert told >= 28 and told > untold  # measured: 32 of 40 against 22 of 40


# -- confirmation ---------------------------------------------------------------------------------

def test_confirmation_reports_the_sparsest_candidate_whose_mean_meets_the_goal_and_runs_once(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    for sparsity, val in ((0.99, 0.975), (0.98, 0.98), (0.97, 0.985), (0.995, 0.90), (0.96, 0.99)):
        trial = study.ask()
        trial.set_user_attr("metrics", {"final/accuracy": val, "final/test_accuracy": val - 0.01,
                                        "final/sparsity": sparsity, "baseline/accuracy": 0.98})
        trial.set_constraint("accuracy_goal", (0.98 - val) / 0.98 - 0.01)
        study.tell(trial, sparsity)
    assert [t.values[0] for t in feasible_candidates(study)] == [0.99, 0.98, 0.97, 0.96]  # 0.995 missed
    calls = []

    def rerun(trial, seed):  # the 0.99 setting was lucky: other seeds lose 4 points
        calls.append((trial.number, seed))
        sparsity = trial.values[0]
        val = trial.user_attrs["metrics"]["final/accuracy"] - (0.04 if sparsity == 0.99 else 0.0)
        return Outcome(metrics={"final/accuracy": val, "final/test_accuracy": val, "final/sparsity": sparsity})

    candidates, best = confirm(study, ConfirmConf(candidates=3, seeds=2), GoalConfig(), lambda t: 1, rerun)
    assert [c.trial.values[0] for c in candidates] == [0.99, 0.98, 0.97]
    assert best is candidates[1] and best.holds and not candidates[0].holds
    assert [r.finetune_seed for r in best.runs] == [1, 2, 3] and best.runs[0].original
    assert best.mean("val_accuracy") == pytest.approx(0.98)
    assert len(calls) == 6 and study.user_attrs[confirmation_attr(best.trial.number, 3)]["final/accuracy"] == 0.98

    _, best_again = confirm(study, ConfirmConf(candidates=3, seeds=2), GoalConfig(), lambda t: 1, rerun)
    assert len(calls) == 6  # stored on the study: a resumed sweep does not run them again
    assert best_again.trial.number == best.trial.number

    # When none of the top candidates holds, the next ones are confirmed until one does.
    calls.clear()
    _, fallback = confirm(study, ConfirmConf(candidates=1, seeds=2, max_candidates=6), GoalConfig(),
                          lambda t: 10, rerun)
    assert [n for n, _ in calls] == [0, 0, 1, 1]
    assert fallback.trial.values[0] == 0.98


# -- failures are counted per study ---------------------------------------------------------------

def test_failures_count_over_the_study_whatever_the_restarts(tmp_path):
    conf = HarnessSweeperConf(n_trials=4, objectives=["final/sparsity"], directions=["maximize"],
                              goal_constraint=True, pruner=PrunerConf(name="none"), max_failure_rate=0.5)
    settings = SweepSettings(study_name="f", storage=f"sqlite:///{tmp_path / 'o.db'}", conf=conf)
    space = parse_search_space(SPACE)

    def failing(trial, overrides):
        return Outcome(error="Diverged: train/loss=nan", output_dir=f"/runs/{trial.number}")

    first = run_worker(settings, space, failing)
    assert first.stopped_on_failures and len(first.failed) == 2  # 0.5 x 4
    again = run_worker(settings, space, failing)
    assert again.stopped_on_failures and again.ran == []  # a restart does not get a new budget
    study = optuna.load_study(study_name="f", storage=settings.storage)
    assert [t.user_attrs["output_dir"] for t in study.trials] == ["/runs/0", "/runs/1"]
    # A trial lost with its process is replaced, not counted.
    lost = study.ask()
    lost.set_user_attr("lost", "its process died")
    study.tell(lost, state=TrialState.FAIL)
    relaxed = dataclasses.replace(settings, conf=dataclasses.replace(conf, max_failure_rate=1.0))
    ran = run_worker(relaxed, space, lambda t, o: Outcome(metrics={"final/sparsity": 0.5, "goal/excess_drop": -1}))
    assert len(ran.ran) == 4 and not ran.stopped_on_failures


def test_reproduce_command_names_every_key_once():
    command = trial_command(["prune.end_epoch=1", "train.finetune_epochs=24"],
                            ["prune.target_sparsity=0.99", "prune.end_epoch=2"])
    assert command == ("python -m harness prune.end_epoch=2 train.finetune_epochs=24 "
                       "prune.target_sparsity=0.99")
    assert merge(["a=1", "+b=2", "a=3"]) == ["a=3", "+b=2"]

"""The sweeper reads sweep files written for Hydra's published Optuna sweeper: ``direction``,
``optimized_metric``, any Optuna sampler by ``_target_`` (or the plugin's short names), ``custom_search_space``,
the plugin's keys in ``optimization_results.yaml``; and a misspelled key in a sweep file is named in one
line. Sweep files are real files composed by Hydra (in this process, or through the command line)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hydra.utils
import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from harness.config import CONF_DIR, register_configs
from harness.errors import ConfigError
from harness.sweep.identity import StudyIdentity
from harness.sweep.space import parse_search_space
from harness.sweep.study import make_sampler
from harness.sweep.summary import write_results
from harness.sweep.sweeper import resolve
from hydra_plugins.harness_sweeper.harness_sweeper import written_sampler

from .conftest import REPO

TINY = ["train.epochs=1", "train.finetune_epochs=2", "prune.end_epoch=1", "hydra.sweeper.confirm.seeds=0",
        "tracking=none"]
HEADER = "# @package _global_\ndefaults:\n  - override /hydra/sweeper: harness_optuna\n"


def sweep_file(folder: Path, name: str, body: str, *defaults: str) -> Path:
    (folder / "sweep").mkdir(parents=True, exist_ok=True)
    path = folder / "sweep" / f"{name}.yaml"
    path.write_text(HEADER + "".join(f"  - {d}\n" for d in defaults) + textwrap.dedent(body))
    return path


def sweeper_of(folder: Path, name: str, overrides: tuple[str, ...] = ()) -> tuple:
    """The sweeper Hydra builds for ``+sweep=<name>`` (a file under ``folder``), and the composed config."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = compose(config_name="config", return_hydra_config=True,
                         overrides=[f"hydra.searchpath=[file://{folder}]", f"+sweep={name}", *overrides])
    sweeper = hydra.utils.instantiate(config.hydra.sweeper)
    choice = config.hydra.runtime.choices.get("hydra/sweeper/sampler")
    sweeper.options.sampler = written_sampler(sweeper.options.sampler, choice)
    return sweeper.options, config


def run(folder: Path, name: str, outputs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    command = [sys.executable, "-m", "harness", "--multirun", f"--config-dir={folder}", f"+sweep={name}", *TINY,
               *args, f"outputs_dir={outputs}", f"hydra.sweep.dir={outputs}/sweep"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


# -- the sampler ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("sampler", "cls", "check"), [
    ("{_target_: optuna.samplers.TPESampler, seed: 1, n_startup_trials: 3}", optuna.samplers.TPESampler,
     lambda s: s._n_startup_trials == 3),
    ("{_target_: optuna.samplers.RandomSampler, seed: 1}", optuna.samplers.RandomSampler, None),
    # Only the _target_ changed: nothing of the default sampler's is passed to the new one.
    ("{_target_: optuna.samplers.CmaEsSampler}", optuna.samplers.CmaEsSampler, None),
    ("{_target_: optuna.samplers.GPSampler}", optuna.samplers.GPSampler, None),
    ("{_target_: optuna.samplers.QMCSampler, scramble: true}", optuna.samplers.QMCSampler, None),
    ("{_target_: optuna.samplers.NSGAIISampler, population_size: 4}", optuna.samplers.NSGAIISampler,
     lambda s: s._population_size == 4),
    ("{name: nsgaii, seed: 3}", optuna.samplers.NSGAIISampler, None),
    ("{name: qmc}", optuna.samplers.QMCSampler, None),
])
def test_a_sweep_file_names_any_optuna_sampler_by_its_target(tmp_path, sampler, cls, check):
    sweep_file(tmp_path, "s", f"hydra:\n  sweeper:\n    sampler: {sampler}\n")
    options, _ = sweeper_of(tmp_path, "s")
    built = make_sampler(options.sampler)
    assert type(built) is cls
    assert check is None or check(built)


def test_the_default_sampler_and_its_identity_are_unchanged(tmp_path):
    """``{name: tpe, seed: 0}``: multivariate TPE, and the same identity section as before (existing studies)."""
    sweep_file(tmp_path, "d", "hydra:\n  sweeper:\n    n_trials: 3\n")
    options, _ = sweeper_of(tmp_path, "d")
    assert options.sampler == {"name": "tpe", "seed": 0}
    built = make_sampler(options.sampler)
    assert isinstance(built, optuna.samplers.TPESampler) and built._multivariate
    identity = StudyIdentity.build({}, {}, {}, ["final/sparsity"], ["maximize"], True, options.sampler)
    assert identity.sampler == {"name": "tpe", "seed": 0}


@pytest.mark.parametrize(("option", "cls"), [
    ("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
    ("cmaes", optuna.samplers.CmaEsSampler), ("nsgaii", optuna.samplers.NSGAIISampler),
    ("gp", optuna.samplers.GPSampler), ("qmc", optuna.samplers.QMCSampler),
])
def test_the_plugins_short_sampler_names_are_a_config_group(tmp_path, option, cls):
    sweep_file(tmp_path, "g", "hydra:\n  sweeper:\n    sampler:\n      seed: 123\n")
    options, _ = sweeper_of(tmp_path, "g", (f"hydra/sweeper/sampler={option}",))
    assert type(make_sampler(options.sampler)) is cls
    assert options.sampler["seed"] == 123


def test_switching_the_group_option_by_target_drops_the_options_arguments(tmp_path):
    sweep_file(tmp_path, "c", "hydra:\n  sweeper:\n    sampler:\n      _target_: optuna.samplers.CmaEsSampler\n")
    options, _ = sweeper_of(tmp_path, "c", ("hydra/sweeper/sampler=tpe",))
    assert "n_ei_candidates" not in options.sampler  # TPE's, not CMA-ES's
    assert type(make_sampler(options.sampler)) is optuna.samplers.CmaEsSampler


def test_grid_sampler_searches_the_params_values_and_caps_n_trials(tmp_path, caplog):
    sweep_file(tmp_path, "grid", """\
        hydra:
          sweeper:
            n_trials: 10
            params:
              prune.schedule: choice(cubic, linear)
              prune.end_epoch: choice(0, 1)
        """, "override /hydra/sweeper/sampler: grid")
    options, config = sweeper_of(tmp_path, "grid")
    space = parse_search_space(dict(options.params))
    with caplog.at_level("INFO"):
        resolved = resolve(options, config, space)
    assert resolved.n_trials == 4 and "lowered to 4" in caplog.text
    grid = make_sampler(resolved.sampler, space)
    assert isinstance(grid, optuna.samplers.GridSampler)
    assert sorted(grid._search_space["prune.schedule"]) == ["cubic", "linear"]
    continuous = parse_search_space({"train.finetune_lr": "interval(0.01, 0.1)"})
    with pytest.raises(ConfigError, match=r"train.finetune_lr: GridSampler only supports discrete"):
        make_sampler(resolved.sampler, continuous)


@pytest.mark.parametrize(("spec", "message"), [
    ({"_target_": "optuna.samplers.TPESampler", "n_startup_trails": 3},
     r"^hydra.sweeper.sampler.n_startup_trails: unknown key; closest: n_startup_trials; TPESampler takes: "),
    ({"_target_": "optuna.samplers.MOTPESampler"}, r"'motpe' sampler was removed in Optuna 4.0; use .*tpe"),
    ({"_target_": "optuna.samplers.TPESamplr"}, r"^hydra.sweeper.sampler._target_=optuna.samplers.TPESamplr: "
                                                r"not an Optuna sampler; closest: TPESampler"),
    ({"_target_": "os.system"}, r"not an Optuna sampler"),
    ({"name": "cmaes2"}, r"^hydra.sweeper.sampler.name=cmaes2: must be one of tpe, random, nsga2, nsgaii, qmc"),
])
def test_a_bad_sampler_is_one_line_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_sampler(spec)
    assert "\n" not in str(err.value)


def test_motpe_and_a_misspelled_sampler_argument_stop_the_command_before_any_trial(tmp_path):
    sweep_file(tmp_path, "m", "hydra:\n  sweeper:\n    direction: [minimize, minimize]\n"
                              "    objectives: [final/sparsity, final/accuracy]\n")
    result = run(tmp_path, "m", tmp_path / "out", "hydra/sweeper/sampler=motpe")
    assert "the 'motpe' sampler was removed in Optuna 4.0" in error_line(result)
    sweep_file(tmp_path, "k", "hydra:\n  sweeper:\n    sampler: {_target_: optuna.samplers.TPESampler, "
                              "n_startup_trails: 3}\n")
    result = run(tmp_path, "k", tmp_path / "out")
    assert "in sweep/k: hydra.sweeper.sampler.n_startup_trails: unknown key; closest: n_startup_trials" in \
        error_line(result)
    assert not (tmp_path / "out" / "optuna.db").exists()  # stopped before any study or trial


# -- keys misspelled in a sweep file ---------------------------------------------------------------

def test_a_misspelled_key_in_a_sweep_file_is_named_with_its_file_and_the_closest_names(tmp_path):
    sweep_file(tmp_path, "x", "hydra:\n  sweeper:\n    directon: maximize\n")
    result = run(tmp_path, "x", tmp_path / "out")
    line = error_line(result)
    assert line.startswith("error: in sweep/x: hydra.sweeper.directon: unknown key; closest: direction")
    assert "defaults" not in line  # Hydra's own field is no key to suggest
    assert not (tmp_path / "out" / "optuna.db").exists()  # stopped before any study or trial


def test_direction_and_directions_that_disagree_are_one_line(tmp_path):
    sweep_file(tmp_path, "dd", "hydra:\n  sweeper:\n    direction: minimize\n    directions: [maximize]\n")
    options, config = sweeper_of(tmp_path, "dd")
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.direction=minimize and hydra.sweeper.directions="
                                          r"\[maximize\] disagree"):
        resolve(options, config, parse_search_space({}))


# -- lightning-hydra-template's file shape, end to end --------------------------------------------

LIGHTNING_SHAPED = """\
    optimized_metric: final/accuracy
    hydra:
      sweeper:
        storage: null
        study_name: null
        n_jobs: 1
        direction: maximize
        n_trials: 2
        sampler:
          _target_: optuna.samplers.TPESampler
          seed: 1234
          n_startup_trials: 10
        params:
          train.finetune_lr: interval(0.01, 0.1)
          prune.target_sparsity: choice(0.5, 0.7)
    """


def test_a_lightning_template_shaped_file_optimizes_its_optimized_metric(tmp_path):
    sweep_file(tmp_path, "lht", LIGHTNING_SHAPED)
    outputs = tmp_path / "out"
    result = run(tmp_path, "lht", outputs, "prune.schedule=cubic", "hydra.sweeper.max_failure_rate=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="lht", storage=f"sqlite:///{outputs / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 and all(t.value == t.user_attrs["metrics"]["final/accuracy"] for t in trials)
    identity = yaml.safe_load((outputs / "sweep" / "study_identity.yaml").read_text())
    assert identity["objectives"] == ["final/accuracy"] and identity["directions"] == ["maximize"]
    assert identity["sampler"] == {"_target_": "optuna.samplers.TPESampler", "n_startup_trials": 10, "seed": 1234}
    # The keys whose meaning differs from the published plugin's, which the file set, are said at start.
    said = [line for line in (result.stdout + result.stderr).splitlines() if "the published plugin's" in line]
    assert len(said) == 1 and "storage=null" in said[0]
    assert "max_failure_rate=0.5: the share of n_trials" in said[0]  # set on the command line
    assert "n_jobs" not in said[0]  # n_jobs=1: one trial at a time under both meanings
    results = yaml.safe_load((outputs / "sweep" / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and results["sweeper"] == "harness_optuna"
    best = max(trials, key=lambda t: t.value)
    assert results["best_value"] == pytest.approx(best.value)
    assert set(results["best_params"]) == {"train.finetune_lr", "prune.target_sparsity"}  # no fixed param


def test_custom_search_space_suggests_more_values_that_reach_the_runs_and_the_identity(tmp_path):
    (tmp_path / "my_space.py").write_text(textwrap.dedent("""\
        def configure(config, trial):
            # after the params: their values are readable
            low = 0.05 if trial.params["prune.target_sparsity"] > 0.6 else 0.01
            trial.suggest_float("train.finetune_lr", low, 0.1)
        """))
    sweep_file(tmp_path, "css", """\
        hydra:
          sweeper:
            n_trials: 2
            custom_search_space: my_space.configure
            params:
              prune.target_sparsity: choice(0.5, 0.7)
        """)
    outputs = tmp_path / "out"
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env_path}"
    try:
        result = run(tmp_path, "css", outputs, "hydra.sweeper.study_name=css")
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="css", storage=f"sqlite:///{outputs / 'optuna.db'}")
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        lr = trial.params["train.finetune_lr"]
        assert (0.05 if trial.params["prune.target_sparsity"] > 0.6 else 0.01) <= lr <= 0.1
        config = yaml.safe_load((Path(trial.user_attrs["output_dir"]) / ".hydra" / "config.yaml").read_text())
        assert config["train"]["finetune_lr"] == pytest.approx(lr)  # the run got it
    identity = yaml.safe_load((outputs / "sweep" / "study_identity.yaml").read_text())
    assert "my_space.configure" in identity["space"]["custom_search_space"]
    results = yaml.safe_load((outputs / "sweep" / "optimization_results.yaml").read_text())
    best = results["best"]
    if best is not None:
        assert "train.finetune_lr=" in best["command"]


# -- optimization_results.yaml --------------------------------------------------------------------

def test_results_carry_the_plugins_keys_as_null_when_nothing_meets_the_goal(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"x": 1}, distributions={
        "x": optuna.distributions.IntDistribution(0, 3)}, value=0.5))
    identity = StudyIdentity.build({}, {}, {}, ["final/sparsity"], ["maximize"], True, {"name": "tpe", "seed": 0})
    path = tmp_path / "optimization_results.yaml"
    write_results(path, study, [], identity, [])
    results = yaml.safe_load(path.read_text())
    assert results["name"] == "optuna" and results["sweeper"] == "harness_optuna"
    assert results["best_params"] is None and results["best_value"] is None and results["best"] is None


# -- any Hydra app (not the harness): the published plugin's example, unchanged but the sweeper's name ----

SPHERE = """\
import hydra


@hydra.main(version_base=None, config_path="conf", config_name="config")
def sphere(cfg):
    if cfg.error:
        raise RuntimeError("cfg.error is True")
    if cfg.two:
        return cfg.x**2 + cfg.y, (cfg.x - 5) ** 2
    return cfg.x**2 + cfg.y**2


if __name__ == "__main__":
    sphere()
"""

SPHERE_CONFIG = """\
defaults:
  - override hydra/sweeper: harness_optuna
hydra:
  sweeper:
    sampler:
      seed: 123
    direction: minimize
    study_name: sphere
    storage: null
    n_trials: 8
    n_jobs: 2
    max_failure_rate: 0.0
    params:
      x: range(-5.5, 5.5, step=0.5)
      y: choice(-5, 0, 5)
x: 1
y: 1
error: false
two: false
"""


def run_sphere(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "sphere.py").write_text(SPHERE)
    (tmp_path / "conf" / "config.yaml").write_text(SPHERE_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, "sphere.py", "--multirun", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_any_hydra_app_is_swept_on_its_return_value(tmp_path):
    result = run_sphere(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Launching 2 jobs locally") == 4  # n_jobs: the launcher's batch, as in the plugin
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    best = results["best_params"]
    assert results["best_value"] == pytest.approx(best["x"] ** 2 + best["y"] ** 2)
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("*.db"))  # storage null: in memory


def test_any_hydra_app_with_two_directions_reports_its_pareto_front(tmp_path):
    result = run_sphere(tmp_path, "two=true", "hydra.sweeper.direction=[minimize,minimize]",
                        "hydra/sweeper/sampler=nsgaii")
    assert result.returncode == 0, result.stderr[-3000:]
    solutions = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())["solutions"]
    assert solutions and all(len(s["values"]) == 2 and set(s["params"]) == {"x", "y"} for s in solutions)


def test_an_apps_failures_stop_its_sweep_with_the_jobs_error(tmp_path):
    result = run_sphere(tmp_path, "error=true")
    assert result.returncode != 0
    assert "RuntimeError: cfg.error is True" in result.stderr


def test_the_default_sweep_keeps_its_sampler_and_objective(tmp_path):
    """``+sweep=max_sparsity``: multivariate TPE seeded 0, final/sparsity maximized, as before issue 16."""
    options, config = sweeper_of(tmp_path, "max_sparsity")
    resolved = resolve(options, config, parse_search_space(dict(options.params)))
    assert resolved.sampler == {"name": "tpe", "seed": 0}
    assert resolved.objectives == ["final/sparsity"] and resolved.directions == ["maximize"]
    built = make_sampler(resolved.sampler)
    assert type(built) is optuna.samplers.TPESampler and built._multivariate


@pytest.mark.slow
def test_the_shipped_lightning_shaped_example_runs_as_a_multirun_without_the_flag(tmp_path):
    # sweeps/lightning_optuna.yaml sets hydra.mode: MULTIRUN, optimized_metric and a sampler by _target_.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    result = subprocess.run(
        [sys.executable, "-m", "harness", "+sweep=lightning_optuna", "hydra.sweeper.n_trials=2",
         "train.finetune_epochs=7", "hydra.sweeper.confirm.seeds=0", "tracking=none", f"outputs_dir={tmp_path}",
         f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="lightning_optuna", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and len(study.trials) == 2
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    assert results["name"] == "optuna" and results["best_value"] == pytest.approx(best.value)
    assert best.value == best.user_attrs["metrics"]["final/accuracy"]

"""The sweep search space: Hydra's override grammar -> Optuna distributions -> trial overrides.

Everything runs for real: Hydra's OverridesParser and in-memory Optuna studies.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from harness.errors import ConfigError
from harness.sweep.space import SearchSpace, encode_value, parse_search_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "prune.target_sparsity": "interval(0.5, 0.98)",
    "prune.schedule": "choice(linear, cubic)",
    "train.finetune_lr": "tag(log, interval(1e-4, 1e-1))",
    "prune.end_epoch": "range(2, 6)",
    "prune.update_frequency": "choice(0.25, 0.5, 1)",
    "train.batch_size": "tag(log, int(interval(8, 256)))",
    "train.warmup": "range(0.0, 1.0, 0.25)",
    "prune.layers": "choice([conv1, fc], [fc], {head: 'a b'})",
    "prune.global_": "true,false",
    "seed": 3,
}


def _parse_value(override: str):
    """What Hydra's own parser makes of ``key=value``."""
    return OverridesParser.create().parse_override(override).value()


def _grid(dist: IntDistribution | FloatDistribution) -> list[float]:
    n = round((dist.high - dist.low) / dist.step)
    return [dist.low + k * dist.step for k in range(n + 1)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("interval(0.5, 0.98)", FloatDistribution(0.5, 0.98)),
        ("interval(1, 5)", FloatDistribution(1.0, 5.0)),  # Hydra's interval() makes floats
        ("tag(log, interval(1e-4, 1e-1))", FloatDistribution(1e-4, 0.1, log=True)),
        ("int(interval(1, 5))", IntDistribution(1, 5)),
        ("tag(log, int(interval(8, 256)))", IntDistribution(8, 256, log=True)),
        ("range(2, 6)", IntDistribution(2, 6)),  # stop included, as the published plugin reads it
        ("range(5)", IntDistribution(0, 5)),
        ("range(0, 9, 3)", IntDistribution(0, 9, step=3)),
        ("range(1, 7, step=3)", IntDistribution(1, 7, step=3)),
        ("range(3, 3)", IntDistribution(3, 3)),
        ("range(0.5, 2, 0.5)", FloatDistribution(0.5, 2.0, step=0.5)),
        ("range(-5.5, 5.5, step=0.5)", FloatDistribution(-5.5, 5.5, step=0.5)),
        ("range(0.1, 0.35, 0.05)", FloatDistribution(0.1, 0.35, step=0.05)),
        ("range(-5.0, 5.0)", FloatDistribution(-5.0, 5.0, step=1.0)),  # Hydra's step defaults to 1
        ("range(1, 5, 0.5)", FloatDistribution(1.0, 5.0, step=0.5)),
        ("choice(linear, cubic)", CategoricalDistribution(["linear", "cubic"])),
        ("linear,cubic", CategoricalDistribution(["linear", "cubic"])),
        ("choice('a b', 'x,y')", CategoricalDistribution(["a b", "x,y"])),
    ],
)
def test_grammar_maps_to_distribution(text, expected):
    space = parse_search_space({"k.x": text})
    assert space.distributions == {"k.x": expected}
    assert space.fixed == {}
    assert space.notices == ()  # read exactly as the published plugin reads it: nothing to tell


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("choice(1,2)", CategoricalDistribution([1, 2])),
        ("choice(true,false)", CategoricalDistribution([True, False])),
        ("choice('hello','world')", CategoricalDistribution(["hello", "world"])),
        ("shuffle(range(1,3))", CategoricalDistribution([1, 2])),
        ("range(1,3)", IntDistribution(1, 3)),
        ("interval(1,5)", FloatDistribution(1, 5)),
        ("int(interval(1,5))", IntDistribution(1, 5)),
        ("tag(log, interval(1,5))", FloatDistribution(1, 5, log=True)),
        ("tag(log, int(interval(1,5)))", IntDistribution(1, 5, log=True)),
        ("range(0.5,5.5,step=1)", FloatDistribution(0.5, 5.5, step=1)),
    ],
)
def test_the_published_plugins_grammar(text, expected):
    """The cases the published hydra-optuna-sweeper checks for its grammar (categoricals as sets)."""
    (dist,) = parse_search_space({"x": text}).distributions.values()
    if isinstance(expected, CategoricalDistribution):
        assert isinstance(dist, CategoricalDistribution)
        assert set(dist.choices) == set(expected.choices)
        assert [type(c) for c in dist.choices] == [type(c) for c in expected.choices]
    else:
        assert dist == expected


def test_a_plain_value_is_fixed_with_one_notice():
    space = parse_search_space({"x": "choice(1, 2)", "key": 5, "mode": "cubic"})
    assert space.fixed == {"key": 5, "mode": "cubic"}
    assert list(space.distributions) == ["x"]
    assert len(space.notices) == 1 and "key, mode" in space.notices[0] and "\n" not in space.notice()


def test_choice_keeps_value_types():
    dist = parse_search_space({"k": "choice(0.25, 0.5, 2, 'two', true, 1e-05)"}).distributions["k"]
    assert isinstance(dist, CategoricalDistribution)
    assert dist.choices == (0.25, 0.5, 2, "two", True, 1e-05)
    assert [type(c) for c in dist.choices] == [float, float, int, str, bool, float]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("range(2, 6)", [2, 3, 4, 5, 6]),
        ("range(0, 9, 3)", [0, 3, 6, 9]),
        ("range(0.5, 2, 0.5)", [0.5, 1.0, 1.5, 2.0]),
        ("range(0.1, 0.35, 0.05)", [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]),
        ("range(0, 1, 0.1)", [k / 10 for k in range(11)]),
        ("range(0, 0.3, 0.1)", [0.0, 0.1, 0.2, 0.3]),
    ],
)
def test_range_includes_stop(text, expected):
    """The plugin's range: Hydra's values (stop excluded, as in Python) and stop itself."""
    hydra_values = sorted(OverridesParser.create().parse_override(f"k={text}").sweep_iterator())
    grid = _grid(parse_search_space({"k": text}).distributions["k"])
    assert grid == pytest.approx(expected, abs=1e-12)
    assert grid[:-1] == pytest.approx(hydra_values, abs=1e-12)


@pytest.mark.parametrize(
    ("text", "expected", "said"),
    [
        ("range(0, 10, 3)", IntDistribution(0, 9, step=3), "ends at 9: 10 is not on its step grid"),
        ("range(0, 1, 0.3)", FloatDistribution(0.0, 0.9, step=0.3), "ends at 0.9: 1 is not on its step grid"),
        ("range(5, 0, -2)", IntDistribution(1, 5, step=2), "counts down, which the published plugin rejects"),
        ("range(5, 1, -2)", IntDistribution(1, 5, step=2), "int in [1, 5], step 2"),
        ("range(1.0, 0.0, -0.1)", FloatDistribution(0.0, 1.0, step=0.1), "float in [0, 1], step 0.1"),
        ("tag(foo, range(1, 3))", IntDistribution(1, 3), "ignores tag foo"),
        ("tag(log, range(1, 5))", IntDistribution(1, 5), "ignores tag log, which applies to interval() only"),
        ("tag(log, choice(1, 2))", CategoricalDistribution([1, 2]), "ignores tag log"),
        ("tag(foo, interval(0, 1))", FloatDistribution(0.0, 1.0), "ignores tag foo"),
    ],
)
def test_what_is_read_differently_is_said_in_one_line(text, expected, said):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's own multi-line warning is replaced by the notice
        space = parse_search_space({"prune.bad_key": text, "prune.schedule": "choice(linear, cubic)"})
    assert space.distributions["prune.bad_key"] == expected
    assert len(space.notices) == 1
    line = space.notice()
    assert line.startswith(f"sweep params: prune.bad_key={text} ") and said in line and "\n" not in line


@pytest.mark.parametrize(
    ("text", "hydra_order"),
    [
        ("shuffle(range(1, 3))", [1, 2]),
        ("shuffle(range(0, 10, 3))", [0, 3, 6, 9]),
        ("shuffle(range(5, 0, -2))", [5, 3, 1]),
        ("shuffle(range(0.5, 2, 0.5))", [0.5, 1.0, 1.5]),
        ("shuffle(choice(a, b, c))", ["a", "b", "c"]),
        ("shuffle(a, b, c)", ["a", "b", "c"]),
        ("shuffle(choice(2, 0.5, true))", [2, 0.5, True]),
    ],
)
def test_shuffle_is_a_choice_of_hydras_values_in_a_stable_order(text, hydra_order):
    """The plugin lists Hydra's values (a range's stop excluded) as a categorical in shuffled order;
    here they keep Hydra's order, so the same file is the same study every run, and a notice says so."""
    parsed = [parse_search_space({"k": text}) for _ in range(3)]
    assert all(space == parsed[0] for space in parsed)
    dist = parsed[0].distributions["k"]
    assert isinstance(dist, CategoricalDistribution)
    assert list(dist.choices) == hydra_order
    assert [type(c) for c in dist.choices] == [type(c) for c in hydra_order]
    assert sorted(map(str, dist.choices)) == sorted(map(str, OverridesParser.create().parse_override(
        f"k={text}").sweep_iterator()))
    assert parsed[0].notice() == (f"sweep params: k={text} is searched as a choice of its values in order: the "
                                  "published plugin shuffles them, an order that means nothing to the sampler "
                                  "but would change the study every run")


# Today's sweep files, written for the plugin's range (stop included), search exactly the values
# they searched when range excluded stop: their studies (identified by these distributions) go on.
SWEEP_FILE_SPACES = {
    "max_sparsity": (
        "{'prune.target_sparsity': FloatDistribution(high=0.9975, log=False, low=0.9, step=None), "
        "'prune.end_epoch': IntDistribution(high=24, log=False, low=8, step=1), "
        "'train.finetune_lr': FloatDistribution(high=0.2, log=True, low=0.03, step=None), "
        "'prune.schedule': CategoricalDistribution(choices=('cubic', 'exponential', 'linear')), "
        "'prune.update_frequency': CategoricalDistribution(choices=(0.5, 1))}",
        {"prune.target_sparsity": "float in [0.9, 0.9975]", "prune.end_epoch": "int in [8, 24]",
         "train.finetune_lr": "float in [0.03, 0.2], log scale",
         "prune.schedule": "one of cubic, exponential, linear", "prune.update_frequency": "one of 0.5, 1"}),
    "pareto": (
        "{'prune.target_sparsity': FloatDistribution(high=0.99, log=False, low=0.3, step=None), "
        "'prune.schedule': CategoricalDistribution(choices=('linear', 'cubic', 'exponential')), "
        "'prune.end_epoch': IntDistribution(high=6, log=False, low=2, step=1), "
        "'prune.criterion': CategoricalDistribution(choices=('magnitude', 'taylor'))}",
        {"prune.target_sparsity": "float in [0.3, 0.99]", "prune.schedule": "one of linear, cubic, exponential",
         "prune.end_epoch": "int in [2, 6]", "prune.criterion": "one of magnitude, taylor"}),
}


@pytest.mark.parametrize("name", sorted(SWEEP_FILE_SPACES))
def test_sweep_files_keep_their_search_space(name):
    params = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    space = parse_search_space(params)
    distributions, described = SWEEP_FILE_SPACES[name]
    assert repr(space.distributions) == distributions
    assert space.describe() == described  # what the study identity is built from
    assert space.fixed == {} and space.notice() == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3),
        (0.5, 0.5),
        (True, True),
        (None, None),
        ("magnitude", "magnitude"),
        ("'x y'", "x y"),
        ("1e-05", 1e-05),
        ("[conv1, fc]", ["conv1", "fc"]),
        (["conv1", "fc"], ["conv1", "fc"]),
        ({"a": 1, "b": "x y"}, {"a": 1, "b": "x y"}),
        ("${train.lr}", "${train.lr}"),
    ],
)
def test_plain_value_is_fixed(value, expected):
    space = parse_search_space({"k.x": value})
    assert space.distributions == {}
    assert space.fixed == {"k.x": expected}
    assert type(space.fixed["k.x"]) is type(expected)


def test_dictconfig_params():
    space = parse_search_space(OmegaConf.create({"params": PARAMS}).params)
    assert space == parse_search_space(PARAMS)
    assert set(space.distributions) == set(PARAMS) - {"seed"}
    assert space.fixed == {"seed": 3}


def test_suggest_stays_in_space_and_records_params():
    space = parse_search_space(PARAMS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    suggested = []
    for i in range(50):
        trial = study.ask()
        values = space.suggest(trial)
        suggested.append(values)
        study.tell(trial, float(i))

    for values, frozen in zip(suggested, study.trials, strict=True):
        assert list(values) == [*space.distributions, "seed"]
        assert values["seed"] == 3 and "seed" not in frozen.params
        assert set(frozen.params) == set(space.distributions)
        for key, dist in space.distributions.items():
            assert key in frozen.params and frozen.distributions[key] == dist
            value = values[key]
            if isinstance(dist, CategoricalDistribution):
                assert frozen.params[key] in dist.choices
            else:
                assert value == frozen.params[key]
                assert dist.low <= value <= dist.high
                assert isinstance(value, int if isinstance(dist, IntDistribution) else float)
                if dist.step is not None and not dist.log:
                    k = (value - dist.low) / dist.step
                    assert abs(k - round(k)) < 1e-9
        assert values["prune.schedule"] in ("linear", "cubic")
        assert values["prune.update_frequency"] in (0.25, 0.5, 1)
        assert values["prune.layers"] in (["conv1", "fc"], ["fc"], {"head": "a b"})
        assert type(values["prune.global_"]) is bool
        assert 2 <= values["prune.end_epoch"] <= 6
        assert 1e-4 <= values["train.finetune_lr"] <= 1e-1
        assert values["train.warmup"] in (0.0, 0.25, 0.5, 0.75, 1.0)

    # 50 random draws see every value of the small discrete spaces, range()'s stop included
    assert {v["prune.end_epoch"] for v in suggested} == {2, 3, 4, 5, 6}
    assert {v["train.warmup"] for v in suggested} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert {v["prune.schedule"] for v in suggested} == {"linear", "cubic"}
    assert {type(v["prune.update_frequency"]) for v in suggested} == {float, int}


def test_suggest_records_container_choices_as_text():
    space = parse_search_space({"prune.layers": "choice([conv1, fc], [fc])"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = space.suggest(trial)
    assert values["prune.layers"] in (["conv1", "fc"], ["fc"])
    assert trial.params["prune.layers"] == encode_value(values["prune.layers"])
    assert space.to_overrides(values) == [f"prune.layers={encode_value(values['prune.layers'])}"]


ROUND_TRIP = [
    1e-05,
    0.1,
    1.0,
    -2.5,
    1e300,
    math.inf,
    3,
    0,
    -7,
    10**20,
    True,
    False,
    None,
    "cubic",
    "linear",
    "a.b/c-d_e",
    "x y",
    " padded ",
    "",
    "1",
    "0.5",
    "1e-3",
    "true",
    "False",
    "null",
    "nan",
    "Inf",
    "a,b",
    "f(x)",
    "[a]",
    "{a: 1}",
    "k=v",
    "it's",
    'say "hi"',
    "back\\slash",
    "trailing\\",
    "\\'",
    "${train.lr}",
    "ünïcode",
    "tab\there",
    [1, 0.5, "cubic", True, None, "x y"],
    [],
    [[1, 2], ["a"]],
    {"a": 1, "b.c": [0.1, "x y"], "d": {"e": "true"}},
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=repr)
def test_to_overrides_round_trips_through_hydra(value):
    (override,) = SearchSpace({}, {}).to_overrides({"prune.some_key": value})
    parsed = _parse_value(override)
    assert parsed == value
    assert type(parsed) is type(value)
    if isinstance(value, list | dict):
        assert repr(parsed) == repr(value)  # nested types too (1 vs 1.0 vs true)


def test_nan_round_trips():
    (override,) = SearchSpace({}, {}).to_overrides({"k": math.nan})
    assert math.isnan(_parse_value(override))


def test_suggested_values_round_trip():
    space = parse_search_space(PARAMS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(50):
        values = space.suggest(study.ask())
        overrides = space.to_overrides(values)
        parsed = OverridesParser.create().parse_overrides(overrides)
        back = {o.get_key_element(): o.value() for o in parsed}
        assert back == values
        assert [type(v) for v in back.values()] == [type(v) for v in values.values()]
        assert not any(o.is_sweep_override() for o in parsed)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("interval(0.9, 0.5)", "interval needs low < high"),
        ("interval(0.5, 0.5)", "interval needs low < high"),
        ("tag(log, interval(0, 1))", "needs low > 0"),
        ("tag(log, interval(-1.0, 1))", "needs low > 0"),
        ("interval(0, inf)", "finite"),
        ("foo(1, 2)", "Unknown function 'foo'"),
        ("glob(*)", "glob() is not supported"),
        ("shuffle([1, 2, 3])", "random order"),
        ("shuffle(range(3, 3))", "shuffle(range(...)) is empty"),
        ("shuffle(range(0.0, 1.0, 1e-9))", "use range() or interval()"),
        ("choice()", "empty choice"),
        ("choice(a, b", "allowed: choice("),
        ("interval(1)", "allowed: choice("),
        ("range(1, 5, 0)", "non-zero step"),
        ("range(0.0, 1.0, 0)", "non-zero step"),
        ("range(5, 1)", "range is empty: from 5 a step of 1 never reaches 1"),
        ("range(1, 5, -1)", "range is empty"),
        ("range(0, inf)", "finite"),
        ("choice(1, true)", "distinct"),
        ("choice(1, 1.0)", "distinct"),
        ("choice('[a]', [a])", "distinct"),
        ("a = = b", "allowed: choice("),
    ],
)
def test_bad_params_are_one_line_value_errors(text, reason):
    with pytest.raises(ValueError) as info:
        parse_search_space({"prune.target_sparsity": 0.9, "prune.bad_key": text})
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "\n" not in msg
    assert msg.startswith(f"sweep params.prune.bad_key={' '.join(text.split())}: ")
    assert reason in msg


def test_bad_key_is_a_value_error():
    for key in ("~prune.schedule", "prune schedule"):
        with pytest.raises(ValueError, match=r"^sweep params\.") as info:
            parse_search_space({key: "choice(a, b)"})
        assert "\n" not in str(info.value)


def test_error_message_example():
    with pytest.raises(ValueError) as info:
        parse_search_space({"prune.target_sparsity": "interval(0.9, 0.5)"})
    assert str(info.value) == "sweep params.prune.target_sparsity=interval(0.9, 0.5): interval needs low < high"


def test_a_resumed_study_gets_the_same_distributions(tmp_path):
    """Parsing the same params again (a resumed sweep) gives the distributions its SQLite study stored."""
    params = {"a": "range(1, 3)", "b": "shuffle(range(0.1, 0.35, 0.05))", "c": "shuffle(choice(x, y, z))",
              "d": "range(5, 0, -2)"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        parse_search_space(params).suggest(trial)
        study.tell(trial, 0.0)
    stored = optuna.load_study(study_name="s", storage=storage).trials
    again = parse_search_space(params).distributions
    assert all(t.distributions == again for t in stored)
    assert {t.params["a"] for t in stored} == {1, 2, 3}
    assert {t.params["d"] for t in stored} == {1, 3, 5}

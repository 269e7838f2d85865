"""The sweep's search space: Hydra's override grammar mapped onto Optuna distributions.

Each entry of the sweep config's ``params`` is read by Hydra's own override parser (as
``key=value``) and means what it means to the published hydra-optuna-sweeper plugin:

=========================================  ======================================================
``choice(a, b, ...)`` or ``a,b,...``       ``CategoricalDistribution`` (ints, floats, strings,
                                           bools keep their type; a list or dict choice is held
                                           as its override text and handed back as the list or
                                           dict)
``range(start, stop[, step])``             ``IntDistribution(start, stop, step)``: ``stop`` is
                                           **included** (``range(1, 3)`` is 1, 2 or 3); a float
                                           start/stop/step gives ``FloatDistribution(step=...)``
``shuffle(range(...))``,                   ``CategoricalDistribution`` of Hydra's own values
``shuffle(choice(...))``                   (for a range: ``stop`` excluded, as Hydra counts)
``interval(low, high)``                    ``FloatDistribution(low, high)``; ``int(interval(...))``
                                           gives ``IntDistribution``
``tag(log, interval(low, high))``          the same with ``log=True`` (needs ``low > 0``)
a plain value (``3``, ``cubic``)           fixed: passed unchanged to every trial
=========================================  ======================================================

Where this project reads a value differently from the plugin (a descending range, which the plugin
rejects, is searched over the same values counted up; a categorical keeps its written order where
the plugin shuffles it; a plain value keeps its type where the plugin records its text; a tag the
plugin ignores), or where Optuna moves a bound (a ``stop`` off the step grid), the space says so in
:attr:`SearchSpace.notices`, which the sweep logs as one line at start (:meth:`SearchSpace.notice`).

Anything else (``glob()``, ``shuffle([...])``, an empty range, a zero step, ``interval`` with
``low >= high``) is a :class:`~harness.errors.ConfigError` (a ``ValueError``) of one line naming
the key, the value and what is allowed.

Example::

    space = parse_search_space({
        "prune.target_sparsity": "interval(0.5, 0.98)",
        "prune.schedule": "choice(linear, cubic)",
        "train.finetune_lr": "tag(log, interval(1e-4, 1e-1))",
        "prune.end_epoch": "range(2, 5)",          # 2, 3, 4 or 5
        "seed": 3,
    })
    values = space.suggest(study.ask())            # {"prune.target_sparsity": 0.73, ..., "seed": 3}
    space.to_overrides(values)                     # ["prune.target_sparsity=0.73", ..., "seed=3"]
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Quote, QuotedString, RangeSweep
from hydra.errors import HydraException
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from harness.errors import ConfigError

ALLOWED = ("choice(a, b, ...), range(start, stop[, step]), shuffle(choice(...)), shuffle(range(...)), "
           "interval(low, high), int(interval(low, high)), tag(log, interval(low, high))")
MAX_SHUFFLED_RANGE = 100_000  # values shuffle(range()) may list as choices; past that, use range() or interval()

_UNQUOTED = re.compile(r"[A-Za-z_][\w\-./]*", re.ASCII)  # strings Hydra reads back as the same string
_DICT_KEY = re.compile(r"[\w\-./]+", re.ASCII)
_KEYWORDS = {"true", "false", "null", "nan", "inf"}  # case-insensitive in Hydra's grammar


@dataclass(frozen=True)
class SearchSpace:
    """Swept keys with their distributions, and keys fixed to one value for every trial."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]
    # For choice() over lists or dicts: the categorical holds each one's override text (storable
    # in any Optuna storage); this maps key -> text -> the list or dict that ``suggest`` returns.
    container_choices: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    # Where a key is read differently from the published plugin, or Optuna moved a bound: one
    # sentence each, which the sweep logs at start (see ``notice``).
    notices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        both = self.distributions.keys() & self.fixed.keys()
        if both:
            raise ConfigError(f"sweep params: {sorted(both)} are both swept and fixed")

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """One value per swept key, asked through ``trial.suggest_*`` (so it is a trial param), plus the fixed ones."""
        values: dict[str, Any] = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, FloatDistribution):
                values[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, IntDistribution):
                values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, CategoricalDistribution):
                value = trial.suggest_categorical(key, dist.choices)
                values[key] = self.container_choices.get(key, {}).get(value, value) if isinstance(value, str) else value
            else:
                raise TypeError(f"sweep params.{key}: unsupported distribution {type(dist).__name__}")
        values.update(self.fixed)
        return values

    def notice(self) -> str:
        """The notices as the one line the sweep logs at start; empty when there is nothing to say."""
        return "sweep params: " + "; ".join(self.notices) if self.notices else ""

    def describe(self) -> dict[str, str]:
        """Each key as it will be sampled (or fixed): printed at the start of a sweep, part of its identity."""
        return ({key: describe_distribution(dist) for key, dist in self.distributions.items()}
                | {key: f"{encode_value(value)} (fixed)" for key, value in self.fixed.items()})

    def to_overrides(self, values: Mapping[str, Any]) -> list[str]:
        """``key=value`` overrides that Hydra's parser reads back as the same values and types."""
        return [f"{key}={encode_value(value)}" for key, value in values.items()]


def describe_distribution(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(encode_value(c) for c in dist.choices)
    if isinstance(dist, FloatDistribution | IntDistribution):
        kind = "int" if isinstance(dist, IntDistribution) else "float"
        step = f", step {dist.step:g}" if dist.step is not None and dist.step != 1 else ""
        return f"{kind} in [{dist.low:g}, {dist.high:g}]{step}{', log scale' if dist.log else ''}"
    return repr(dist)


def encode_value(value: Any) -> str:
    """``value`` in Hydra's override grammar: floats stay floats, odd strings are quoted, lists stay lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # 3, 0.1, 1e-05, inf, nan: all read back as the same int or float
    if isinstance(value, str):
        if _UNQUOTED.fullmatch(value) and value.lower() not in _KEYWORDS:
            return value
        return QuotedString(text=value, quote=Quote.single).with_quotes()
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        bad = [k for k in value if not (isinstance(k, str) and _DICT_KEY.fullmatch(k))]
        if bad:
            raise ConfigError(f"cannot write dict key {bad[0]!r} as a Hydra override; use letters, digits, _-./")
        return "{" + ",".join(f"{k}:{encode_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as a Hydra override")


def parse_search_space(params: Mapping[str, Any]) -> SearchSpace:
    """Read the sweep config's ``params`` (key -> grammar text or plain value) into a :class:`SearchSpace`."""
    if OmegaConf.is_config(params):
        params = OmegaConf.to_container(params, resolve=False)  # type: ignore[assignment]
    parser = OverridesParser.create()
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    containers: dict[str, dict[str, Any]] = {}
    notices: list[str] = []
    for raw_key, raw_value in params.items():
        entry = _Entry(str(raw_key), raw_value if isinstance(raw_value, str) else encode_value(raw_value), notices)
        value, is_sweep = _parse(parser, entry)
        if not is_sweep:
            fixed[entry.key] = _fixed(value, entry)
        elif isinstance(value, ChoiceSweep):
            distributions[entry.key] = _choice(value, containers.setdefault(entry.key, {}), entry)
        elif isinstance(value, RangeSweep):
            distributions[entry.key] = _shuffled_range(value, entry) if value.shuffle else _range(value, entry)
        elif isinstance(value, IntervalSweep):
            distributions[entry.key] = _interval(value, entry)
        else:
            raise entry.fail(f"{type(value).__name__.lower()}() is not supported (nor by the published plugin); "
                             f"allowed: {ALLOWED}")
    if fixed:
        notices.append(f"plain values ({', '.join(fixed)}) are fixed for every trial with their Hydra type (the "
                       "published plugin records them as text)")
    return SearchSpace(distributions, fixed, {k: v for k, v in containers.items() if v}, tuple(notices))


@dataclass(frozen=True)
class _Entry:
    """One ``params`` entry being read: its errors and notices name it as the user wrote it."""

    key: str
    text: str
    notices: list[str]

    def fail(self, reason: str) -> ConfigError:
        return ConfigError(" ".join(f"sweep params.{self.key}={self.text}: {reason}".split()))

    def note(self, sentence: str) -> None:
        self.notices.append(" ".join(f"{self.key}={self.text} {sentence}".split()))


def _parse(parser: OverridesParser, entry: _Entry) -> tuple[Any, bool]:
    """Hydra's parsed value of ``key=text``, and whether it is a sweep."""
    try:
        override = parser.parse_override(f"{entry.key}={entry.text}")
        value = override.value()
    except HydraException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise entry.fail(f"{first}; allowed: {ALLOWED} or a plain value") from e
    if override.is_delete() or override.get_key_element() != entry.key:
        raise entry.fail("the key must be a config path such as prune.target_sparsity")
    return value, override.is_sweep_override()


def _fixed(value: Any, entry: _Entry) -> Any:
    # shuffle([...]) is no sweep: Hydra fixes the list in a new random order at every parse, so a
    # resumed sweep would run other trials than the ones it started with.
    if re.match(r"\s*shuffle\s*\(", entry.text):
        raise entry.fail("shuffle([...]) fixes a list in a random order that changes every run; write the list "
                         "itself, or shuffle(choice(...)) to search its elements")
    return value


def _check_sweep(value: ChoiceSweep | RangeSweep | IntervalSweep, entry: _Entry, log_ok: bool = False) -> bool:
    """Whether log is set; tags the plugin ignores are ignored here too, with a notice."""
    unknown = sorted(set(value.tags) - {"log"})
    if unknown:
        entry.note(f"ignores tag {', '.join(unknown)} (only log has a meaning, as in tag(log, interval(low, high)); "
                   "the published plugin ignores the others too)")
    if "log" in value.tags and not log_ok:
        entry.note("ignores tag log, which applies to interval() only (the published plugin ignores it too)")
        return False
    return "log" in value.tags


def _plain(value: Any) -> Any:
    """Hydra's parsed element with quoted strings (kept inside lists and dicts) made plain ``str``."""
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _note_shuffle(entry: _Entry) -> None:
    entry.note("is searched as a choice of its values in order: the published plugin shuffles them, an order "
               "that means nothing to the sampler but would change the study every run")


def _choice(value: ChoiceSweep, containers: dict[str, Any], entry: _Entry) -> CategoricalDistribution:
    _check_sweep(value, entry)
    if value.shuffle:
        _note_shuffle(entry)
    choices: list[Any] = []
    for item in map(_plain, value.list):
        text = encode_value(item)
        if isinstance(item, list | dict):
            containers[text] = item
            item = text
        if any(item == seen for seen in choices):  # also 1 == 1.0 == true: Optuna could not tell them apart
            raise entry.fail(f"choice values must be distinct (1, 1.0 and true count as equal); {text} repeats")
        choices.append(item)
    return CategoricalDistribution(choices)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_range(value: RangeSweep, entry: _Entry) -> None:
    start, stop, step = value.start, value.stop, value.step
    if not all(_is_number(x) and math.isfinite(x) for x in (start, stop, step)):
        raise entry.fail("range needs finite numbers: range(start, stop[, step])")
    if step == 0:
        raise entry.fail("range needs a non-zero step")
    if (stop - start) * step < 0:
        raise entry.fail(f"range is empty: from {start} a step of {step} never reaches {stop}")


def _shuffled_range(value: RangeSweep, entry: _Entry) -> CategoricalDistribution:
    """shuffle(range(...)): a choice of exactly Hydra's values (stop excluded, as Hydra counts), as in the plugin."""
    _check_sweep(value, entry)
    _check_range(value, entry)
    values = list(itertools.islice(value.range(), MAX_SHUFFLED_RANGE + 1))
    if not values:
        raise entry.fail("shuffle(range(...)) is empty: Hydra's range excludes stop")
    if len(values) > MAX_SHUFFLED_RANGE:
        raise entry.fail(f"shuffle(range(...)) has more than {MAX_SHUFFLED_RANGE} values; use range() or interval()")
    _note_shuffle(entry)
    return CategoricalDistribution(values)


def _range(value: RangeSweep, entry: _Entry) -> IntDistribution | FloatDistribution:
    """range(start, stop, step) from start to stop included, as the plugin reads it; counting down gives the
    same values counted up (the plugin rejects it)."""
    _check_sweep(value, entry)
    _check_range(value, entry)
    start, stop, step = value.start, value.stop, value.step
    kind: type[IntDistribution] | type[FloatDistribution] = IntDistribution
    if not all(isinstance(x, int) for x in (start, stop, step)):
        kind, start, stop, step = FloatDistribution, float(start), float(stop), float(step)
    if step > 0:
        return _stepped(kind, start, stop, step, entry)
    # Counting down: the lowest value is the last one of start - k*|step| at or above stop.
    count = (Decimal(str(start)) - Decimal(str(stop))) // Decimal(str(-step))
    low = type(start)(Decimal(str(start)) - count * Decimal(str(-step)))
    dist = kind(low, start, step=-step)
    entry.note(f"counts down, which the published plugin rejects: searched as the same values counted up, "
               f"{describe_distribution(dist)}")
    return dist


def _stepped(kind: type[IntDistribution] | type[FloatDistribution], low: float, high: float, step: float,
             entry: _Entry) -> IntDistribution | FloatDistribution:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns when it moves high onto the step grid: a notice says it
        dist = kind(low, high, step=step)
    if dist.high != high:
        entry.note(f"ends at {dist.high:g}: {high:g} is not on its step grid")
    return dist


def _interval(value: IntervalSweep, entry: _Entry) -> IntDistribution | FloatDistribution:
    log = _check_sweep(value, entry, log_ok=True)
    low, high = value.start, value.end
    if not (_is_number(low) and _is_number(high) and math.isfinite(low) and math.isfinite(high)):
        raise entry.fail("interval needs finite numbers: interval(low, high)")
    if low >= high:
        raise entry.fail("interval needs low < high")
    if log and low <= 0:
        raise entry.fail("tag(log, ...) needs low > 0")
    if isinstance(low, int) and isinstance(high, int):  # int(interval(...)), as the published plugin does
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)

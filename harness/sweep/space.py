"""The sweep's search space: Hydra's override grammar mapped onto Optuna distributions.

Each entry of the sweep config's ``params`` is read by Hydra's own override parser (as
``key=value``), so the grammar is exactly Hydra's and the one of the published
hydra-optuna-sweeper plugin:

=====================================  ==========================================================
``choice(a, b, ...)`` or ``a,b,...``   ``CategoricalDistribution`` (ints, floats, strings, bools
                                       keep their type; a list or dict choice is held as its
                                       override text and handed back as the list or dict)
``range(start, stop[, step])``         ``IntDistribution`` over exactly Hydra's values (``stop``
                                       is excluded, as in Python's ``range``); a float
                                       start/stop/step gives ``FloatDistribution(step=...)``
``interval(low, high)``                ``FloatDistribution(low, high)``; ``int(interval(...))``
                                       gives ``IntDistribution``
``tag(log, interval(low, high))``      the same with ``log=True`` (needs ``low > 0``)
a plain value (``3``, ``cubic``)       fixed: passed unchanged to every trial
=====================================  ==========================================================

Anything else (``glob()``, ``shuffle()``, other tags, ``tag(log, ...)`` on a choice or range,
an empty range, ``interval`` with ``low >= high``) is a :class:`~harness.errors.ConfigError`
(a ``ValueError``) of one line naming the key, the value and what is allowed.

Example::

    space = parse_search_space({
        "prune.target_sparsity": "interval(0.5, 0.98)",
        "prune.schedule": "choice(linear, cubic)",
        "train.finetune_lr": "tag(log, interval(1e-4, 1e-1))",
        "prune.end_epoch": "range(2, 6)",          # 2, 3, 4 or 5
        "seed": 3,
    })
    values = space.suggest(study.ask())            # {"prune.target_sparsity": 0.73, ..., "seed": 3}
    space.to_overrides(values)                     # ["prune.target_sparsity=0.73", ..., "seed=3"]
"""

from __future__ import annotations

import itertools
import math
import re
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

ALLOWED = "choice(a, b, ...), range(start, stop[, step]), interval(low, high), tag(log, interval(low, high))"
MAX_FLOAT_RANGE = 100_000  # values a float range() may have; past that, use interval()

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
    for raw_key, raw_value in params.items():
        key = str(raw_key)
        text = raw_value if isinstance(raw_value, str) else encode_value(raw_value)

        def fail(reason: str, key: str = key, text: str = text) -> ConfigError:
            return ConfigError(" ".join(f"sweep params.{key}={text}: {reason}".split()))

        try:
            override = parser.parse_override(f"{key}={text}")
            value = override.value()
        except HydraException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise fail(f"{first}; allowed: {ALLOWED} or a plain value") from e
        if override.is_delete() or override.get_key_element() != key:
            raise fail("the key must be a config path such as prune.target_sparsity")
        if not override.is_sweep_override():
            fixed[key] = value
        elif isinstance(value, ChoiceSweep):
            distributions[key] = _choice(value, containers.setdefault(key, {}), fail)
        elif isinstance(value, RangeSweep):
            distributions[key] = _range(value, fail)
        elif isinstance(value, IntervalSweep):
            distributions[key] = _interval(value, fail)
        else:
            raise fail(f"{type(value).__name__.lower()}() is not supported; allowed: {ALLOWED}")
    return SearchSpace(distributions, fixed, {k: v for k, v in containers.items() if v})


def _check_sweep(value: ChoiceSweep | RangeSweep | IntervalSweep, fail: Any, log_ok: bool = False) -> bool:
    """Reject shuffle() and tags other than log (log only on interval); return whether log is set."""
    if getattr(value, "shuffle", False):
        raise fail("shuffle() has no meaning for a sampler; use choice(...) or range(...)")
    unknown = sorted(set(value.tags) - {"log"})
    if unknown:
        raise fail(f"unknown tag {', '.join(unknown)}; the only tag is log, as in tag(log, interval(low, high))")
    if "log" in value.tags and not log_ok:
        raise fail("tag(log, ...) applies to interval() only, as in tag(log, interval(low, high))")
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


def _choice(value: ChoiceSweep, containers: dict[str, Any], fail: Any) -> CategoricalDistribution:
    _check_sweep(value, fail)
    choices: list[Any] = []
    for item in map(_plain, value.list):
        text = encode_value(item)
        if isinstance(item, list | dict):
            containers[text] = item
            item = text
        if any(item == seen for seen in choices):  # also 1 == 1.0 == true: Optuna could not tell them apart
            raise fail(f"choice values must be distinct (1, 1.0 and true count as equal); {text} repeats")
        choices.append(item)
    return CategoricalDistribution(choices)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _range(value: RangeSweep, fail: Any) -> IntDistribution | FloatDistribution:
    """The same values as Hydra's range (stop excluded); a descending range gives the same set."""
    _check_sweep(value, fail)
    start, stop, step = value.start, value.stop, value.step
    if not all(_is_number(x) and math.isfinite(x) for x in (start, stop, step)):
        raise fail("range needs finite numbers: range(start, stop[, step])")
    if step == 0:
        raise fail("range needs a non-zero step")
    if all(isinstance(x, int) for x in (start, stop, step)):
        r = range(start, stop, step)
        if not r:
            raise fail("range is empty (stop is excluded, as in Python's range)")
        return IntDistribution(min(r[0], r[-1]), max(r[0], r[-1]), step=abs(step))
    # Count the values the way Hydra's FloatRange iterates (bounded), then place the last one on
    # the decimal grid start + k*step so that Optuna keeps it as the upper (or lower) end.
    n = sum(1 for _ in itertools.islice(value.range(), MAX_FLOAT_RANGE + 1))
    if n == 0:
        raise fail("range is empty (stop is excluded, as in Python's range)")
    if n > MAX_FLOAT_RANGE:
        raise fail(f"range has more than {MAX_FLOAT_RANGE} values; use interval(low, high)")
    last = float(Decimal(str(float(start))) + (n - 1) * Decimal(str(float(step))))
    return FloatDistribution(min(start, last), max(start, last), step=abs(float(step)))


def _interval(value: IntervalSweep, fail: Any) -> IntDistribution | FloatDistribution:
    log = _check_sweep(value, fail, log_ok=True)
    low, high = value.start, value.end
    if not (_is_number(low) and _is_number(high) and math.isfinite(low) and math.isfinite(high)):
        raise fail("interval needs finite numbers: interval(low, high)")
    if low >= high:
        raise fail("interval needs low < high")
    if log and low <= 0:
        raise fail("tag(log, ...) needs low > 0")
    if isinstance(low, int) and isinstance(high, int):  # int(interval(...)), as the published plugin does
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)

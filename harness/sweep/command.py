"""The command that reproduces one trial as one plain run: ``python -m harness key=value ...``.

A trial's config comes from three places: what the user typed, what the sweep file sets
(``+sweep=max_sparsity`` may set ``train.finetune_epochs`` or override a group), and the
trial's sampled values. The command keeps the user's overrides (less the sweep group),
writes out what the sweep file changed as plain overrides, then the trial's values; every
key appears once, so the command neither launches a sweep nor depends on the sweep file.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from harness.sweep.space import encode_value
from harness.tracking import flatten

Compose = Callable[[list[str]], DictConfig]  # overrides -> the job config of one plain run


def run_overrides(fixed_args: list[str], sweep_config: DictConfig, compose: Compose) -> list[str]:
    """Overrides that give a plain run the config this sweep's trials start from."""
    typed = merge([o.input_line for o in OverridesParser.create().parse_overrides(fixed_args)
                   if o.key_or_group != "sweep"])
    groups = _changed_groups(sweep_config, compose(typed))
    with_groups = merge([*typed, *groups])
    plain = compose(with_groups)
    want, have = _leaves(sweep_config), _leaves(plain)
    changed = [f"{'' if key in have else '+'}{key}={encode_value(value)}"
               for key, value in want.items() if key not in have or have[key] != value]
    return merge([*with_groups, *changed])


def trial_command(base: list[str], trial_overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "harness", *merge([*base, *trial_overrides])])


def merge(overrides: list[str]) -> list[str]:
    """Each key once, in the place it first appeared, with the last value given for it."""
    latest: dict[str, str] = {}
    for override in overrides:
        latest[_key(override)] = override
    return list(latest.values())


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _changed_groups(sweep_config: DictConfig, plain: DictConfig) -> list[str]:
    """``group=option`` for the groups the sweep file overrides (``defaults: - override /model: mlp``)."""
    want = sweep_config.hydra.runtime.choices
    have = plain.hydra.runtime.choices
    return [f"{group}={option}" for group, option in want.items()
            if not group.startswith("hydra/") and group != "sweep" and option is not None
            and have.get(group) != option]


def job_config(config: DictConfig) -> dict[str, Any]:
    """The composed job config (less Hydra's own node) as plain data."""
    job = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    return OmegaConf.to_container(job, resolve=True)  # type: ignore[return-value]


def _leaves(config: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in flatten(job_config(config)).items() if not k.startswith("sweep_trial.")}

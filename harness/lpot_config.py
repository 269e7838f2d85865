"""``python -m harness lpot=path/to/conf.yaml``: an LPOT YAML merged under the command line.

The file is read once by :func:`harness.lpot.document.read_lpot` and mapped by
:func:`harness.lpot.migration.migrate`; this module only merges the values into the composed
config, so that everything given on the command line wins: a key (``train.finetune_epochs=4``)
and a whole group choice (``dataset=fake`` replaces the file's dataset, not only its name).
It prints what was used, what was not (with the reason), and each LPOT behaviour the harness
changes on purpose, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.lpot.document import read_lpot
from harness.lpot.migration import migrate


def apply_lpot_file(cfg: DictConfig, command_line: list[str]) -> DictConfig:
    """Merge an LPOT YAML (``lpot=path``) into the composed config; the command line still wins."""
    if not Path(cfg.lpot).is_file():
        raise ConfigError(f"lpot={cfg.lpot}: no such file")
    try:
        migration = migrate(read_lpot(cfg.lpot))
    except (ValueError, OSError) as err:
        raise ConfigError(f"lpot={cfg.lpot}: {str(err).splitlines()[0]}") from None
    # Fields LPOT never had (typos) and foreign tags are mistakes, not migration notes.
    mistakes = [line for line in migration.unmapped if "unknown LPOT field" in line or "YAML tag" in line]
    if mistakes:
        raise ConfigError(f"lpot={cfg.lpot}: {mistakes[0].removesuffix('; not used')}")
    overrides = [o for o in OverridesParser.create().parse_overrides(command_line) if o.key_or_group != "lpot"]
    values = _without_chosen_groups(migration.values, cfg, overrides)
    given = {group: f"the command line's {group}" for group in set(migration.values) - set(values)}
    given |= {o.key_or_group: f"{o.key_or_group}={o.value()}" for o in overrides if not o.is_delete()}
    merged = OmegaConf.merge(cfg, values)
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or isinstance(OmegaConf.select(merged, key), DictConfig):
            continue  # group choices were applied while composing
        OmegaConf.update(merged, key, override.value(), merge=False)
    used = [line for line in migration.used if _winner(_target(line), given) is None]
    unmapped = [*migration.unmapped, *(f"{line.partition(' -> ')[0]}: {_winner(_target(line), given)} wins"
                                       for line in migration.used if line not in used)]
    print(f"LPOT config {cfg.lpot}: {len(used)} fields mapped, {len(unmapped)} not used")
    for line in used:
        print(f"  used:     {line}")
    for line in unmapped:
        print(f"  not used: {line}")
    for line in migration.notices:
        if _winner(migration.notice_keys.get(line, ""), given) is None:
            print(f"  changed:  {line}")
    return merged  # type: ignore[return-value]


def _target(used_line: str) -> str:
    """The harness key of a ``used`` line: ``"a.b -> train.finetune_lr=0.1 (why)"`` -> ``train.finetune_lr``."""
    return used_line.partition(" -> ")[2].partition("=")[0].partition(" ")[0]


def _winner(key: str, given: dict[str, str]) -> str | None:
    """What on the command line overrides the harness ``key`` (the key itself or its group), if anything."""
    for name, what in given.items():
        if key and (key == name or key.startswith(name + ".")):
            return what
    return None


def _without_chosen_groups(values: dict[str, Any], cfg: DictConfig, overrides: list[Any]) -> dict[str, Any]:
    """The file's values minus each group the command line chose: ``dataset=fake`` (or a
    ``dataset.name`` other than the file's) replaces the file's whole dataset, root and image size
    included, since they describe another dataset."""
    values = dict(values)
    for override in overrides:
        key = override.key_or_group
        group, _, leaf = key.partition(".")
        if group not in values:
            continue
        chosen_whole = not leaf and isinstance(OmegaConf.select(cfg, key), DictConfig)
        other_dataset = key == "dataset.name" and override.value() != values[group].get("name")
        if chosen_whole or other_dataset:
            print(f"LPOT config {cfg.lpot}: {key}={override.value()} on the command line replaces the file's "
                  f"{group} values")
            del values[group]
    return values

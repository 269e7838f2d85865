"""Which experiment a study belongs to, and which study a sweep command resumes.

A study's identity is everything that changes what one of its trials means: the config every
trial starts from (group choices such as ``model=digits_cnn`` and every key, after the
command line and the sweep file are applied, less the keys the search samples), the search
space, the objectives and their directions, the goal constraint and how the search samples.
It is stored on the study; the same command finds its study again by it (to resume after
Ctrl-C or SIGKILL, or to join other workers), and a different command gets a study of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from harness.errors import ConfigError
from harness.tracking import flatten

# Keys that never change what a trial measures: where things are written and how they are shown.
_NOT_IDENTITY_PREFIXES = ("tracking.", "sweep_trial.", "hydra.")
# optimized_metric: it counts through the objectives it names (and existing studies keep their identity).
_NOT_IDENTITY_KEYS = {"outputs_dir", "resume", "dataset.num_workers", "train.eval_batch_size", "optimized_metric"}

IDENTITY_ATTR = "harness.identity"
DIGEST_ATTR = "harness.identity_digest"


@dataclass(frozen=True)
class StudyIdentity:
    choices: dict[str, str]  # config group -> option, e.g. {"model": "digits_cnn"}
    config: dict[str, Any]  # flattened dotted keys of the config every trial starts from, less the searched keys
    space: dict[str, str]  # searched key -> its distribution
    objectives: list[str]
    directions: list[str]
    goal_constraint: bool
    sampler: dict[str, Any]

    @classmethod
    def build(cls, choices: Mapping[str, Any], config: Mapping[str, Any], space: Mapping[str, Any],
              objectives: list[str], directions: list[str], goal_constraint: bool,
              sampler: Mapping[str, Any]) -> StudyIdentity:
        chosen = {str(k): str(v) for k, v in choices.items()
                  if v is not None and not str(k).startswith("hydra/") and k != "sweep"}
        flat = {k: _jsonable(v) for k, v in flatten(config).items()
                if k not in space and not _ignored(k)}
        return cls(dict(sorted(chosen.items())), dict(sorted(flat.items())),
                   {k: repr(v) for k, v in sorted(space.items())}, list(objectives), list(directions),
                   bool(goal_constraint), {k: _jsonable(v) for k, v in sorted(sampler.items())})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, stored: Mapping[str, Any], limit: int = 3) -> list[tuple[str, str]]:
        """(what the stored study had, what this command has) for the first few differences."""
        mine = self.as_dict()
        pairs: list[tuple[str, str]] = []
        changed_groups: set[str] = set()
        for section in ("choices", "config", "space"):
            old, new = stored.get(section, {}), mine[section]
            for key in sorted(set(old) | set(new)):
                if old.get(key) == new.get(key) or key.split(".")[0] in changed_groups:
                    continue  # (a key of a group whose option changed: the option says it)
                pairs.append((_describe(section, key, old), _describe(section, key, new)))
                if section == "choices":
                    changed_groups.add(key)
        for section in ("objectives", "directions", "goal_constraint", "sampler"):
            if stored.get(section) != mine[section]:
                pairs.append((f"hydra.sweeper.{section}={_text(stored.get(section))}",
                              f"hydra.sweeper.{section}={_text(mine[section])}"))
        return pairs[:limit]


def resolve_study_name(storage: optuna.storages.BaseStorage, base_name: str, explicit: bool,
                       identity: StudyIdentity) -> tuple[str, bool]:
    """The study this command runs in, and whether it exists already.

    A name given explicitly is used as it is, and must not hold another experiment. Otherwise
    the study of this identity is found again among ``base_name`` and ``base_name-<digest>``;
    a new one takes ``base_name`` when that is free.
    """
    digest = identity.digest()
    studies = {s.study_name: s.user_attrs for s in storage.get_all_studies()}
    if explicit:
        stored = studies.get(base_name)
        if stored is None:
            return base_name, False
        if stored.get(DIGEST_ATTR) not in (None, digest):
            raise ConfigError(mismatch_message(base_name, stored.get(IDENTITY_ATTR, {}), identity))
        return base_name, True
    for name in (base_name, f"{base_name}-{digest[:8]}"):
        if name in studies and studies[name].get(DIGEST_ATTR) == digest:
            return name, True
    return (base_name if base_name not in studies else f"{base_name}-{digest[:8]}"), False


def mismatch_message(name: str, stored: Mapping[str, Any], identity: StudyIdentity) -> str:
    pairs = identity.differences(stored)
    if not pairs:
        return (f"hydra.sweeper.study_name={name}: that study was started by another experiment; "
                "leave study_name out to start a study of this command's own")
    was = ", ".join(old for old, _ in pairs)
    has = ", ".join(new for _, new in pairs)
    return (f"study {name} was started with {was}; this command has {has}. Leave hydra.sweeper.study_name out "
            "to start (or resume) this command's own study, or name another")


def store_identity(study: optuna.Study, identity: StudyIdentity) -> None:
    study.set_user_attr(IDENTITY_ATTR, identity.as_dict())
    study.set_user_attr(DIGEST_ATTR, identity.digest())


def _describe(section: str, key: str, values: Mapping[str, Any]) -> str:
    if key not in values:
        return f"no {key}" if section != "space" else f"{key} not searched"
    if section == "space":
        return f"{key} searched as {values[key]}"
    return f"{key}={_text(values[key])}"


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _ignored(key: str) -> bool:
    return key in _NOT_IDENTITY_KEYS or key.startswith(_NOT_IDENTITY_PREFIXES)



def _jsonable(value: Any) -> Any:
    """Plain JSON types, so that the identity reads back from the storage exactly as written."""
    return json.loads(json.dumps(value, default=str))

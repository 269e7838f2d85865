"""What to prune and when: global pruning fields, per-pruner overrides, and their resolution.

The fields follow the LPOT / Intel Neural Compressor pruning config: global values
(``initial_sparsity``, ``target_sparsity``, ``start_epoch``, ``end_epoch``,
``update_frequency``, ``prune_type``) that every pruner inherits unless it sets its own.
A pruner field that is ``None`` is absent and inherits; an explicit ``0.0`` is a value
(LPOT 1.6 read ``0.0`` as absent).

Example::

    spec = PruningSpec(target_sparsity=0.3, pruners=[
        PrunerSpec(names=["layer1.0.conv1.weight"], target_sparsity=0.97, end_epoch=2,
                   update_frequency=0.1),
    ])
    [p.target_sparsity for p in spec.resolve()]  # [0.97]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from typing import Any


class Schedule(StrEnum):
    """How sparsity grows from ``initial_sparsity`` to ``target_sparsity`` (see schedules.py)."""

    linear = "linear"
    cubic = "cubic"


class Criterion(StrEnum):
    """How weights are scored; the lowest scores are pruned first."""

    magnitude = "magnitude"


# LPOT's name for unstructured magnitude pruning, accepted so its configs keep working.
_CRITERION_ALIASES = {"basic_magnitude": "magnitude"}


def _as_enum(enum_type: type[Enum], value: Any, key: str) -> Enum:
    if isinstance(value, enum_type):
        return value
    value = _CRITERION_ALIASES.get(value, value) if enum_type is Criterion else value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_type)
        raise ValueError(f"{key}={value!r}: must be one of {allowed}") from None


@dataclass
class PrunerSpec:
    """One pruner: the tensors it owns and the fields it overrides (``None`` inherits)."""

    names: list[str] | None = None
    initial_sparsity: float | None = None
    target_sparsity: float | None = None
    start_epoch: int | None = None
    end_epoch: int | None = None
    update_frequency: float | None = None
    schedule: Schedule | None = None
    prune_type: Criterion | None = None


@dataclass
class PruningSpec:
    """Global pruning fields plus the pruners that inherit them.

    With no pruners, one pruner with the global values covers ``names`` (or, when
    ``names`` is empty, every conv and linear weight of the model).
    """

    initial_sparsity: float = 0.0
    target_sparsity: float = 0.8
    start_epoch: int = 0
    end_epoch: int = 5
    update_frequency: float = 0.5
    schedule: Schedule = Schedule.cubic
    prune_type: Criterion = Criterion.magnitude
    names: list[str] | None = None
    pruners: list[PrunerSpec] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PruningSpec:
        """Build from a plain dict (e.g. parsed YAML); unknown keys are an error."""
        data = dict(data)
        _reject_unknown(data, cls, "")
        pruners = []
        for i, p in enumerate(data.pop("pruners", None) or []):
            if isinstance(p, PrunerSpec):
                pruners.append(p)
                continue
            _reject_unknown(p, PrunerSpec, f"pruners[{i}].")
            pruners.append(PrunerSpec(**p))
        return cls(**data, pruners=pruners)

    def resolve(self) -> list[ResolvedPruner]:
        """Apply inheritance and validate; errors name the field, its value and what is allowed."""
        pruner_specs = self.pruners or [PrunerSpec(names=self.names)]
        resolved = []
        for i, p in enumerate(pruner_specs):
            prefix = f"pruners[{i}]." if self.pruners else ""

            def pick(name: str, p: PrunerSpec = p) -> Any:
                own = getattr(p, name)
                return getattr(self, name) if own is None else own

            r = ResolvedPruner(
                names=list(p.names) if p.names is not None else None,
                initial_sparsity=float(pick("initial_sparsity")),
                target_sparsity=float(pick("target_sparsity")),
                start_epoch=int(pick("start_epoch")),
                end_epoch=int(pick("end_epoch")),
                update_frequency=float(pick("update_frequency")),
                schedule=_as_enum(Schedule, pick("schedule"), prefix + "schedule"),
                prune_type=_as_enum(Criterion, pick("prune_type"), prefix + "prune_type"),
            )
            r.validate(prefix)
            resolved.append(r)
        return resolved


@dataclass(frozen=True)
class ResolvedPruner:
    """A pruner with every field filled in (inheritance applied)."""

    names: list[str] | None
    initial_sparsity: float
    target_sparsity: float
    start_epoch: int
    end_epoch: int
    update_frequency: float
    schedule: Schedule
    prune_type: Criterion

    def validate(self, prefix: str = "") -> None:
        for key in ("initial_sparsity", "target_sparsity"):
            value = getattr(self, key)
            if not (0.0 <= value < 1.0) or math.isnan(value):
                raise ValueError(f"{prefix}{key}={value}: must be in [0, 1)")
        if self.target_sparsity < self.initial_sparsity:
            raise ValueError(
                f"{prefix}target_sparsity={self.target_sparsity}: must be >= "
                f"initial_sparsity={self.initial_sparsity}"
            )
        if self.start_epoch < 0:
            raise ValueError(f"{prefix}start_epoch={self.start_epoch}: must be >= 0")
        if self.end_epoch < self.start_epoch:
            raise ValueError(
                f"{prefix}end_epoch={self.end_epoch}: must be >= start_epoch={self.start_epoch}"
            )
        if not self.update_frequency > 0:
            raise ValueError(
                f"{prefix}update_frequency={self.update_frequency}: must be > 0 "
                "(in epochs; 0.1 means ten updates per epoch)"
            )
        if self.names is not None and len(self.names) == 0:
            raise ValueError(f"{prefix}names=[]: list at least one tensor, or leave names unset")


def _reject_unknown(data: Mapping[str, Any], cls: type, prefix: str) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"{prefix}{unknown[0]}: unknown pruning field; allowed: {', '.join(sorted(allowed))}"
        )

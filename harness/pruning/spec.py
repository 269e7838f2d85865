"""What to prune and when: global pruning fields, per-pruner overrides, and their resolution.

The fields follow the LPOT / Intel Neural Compressor pruning config: global values
(``initial_sparsity``, ``target_sparsity``, ``start_epoch``, ``end_epoch``,
``update_frequency``, the criterion LPOT calls ``prune_type``) that every pruner inherits
unless it sets its own. A pruner field that is ``None`` is absent and inherits; an
explicit ``0.0`` is a value (LPOT 1.6 read ``0.0`` as absent).

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

    one_shot = "one_shot"
    linear = "linear"
    cubic = "cubic"
    exponential = "exponential"
    cosine = "cosine"


class Criterion(StrEnum):
    """How weights are scored; the lowest scores are pruned first (see criteria.py)."""

    magnitude = "magnitude"
    taylor = "taylor"
    snip_momentum = "snip_momentum"
    random = "random"
    gradient_sensitivity = "gradient_sensitivity"


class Pattern(StrEnum):
    """Which weights are pruned together (see patterns.py)."""

    unstructured = "unstructured"
    nm = "nm"
    block = "block"
    channel = "channel"
    lock = "lock"  # keep the zeros the weights have when attached (LPOT's pattern_lock)


class ChannelNorm(StrEnum):
    l1 = "l1"
    l2 = "l2"


# "global" is a keyword, so this enum is built by name.
Scope = StrEnum("Scope", {"per_tensor": "per_tensor", "global": "global"})
Scope.__doc__ = "Rank weights within each tensor (per_tensor) or across all tensors of a pruner (global)."
PER_TENSOR, GLOBAL = Scope["per_tensor"], Scope["global"]

# LPOT's names, accepted so that its configs keep working.
_CRITERION_ALIASES = {"basic_magnitude": "magnitude"}
_FIELD_ALIASES = {"prune_type": "criterion"}


@dataclass
class PrunerSpec:
    """One pruner: the tensors it owns and the fields it overrides (``None`` inherits)."""

    names: list[str] | None = None
    exclude: list[str] | None = None
    initial_sparsity: float | None = None
    target_sparsity: float | None = None
    start_epoch: int | None = None
    end_epoch: int | None = None
    update_frequency: float | None = None
    update_frequency_steps: int | None = None
    schedule: Schedule | None = None
    criterion: Criterion | None = None
    pattern: Pattern | None = None
    n: int | None = None
    m: int | None = None
    block_shape: list[int] | None = None
    channel_norm: ChannelNorm | None = None
    scope: Scope | None = None  # type: ignore[valid-type]
    max_sparsity: float | None = None


@dataclass
class PruningSpec:
    """Global pruning fields plus the pruners that inherit them.

    With no pruners, one pruner with the global values covers ``names`` (or, when
    ``names`` is unset, every conv and linear weight of the model).

    Tensor names are exact parameter names, globs (``layer1.*.weight``) or regular
    expressions prefixed with ``re:`` (``re:layer[12]\\..*conv``); ``exclude`` takes the same forms.
    """

    initial_sparsity: float = 0.0
    target_sparsity: float = 0.8
    start_epoch: int = 0
    end_epoch: int = 5
    update_frequency: float = 0.5  # in epochs; 0.1 = ten updates per epoch
    update_frequency_steps: int | None = None  # when set: every this many optimizer steps instead
    schedule: Schedule = Schedule.cubic
    criterion: Criterion = Criterion.magnitude
    pattern: Pattern = Pattern.unstructured
    n: int = 2  # nm: keep n of every m consecutive weights along the input dimension
    m: int = 4
    block_shape: list[int] = field(default_factory=lambda: [1, 4])  # block: rows x columns of the 2-D view
    channel_norm: ChannelNorm = ChannelNorm.l1  # channel: how a whole output channel is scored
    scope: Scope = PER_TENSOR  # type: ignore[valid-type]
    max_sparsity: float | None = None  # a cap per tensor, useful with scope=global
    names: list[str] | None = None
    exclude: list[str] | None = None
    seed: int = 0  # for the random criterion
    # While training, large Linear weights at <= 15% density on the CPU get the gradients of their
    # kept weights only (sparse_grads.py): faster, equal to the masked dense gradient up to rounding.
    sparse_grads: bool = True
    pruners: list[PrunerSpec] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PruningSpec:
        """Build from a plain dict (e.g. parsed YAML); unknown keys are an error."""
        data = _unalias(data)
        _reject_unknown(data, cls, "")
        pruners = []
        for i, p in enumerate(data.pop("pruners", None) or []):
            if isinstance(p, PrunerSpec):
                pruners.append(p)
                continue
            p = _unalias(p)
            _reject_unknown(p, PrunerSpec, f"pruners[{i}].")
            pruners.append(PrunerSpec(**p))
        return cls(**data, pruners=pruners)

    def resolve(self) -> list[ResolvedPruner]:
        """Apply inheritance and validate; errors name the field, its value and what is allowed."""
        if not isinstance(self.sparse_grads, bool):
            raise ValueError(f"sparse_grads={self.sparse_grads}: must be true or false")
        pruner_specs = self.pruners or [PrunerSpec()]
        resolved = []
        for i, p in enumerate(pruner_specs):
            prefix = f"pruners[{i}]." if self.pruners else ""

            def pick(name: str, p: PrunerSpec = p) -> Any:
                own = getattr(p, name)
                return getattr(self, name) if own is None else own

            def enum(enum_type: type[Enum], name: str, prefix: str = prefix) -> Any:
                return _as_enum(enum_type, pick(name), prefix + name)

            r = ResolvedPruner(
                names=_optional_list(pick("names")),
                exclude=_optional_list(pick("exclude")),
                initial_sparsity=float(pick("initial_sparsity")),
                target_sparsity=float(pick("target_sparsity")),
                start_epoch=int(pick("start_epoch")),
                end_epoch=int(pick("end_epoch")),
                update_frequency=float(pick("update_frequency")),
                update_frequency_steps=pick("update_frequency_steps"),
                schedule=enum(Schedule, "schedule"),
                criterion=enum(Criterion, "criterion"),
                pattern=enum(Pattern, "pattern"),
                n=int(pick("n")),
                m=int(pick("m")),
                block_shape=[int(v) for v in pick("block_shape")],
                channel_norm=enum(ChannelNorm, "channel_norm"),
                scope=enum(Scope, "scope"),
                max_sparsity=pick("max_sparsity"),
                seed=self.seed + i,
            )
            r.validate(prefix)
            resolved.append(r)
        return resolved


@dataclass(frozen=True)
class ResolvedPruner:
    """A pruner with every field filled in (inheritance applied)."""

    names: list[str] | None
    exclude: list[str] | None
    initial_sparsity: float
    target_sparsity: float
    start_epoch: int
    end_epoch: int
    update_frequency: float
    update_frequency_steps: int | None
    schedule: Schedule
    criterion: Criterion
    pattern: Pattern
    n: int
    m: int
    block_shape: list[int]
    channel_norm: ChannelNorm
    scope: Any
    max_sparsity: float | None
    seed: int

    def validate(self, prefix: str = "") -> None:
        if self.pattern == Pattern.nm and not 1 <= self.n < self.m:  # first: the nm target follows n and m
            raise ValueError(f"{prefix}n={self.n}: N:M needs 1 <= n < m (m={self.m})")
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
        if self.update_frequency_steps is not None and self.update_frequency_steps < 1:
            raise ValueError(f"{prefix}update_frequency_steps={self.update_frequency_steps}: must be >= 1")
        if self.names is not None and len(self.names) == 0:
            raise ValueError(f"{prefix}names=[]: list at least one tensor, or leave names unset")
        if self.pattern == Pattern.nm:
            if self.target_sparsity > 1 - self.n / self.m + 1e-9:
                raise ValueError(
                    f"{prefix}target_sparsity={self.target_sparsity}: {self.n}:{self.m} keeps "
                    f"{self.n} of every {self.m} weights, so at most {1 - self.n / self.m:g}"
                )
            if self.scope == GLOBAL:
                raise ValueError(f"{prefix}scope=global: N:M ranks within groups of m weights; use per_tensor")
        if len(self.block_shape) != 2 or min(self.block_shape) < 1:
            raise ValueError(f"{prefix}block_shape={list(self.block_shape)}: must be [rows, columns], each >= 1")
        if self.max_sparsity is not None:
            if not 0.0 < self.max_sparsity <= 1.0:
                raise ValueError(f"{prefix}max_sparsity={self.max_sparsity}: must be in (0, 1]")
            if self.scope == PER_TENSOR and self.target_sparsity > self.max_sparsity:
                raise ValueError(
                    f"{prefix}target_sparsity={self.target_sparsity}: above max_sparsity={self.max_sparsity}"
                )


def _as_enum(enum_type: type[Enum], value: Any, key: str) -> Enum:
    if isinstance(value, enum_type):
        return value
    if enum_type is Criterion:
        value = _CRITERION_ALIASES.get(value, value)
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise ValueError(f"{key}={value!r}: must be one of {allowed}") from None


def _optional_list(value: Any) -> list[str] | None:
    return None if value is None else list(value)


def _unalias(data: Mapping[str, Any]) -> dict[str, Any]:
    """LPOT's field names -> ours (``prune_type`` -> ``criterion``)."""
    return {_FIELD_ALIASES.get(key, key): value for key, value in data.items()}


def _reject_unknown(data: Mapping[str, Any], cls: type, prefix: str) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"{prefix}{unknown[0]}: unknown pruning field; allowed: {', '.join(sorted(allowed))}"
        )

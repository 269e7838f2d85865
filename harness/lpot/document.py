"""The one reader of an LPOT / Intel Neural Compressor 1.x pruning YAML: parsed once, one field map.

:func:`read_lpot` turns the file (or its parsed mapping) into an :class:`LpotDocument`: the engine's
:class:`PruningSpec`, the type-checked ``pruning.train`` section, the accuracy criterion, every key
it did not use (with the reason) and one notice per LPOT behaviour the harness changes on purpose.
The command line (``harness.lpot.migration``) and the Python API (``harness.lpot.api``) both start
from it. No torch here: reading a config stays light.

Example::

    doc = read_lpot("conf.yaml")
    doc.spec.resolve()[0].target_sparsity   # 0.97 for the seed document's pruner
    doc.train.learning_rate                 # 0.1
    doc.unmapped                            # ['pruning.train.frequency: ...', ...]
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.pruning.spec import PER_TENSOR, Criterion, Pattern, PrunerSpec, PruningSpec, Schedule

WEIGHT_COMPRESSION = "pruning.approach.weight_compression"
TRAIN = "pruning.train"

# LPOT 1.6's values for a field that the whole file leaves out (lpot/conf/config.py:
# weight_compression_schema's defaults, and Pruner.__init__'s update_frequency=1 and
# prune_type='basic_magnitude'; LPOT has no global update frequency, so every pruner that does
# not set its own used 1 epoch). The seed document agrees: "initial sparsity goal default 0".
LPOT_DEFAULTS: dict[str, Any] = {
    "initial_sparsity": 0.0,
    "target_sparsity": 0.97,
    "start_epoch": 0,
    "end_epoch": 4,
    "update_frequency": 1.0,
    "criterion": Criterion.magnitude,
}

# LPOT's prune types (it compared them after removing underscores) -> (criterion, pattern).
_PRUNE_TYPES = {
    "basicmagnitude": (Criterion.magnitude, None),
    "gradientsensitivity": (Criterion.gradient_sensitivity, None),
    "patternlock": (Criterion.magnitude, Pattern.lock),
}

_TOP_LEVEL_REASONS = {
    "model": "not used by pruning: the model comes from Python (prune.model) or the command line "
             "(model=torchvision model.name=...)",
    "tuning": "not used by pruning: LPOT's tuning section drives quantization",
    "evaluation": "not used by pruning: evaluation is prune.eval_func / eval_dataloader, or the harness's "
                  "val and test splits",
    "quantization": "not used by pruning: another LPOT approach",
    "graph_optimization": "not used by pruning: another LPOT approach",
    "model_conversion": "not used by pruning: another LPOT approach",
    "distillation": "not used by pruning: another LPOT approach",
    "device": "not used by pruning: the model runs where its parameters are (the harness: train.device)",
    "version": "not used by pruning: LPOT's config schema version",
}

# Keys of LPOT's format before 1.4 (`pruning: magnitude: {prune1: {weights: ...}}`, init_sparsity).
_PRE_14_KEYS = ("magnitude", "init_sparsity")


# ---- YAML with LPOT's tags ------------------------------------------------------------------------


class _Tagged:
    """A YAML node that carried a custom tag such as ``!Pruner``, with its plain content."""

    __slots__ = ("tag", "value")

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


class _LpotLoader(yaml.SafeLoader):
    """SafeLoader plus LPOT's tags; a subclass, so that yaml.SafeLoader itself is left alone."""


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:  # a tagged scalar: read it as if it had no tag
        implicit = loader.resolve(yaml.ScalarNode, node.value, (True, False))
        value = loader.construct_object(yaml.ScalarNode(implicit, node.value, node.start_mark, node.end_mark))
    return _Tagged("!" + suffix, value)


_LpotLoader.add_multi_constructor("!", _construct_tagged)
# LPOT registered python/tuple too (its best_configure.yaml holds tuples).
_LpotLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                            lambda loader, node: list(loader.construct_sequence(node)))


def _load(source: str | os.PathLike[str] | Mapping[str, Any]) -> Any:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"LPOT config {path}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LpotLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(f"LPOT config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if isinstance(data, _Tagged):
        data = data.value
    if not isinstance(data, Mapping):
        raise ValueError(f"LPOT config {path}: must be a mapping with a `pruning:` section")
    return data


def _plain(obj: Any, path: str, tags: list[str]) -> Any:
    """Drop custom tags (noting those other than !Pruner in ``tags``) and copy into dicts and lists."""
    if isinstance(obj, _Tagged):
        if obj.tag != "!Pruner":
            tags.append(f"{path}: YAML tag {obj.tag} is not LPOT's !Pruner; its content is read as if untagged")
        return _plain(obj.value, path, tags)
    if isinstance(obj, Mapping):
        return {key: _plain(value, f"{path}.{key}" if path else str(key), tags) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(value, f"{path}[{i}]", tags) for i, value in enumerate(obj)]
    return obj


# ---- type checks: every message names the dotted key ---------------------------------------------

# YAML 1.1 (PyYAML) reads 1e-4 without a dot as a string; accept it as the number it means.
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")


def as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r}: must be an integer")
    return value


def as_float(value: Any, key: str) -> float:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}={value!r}: must be a number")
    return float(value)


def as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: must be true or false")
    return value


def as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r}: must be a string")
    return value


def as_mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}={value!r}: must be a mapping")
    return dict(value)


def _as_names(value: Any, key: str) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}={value!r}: must be a list of tensor names, e.g. ['layer1.0.conv1.weight']")
    return list(value) or None  # LPOT: an empty list prunes every weight


def _as_prune_type(value: Any, key: str) -> tuple[Criterion, Pattern | None]:
    name = as_str(value, key)
    found = _PRUNE_TYPES.get(name.replace("_", "").lower())
    if found is None:
        raise ValueError(f"{key}={value!r}: must be one of basic_magnitude, gradient_sensitivity, pattern_lock")
    return found


def _unknown(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key.rpartition(".")[2], list(allowed), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{key}: unknown LPOT field{hint}; not used"


# ---- what the reader returns ----------------------------------------------------------------------


@dataclass(frozen=True)
class GroupPruning:
    """LPOT 1.6's structured ``gradient_sensitivity`` (a pruner with ``parameters``): keep the
    ``target`` groups of ``stride`` rows (columns with ``transpose``) with the highest accumulated
    ``|grad * w|``. The group count depends on each tensor's shape, so the Python API turns it into
    one block pruner per tensor once the model is known."""

    pruner: int  # index in spec.pruners
    target: int
    stride: int
    transpose: bool


@dataclass(frozen=True)
class LpotTrain:
    """``pruning.train``, type-checked: what a training loop can take from it.

    LPOT 1.6's PyTorch trainer ran ``for epoch in range(start_epoch, end_epoch)`` (end exclusive),
    stopped an epoch after ``iteration`` batches, and built the optimizer with torch's defaults
    for every argument the YAML leaves out. ``source`` maps each setting to the dotted key it was
    read from.
    """

    start_epoch: int = 0
    end_epoch: int | None = None
    iteration: int | None = None
    optimizer: str | None = None  # sgd, adam or adamw
    learning_rate: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool | None = None
    loss: str | None = None  # "cross_entropy" when CrossEntropyLoss is named
    reduction: str | None = None  # as written
    dataloader: dict[str, Any] | None = None  # type-checked as a mapping; harness.lpot.migration maps it
    source: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LpotDocument:
    """An LPOT config as the harness reads it.

    Attributes:
        spec: the engine's spec, from ``pruning.approach.weight_compression``.
        train: ``pruning.train``, type-checked.
        given: the LPOT keys the file sets under weight_compression (``"target_sparsity"``) and in each
            pruner (``"pruners[0].names"``), so that a mapping can tell a value from a default.
        groups: the structured gradient_sensitivity pruners.
        tuning: the raw ``tuning`` section (its accuracy criterion becomes the goal), or None.
        unmapped: every key of the file that nothing here uses, as ``"dotted.key: reason"``.
        notices: one line per LPOT behaviour that the harness changes on purpose.
    """

    spec: PruningSpec
    train: LpotTrain
    given: frozenset[str] = frozenset()
    groups: tuple[GroupPruning, ...] = ()
    tuning: Any = None
    unmapped: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()


def read_lpot(source: str | os.PathLike[str] | Mapping[str, Any] | LpotDocument) -> LpotDocument:
    """Read an LPOT YAML file (a path) or its parsed mapping: the whole config or just ``pruning:``.

    The schedule is LPOT's linear staircase; a field absent from the whole file takes LPOT 1.6's
    default (:data:`LPOT_DEFAULTS`); an explicit ``0.0`` is a value.

    Raises:
        ValueError: a value of the wrong type or out of range, or a field the harness cannot honour,
            naming its dotted key; LPOT's format before 1.4, which is not read.
    """
    if isinstance(source, LpotDocument):
        return source
    raw = _load(source)
    unmapped: list[str] = []
    if "pruning" in raw:
        for key in raw:
            if key != "pruning":
                unmapped.append(f"{key}: {_TOP_LEVEL_REASONS.get(str(key), 'not used by pruning')}")
        section = raw["pruning"]
    elif "approach" in raw or "train" in raw:
        section = raw  # a bare pruning section
    else:
        raise ValueError("LPOT config: no `pruning:` section (with approach.weight_compression) found")
    pruning = as_mapping(_plain(section, "pruning", unmapped), "pruning")
    old = [key for key in _PRE_14_KEYS if key in pruning]
    if old and "approach" not in pruning:
        raise ValueError(f"pruning.{old[0]}: LPOT's format before 1.4 (pruning: magnitude: prune1: weights: ..., "
                         "init_sparsity) is not read; write it as pruning: approach: weight_compression: "
                         "pruners: [!Pruner {names: [...], target_sparsity: ...}] (docs/lpot-migration.md)")
    for key in pruning:
        if key not in ("train", "approach"):
            unmapped.append(_unknown(f"pruning.{key}", ["train", "approach"]))
    approach = as_mapping(pruning.get("approach"), "pruning.approach")
    for key in approach:
        if key == "activation_compression":
            unmapped.append("pruning.approach.activation_compression: not supported (LPOT marked it WIP)")
        elif key != "weight_compression":
            unmapped.append(_unknown(f"pruning.approach.{key}", ["weight_compression"]))
    if approach.get("weight_compression") is None:
        raise ValueError(f"{WEIGHT_COMPRESSION}: missing; it says what to prune (target_sparsity, pruners)")
    wc = as_mapping(approach["weight_compression"], WEIGHT_COMPRESSION)
    reading = _SpecReading(unmapped)
    spec = reading.weight_compression(wc)
    train = _read_train(as_mapping(pruning.get("train"), TRAIN), unmapped)
    notices = _notices(spec, reading, train)
    return LpotDocument(spec=spec, train=train, given=frozenset(reading.given), groups=tuple(reading.groups),
                        tuning=raw.get("tuning") if "pruning" in raw else None, unmapped=tuple(unmapped),
                        notices=tuple(notices))


# ---- the pruning section -> PruningSpec ------------------------------------------------------------

# The one field map: LPOT key -> (PruningSpec / PrunerSpec field, type check); used at both levels.
SPEC_FIELDS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "initial_sparsity": ("initial_sparsity", as_float),
    "target_sparsity": ("target_sparsity", as_float),
    "start_epoch": ("start_epoch", as_int),
    "end_epoch": ("end_epoch", as_int),
    "update_frequency": ("update_frequency", as_float),
    "prune_type": ("criterion", _as_prune_type),
    "names": ("names", _as_names),
}
_GLOBAL_KEYS = {*SPEC_FIELDS, "frequency", "method", "pruners"}
_PRUNER_KEYS = {*SPEC_FIELDS, "method", "parameters"}
_GROUP_PARAMETERS = ("target", "stride", "normalize", "transpose", "importance_inputs", "importance_metric")


class _SpecReading:
    """``weight_compression`` -> PruningSpec; collects the keys given and the group pruners."""

    def __init__(self, unmapped: list[str]) -> None:
        self.unmapped = unmapped
        self.given: set[str] = set()
        self.groups: list[GroupPruning] = []

    def weight_compression(self, wc: dict[str, Any]) -> PruningSpec:
        own = self._fields(wc, WEIGHT_COMPRESSION, _GLOBAL_KEYS, "")
        raw_pruners = wc.get("pruners")
        if raw_pruners is not None and not isinstance(raw_pruners, list):
            raise ValueError(f"{WEIGHT_COMPRESSION}.pruners: must be a list of !Pruner entries")
        pruners = []
        for i, entry in enumerate(raw_pruners or []):
            key = f"{WEIGHT_COMPRESSION}.pruners[{i}]"
            fields = self._fields(as_mapping(entry, key), key, _PRUNER_KEYS, f"pruners[{i}].")
            pruners.append(PrunerSpec(**fields))
        spec = PruningSpec(
            initial_sparsity=own.get("initial_sparsity", LPOT_DEFAULTS["initial_sparsity"]),
            target_sparsity=own.get("target_sparsity", LPOT_DEFAULTS["target_sparsity"]),
            start_epoch=own.get("start_epoch", LPOT_DEFAULTS["start_epoch"]),
            end_epoch=own.get("end_epoch", LPOT_DEFAULTS["end_epoch"]),
            update_frequency=own.get("update_frequency", LPOT_DEFAULTS["update_frequency"]),
            schedule=Schedule.linear,  # LPOT's only schedule: its staircase
            criterion=own.get("criterion", LPOT_DEFAULTS["criterion"]),
            pattern=own.get("pattern", Pattern.unstructured),
            scope=own.get("scope", PER_TENSOR),
            names=own.get("names"),
            pruners=pruners,
        )
        try:
            spec.resolve()
        except ValueError as err:
            message = re.sub(r"^((?:pruners\[\d+\]\.)?)criterion", r"\1prune_type", str(err))
            raise ValueError(f"{WEIGHT_COMPRESSION}.{message}") from None
        return spec

    def _fields(self, data: dict[str, Any], path: str, allowed: set[str], given_prefix: str) -> dict[str, Any]:
        """LPOT keys -> spec fields; absent (or null) keys are left out so that they inherit."""
        out: dict[str, Any] = {}
        for key, value in data.items():
            dotted = f"{path}.{key}"
            if key not in allowed:
                if key == "frequency":
                    self.unmapped.append(f"{dotted}: LPOT's Pruner has no `frequency` (it is update_frequency); "
                                         "not used")
                else:
                    self.unmapped.append(_unknown(dotted, sorted(allowed)))
                continue
            if key == "pruners" or value is None:
                continue
            self.given.add(given_prefix + key)
            if key == "prune_type":
                out["criterion"], pattern = _as_prune_type(value, dotted)
                if pattern is not None:
                    out["pattern"] = pattern
            elif key in SPEC_FIELDS:
                name, check = SPEC_FIELDS[key]
                out[name] = check(value, dotted)
            elif key == "frequency":  # the seed's prose name for the global update frequency
                frequency = as_float(value, dotted)
                if data.get("update_frequency") is not None \
                        and as_float(data["update_frequency"], f"{path}.update_frequency") != frequency:
                    raise ValueError(f"{dotted}={value!r}: conflicts with {path}.update_frequency="
                                     f"{data['update_frequency']!r}; give one of them")
                out.setdefault("update_frequency", frequency)
            elif key == "method":
                method = as_str(value, dotted)
                if method == "per_tensor":
                    out["scope"] = PER_TENSOR
                else:
                    self.unmapped.append(f"{dotted}: {method!r} is not supported (LPOT's per_channel kept a share "
                                         "of each output channel); the harness prunes per tensor")
        if "parameters" in data and data["parameters"] not in (None, {}, []):
            self._group(data, path, out)
        return out

    def _group(self, data: dict[str, Any], path: str, fields: dict[str, Any]) -> None:
        """A pruner's ``parameters``: LPOT read them for structured gradient_sensitivity only."""
        key = f"{path}.parameters"
        if fields.get("criterion") != Criterion.gradient_sensitivity:
            self.unmapped.append(f"{key}: not used (LPOT read parameters for gradient_sensitivity only)")
            return
        params = as_mapping(data["parameters"], key)
        for name in params:
            if name not in _GROUP_PARAMETERS:
                raise ValueError(f"{key}.{name}: unknown gradient_sensitivity parameter; allowed: "
                                 f"{', '.join(_GROUP_PARAMETERS)}")
        for name in ("target", "stride"):
            if name not in params:
                raise ValueError(f"{key}.{name}: missing; structured gradient_sensitivity keeps `target` groups "
                                 "of `stride` rows")
        target, stride = as_int(params["target"], f"{key}.target"), as_int(params["stride"], f"{key}.stride")
        for name, value in (("target", target), ("stride", stride)):
            if value < 1:
                raise ValueError(f"{key}.{name}={value}: must be >= 1")
        metric = as_str(params.get("importance_metric", "weighted_gradient"), f"{key}.importance_metric")
        if metric != "weighted_gradient":
            raise ValueError(f"{key}.importance_metric={metric!r}: not supported; the harness ranks groups by the "
                             "accumulated |grad * w| of their own weights (weighted_gradient)")
        names = fields.get("names") or []
        inputs = params.get("importance_inputs")
        if inputs is not None:
            inputs = _as_names(inputs, f"{key}.importance_inputs") or []
            foreign = [name for name in inputs if name not in names]
            if foreign:
                raise ValueError(f"{key}.importance_inputs={foreign!r}: names a model input or a tensor this pruner "
                                 "does not prune; the harness scores each pruned tensor by its own |grad * w|: "
                                 f"list only the pruner's names ({names}) or leave importance_inputs out")
        for name in names:
            if not name.endswith("weight"):
                raise ValueError(f"{path}.names: {name!r}: structured gradient_sensitivity keeps rows of weight "
                                 "matrices; a bias cannot follow its weight's rows here: leave it out")
        as_bool(params.get("normalize", False), f"{key}.normalize")  # a tensor's norm leaves its ranking as is
        transpose = as_bool(params.get("transpose", False), f"{key}.transpose")
        self.groups.append(GroupPruning(pruner=_pruner_index(path), target=target, stride=stride,
                                        transpose=transpose))


def _pruner_index(path: str) -> int:
    found = re.search(r"pruners\[(\d+)\]$", path)
    if found is None:
        raise ValueError(f"{path}.parameters: give structured gradient_sensitivity in a !Pruner entry")
    return int(found.group(1))


# ---- the train section ------------------------------------------------------------------------------

_OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
_OPTIMIZER_ARGS = {
    "sgd": ("learning_rate", "momentum", "weight_decay", "nesterov"),
    "adam": ("learning_rate", "weight_decay"),
    "adamw": ("learning_rate", "weight_decay"),
}
_TRAIN_KEYS = ("start_epoch", "end_epoch", "iteration", "frequency", "optimizer", "criterion", "dataloader",
               "hostfile")


def _read_train(train: Mapping[str, Any], unmapped: list[str]) -> LpotTrain:
    """Type-check ``pruning.train`` (a plain mapping) into :class:`LpotTrain`."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}

    def take(name: str, key: str, check: Callable[[Any, str], Any], value: Any) -> None:
        values[name] = check(value, key)
        source[name] = key

    for key, value in train.items():
        dotted = f"{TRAIN}.{key}"
        if key in ("start_epoch", "end_epoch", "iteration") and value is not None:
            take(key, dotted, as_int, value)
        elif key == "frequency":
            unmapped.append(f"{dotted}: not used (LPOT 1.6's PyTorch trainer never read it; mask updates "
                            f"follow {WEIGHT_COMPRESSION} update_frequency)")
        elif key == "hostfile":
            unmapped.append(f"{dotted}: not used (LPOT reserved it for multi-node training)")
        elif key == "optimizer":
            _read_optimizer(as_mapping(value, dotted), dotted, take, unmapped)
        elif key == "criterion":
            for name, args in as_mapping(value, dotted).items():
                if name != "CrossEntropyLoss":
                    unmapped.append(f"{dotted}.{name}: not supported (the loss is CrossEntropyLoss)")
                    continue
                values["loss"], source["loss"] = "cross_entropy", f"{dotted}.{name}"
                for arg, arg_value in as_mapping(args, f"{dotted}.{name}").items():
                    if arg == "reduction":
                        if arg_value is not None:  # null: torch's default, mean
                            take("reduction", f"{dotted}.{name}.reduction", as_str, arg_value)
                    else:
                        unmapped.append(_unknown(f"{dotted}.{name}.{arg}", ["reduction"]))
        elif key == "dataloader":
            take("dataloader", dotted, as_mapping, value)
        elif value is not None:
            unmapped.append(_unknown(dotted, _TRAIN_KEYS))
    settings = LpotTrain(**values, source=source)
    if settings.end_epoch is not None and settings.end_epoch < settings.start_epoch:
        raise ValueError(f"{TRAIN}.end_epoch={settings.end_epoch}: must be >= start_epoch={settings.start_epoch} "
                         "(LPOT trains epochs start_epoch..end_epoch-1)")
    if settings.start_epoch < 0:
        raise ValueError(f"{TRAIN}.start_epoch={settings.start_epoch}: must be >= 0")
    if settings.iteration is not None and settings.iteration < 1:
        raise ValueError(f"{TRAIN}.iteration={settings.iteration}: must be >= 1 (batches per epoch)")
    return settings


def _read_optimizer(optimizer: dict[str, Any], path: str, take: Callable[..., None], unmapped: list[str]) -> None:
    known = [name for name in optimizer if name in _OPTIMIZERS]
    if len(known) > 1:
        raise ValueError(f"{path}: names {', '.join(known)}; give one optimizer")
    for name, args in optimizer.items():
        key = f"{path}.{name}"
        if name not in _OPTIMIZERS:
            unmapped.append(f"{key}: not supported (use SGD, Adam or AdamW)")
            continue
        kind = _OPTIMIZERS[name]
        take("optimizer", key, lambda v, k: v, kind)
        for arg, value in as_mapping(args, key).items():
            if arg in _OPTIMIZER_ARGS[kind] and value is not None:
                take(arg, f"{key}.{arg}", as_bool if arg == "nesterov" else as_float, value)
            else:
                reason = "not supported" if arg in ("beta_1", "beta_2", "epsilon", "amsgrad") else "unknown LPOT field"
                unmapped.append(f"{key}.{arg}: {reason}; not used (torch's default applies)")


# ---- what the harness does differently, on purpose ---------------------------------------------------

NAMES_ABSENT = ("names absent: the harness prunes every conv and linear weight; LPOT pruned every 2-D and 4-D "
                "parameter (embeddings, recurrent and attention matrices too): list those in names to prune them")


def _notices(spec: PruningSpec, reading: _SpecReading, train: LpotTrain) -> list[str]:
    """One line per LPOT behaviour the harness changes on purpose, for this file."""
    lines = ["each update prunes exactly round(sparsity * n) weights of a tensor (LPOT pruned one more)"]
    resolved = spec.resolve()
    if any(p.names is None for p in resolved):
        lines.append(NAMES_ABSENT)
    for i, pruner in enumerate(spec.pruners):
        for key, name in (("initial_sparsity", "initial_sparsity"), ("target_sparsity", "target_sparsity"),
                          ("start_epoch", "start_epoch"), ("end_epoch", "end_epoch"),
                          ("update_frequency", "update_frequency")):
            own, inherited = getattr(pruner, name), getattr(spec, name)
            if own is not None and not own and own != inherited:
                lines.append(f"{WEIGHT_COMPRESSION}.pruners[{i}].{key}={own!r} is used as given; LPOT 1.6 read "
                             f"0 as absent and took the global {inherited!r}")
    for i, p in enumerate(resolved):
        where = f"{WEIGHT_COMPRESSION}.pruners[{i}]" if spec.pruners else WEIGHT_COMPRESSION
        if p.start_epoch == p.end_epoch and p.pattern != Pattern.lock and not _is_group(reading, i):
            lines.append(f"{where}: start_epoch == end_epoch = {p.start_epoch}: pruned one-shot to "
                         f"target_sparsity={p.target_sparsity} (LPOT stayed at initial_sparsity)")
        elif not float(p.update_frequency).is_integer():
            lines.append(f"{where}.update_frequency={p.update_frequency}: an update every "
                         f"{p.update_frequency} of an epoch, reaching the target at end_epoch (LPOT updated at epoch "
                         "begin only, with floor division, and fell short of the target)")
        elif (p.end_epoch - p.start_epoch) % int(p.update_frequency):
            lines.append(f"{where}: end_epoch - start_epoch = {p.end_epoch - p.start_epoch} is not a multiple of "
                         f"update_frequency={p.update_frequency:g}; a last update at end_epoch reaches the target "
                         "(LPOT stopped short)")
        if p.criterion == Criterion.gradient_sensitivity and not _is_group(reading, i):
            lines.append(f"{where}: gradient_sensitivity scores |grad * w| summed over every batch, as LPOT did; "
                         "LPOT scored no batch before its own on_batch_end, the harness scores after each backward")
    for group in reading.groups:
        lines.append(f"{WEIGHT_COMPRESSION}.pruners[{group.pruner}]: structured gradient_sensitivity keeps the "
                     f"{group.target} groups of {group.stride} {'columns' if group.transpose else 'rows'} with the "
                     "highest |grad * w| once, at end_epoch, by zeroing the others (LPOT cut them out of the "
                     "tensor at every epoch end); normalize does not change which groups are kept")
    if train.reduction not in (None, "mean"):
        lines.append(f"{train.source['reduction']}={train.reduction!r}: the loss is averaged over the batch "
                     "(mean), whatever the reduction (YAML reads None as the string 'None')")
    return lines


def _is_group(reading: _SpecReading, index: int) -> bool:
    return any(group.pruner == index for group in reading.groups)


def training_epochs(spec: PruningSpec, train: LpotTrain) -> tuple[int, int, str]:
    """The epochs to train, ``range(start, end)`` in LPOT's numbering, and why: LPOT's
    ``start_epoch..end_epoch-1``, extended to the last pruner's ``end_epoch`` (where it reaches its
    target), which LPOT's loop could end before."""
    last = max(p.end_epoch for p in spec.resolve())
    start = train.start_epoch
    if train.end_epoch is None:
        return start, max(last + 1, start + 1), f"{TRAIN}.end_epoch absent: up to the last pruner end_epoch={last}"
    span = f"LPOT trains epochs start_epoch..end_epoch-1 = {start}..{train.end_epoch - 1}"
    if train.end_epoch > last:
        return start, train.end_epoch, span
    return start, last + 1, (f"{span}; extended to epoch {last}, the last pruner end_epoch, where it reaches its "
                             "target (LPOT's loop ended before it)")

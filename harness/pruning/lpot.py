"""LPOT / Intel Neural Compressor 1.x pruning on the harness's engine: its YAML and its Python API.

An LPOT user changes one line, the import, and keeps the rest of the code::

    from harness.pruning.lpot import Pruning, common   # was: from lpot.experimental import Pruning, common

    prune = Pruning("conf.yaml")            # LPOT's YAML, read verbatim (!Pruner tags included)
    prune.model = common.Model(model)
    prune.train_dataloader = train_dataloader
    prune.pruning_func = train_func         # calls prune.on_epoch_begin / on_batch_begin / on_batch_end
    prune.eval_func = eval_func
    model = prune()                         # common.Model; model.model is the pruned nn.Module

:func:`read_lpot_yaml` turns the YAML into a :class:`PruningSpec` and lists, by dotted key and
with a reason, every key it did not use. The engine underneath avoids LPOT 1.6's defects: it
keeps the model's own ``nn.Parameter`` objects (LPOT replaced them, so the user's optimizer
trained stale copies), reads an explicit ``0.0`` as a value (LPOT read it as absent), prunes
exactly ``round(sparsity * numel)`` weights (LPOT pruned one more), and masks in place on the
device (LPOT copied every pruned weight through numpy at every batch).

Torch is imported on first use, so reading a config stays light.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import yaml

from .spec import PER_TENSOR, Criterion, PrunerSpec, PruningSpec, Schedule

if TYPE_CHECKING:
    from torch import nn

    from .counting import TensorSparsity
    from .pruning import Pruning as Engine

log = logging.getLogger(__name__)

__all__ = ["LPOT_DEFAULTS", "LpotConfig", "LpotTrain", "Model", "Pruning", "common", "format_sparsity",
           "load_lpot_yaml", "read_lpot_yaml", "read_train_section"]

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

WEIGHT_COMPRESSION = "pruning.approach.weight_compression"

# LPOT accepted prune_type with or without underscores (it compared after removing them).
_CRITERION_NAMES = {"basic_magnitude": "magnitude", "basicmagnitude": "magnitude", "BasicMagnitude": "magnitude"}

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


# ---- reading the YAML ---------------------------------------------------------------------------


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


def load_lpot_yaml(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The whole LPOT config as plain dicts and lists (custom tags dropped, their content kept)."""
    return _plain(_load(source), "", None)


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


def _plain(obj: Any, path: str, tags: list[str] | None) -> Any:
    """Drop custom tags (noting those other than !Pruner in ``tags``) and copy into dicts and lists."""
    if isinstance(obj, _Tagged):
        if tags is not None and obj.tag != "!Pruner":
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


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r}: must be an integer")
    return value


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}={value!r}: must be a number")
    return float(value)


def _as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: must be true or false")
    return value


def _as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r}: must be a string")
    return value


def _as_mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}={value!r}: must be a mapping")
    return dict(value)


def _as_names(value: Any, key: str) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}={value!r}: must be a list of tensor names, e.g. ['layer1.0.conv1.weight']")
    return list(value) or None  # LPOT: an empty list prunes every weight


def _as_criterion(value: Any, key: str) -> Criterion:
    name = _as_str(value, key)
    try:
        return Criterion(_CRITERION_NAMES.get(name, name))
    except ValueError:
        allowed = ", ".join(["basic_magnitude", *(c.value for c in Criterion)])
        raise ValueError(f"{key}={value!r}: must be one of {allowed}") from None


def _unknown(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key.rpartition(".")[2], list(allowed), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{key}: unknown LPOT field{hint}; not used"


# ---- the pruning section -> PruningSpec ------------------------------------------------------------

# LPOT key -> (PruningSpec / PrunerSpec field, type check); used at both levels.
_SPEC_FIELDS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "initial_sparsity": ("initial_sparsity", _as_float),
    "target_sparsity": ("target_sparsity", _as_float),
    "start_epoch": ("start_epoch", _as_int),
    "end_epoch": ("end_epoch", _as_int),
    "update_frequency": ("update_frequency", _as_float),
    "prune_type": ("criterion", _as_criterion),
    "names": ("names", _as_names),
}
_GLOBAL_KEYS = {*_SPEC_FIELDS, "frequency", "method", "pruners"}
_PRUNER_KEYS = {*_SPEC_FIELDS, "method", "parameters"}


@dataclass(frozen=True)
class LpotConfig:
    """An LPOT config as the harness reads it.

    Attributes:
        spec: the engine's spec, from ``pruning.approach.weight_compression``.
        train: the raw ``pruning.train`` section (``{}`` if absent).
        unmapped: every key of the file that nothing here uses, as ``"dotted.key: reason"``.
    """

    spec: PruningSpec
    train: dict[str, Any]
    unmapped: list[str]


def read_lpot_yaml(source: str | os.PathLike[str] | Mapping[str, Any]) -> LpotConfig:
    """Read an LPOT YAML file (a path) or its parsed mapping: the whole config or just ``pruning:``.

    The schedule is LPOT's linear staircase; a field absent from the whole file takes LPOT 1.6's
    default (:data:`LPOT_DEFAULTS`); an explicit ``0.0`` is a value.

    Raises:
        ValueError: a value of the wrong type or out of range, naming its dotted key.

    Example::

        conf = read_lpot_yaml("conf.yaml")
        conf.spec.resolve()[0].target_sparsity   # 0.97 for the seed document's pruner
        conf.unmapped                            # ['pruning.train.frequency: ...', ...]
    """
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
    pruning = _as_mapping(_plain(section, "pruning", unmapped), "pruning")

    for key in pruning:
        if key not in ("train", "approach"):
            unmapped.append(_unknown(f"pruning.{key}", ["train", "approach"]))
    approach = _as_mapping(pruning.get("approach"), "pruning.approach")
    for key in approach:
        if key == "activation_compression":
            unmapped.append("pruning.approach.activation_compression: not supported (LPOT marked it WIP)")
        elif key != "weight_compression":
            unmapped.append(_unknown(f"pruning.approach.{key}", ["weight_compression"]))
    if approach.get("weight_compression") is None:
        raise ValueError(f"{WEIGHT_COMPRESSION}: missing; it says what to prune (target_sparsity, pruners)")
    spec = _read_weight_compression(_as_mapping(approach["weight_compression"], WEIGHT_COMPRESSION), unmapped)

    train = _as_mapping(pruning.get("train"), "pruning.train")
    settings = read_train_section(train)
    unmapped += settings.unmapped
    if settings.dataloader is not None:
        unmapped.append("pruning.train.dataloader: not used by the Python API (set prune.train_dataloader); "
                        "python -m harness lpot=... maps it to dataset.* and train.batch_size")
    if settings.reduction not in (None, "mean", "sum"):
        unmapped.append(f"pruning.train.criterion.CrossEntropyLoss.reduction: {_reduction_reason(settings.reduction)}")
    return LpotConfig(spec=spec, train=train, unmapped=unmapped)


def _read_weight_compression(wc: dict[str, Any], unmapped: list[str]) -> PruningSpec:
    own = _read_fields(wc, WEIGHT_COMPRESSION, _GLOBAL_KEYS, unmapped)
    raw_pruners = wc.get("pruners")
    if raw_pruners is not None and not isinstance(raw_pruners, list):
        raise ValueError(f"{WEIGHT_COMPRESSION}.pruners: must be a list of !Pruner entries")
    pruners = []
    for i, entry in enumerate(raw_pruners or []):
        key = f"{WEIGHT_COMPRESSION}.pruners[{i}]"
        pruners.append(PrunerSpec(**_read_fields(_as_mapping(entry, key), key, _PRUNER_KEYS, unmapped)))
    spec = PruningSpec(
        initial_sparsity=own.get("initial_sparsity", LPOT_DEFAULTS["initial_sparsity"]),
        target_sparsity=own.get("target_sparsity", LPOT_DEFAULTS["target_sparsity"]),
        start_epoch=own.get("start_epoch", LPOT_DEFAULTS["start_epoch"]),
        end_epoch=own.get("end_epoch", LPOT_DEFAULTS["end_epoch"]),
        update_frequency=own.get("update_frequency", LPOT_DEFAULTS["update_frequency"]),
        schedule=Schedule.linear,  # LPOT's only schedule: its staircase
        criterion=own.get("criterion", LPOT_DEFAULTS["criterion"]),
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


def _read_fields(data: dict[str, Any], path: str, allowed: set[str], unmapped: list[str]) -> dict[str, Any]:
    """LPOT keys -> spec fields; absent (or null) keys are left out so that they inherit."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}"
        if key not in allowed:
            if key == "frequency":
                unmapped.append(f"{dotted}: LPOT's Pruner has no `frequency` (it is update_frequency); not used")
            else:
                unmapped.append(_unknown(dotted, sorted(allowed)))
        elif key == "pruners" or value is None:
            continue
        elif key in _SPEC_FIELDS:
            name, check = _SPEC_FIELDS[key]
            out[name] = check(value, dotted)
        elif key == "frequency":  # the seed's prose name for the global update frequency
            frequency = _as_float(value, dotted)
            if "update_frequency" in data and data["update_frequency"] is not None \
                    and _as_float(data["update_frequency"], f"{path}.update_frequency") != frequency:
                raise ValueError(f"{dotted}={value!r}: conflicts with {path}.update_frequency="
                                 f"{data['update_frequency']!r}; give one of them")
            out.setdefault("update_frequency", frequency)
        elif key == "method":
            method = _as_str(value, dotted)
            if method == "per_tensor":
                out["scope"] = PER_TENSOR
            else:
                unmapped.append(f"{dotted}: {method!r} is not supported (LPOT's per_channel kept a share of "
                                "each output channel); the harness prunes per tensor")
        elif key == "parameters" and value not in ({}, []):
            unmapped.append(f"{dotted}: not used (LPOT passed it to its non-magnitude pruners)")
    return out


# ---- the train section ------------------------------------------------------------------------------

_OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
_OPTIMIZER_ARGS = {
    "sgd": ("learning_rate", "momentum", "weight_decay", "nesterov"),
    "adam": ("learning_rate", "weight_decay"),
    "adamw": ("learning_rate", "weight_decay"),
}
_TRAIN_KEYS = ("start_epoch", "end_epoch", "iteration", "frequency", "optimizer", "criterion", "dataloader",
               "hostfile")


@dataclass(frozen=True)
class LpotTrain:
    """``pruning.train``, type-checked: what a training loop can take from it.

    LPOT 1.6's PyTorch trainer ran ``for epoch in range(start_epoch, end_epoch)`` (end exclusive),
    stopped an epoch after ``iteration`` batches, and built the optimizer with torch's defaults
    for every argument the YAML leaves out. ``source`` maps each setting to the dotted key it was
    read from; ``unmapped`` lists what no training loop here uses.
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
    dataloader: dict[str, Any] | None = None  # raw; the harness side maps it
    source: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


def read_train_section(train: Mapping[str, Any]) -> LpotTrain:
    """Type-check ``pruning.train`` (a plain mapping) into :class:`LpotTrain`.

    Raises:
        ValueError: a value of the wrong type, naming its dotted key.
    """
    p = "pruning.train"
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    unmapped: list[str] = []

    def take(name: str, key: str, check: Callable[[Any, str], Any], value: Any) -> None:
        values[name] = check(value, key)
        source[name] = key

    for key, value in train.items():
        dotted = f"{p}.{key}"
        if key in ("start_epoch", "end_epoch", "iteration") and value is not None:
            take(key, dotted, _as_int, value)
        elif key == "frequency":
            unmapped.append(f"{dotted}: not used (LPOT 1.6's PyTorch trainer never read it; mask updates "
                            f"follow {WEIGHT_COMPRESSION} update_frequency)")
        elif key == "hostfile":
            unmapped.append(f"{dotted}: not used (LPOT reserved it for multi-node training)")
        elif key == "optimizer":
            _read_optimizer(_as_mapping(value, dotted), dotted, take, unmapped)
        elif key == "criterion":
            for name, args in _as_mapping(value, dotted).items():
                if name != "CrossEntropyLoss":
                    unmapped.append(f"{dotted}.{name}: not supported (the loss is CrossEntropyLoss)")
                    continue
                values["loss"], source["loss"] = "cross_entropy", f"{dotted}.{name}"
                for arg, arg_value in _as_mapping(args, f"{dotted}.{name}").items():
                    if arg == "reduction":
                        take("reduction", f"{dotted}.{name}.reduction", _as_str, arg_value)
                    else:
                        unmapped.append(_unknown(f"{dotted}.{name}.{arg}", ["reduction"]))
        elif key == "dataloader":
            values["dataloader"] = _as_mapping(value, dotted)
            source["dataloader"] = dotted
        elif value is not None:
            unmapped.append(_unknown(dotted, _TRAIN_KEYS))
    settings = LpotTrain(**values, source=source, unmapped=unmapped)
    if settings.end_epoch is not None and settings.end_epoch < settings.start_epoch:
        raise ValueError(f"{p}.end_epoch={settings.end_epoch}: must be >= start_epoch={settings.start_epoch} "
                         "(LPOT trains epochs start_epoch..end_epoch-1)")
    if settings.start_epoch < 0:
        raise ValueError(f"{p}.start_epoch={settings.start_epoch}: must be >= 0")
    if settings.iteration is not None and settings.iteration < 1:
        raise ValueError(f"{p}.iteration={settings.iteration}: must be >= 1 (batches per epoch)")
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
        for arg, value in _as_mapping(args, key).items():
            if arg in _OPTIMIZER_ARGS[kind] and value is not None:
                take(arg, f"{key}.{arg}", _as_bool if arg == "nesterov" else _as_float, value)
            else:
                reason = "not supported" if arg in ("beta_1", "beta_2", "epsilon", "amsgrad") else "unknown LPOT field"
                unmapped.append(f"{key}.{arg}: {reason}; not used (torch's default applies)")


def _reduction_reason(reduction: str | None) -> str:
    if reduction == "none":
        return "'none' (a loss per sample) cannot be backpropagated as is; the loss averages over the batch (mean)"
    return (f"{reduction!r} is not one of LPOT's none, sum, mean (YAML reads None as the string 'None'); "
            "the loss averages over the batch (mean)")


# ---- the Python API ------------------------------------------------------------------------------


class Model:
    """LPOT's ``common.Model`` for PyTorch: wraps an ``nn.Module``; ``.model`` gives it back.

    Example::

        wrapped = common.Model(net)
        wrapped.model is net        # True
        wrapped.save("out")         # out/best_model_weights.pt (LPOT's folder layout), a state_dict
    """

    def __init__(self, root: nn.Module) -> None:
        from torch import nn

        if isinstance(root, Model):
            root = root.model
        if not isinstance(root, nn.Module):
            raise TypeError(f"common.Model({type(root).__name__}): expected a torch.nn.Module")
        self.model = root

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the state_dict: to ``path`` when it names a file (``.pt``, ``.pth``, ``.bin``), else,
        as LPOT did, to ``path/best_model_weights.pt``. Returns the file written."""
        import torch

        target = Path(path)
        if target.suffix in (".pt", ".pth", ".bin") and not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            target = target / "best_model_weights.pt"
        torch.save(self.model.state_dict(), target)
        return target

    def __repr__(self) -> str:
        return f"common.Model({type(self.model).__name__})"


# LPOT's `common` module, as far as the pruning API uses it: `common.Model(model)`.
common = SimpleNamespace(Model=Model)


class Pruning:
    """LPOT's ``Pruning`` object, driving the harness's engine.

    Args:
        conf: an LPOT YAML path (LPOT passes ``args.config``), its parsed mapping, or an
            :class:`LpotConfig`.

    Attributes:
        model: set with ``common.Model(net)`` or a plain ``nn.Module``; reads back as ``common.Model``.
        train_dataloader: batches of ``(inputs, targets)``; ``len()`` gives the steps per epoch.
        eval_dataloader: used for top-1 accuracy when ``eval_func`` is not set.
        pruning_func: ``pruning_func(net)`` trains ``net`` (the ``nn.Module``), calling the callbacks.
            Unset: a loop is built from the YAML's ``pruning.train`` over ``train_dataloader``.
        eval_func: ``eval_func(net) -> float``, optional.
        engine: the harness's :class:`harness.pruning.Pruning` underneath.
        score: what evaluation returned after the last call, or None.

    The callbacks (``on_epoch_begin(epoch)``, ``on_batch_begin(step)``, ``on_batch_end()``, and
    optionally ``on_train_begin``, ``on_before_optimizer_step``, ``on_epoch_end``, ``on_train_end``)
    delegate to the engine. LPOT had no ``on_before_optimizer_step``, so the optimizer may move a
    pruned weight within a batch; ``on_batch_end`` zeroes it again after ``optimizer.step()``.
    """

    def __init__(self, conf: str | os.PathLike[str] | Mapping[str, Any] | LpotConfig) -> None:
        from .pruning import Pruning as Engine

        self.conf = conf if isinstance(conf, LpotConfig) else read_lpot_yaml(conf)
        for line in self.conf.unmapped:
            log.warning("LPOT config: %s", line)
        self.engine: Engine = Engine(self.conf.spec)
        self._train = read_train_section(self.conf.train)
        self._model: Model | None = None
        self.train_dataloader: Any = None
        self.eval_dataloader: Any = None
        self.pruning_func: Callable[[nn.Module], Any] | None = None
        self.eval_func: Callable[[nn.Module], Any] | None = None
        self.score: Any = None

    @property
    def model(self) -> Model | None:
        return self._model

    @model.setter
    def model(self, user_model: Model | nn.Module) -> None:
        self._model = user_model if isinstance(user_model, Model) else Model(user_model)

    # -- the callbacks, for the user's training function --------------------------------------------

    def on_train_begin(self) -> None:
        self._attached().on_train_begin()

    def on_epoch_begin(self, epoch: int) -> None:
        self._attached().on_epoch_begin(epoch)

    def on_batch_begin(self, batch_id: int) -> None:
        self._attached().on_batch_begin(batch_id)

    def on_before_optimizer_step(self) -> None:
        self._attached().on_before_optimizer_step()

    def on_batch_end(self) -> None:
        self._attached().on_batch_end()

    def on_epoch_end(self) -> None:
        self._attached().on_epoch_end()

    def on_train_end(self) -> None:
        self._attached().on_train_end()

    # -- the run ------------------------------------------------------------------------------------

    def __call__(self) -> Model:
        """Attach, train with ``pruning_func``, bake the masks in, evaluate, report; return the model."""
        if self._model is None:
            raise ValueError("prune.model is not set: prune.model = common.Model(your_torch_model)")
        train = self.pruning_func if self.pruning_func is not None else self._yaml_train_func()
        net = self._model.model
        self._attach(net)
        train(net)
        self.engine.on_train_end()
        self.engine.finalize()
        if self.eval_func is not None:
            self.score = self.eval_func(net)
        elif self.eval_dataloader is not None:
            self.score = _top1(net, self.eval_dataloader)
        if self.score is not None:
            log.info("pruned model score: %s", self.score)
        report = format_sparsity(self.engine.sparsity())
        log.info("%s", report)
        print(report, flush=True)
        return self._model

    def _attached(self) -> Engine:
        if self.engine.model is None:
            if self._model is None:
                raise RuntimeError("set prune.model = common.Model(model) before calling the callbacks")
            self._attach(self._model.model)
        return self.engine

    def _attach(self, net: nn.Module) -> None:
        steps = self._steps_per_epoch()
        try:
            self.engine.attach(net, steps_per_epoch=steps)
        except ValueError as err:
            what, needs_steps, _ = str(err).partition(": pass attach(model, steps_per_epoch")
            if needs_steps:
                raise ValueError(f"{WEIGHT_COMPRESSION}: {what} needs the steps per epoch: set "
                                 "prune.train_dataloader (its len() gives them) before prune()") from None
            raise ValueError(f"{WEIGHT_COMPRESSION}.{err}") from None

    def _steps_per_epoch(self) -> int | None:
        try:
            steps = len(self.train_dataloader)
        except TypeError:  # None, or an iterable without a length
            return None
        if self.pruning_func is None and self._train.iteration is not None:
            steps = min(steps, self._train.iteration)  # the YAML loop stops each epoch there
        return steps or None

    def _yaml_train_func(self) -> Callable[[nn.Module], None]:
        """LPOT's 'completely configured in the yaml' usage: a loop built from ``pruning.train``."""
        t = self._train
        if self.train_dataloader is None:
            raise ValueError("nothing to train with: set prune.pruning_func = train_func (your loop, calling "
                             "prune.on_epoch_begin/on_batch_begin/on_batch_end), or prune.train_dataloader so "
                             "that the loop is built from the YAML's pruning.train section")
        if t.optimizer is None or t.learning_rate is None:
            raise ValueError("pruning.train.optimizer: the YAML gives no SGD, Adam or AdamW with a learning_rate; "
                             "add one, or set prune.pruning_func = train_func")
        if t.reduction not in (None, "mean", "sum"):
            log.warning("pruning.train.criterion.CrossEntropyLoss.reduction: %s", _reduction_reason(t.reduction))
        last_prune_epoch = max(p.end_epoch for p in self.conf.spec.resolve())
        end_epoch = t.end_epoch if t.end_epoch is not None else last_prune_epoch + 1
        if end_epoch <= last_prune_epoch:
            log.warning("pruning.train.end_epoch=%d: training ends before epoch %d, where the pruners reach "
                        "their target (epochs run start_epoch..end_epoch-1)", end_epoch, last_prune_epoch)
        loader = self.train_dataloader

        def train_func(net: nn.Module) -> None:
            import torch

            optimizer = _make_optimizer(net.parameters(), t)
            loss_fn = torch.nn.CrossEntropyLoss(reduction="sum" if t.reduction == "sum" else "mean")
            device = next(net.parameters()).device
            self.on_train_begin()
            for epoch in range(t.start_epoch, end_epoch):
                net.train()
                self.on_epoch_begin(epoch)
                for step, (inputs, targets) in enumerate(loader):
                    if t.iteration is not None and step >= t.iteration:
                        break
                    self.on_batch_begin(step)
                    loss = loss_fn(net(inputs.to(device)), targets.to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.on_before_optimizer_step()
                    optimizer.step()
                    self.on_batch_end()
                self.on_epoch_end()
            self.on_train_end()

        return train_func


def _make_optimizer(params: Iterable[Any], t: LpotTrain) -> Any:
    """torch's optimizer with the YAML's arguments; torch's defaults for the rest, as LPOT did."""
    import torch

    kwargs: dict[str, Any] = {"lr": t.learning_rate}
    if t.weight_decay is not None:
        kwargs["weight_decay"] = t.weight_decay
    if t.optimizer == "sgd":
        if t.momentum is not None:
            kwargs["momentum"] = t.momentum
        if t.nesterov is not None:
            kwargs["nesterov"] = t.nesterov
        return torch.optim.SGD(params, **kwargs)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _top1(net: nn.Module, loader: Iterable[Any]) -> float:
    import torch

    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = total = 0
    with torch.inference_mode():
        for inputs, targets in loader:
            predicted = net(inputs.to(device)).argmax(dim=1)
            correct += int((predicted == targets.to(device)).sum())
            total += targets.numel()
    net.train(was_training)
    return correct / total if total else 0.0


def format_sparsity(rows: list[TensorSparsity]) -> str:
    """Per-tensor sparsity, counted from the weights (exact zeros), and the total."""
    width = max([len(r.name) for r in rows] + [7])
    lines = ["pruned tensors (sparsity counted from the weights):"]
    for r in rows:
        lines.append(f"  {r.name:<{width}}  {r.zeros:>9}/{r.numel:<9} zeros  {r.sparsity:7.2%}")
    zeros, numel = sum(r.zeros for r in rows), sum(r.numel for r in rows)
    lines.append(f"  {'overall':<{width}}  {zeros:>9}/{numel:<9} zeros  {zeros / numel if numel else 0.0:7.2%}")
    return "\n".join(lines)

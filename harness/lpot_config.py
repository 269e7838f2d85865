"""LPOT YAML -> harness config values, for ``python -m harness lpot=path/to/conf.yaml``.

:func:`apply_lpot_file` merges such a file into the composed config (the entry point calls it);
:func:`migrate_lpot` reads an LPOT / Intel Neural Compressor 1.x config and returns the values
to merge into the composed harness config (explicit command-line overrides still win), with
one ``used`` line per LPOT field it mapped and one ``unmapped`` line, with the reason, per field
it did not. The pruning part goes through :func:`harness.pruning.lpot.read_lpot_yaml`; this
module adds the ``pruning.train`` section (epochs, optimizer, loss, dataloader) and the
accuracy goal.

Example::

    migration = migrate_lpot("conf.yaml")
    migration.values["train"]["finetune_lr"]    # 0.1 for the seed document
    print(*migration.used, sep="\\n")            # pruning.train.optimizer.SGD.learning_rate -> train.finetune_lr=0.1
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from harness.config import PruneConfig, TrainConfig, plain
from harness.errors import ConfigError
from harness.pruning.lpot import (
    WEIGHT_COMPRESSION,
    LpotTrain,
    _as_bool,
    _as_int,
    _as_str,
    load_lpot_yaml,
    read_lpot_yaml,
    read_train_section,
)
from harness.pruning.spec import PrunerSpec, PruningSpec

# The statistics the harness normalizes with (harness/data.py; not imported, it loads torch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TRAIN = "pruning.train"
DATALOADER = "pruning.train.dataloader"

# LPOT field -> harness field, for both the global fields and each pruner's.
_PRUNE_FIELDS = {
    "initial_sparsity": "initial_sparsity",
    "target_sparsity": "target_sparsity",
    "start_epoch": "start_epoch",
    "end_epoch": "end_epoch",
    "update_frequency": "update_frequency",
    "prune_type": "criterion",
    "names": "names",
}


@dataclass(frozen=True)
class LpotMigration:
    """What an LPOT config becomes in the harness.

    Attributes:
        values: nested dict to merge into the composed config (``prune``, ``train``, ``dataset``,
            ``goal``), plain YAML-able values.
        used: one line per mapped LPOT field, ``"lpot.key -> harness.key=value (why)"``.
        unmapped: one line per LPOT field not used, ``"lpot.key: reason"``.
    """

    values: dict[str, Any]
    used: list[str]
    unmapped: list[str]


@dataclass
class _Draft:
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)

    def set(self, lpot_key: str, harness_key: str, value: Any, why: str = "") -> None:
        group, _, name = harness_key.partition(".")
        self.values.setdefault(group, {})[name] = value
        self.note(lpot_key, f"{harness_key}={_fmt(value)}", why)

    def note(self, lpot_key: str, target: str, why: str = "") -> None:
        self.used.append(f"{lpot_key} -> {target}" + (f" ({why})" if why else ""))

    def skip(self, lpot_key: str, reason: str) -> None:
        self.unmapped.append(f"{lpot_key}: {reason}")


def apply_lpot_file(cfg: DictConfig, command_line: list[str]) -> DictConfig:
    """Merge an LPOT YAML (``lpot=path``) into the composed config; command-line values still win.

    Prints what was mapped and, by name, everything in the file that was not used.
    """
    if not Path(cfg.lpot).is_file():
        raise ConfigError(f"lpot={cfg.lpot}: no such file")
    try:
        migration = migrate_lpot(cfg.lpot)
    except (ValueError, OSError) as err:
        raise ConfigError(f"lpot={cfg.lpot}: {str(err).splitlines()[0]}") from None
    # Fields LPOT never had (typos) and foreign tags are mistakes, not migration notes.
    mistakes = [line for line in migration.unmapped if "unknown LPOT field" in line or "YAML tag" in line]
    if mistakes:
        raise ConfigError(f"lpot={cfg.lpot}: {mistakes[0].removesuffix('; not used')}")
    merged = OmegaConf.merge(cfg, migration.values)
    for override in OverridesParser.create().parse_overrides(command_line):
        key = override.key_or_group
        if key == "lpot" or override.is_delete() or isinstance(OmegaConf.select(merged, key), DictConfig):
            continue  # group choices were applied while composing
        OmegaConf.update(merged, key, override.value(), merge=False)
    print(f"LPOT config {cfg.lpot}: {len(migration.used)} fields mapped, {len(migration.unmapped)} not used")
    for line in migration.used:
        print(f"  used:     {line}")
    for line in migration.unmapped:
        print(f"  not used: {line}")
    return merged  # type: ignore[return-value]


def migrate_lpot(path: str | os.PathLike[str]) -> LpotMigration:
    """Map an LPOT YAML file to harness config values.

    Raises:
        ValueError: a value of the wrong type or out of range, naming its dotted LPOT key.
    """
    doc = load_lpot_yaml(path)
    conf = read_lpot_yaml(path)
    train = read_train_section(conf.train)
    draft = _Draft()
    # The pruning reader's notes, except those about train (mapped below, for the harness's loop
    # rather than LPOT's) and tuning (its accuracy criterion becomes the goal).
    draft.unmapped += [line for line in conf.unmapped
                       if not _key(line).startswith(TRAIN) and _key(line) != "tuning"]
    draft.unmapped += train.unmapped

    raw_pruning = doc.get("pruning", doc)
    wc = raw_pruning.get("approach", {}).get("weight_compression", {})
    spec = _map_prune(conf.spec, wc, train.start_epoch, draft)
    _map_epochs(spec, train, draft)
    _map_optimizer(train, draft)
    _map_loss(train, draft)
    if train.iteration is not None:
        draft.skip(train.source["iteration"],
                   f"not used (the harness trains on every batch of the training split each epoch; LPOT stopped "
                   f"an epoch after {train.iteration} batches)")
    if train.dataloader is not None:
        _map_dataloader(train.dataloader, draft)
    if "tuning" in doc:
        _map_tuning(doc["tuning"], draft)
    return LpotMigration(values=draft.values, used=draft.used, unmapped=draft.unmapped)


# ---- pruning ----------------------------------------------------------------------------------------


def _map_prune(spec: PruningSpec, wc: Mapping[str, Any], shift: int, draft: _Draft) -> PruningSpec:
    """The spec's fields -> ``prune.*``; LPOT epochs renumbered from 0 when train.start_epoch > 0."""
    if shift:
        spec = dataclasses.replace(
            spec,
            start_epoch=max(0, spec.start_epoch - shift),
            end_epoch=max(0, spec.end_epoch - shift),
            pruners=[dataclasses.replace(
                p,
                start_epoch=None if p.start_epoch is None else max(0, p.start_epoch - shift),
                end_epoch=None if p.end_epoch is None else max(0, p.end_epoch - shift),
            ) for p in spec.pruners],
        )
        draft.note(f"{TRAIN}.start_epoch", f"prune epochs shifted by -{shift}",
                   f"LPOT numbered epochs from {shift}; the harness's fine-tuning epochs count from 0")
    # The harness's switch for "prune" (its name has changed; follow the schema).
    switches = {f.name for f in dataclasses.fields(PruneConfig)}
    if "method" in switches:
        draft.set("pruning", "prune.method", "magnitude", "LPOT's basic_magnitude pruning")
    if "enabled" in switches:
        draft.set("pruning", "prune.enabled", True, "the file has a pruning section")
    given = {key for key, value in wc.items() if value is not None}
    for lpot_key, name in _PRUNE_FIELDS.items():
        value = plain(getattr(spec, name))
        if lpot_key in given:
            draft.set(f"{WEIGHT_COMPRESSION}.{lpot_key}", f"prune.{name}", value)
        elif lpot_key == "update_frequency" and "frequency" in given:
            draft.set(f"{WEIGHT_COMPRESSION}.frequency", f"prune.{name}", value)
        elif lpot_key == "names":
            draft.set(f"{WEIGHT_COMPRESSION}.names", "prune.names", None,
                      "absent: every conv and linear weight, where LPOT took every 2-D and 4-D parameter")
        else:
            draft.set(f"{WEIGHT_COMPRESSION}.{lpot_key}", f"prune.{name}", value, "absent: LPOT 1.6's default")
    draft.set(WEIGHT_COMPRESSION, "prune.schedule", "linear", "LPOT's staircase")
    draft.set(f"{WEIGHT_COMPRESSION}.method" if "method" in given else WEIGHT_COMPRESSION, "prune.scope",
              "per_tensor", "LPOT's per_tensor")
    draft.set(WEIGHT_COMPRESSION, "prune.pattern", "unstructured", "LPOT prunes single weights")
    draft.set(WEIGHT_COMPRESSION, "prune.update_frequency_steps", None, "updates are counted in epochs")

    raw_pruners = wc.get("pruners") or []
    pruners = []
    for i, (pruner, raw) in enumerate(zip(spec.pruners, raw_pruners, strict=True)):
        pruners.append(_pruner_values(pruner))
        for lpot_key, name in [*_PRUNE_FIELDS.items(), ("method", "scope")]:
            value = getattr(pruner, name)
            key = f"{WEIGHT_COMPRESSION}.pruners[{i}].{lpot_key}"
            if lpot_key in raw and value is not None:
                draft.note(key, f"prune.pruners[{i}].{name}={_fmt(value)}")
            elif lpot_key == "names" and lpot_key in raw:
                draft.note(key, f"prune.pruners[{i}].names inherits prune.names", "LPOT: an empty list is every weight")
    draft.values["prune"]["pruners"] = pruners
    return spec


def _pruner_values(pruner: PrunerSpec) -> dict[str, Any]:
    """A pruner's own fields (None inherits, so it is left out), as plain values."""
    return {f.name: plain(getattr(pruner, f.name)) for f in dataclasses.fields(pruner)
            if getattr(pruner, f.name) is not None}


# ---- train: epochs, optimizer, loss ---------------------------------------------------------------------


def _map_epochs(spec: PruningSpec, train: LpotTrain, draft: _Draft) -> None:
    """LPOT trains ``range(start_epoch, end_epoch)``; the harness needs prune end_epoch <= finetune_epochs - 1."""
    last = max(p.end_epoch for p in spec.resolve())
    needed = last + 1
    fit = f"the harness needs prune end_epoch={last} <= train.finetune_epochs - 1"
    if train.end_epoch is None:
        if needed > TrainConfig().finetune_epochs:
            draft.set(f"{TRAIN}.end_epoch", "train.finetune_epochs", needed, f"absent; {fit}")
        return
    lpot_epochs = train.end_epoch - train.start_epoch
    span = f"LPOT trains epochs start_epoch..end_epoch-1 = {train.start_epoch}..{train.end_epoch - 1}"
    if lpot_epochs >= needed:
        draft.set(f"{TRAIN}.end_epoch", "train.finetune_epochs", lpot_epochs, span)
    else:
        draft.set(f"{TRAIN}.end_epoch", "train.finetune_epochs", needed,
                  f"{span}, {lpot_epochs} epochs; raised to {needed}, the larger: {fit}")
    if "start_epoch" in train.source and train.start_epoch == 0:
        draft.note(train.source["start_epoch"], "train.finetune_epochs", "epochs numbered from 0, as in LPOT")


def _map_optimizer(train: LpotTrain, draft: _Draft) -> None:
    if train.optimizer is None:
        return
    key = train.source["optimizer"]
    draft.set(key, "train.optimizer", train.optimizer)
    if train.learning_rate is not None:
        draft.set(train.source["learning_rate"], "train.finetune_lr", train.learning_rate)
    defaults = {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False} if train.optimizer == "sgd" \
        else {"weight_decay": 0.0}
    for name, default in defaults.items():
        value = getattr(train, name)
        if value is not None:
            draft.set(train.source[name], f"train.{name}", value)
        else:
            draft.set(f"{key}.{name}", f"train.{name}", default, "absent: torch's default, which LPOT used")
    draft.set(key, "train.lr_schedule", "constant", "LPOT kept the learning rate constant")


def _map_loss(train: LpotTrain, draft: _Draft) -> None:
    if train.loss is not None:
        draft.note(train.source["loss"], "the harness's loss (cross-entropy)")
    if train.reduction is None:
        return
    key = train.source["reduction"]
    if train.reduction == "mean":
        draft.note(key, "the harness's loss (averaged over the batch)")
    elif train.reduction in ("none", "sum"):
        draft.skip(key, f"{train.reduction!r} is not supported; the harness's loss averages over the batch (mean)")
    else:
        draft.skip(key, f"{train.reduction!r} is not one of LPOT's none, sum, mean (YAML reads None as the string "
                        "'None'); the harness's loss averages over the batch (mean)")


# ---- train.dataloader -> dataset ----------------------------------------------------------------------


def _map_dataloader(dataloader: Mapping[str, Any], draft: _Draft) -> None:
    dataset = None
    for key, value in dataloader.items():
        dotted = f"{DATALOADER}.{key}"
        if key == "batch_size":
            draft.set(dotted, "train.batch_size", _as_int(value, dotted))
        elif key == "dataset":
            dataset = _map_dataset(_mapping(value, dotted), dotted, draft)
        elif key == "transform":
            continue  # below, once the dataset is known
        elif key == "shuffle" and value is True:
            draft.note(dotted, "the harness's training loader (it shuffles)")
        elif key in ("shuffle", "last_batch", "filter"):
            draft.skip(dotted, "not used (the harness's training loader shuffles and keeps the last partial batch)")
        else:
            draft.skip(dotted, "unknown LPOT dataloader field; not used")
    if "transform" in dataloader:
        _map_transform(_mapping(dataloader["transform"], f"{DATALOADER}.transform"), dataset, draft)


def _map_dataset(datasets: Mapping[str, Any], path: str, draft: _Draft) -> str | None:
    name = None
    for kind, args in datasets.items():
        key = f"{path}.{kind}"
        args = _mapping(args, key)
        if name is not None:
            draft.skip(key, f"not used (the training data is already {path}.{name})")
            continue
        if kind == "ImageFolder":
            name = "imagefolder"
            draft.set(key, "dataset.name", "imagefolder")
        elif kind == "CIFAR10":
            name = "cifar10"
            draft.set(key, "dataset.name", "cifar10")
        else:
            draft.skip(key, "no harness dataset reads it; choose dataset=digits|cifar10|imagefolder|fake")
            continue
        for arg, value in args.items():
            dotted = f"{key}.{arg}"
            if arg == "root":
                _map_root(_as_str(value, dotted), dotted, name, draft)
            elif name == "cifar10" and arg == "download":
                draft.set(dotted, "dataset.download", _as_bool(value, dotted))
            elif name == "cifar10" and arg == "train" and value is True:
                draft.note(dotted, "the harness's training split")
            elif name == "cifar10" and arg == "train":
                draft.skip(dotted, "not used (the harness trains on the official train set, less its val part)")
            else:
                draft.skip(dotted, "unknown LPOT dataset field; not used")
    return name


def _map_root(root: str, key: str, name: str, draft: _Draft) -> None:
    if name != "imagefolder":
        draft.set(key, "dataset.root", root)
        return
    path = PurePath(root)
    if path.name == "train":
        draft.set(key, "dataset.root", str(path.parent),
                  f"LPOT pointed at the train folder itself; the harness reads train/, val/ and an optional "
                  f"test/ under {path.parent}")
    else:
        draft.set(key, "dataset.root", root, f"the harness reads train/, val/ and an optional test/ under {root}")


def _map_transform(transforms: Mapping[str, Any], dataset: str | None, draft: _Draft) -> None:
    path = f"{DATALOADER}.transform"
    random = {"RandomResizedCrop", "RandomHorizontalFlip", "RandomCrop"} & set(transforms)
    for name, args in transforms.items():
        key = f"{path}.{name}"
        args = _mapping(args, key)
        if name in ("RandomResizedCrop", "CenterCrop") and dataset == "imagefolder":
            if name == "CenterCrop" and "RandomResizedCrop" in transforms:
                draft.skip(key, "not used (training images are cropped by RandomResizedCrop)")
                continue
            size = _square_size(args.get("size"), f"{key}.size")
            if size is None:
                draft.skip(f"{key}.size", f"{args.get('size')!r}: not used (the harness's images are square)")
            else:
                draft.set(f"{key}.size", "dataset.image_size", size)
            for arg in sorted(set(args) - {"size"}):
                draft.skip(f"{key}.{arg}", "not used (the harness's crops use torchvision's defaults)")
        elif name in ("RandomHorizontalFlip", "RandomCrop", "RandomResizedCrop"):
            continue  # the augment flag, below
        elif name == "ToTensor":
            draft.note(key, "the harness's transforms (it converts images to tensors)")
        elif name == "Normalize" and dataset == "imagefolder" and _close(args.get("mean"), IMAGENET_MEAN) \
                and _close(args.get("std"), IMAGENET_STD):
            draft.note(key, "the harness's transforms (it normalizes with the ImageNet mean and std)")
        elif name == "Normalize":
            draft.skip(key, "not used (the harness normalizes each dataset with its own statistics: "
                            "ImageNet's for imagefolder, CIFAR-10's for cifar10)")
        elif name == "Resize" and dataset == "imagefolder":
            draft.skip(key, "not used (the harness resizes evaluation images to dataset.image_size before its "
                            "center crop)")
        else:
            draft.skip(key, "not used (the harness's transforms are fixed per dataset)")
    if random and dataset in ("imagefolder", "cifar10"):
        crops = "RandomResizedCrop" if dataset == "imagefolder" else "RandomCrop(32, padding=4)"
        for name in sorted(random):
            if name == "RandomResizedCrop" and dataset != "imagefolder":
                draft.skip(f"{path}.{name}", "not used (cifar10 images stay 32x32)")
                continue
            draft.set(f"{path}.{name}", "dataset.augment", True,
                      f"the harness's augmentation: {crops} + RandomHorizontalFlip")
    elif random:
        for name in sorted(random):
            draft.skip(f"{path}.{name}", "not used (no augmentation for this dataset)")
    elif dataset in ("imagefolder", "cifar10"):
        draft.set(path, "dataset.augment", False, "no random transform")


def _square_size(size: Any, key: str) -> int | None:
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, list):
        return None
    return _as_int(size, key)


def _close(values: Any, expected: tuple[float, ...]) -> bool:
    return isinstance(values, list) and len(values) == len(expected) and all(
        isinstance(v, int | float) and math.isclose(v, e, abs_tol=1e-6) for v, e in zip(values, expected, strict=True))


# ---- tuning.accuracy_criterion -> goal -----------------------------------------------------------------


def _map_tuning(tuning: Any, draft: _Draft) -> None:
    if not isinstance(tuning, Mapping):
        draft.skip("tuning", "not used by pruning")
        return
    for key, value in tuning.items():
        if key != "accuracy_criterion":
            draft.skip(f"tuning.{key}", "not used by pruning (LPOT's quantization tuning)")
            continue
        for name, criterion in _mapping(value, "tuning.accuracy_criterion").items():
            dotted = f"tuning.accuracy_criterion.{name}"
            if name in ("relative", "absolute"):
                draft.set(dotted, "goal.criterion", name)
                draft.set(dotted, "goal.max_drop", _fraction(criterion, dotted))
            elif name == "higher_is_better" and criterion is True:
                draft.note(dotted, "the harness's goal (accuracy: higher is better)")
            else:
                draft.skip(dotted, "not used (the harness's goal is an accuracy drop, higher is better)")


def _fraction(value: Any, key: str) -> float:
    """LPOT accepted 0.01 or '1%'."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*%\s*", value):
        return float(value.strip().rstrip("%")) / 100
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}={value!r}: must be a number such as 0.01, or a percentage such as '1%'")
    return float(value)


# ---- small helpers ---------------------------------------------------------------------------------------


def _key(line: str) -> str:
    return line.partition(": ")[0]


def _fmt(value: Any) -> str:
    """A value as one would type it on the command line."""
    value = plain(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}={value!r}: must be a mapping")
    return value


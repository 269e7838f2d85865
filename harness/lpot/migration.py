"""An :class:`LpotDocument` -> harness config values (``prune``, ``train``, ``dataset``, ``goal``).

The command line (``lpot=conf.yaml``, :mod:`harness.lpot_config`) merges these values under its own
overrides; the Python API's YAML-only usage builds its data, optimizer and loss from the same
values (:func:`training_migration`), so both read ``pruning.train`` the same way. Each mapped LPOT
field gives one ``used`` line, each field not used one ``unmapped`` line with the reason.

Example::

    migration = migrate(read_lpot("conf.yaml"))
    migration.values["train"]["finetune_lr"]    # 0.1 for the seed document
    print(*migration.used, sep="\\n")            # pruning.train.optimizer.SGD.learning_rate -> train.finetune_lr=0.1
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from harness.config import TrainConfig, plain
from harness.lpot.document import (
    TRAIN,
    WEIGHT_COMPRESSION,
    LpotDocument,
    as_bool,
    as_int,
    as_mapping,
    as_str,
    training_epochs,
)
from harness.pruning.spec import PrunerSpec, PruningSpec

# The statistics the harness normalizes with (harness/data.py; not imported, it loads torch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATALOADER = f"{TRAIN}.dataloader"

# LPOT field -> harness field, for both the global fields and each pruner's (document.SPEC_FIELDS' targets).
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
        notices: one line per LPOT behaviour the harness changes on purpose.
        iteration: ``pruning.train.iteration`` (batches per epoch), for a loop that honours it.
        notice_keys: for a notice about one harness key or group (``"dataset"``), that key: a value
            given on the command line makes it moot.
    """

    values: dict[str, Any]
    used: list[str]
    unmapped: list[str]
    notices: list[str]
    iteration: int | None = None
    notice_keys: dict[str, str] = field(default_factory=dict)


@dataclass
class _Draft:
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    notice_keys: dict[str, str] = field(default_factory=dict)

    def notice(self, line: str, harness_key: str) -> None:
        self.notices.append(line)
        self.notice_keys[line] = harness_key

    def set(self, lpot_key: str, harness_key: str, value: Any, why: str = "") -> None:
        group, _, name = harness_key.partition(".")
        self.values.setdefault(group, {})[name] = value
        self.note(lpot_key, f"{harness_key}={_fmt(value)}", why)

    def note(self, lpot_key: str, target: str, why: str = "") -> None:
        self.used.append(f"{lpot_key} -> {target}" + (f" ({why})" if why else ""))

    def skip(self, lpot_key: str, reason: str) -> None:
        self.unmapped.append(f"{lpot_key}: {reason}")

    def done(self, iteration: int | None) -> LpotMigration:
        return LpotMigration(values=self.values, used=self.used, unmapped=self.unmapped,
                             notices=list(dict.fromkeys(self.notices)), iteration=iteration,
                             notice_keys=self.notice_keys)


def migrate(doc: LpotDocument) -> LpotMigration:
    """Map a whole LPOT document to harness config values (the command line's ``lpot=``).

    Raises:
        ValueError: what the command line cannot run, naming the LPOT key.
    """
    if doc.groups:
        group = doc.groups[0]
        raise ValueError(f"{WEIGHT_COMPRESSION}.pruners[{group.pruner}].parameters: structured "
                         "gradient_sensitivity counts groups per tensor, which needs the model's shapes: run it "
                         "from Python (from harness.lpot import Pruning)")
    draft = _training(doc)
    draft.unmapped += [line for line in doc.unmapped if not line.startswith("tuning")]
    _map_prune(doc, draft)
    if doc.tuning is not None:
        _map_tuning(doc.tuning, draft)
    return draft.done(None)


def training_migration(doc: LpotDocument) -> LpotMigration:
    """Only ``pruning.train`` (epochs, optimizer, loss, data): what a YAML-only run trains with."""
    return _training(doc).done(doc.train.iteration)


def _training(doc: LpotDocument) -> _Draft:
    draft = _Draft(notices=list(doc.notices))
    _map_epochs(doc, draft)
    if doc.train.iteration is not None:
        draft.set(doc.train.source["iteration"], "train.finetune_steps_per_epoch", doc.train.iteration,
                  "LPOT stopped each epoch after this many batches")
    _map_optimizer(doc, draft)
    _map_loss(doc, draft)
    if doc.train.dataloader is not None:
        _map_dataloader(doc.train.dataloader, draft)
    return draft


# ---- pruning ----------------------------------------------------------------------------------------


def _map_prune(doc: LpotDocument, draft: _Draft) -> None:
    """The spec's fields -> ``prune.*``; LPOT epochs renumbered from 0 when train.start_epoch > 0."""
    spec, shift = doc.spec, doc.train.start_epoch
    if shift:
        spec = _shifted(spec, shift)
        draft.note(f"{TRAIN}.start_epoch", f"prune epochs shifted by -{shift}",
                   f"LPOT numbered epochs from {shift}; the harness's fine-tuning epochs count from 0")
    draft.set("pruning", "prune.enabled", True, "the file has a pruning section")
    for lpot_key, name in _PRUNE_FIELDS.items():
        value = plain(getattr(spec, name))
        if lpot_key in doc.given:
            draft.set(f"{WEIGHT_COMPRESSION}.{lpot_key}", f"prune.{name}", value)
        elif lpot_key == "update_frequency" and "frequency" in doc.given:
            draft.set(f"{WEIGHT_COMPRESSION}.frequency", f"prune.{name}", value)
        elif lpot_key == "names":
            draft.set(f"{WEIGHT_COMPRESSION}.names", "prune.names", None,
                      "absent: every conv and linear weight, where LPOT took every 2-D and 4-D parameter")
        else:
            draft.set(f"{WEIGHT_COMPRESSION}.{lpot_key}", f"prune.{name}", value, "absent: LPOT 1.6's default")
    draft.set(WEIGHT_COMPRESSION, "prune.schedule", "linear", "LPOT's staircase")
    draft.set(f"{WEIGHT_COMPRESSION}.method" if "method" in doc.given else WEIGHT_COMPRESSION, "prune.scope",
              "per_tensor", "LPOT's per_tensor")
    draft.set(WEIGHT_COMPRESSION, "prune.pattern", plain(spec.pattern), "LPOT prunes single weights")
    draft.set(WEIGHT_COMPRESSION, "prune.update_frequency_steps", None, "updates are counted in epochs")
    pruners = []
    for i, pruner in enumerate(spec.pruners):
        pruners.append(_pruner_values(pruner))
        for lpot_key, name in [*_PRUNE_FIELDS.items(), ("method", "scope")]:
            value = getattr(pruner, name)
            key = f"{WEIGHT_COMPRESSION}.pruners[{i}].{lpot_key}"
            if f"pruners[{i}].{lpot_key}" in doc.given and value is not None:
                draft.note(key, f"prune.pruners[{i}].{name}={_fmt(value)}")
                if lpot_key == "prune_type" and pruner.pattern is not None:
                    draft.note(key, f"prune.pruners[{i}].pattern={_fmt(pruner.pattern)}")
            elif lpot_key == "names" and f"pruners[{i}].names" in doc.given:
                draft.note(key, f"prune.pruners[{i}].names inherits prune.names", "LPOT: an empty list is every weight")
    draft.values["prune"]["pruners"] = pruners


def _shifted(spec: PruningSpec, shift: int) -> PruningSpec:
    return dataclasses.replace(
        spec,
        start_epoch=max(0, spec.start_epoch - shift),
        end_epoch=max(0, spec.end_epoch - shift),
        pruners=[dataclasses.replace(
            p,
            start_epoch=None if p.start_epoch is None else max(0, p.start_epoch - shift),
            end_epoch=None if p.end_epoch is None else max(0, p.end_epoch - shift),
        ) for p in spec.pruners],
    )


def _pruner_values(pruner: PrunerSpec) -> dict[str, Any]:
    """A pruner's own fields (None inherits, so it is left out), as plain values."""
    return {f.name: plain(getattr(pruner, f.name)) for f in dataclasses.fields(pruner)
            if getattr(pruner, f.name) is not None}


# ---- train: epochs, optimizer, loss ---------------------------------------------------------------------


def _map_epochs(doc: LpotDocument, draft: _Draft) -> None:
    """``train.finetune_epochs`` = the epochs LPOT's loop ran, extended to the last prune end_epoch."""
    start, end, why = training_epochs(doc.spec, doc.train)
    key = doc.train.source.get("end_epoch", f"{TRAIN}.end_epoch")
    if doc.train.end_epoch is None and end - start <= TrainConfig().finetune_epochs:
        return  # the harness's default is long enough
    draft.set(key, "train.finetune_epochs", end - start, why)
    if "start_epoch" in doc.train.source and start == 0:
        draft.note(doc.train.source["start_epoch"], "train.finetune_epochs", "epochs numbered from 0, as in LPOT")
    if "extended" in why:
        draft.notice(f"{key}: {why}", "train.finetune_epochs")


def _map_optimizer(doc: LpotDocument, draft: _Draft) -> None:
    train = doc.train
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


def _map_loss(doc: LpotDocument, draft: _Draft) -> None:
    train = doc.train
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
            draft.set(dotted, "train.batch_size", as_int(value, dotted))
        elif key == "dataset":
            dataset = _map_dataset(as_mapping(value, dotted), dotted, draft)
        elif key == "transform":
            continue  # below, once the dataset is known
        elif key == "shuffle" and value is True:
            draft.note(dotted, "the harness's training loader (it shuffles)")
        elif key in ("shuffle", "last_batch", "filter"):
            draft.skip(dotted, "not used (the harness's training loader shuffles and keeps the last partial batch)")
        else:
            draft.skip(dotted, "unknown LPOT dataloader field; not used")
    if "transform" in dataloader:
        _map_transform(as_mapping(dataloader["transform"], f"{DATALOADER}.transform"), dataset, draft)


def _map_dataset(datasets: Mapping[str, Any], path: str, draft: _Draft) -> str | None:
    name = None
    for kind, args in datasets.items():
        key = f"{path}.{kind}"
        args = as_mapping(args, key)
        if name is not None:
            draft.skip(key, f"not used (the training data is already {path}.{name})")
            continue
        if kind == "dummy":
            name = "fake"
            _map_dummy(args, key, draft)
            continue
        if kind == "ImageFolder":
            name = "imagefolder"
        elif kind == "CIFAR10":
            name = "cifar10"
        else:
            draft.skip(key, "no harness dataset reads it; choose dataset=digits|cifar10|imagefolder|fake")
            continue
        draft.set(key, "dataset.name", name)
        for arg, value in args.items():
            dotted = f"{key}.{arg}"
            if arg == "root":
                _map_root(as_str(value, dotted), dotted, name, draft)
            elif name == "cifar10" and arg == "download":
                draft.set(dotted, "dataset.download", as_bool(value, dotted))
            elif name == "cifar10" and arg == "train" and value is True:
                draft.note(dotted, "the harness's training split")
            elif name == "cifar10" and arg == "train":
                draft.skip(dotted, "not used (the harness trains on the official train set, less its val part)")
            else:
                draft.skip(dotted, "unknown LPOT dataset field; not used")
    return name


def _map_dummy(args: Mapping[str, Any], key: str, draft: _Draft) -> None:
    """LPOT's ``dummy`` (random tensors of one shape) -> the harness's ``fake`` (random images)."""
    shape = args.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape)
            and shape[1] == 3 and shape[2] == shape[3]):
        raise ValueError(f"{key}.shape={shape!r}: the harness's fake dataset makes square RGB images: give "
                         "[samples, 3, size, size]")
    draft.set(key, "dataset.name", "fake", "random images, as LPOT's dummy dataset")
    draft.set(f"{key}.shape", "dataset.train_size", shape[0])
    draft.set(f"{key}.shape", "dataset.image_size", shape[2])
    draft.set(f"{key}.shape", "dataset.augment", False, "random images need no augmentation")
    for arg in sorted(set(args) - {"shape"}):
        draft.skip(f"{key}.{arg}", "not used (the fake dataset's pixels are in [0, 1] and its labels are random "
                                   "classes; LPOT's dummy labels were all 0)")
    draft.notice(f"{key}: the harness's fake dataset stands for LPOT's dummy one (random images in [0, 1] with "
                 "random labels; val and test are more of the same)", "dataset")


def _map_root(root: str, key: str, name: str, draft: _Draft) -> None:
    if name != "imagefolder":
        draft.set(key, "dataset.root", root)
        return
    path = PurePath(root)
    if path.name == "train":
        draft.set(key, "dataset.root", str(path.parent),
                  f"LPOT pointed at the train folder itself; the harness reads train/, val/ and an optional "
                  f"test/ under {path.parent}")
        draft.notice(f"{key}: the harness reads train/ under {path.parent} and val/ and test/ beside it, carving "
                     "them from train/ when absent, so it trains on fewer images than LPOT did", "dataset")
    else:
        draft.set(key, "dataset.root", root, f"the harness reads train/, val/ and an optional test/ under {root}")


def _map_transform(transforms: Mapping[str, Any], dataset: str | None, draft: _Draft) -> None:
    path = f"{DATALOADER}.transform"
    random = {"RandomResizedCrop", "RandomHorizontalFlip", "RandomCrop"} & set(transforms)
    for name, args in transforms.items():
        key = f"{path}.{name}"
        args = as_mapping(args, key)
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
    return as_int(size, key)


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
        for name, criterion in as_mapping(value, "tuning.accuracy_criterion").items():
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


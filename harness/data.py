"""Datasets and their train / val / test loaders (DESIGN.md section 5).

:func:`build_data` turns a :class:`~harness.config.DatasetConfig` into a :class:`DataBundle`.
Where the harness carves a split itself (digits; cifar10's val; imagefolder's test when there
is no ``test/`` folder), the split is stratified by label and uses the fixed ``SPLIT_SEED``,
so it is the same for every run and every training seed. A dataset that cannot be loaded as
configured raises :class:`~harness.errors.DataError` with a one-line message.

torchvision and scikit-learn are imported inside the functions that use them: together
they add seconds to the start-up of ``python -m harness``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset, TensorDataset

from harness.distributed import SINGLE, World
from harness.errors import DataError

if TYPE_CHECKING:
    from harness.config import DatasetConfig

# The splits belong to the dataset, not to the run: a constant seed keeps them identical
# across runs and across training seeds, so runs with different seeds are comparable.
SPLIT_SEED = 0

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Any], Any]


@dataclass(frozen=True)
class DataBundle:
    train: DataLoader  # shuffled by a generator seeded from `seed`
    val: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8) or (3, 32, 32)
    sizes: dict[str, int]  # {"train": n, "val": n, "test": n}
    description: str  # one line


@dataclass(frozen=True)
class _Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    note: str = ""  # appended to the description, e.g. where a split was carved from


class _TransformedSubset(Subset):
    """A Subset with its own transform, so that splits carved from one dataset can differ:
    the train part gets augmentation, the held-out part does not."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Transform) -> None:
        super().__init__(dataset, indices)
        self.transform = transform

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        image, label = self.dataset[self.indices[idx]]
        return self.transform(image), label

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        return [self[i] for i in indices]


class RankShard(Sampler[list[int]]):
    """This rank's part of each batch of ``batches``: with the same shuffle on every rank (the same
    generator seed), the ranks' parts of a step make up exactly the batch one process would train on,
    so a run on N processes takes the same steps, with the same pruning schedule, as on one.
    A last batch smaller than the number of ranks repeats samples, so that no rank has none."""

    def __init__(self, batches: BatchSampler, world: World) -> None:
        self.batches, self.world = batches, world

    def __iter__(self):
        for batch in self.batches:
            part = batch[self.world.rank::self.world.size]
            yield part or [batch[self.world.rank % len(batch)]]

    def __len__(self) -> int:
        return len(self.batches)


def build_data(cfg: DatasetConfig, batch_size: int, eval_batch_size: int, seed: int,
               world: World = SINGLE) -> DataBundle:
    """Load ``cfg.name`` and wrap its three splits in loaders; only the train order depends on ``seed``.
    On several processes (``world``), each rank loads its share: a part of every train batch
    (``batch_size`` stays the batch of one optimizer step over all ranks) and every N-th val/test sample
    (:func:`harness.training.evaluate` adds the ranks' counts up)."""
    builders = {"digits": _digits, "cifar10": _cifar10, "imagefolder": _imagefolder, "fake": _fake}
    splits = builders[cfg.name](cfg)
    common = {"num_workers": cfg.num_workers, "pin_memory": False, "persistent_workers": cfg.num_workers > 0}

    def loader(dataset: Dataset, size: int, shuffle: bool) -> DataLoader:
        if not shuffle:
            shard = dataset if not world.distributed else Subset(dataset, range(world.rank, len(dataset), world.size))
            return DataLoader(shard, batch_size=size, shuffle=False, drop_last=False, **common)
        generator = torch.Generator().manual_seed(seed)
        if not world.distributed:
            return DataLoader(dataset, batch_size=size, shuffle=True, generator=generator, drop_last=False, **common)
        batches = BatchSampler(RandomSampler(dataset, generator=generator), size, drop_last=False)
        return DataLoader(dataset, batch_sampler=RankShard(batches, world), generator=generator, **common)

    sizes = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    description = (f"{cfg.name}: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test, "
                   f"{splits.num_classes} classes{splits.note}")
    return DataBundle(
        train=loader(splits.train, batch_size, shuffle=True),
        val=loader(splits.val, eval_batch_size, shuffle=False),
        test=loader(splits.test, eval_batch_size, shuffle=False),
        num_classes=splits.num_classes,
        input_shape=splits.input_shape,
        sizes=sizes,
        description=description,
    )


def _carve(labels: Sequence[int], fraction: float, total: int, key: str,
           class_names: Sequence[str]) -> tuple[list[int], list[int]]:
    """Split positions 0..len(labels)-1 into (kept, held out), holding out ``round(fraction * total)``,
    stratified by label with the fixed split seed. ``key`` names the config key of ``fraction``."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    held = round(fraction * total)
    # The checks scikit-learn would make, as one-line errors that name the config key.
    for part, count in ((key.removesuffix("_fraction"), held), ("remaining", len(labels) - held)):
        if count < len(classes):
            raise DataError(
                f"dataset.{key}={fraction}: the {part} split would get {count} of {len(labels)} samples, "
                f"fewer than the {len(classes)} classes; a stratified split needs at least one per class")
    if counts.min() < 2:
        rare = class_names[classes[counts.argmin()]]
        raise DataError(f"dataset.{key}={fraction}: class {rare!r} has a single sample; "
                        f"a stratified split needs at least 2 per class")
    kept, out = train_test_split(np.arange(len(labels)), test_size=held, stratify=labels,
                                 random_state=SPLIT_SEED)
    return sorted(kept.tolist()), sorted(out.tolist())


def _require_root(cfg: DatasetConfig) -> Path:
    root = Path(cfg.root or "")
    if not root.is_dir():
        raise DataError(f"dataset.root={cfg.root}: no such folder (expected the folder holding the "
                        f"{cfg.name} data)")
    return root


# ---- digits ---------------------------------------------------------------------------------


def _digits(cfg: DatasetConfig) -> _Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.from_numpy(digits.target).long()
    names = [str(c) for c in digits.target_names]
    n = len(labels)

    rest, test = _carve(labels, cfg.test_fraction, n, "test_fraction", names)
    train_pos, val_pos = _carve(labels[rest], cfg.val_fraction, n, "val_fraction", names)
    train, val = [rest[i] for i in train_pos], [rest[i] for i in val_pos]

    # Statistics of the train split only, so nothing about val or test leaks into the inputs.
    mean, std = images[train].mean(), images[train].std()

    def split(idx: list[int]) -> TensorDataset:
        return TensorDataset((images[idx] - mean) / std, labels[idx])

    return _Splits(split(train), split(val), split(test), num_classes=len(names), input_shape=(1, 8, 8))


# ---- cifar10 --------------------------------------------------------------------------------


@functools.cache
def _local_cifar10_class() -> type:
    """CIFAR10 that accepts a copy whose files differ from the official ones, built on first use
    so that importing this module does not import torchvision."""
    import pickle

    from torchvision.datasets import CIFAR10

    class _LocalCIFAR10(CIFAR10):
        # torchvision checks the md5 of every file, which rejects a locally made subset or a test
        # fixture. Without download there is nothing to repair, so only check that the files exist.
        def __init__(self, root: str, train: bool, download: bool) -> None:
            self._verify_md5 = download  # read by _check_integrity, which the parent's __init__ calls
            super().__init__(root, train=train, download=download)

        def _check_integrity(self) -> bool:
            if self._verify_md5:
                return super()._check_integrity()
            folder = Path(self.root, self.base_folder)
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            # The parent checks the meta file's md5 too, outside _check_integrity.
            if self._verify_md5:
                return super()._load_meta()
            with open(Path(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    # Found by pickle (DataLoader workers under spawn) through the module __getattr__ below.
    _LocalCIFAR10.__qualname__ = "_LocalCIFAR10"
    return _LocalCIFAR10


def __getattr__(name: str) -> Any:
    if name == "_LocalCIFAR10":
        return _local_cifar10_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cifar10(cfg: DatasetConfig) -> _Splits:
    import pickle

    from torchvision import transforms as T

    root = Path(cfg.root or "") if cfg.download else _require_root(cfg)
    cifar = _local_cifar10_class()
    if not cfg.download:
        _check_cifar_files(cfg, root / cifar.base_folder, cifar)
    try:
        full_train = cifar(str(root), train=True, download=cfg.download)
        test_base = cifar(str(root), train=False, download=False)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        detail = " ".join(str(err).split())
        raise DataError(f"dataset.root={cfg.root}: cannot load CIFAR-10 from {root / cifar.base_folder} "
                        f"({type(err).__name__}: {detail})") from err

    normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if cfg.augment else []
    train_idx, val_idx = _carve(full_train.targets, cfg.val_fraction, len(full_train), "val_fraction",
                                full_train.classes)
    test_base.transform = T.Compose(normalize)
    return _Splits(
        train=_TransformedSubset(full_train, train_idx, T.Compose(augment + normalize)),
        val=_TransformedSubset(full_train, val_idx, T.Compose(normalize)),
        test=test_base,
        num_classes=len(full_train.classes),
        input_shape=(3, 32, 32),
        note=" (val carved from the official train set)",
    )


def _check_cifar_files(cfg: DatasetConfig, folder: Path, cifar: Any) -> None:
    names = [name for name, _ in cifar.train_list + cifar.test_list] + [cifar.meta["filename"]]
    missing = [name for name in names if not (folder / name).is_file()]
    if len(missing) == len(names):
        raise DataError(f"dataset.root={cfg.root}: no CIFAR-10 batches in {folder}; "
                        f"put the python version there or set dataset.download=true")
    if missing:
        raise DataError(f"dataset.root={cfg.root}: {folder} lacks {', '.join(missing)}; "
                        f"put the complete python version there or set dataset.download=true")


# ---- imagefolder ----------------------------------------------------------------------------


def _load_image(root: str | None, path: str) -> Any:
    """ImageFolder's loader (RGB PIL image) with a DataError naming the file that cannot be decoded."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError) as err:
        detail = " ".join(str(err).split())
        raise DataError(f"dataset.root={root}: cannot decode image {path} ({detail})") from err


def _image_folder(cfg: DatasetConfig, split: str, transform: Transform | None) -> Any:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root or "", split)
    if not folder.is_dir():
        raise DataError(f"dataset.root={cfg.root}: {folder} is missing "
                        f"(expected {split}/<class>/<image>)")
    no_images = f"dataset.root={cfg.root}: {folder} has no image files (expected {split}/<class>/<image>)"
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        raise DataError(no_images)
    # allow_empty: report empty class folders ourselves, in one line.
    dataset = ImageFolder(str(folder), transform=transform, loader=functools.partial(_load_image, cfg.root),
                          allow_empty=True)
    if not dataset.samples:
        raise DataError(no_images)
    first: dict[int, str] = {}
    for path, label in dataset.samples:
        first.setdefault(label, path)
    empty = [name for i, name in enumerate(dataset.classes) if i not in first]
    if empty:
        raise DataError(f"dataset.root={cfg.root}: class folders without image files in {folder}: "
                        f"{', '.join(empty)}")
    # Decoding every file up front is slow for big sets: check one per class now; the loader
    # reports any other bad file when it is met.
    for path in first.values():
        dataset.loader(path)
    return dataset


def _imagefolder(cfg: DatasetConfig) -> _Splits:
    from torchvision import transforms as T

    root = _require_root(cfg)
    size = cfg.image_size
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    eval_tf = T.Compose([T.Resize(size), T.CenterCrop(size), *normalize])
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize]) \
        if cfg.augment else eval_tf

    # root/train, root/val, root/test; a split folder that is absent is carved from train, and a
    # root that holds class folders directly (LPOT pointed at the train folder) is the train set.
    has_train = (root / "train").is_dir()
    if not has_train and not any(entry.is_dir() for entry in os.scandir(root)):
        raise DataError(f"dataset.root={cfg.root}: {root / 'train'} is missing "
                        "(expected train/<class>/<image>, optional val/ and test/, or <class>/<image>)")
    has_val, has_test = has_train and (root / "val").is_dir(), has_train and (root / "test").is_dir()
    carving = not (has_val and has_test)
    # When carving, the train folder is loaded untransformed and each part gets its own transform.
    train = _image_folder(cfg, "train" if has_train else ".", None if carving else train_tf)
    classes, notes = train.classes, []
    held_out = {}
    for split, present in (("val", has_val), ("test", has_test)):
        if present:
            held_out[split] = _image_folder(cfg, split, eval_tf)
            _check_same_classes(cfg, train, held_out[split], split)
    keep = list(range(len(train)))
    for split in ("test", "val"):
        if split in held_out:
            continue
        labels = [train.targets[i] for i in keep]
        kept, out = _carve(labels, getattr(cfg, f"{split}_fraction"), len(train), f"{split}_fraction", classes)
        held_out[split] = _TransformedSubset(train, [keep[i] for i in out], eval_tf)
        keep = [keep[i] for i in kept]
        notes.append(split)
    if carving:
        train = _TransformedSubset(train, keep, train_tf)
    note = f" ({' and '.join(reversed(notes))} carved from train)" if notes else ""
    return _Splits(train, held_out["val"], held_out["test"], num_classes=len(classes),
                   input_shape=(3, size, size), note=note)


def _check_same_classes(cfg: DatasetConfig, train: Any, other: Any, split: str) -> None:
    if other.classes == train.classes:
        return
    only_train = sorted(set(train.classes) - set(other.classes))
    only_other = sorted(set(other.classes) - set(train.classes))
    raise DataError(f"dataset.root={cfg.root}: {split}/ must hold the same class folders as train/; "
                    f"only in {train.root}: {only_train or 'none'}; "
                    f"only in {other.root}: {only_other or 'none'}")


# ---- fake -----------------------------------------------------------------------------------


def _fake(cfg: DatasetConfig) -> _Splits:
    from torchvision import transforms as T
    from torchvision.datasets import FakeData

    shape = (3, cfg.image_size, cfg.image_size)

    def split(size: int, offset: int) -> Dataset:
        return FakeData(size=size, image_size=shape, num_classes=cfg.num_classes, transform=T.ToTensor(),
                        random_offset=offset)

    # FakeData seeds image i with i + random_offset: offsets past the previous split keep the
    # three splits apart, and fixed offsets keep them the same for every training seed.
    return _Splits(
        train=split(cfg.train_size, 0),
        val=split(cfg.eval_size, cfg.train_size),
        test=split(cfg.eval_size, cfg.train_size + cfg.eval_size),
        num_classes=cfg.num_classes,
        input_shape=shape,
    )

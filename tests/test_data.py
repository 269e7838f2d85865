"""harness.data on real files: sklearn's digits, a tiny CIFAR-10 copy, PNG folders, FakeData."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import DatasetConfig
from harness.data import DataBundle, build_data
from harness.errors import DataError


def _build(cfg: DatasetConfig, seed: int = 0, batch_size: int = 64) -> DataBundle:
    return build_data(cfg, batch_size=batch_size, eval_batch_size=128, seed=seed)


def _all(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def _assert_one_line(err: pytest.ExceptionInfo[DataError], *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# ---- digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return _build(DatasetConfig(name="digits"))


def test_digits_sizes_shape_and_classes(digits: DataBundle) -> None:
    assert digits.sizes == {"train": 1257, "val": 270, "test": 270}
    assert sum(digits.sizes.values()) == 1797
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.description == "digits: 1257 train / 270 val / 270 test, 10 classes"
    for loader in (digits.train, digits.val, digits.test):
        x, y = _all(loader)
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (1, 8, 8)
        assert set(y.tolist()) == set(range(10))  # stratified: every class in every split


def test_digits_standardized_on_train(digits: DataBundle) -> None:
    x, _ = _all(digits.train)
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std().item() - 1) < 1e-3


def test_digits_splits_disjoint_and_fixed_across_seeds(digits: DataBundle) -> None:
    rows = {name: _rows(_all(getattr(digits, name))[0]) for name in ("train", "val", "test")}
    assert len(rows["train"]) + len(rows["val"]) + len(rows["test"]) == 1797  # raw rows are unique
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]

    other = _build(DatasetConfig(name="digits"), seed=123)
    for name in ("train", "val", "test"):
        assert _rows(_all(getattr(other, name))[0]) == rows[name]
    # Eval loaders are not shuffled: same order, whatever the seed.
    assert torch.equal(_all(other.val)[0], _all(digits.val)[0])


def test_digits_train_order_follows_seed() -> None:
    cfg = DatasetConfig(name="digits")
    first = [y for _, y in _build(cfg, seed=7).train]
    again = [y for _, y in _build(cfg, seed=7).train]
    other = [y for _, y in _build(cfg, seed=8).train]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert len(first) == -(-1257 // 64)  # drop_last=False


def test_digits_split_too_small_for_stratification() -> None:
    with pytest.raises(DataError) as err:
        _build(DatasetConfig(name="digits", test_fraction=0.003))
    _assert_one_line(err, "dataset.test_fraction=0.003", "10 classes")


# ---- cifar10 --------------------------------------------------------------------------------

PER_CLASS = 10  # images per class in every batch file


def _write_cifar(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 10 * PER_CLASS
    # torchvision unpickles with encoding="latin1": the real files are Python 2 pickles whose str
    # keys come back as str, so a Python 3 fixture uses str keys as well.
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def test_cifar10_local_copy(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    bundle = _build(DatasetConfig(name="cifar10", root=str(tmp_path), val_fraction=0.1, augment=True))
    assert bundle.sizes == {"train": 450, "val": 50, "test": 100}
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    train_idx, val_idx = bundle.train.dataset.indices, bundle.val.dataset.indices
    assert not set(train_idx) & set(val_idx)
    assert set(train_idx) | set(val_idx) == set(range(500))
    x, y = next(iter(bundle.val))
    assert tuple(x.shape[1:]) == (3, 32, 32) and len(set(y.tolist())) == 10
    # The val part is not augmented: the same image twice gives the same tensor.
    assert torch.equal(bundle.val.dataset[0][0], bundle.val.dataset[0][0])
    assert tuple(next(iter(bundle.test))[0].shape[1:]) == (3, 32, 32)
    # DataLoader workers started with spawn or forkserver receive the dataset pickled.
    assert len(pickle.loads(pickle.dumps(bundle.train.dataset))) == 450


def test_cifar10_missing_batches(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _build(DatasetConfig(name="cifar10", root=str(tmp_path)))
    _assert_one_line(err, f"dataset.root={tmp_path}", "no CIFAR-10 batches", "dataset.download=true")


def test_cifar10_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _build(DatasetConfig(name="cifar10", root=str(tmp_path / "nope")))
    _assert_one_line(err, f"dataset.root={tmp_path / 'nope'}")


def test_cifar10_incomplete_copy(tmp_path: Path) -> None:
    (_write_cifar(tmp_path) / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        _build(DatasetConfig(name="cifar10", root=str(tmp_path)))
    _assert_one_line(err, "dataset.root=", "data_batch_3")


# ---- imagefolder ----------------------------------------------------------------------------

CLASSES = ("cat", "dog", "fox")


def _write_images(root: Path, split: str, per_class: int, classes: tuple[str, ...] = CLASSES) -> None:
    rng = np.random.default_rng(len(split))
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            size = (12 + 3 * i, 20 - c)  # sizes differ within and across classes
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            mode_image = Image.fromarray(pixels)
            if i % 2:
                mode_image = mode_image.convert("L")  # converted back to RGB by the loader
            mode_image.save(root / split / name / f"{i}.png")


def _folder_cfg(root: Path, **overrides: object) -> DatasetConfig:
    return DatasetConfig(name="imagefolder", root=str(root), image_size=16, **overrides)


@pytest.mark.parametrize("augment", [False, True])
def test_imagefolder_three_folders(tmp_path: Path, augment: bool) -> None:
    _write_images(tmp_path, "train", 6)
    _write_images(tmp_path, "val", 2)
    _write_images(tmp_path, "test", 3)
    bundle = _build(_folder_cfg(tmp_path, augment=augment), batch_size=4)
    assert bundle.sizes == {"train": 18, "val": 6, "test": 9}
    assert bundle.num_classes == 3 and bundle.input_shape == (3, 16, 16)
    assert bundle.val.dataset.classes == list(CLASSES)
    for loader in (bundle.train, bundle.val, bundle.test):
        x, y = _all(loader)
        assert tuple(x.shape[1:]) == (3, 16, 16) and set(y.tolist()) == {0, 1, 2}


def test_imagefolder_test_carved_from_train(tmp_path: Path) -> None:
    _write_images(tmp_path, "train", 10)
    _write_images(tmp_path, "val", 2)
    bundle = _build(_folder_cfg(tmp_path, test_fraction=0.2, augment=True))
    assert bundle.sizes == {"train": 24, "val": 6, "test": 6}
    assert "test carved from train" in bundle.description
    train_idx, test_idx = bundle.train.dataset.indices, bundle.test.dataset.indices
    assert not set(train_idx) & set(test_idx)
    x, y = _all(bundle.test)
    assert tuple(x.shape[1:]) == (3, 16, 16) and set(y.tolist()) == {0, 1, 2}
    # The carved test part uses the eval transform, not the training augmentation.
    assert torch.equal(bundle.test.dataset[0][0], bundle.test.dataset[0][0])


@pytest.mark.parametrize("layout", ["train_only", "class_folders_at_root"])
def test_imagefolder_without_val_carves_val_and_test_from_train(tmp_path: Path, layout: str) -> None:
    # LPOT pointed ImageFolder at the train folder itself; a root of class folders is the train set.
    _write_images(tmp_path, "train", 10)
    root = tmp_path if layout == "train_only" else tmp_path / "train"
    bundle = _build(_folder_cfg(root, val_fraction=0.2, test_fraction=0.2))
    assert bundle.sizes == {"train": 18, "val": 6, "test": 6}
    assert "val and test carved from train" in bundle.description
    parts = [set(loader.dataset.indices) for loader in (bundle.train, bundle.val, bundle.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    for loader in (bundle.val, bundle.test):
        assert set(_all(loader)[1].tolist()) == {0, 1, 2}  # stratified


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _build(_folder_cfg(tmp_path / "nope"))
    _assert_one_line(err, f"dataset.root={tmp_path / 'nope'}")


@pytest.mark.parametrize("with_class_folder", [False, True])
def test_imagefolder_empty_train(tmp_path: Path, with_class_folder: bool) -> None:
    (tmp_path / "train").mkdir()
    if with_class_folder:
        (tmp_path / "train" / "cat").mkdir()
        (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _write_images(tmp_path, "val", 1)
    with pytest.raises(DataError) as err:
        _build(_folder_cfg(tmp_path))
    _assert_one_line(err, f"dataset.root={tmp_path}: {tmp_path / 'train'} has no image files")


def test_imagefolder_empty_class_folder(tmp_path: Path) -> None:
    _write_images(tmp_path, "train", 2)
    (tmp_path / "train" / "emu").mkdir()
    _write_images(tmp_path, "val", 1)
    with pytest.raises(DataError) as err:
        _build(_folder_cfg(tmp_path))
    _assert_one_line(err, f"dataset.root={tmp_path}", "emu")


def test_imagefolder_classes_differ(tmp_path: Path) -> None:
    _write_images(tmp_path, "train", 2)
    _write_images(tmp_path, "val", 1, classes=("cat", "dog", "owl"))
    with pytest.raises(DataError) as err:
        _build(_folder_cfg(tmp_path))
    _assert_one_line(err, f"dataset.root={tmp_path}", "fox", "owl", str(tmp_path / "val"))


def _corrupt(tmp_path: Path, name: str) -> Path:
    _write_images(tmp_path, "train", 4)
    _write_images(tmp_path, "val", 1)
    _write_images(tmp_path, "test", 1)
    bad = tmp_path / "train" / "dog" / name
    bad.write_bytes(b"this is not a png\x00\x01\x02" * 10)
    return bad


def test_imagefolder_corrupt_image_found_at_build(tmp_path: Path) -> None:
    bad = _corrupt(tmp_path, "0.png")  # the first image of its class: decoded while building
    with pytest.raises(DataError) as err:
        _build(_folder_cfg(tmp_path))
    _assert_one_line(err, f"dataset.root={tmp_path}", "cannot decode image", str(bad))


def test_imagefolder_corrupt_image_met_while_loading(tmp_path: Path) -> None:
    bad = _corrupt(tmp_path, "9.png")  # not the first of its class: found when the loader reads it
    bundle = _build(_folder_cfg(tmp_path))
    with pytest.raises(DataError) as err:
        _all(bundle.train)
    _assert_one_line(err, f"dataset.root={tmp_path}", "cannot decode image", str(bad))


# ---- fake -----------------------------------------------------------------------------------


def test_fake_sizes_and_shapes() -> None:
    cfg = DatasetConfig(name="fake", image_size=8, train_size=20, eval_size=6, num_classes=4)
    bundle = _build(cfg, batch_size=8)
    assert bundle.sizes == {"train": 20, "val": 6, "test": 6}
    assert bundle.num_classes == 4 and bundle.input_shape == (3, 8, 8)
    splits = {name: _all(getattr(bundle, name)) for name in ("train", "val", "test")}
    for x, y in splits.values():
        assert tuple(x.shape[1:]) == (3, 8, 8) and y.max() < 4
    assert not _rows(splits["val"][0]) & _rows(splits["test"][0])
    again = _build(cfg, seed=5)
    assert torch.equal(_all(again.val)[0], splits["val"][0])

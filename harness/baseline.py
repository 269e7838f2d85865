"""The dense baseline: trained once per (data, model, training, seed) and cached under outputs/.

The cache key is a hash of every config value that changes the trained weights (and the
checkpoint file's bytes when one seeds the model); anything else, such as the pruning
fields or the fine-tuning epochs, reuses the same baseline. A file lock makes concurrent
runs with the same key (a sweep's parallel trials) train it once and share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import distributed
from harness.caches import file_digest, set_aside
from harness.config import Config
from harness.locking import file_lock

log = logging.getLogger(__name__)

# TrainConfig fields that do not change the dense weights.
_NOT_IN_KEY = {"finetune_epochs", "finetune_lr", "finetune_seed", "finetune_steps_per_epoch", "distill_weight",
               "distill_temperature", "device", "eval_batch_size"}
_CACHE_VERSION = 1  # bump when the training code changes what a key produces


@dataclass(frozen=True)
class Baseline:
    key: str
    val_accuracy: float
    test_accuracy: float
    reused: bool
    path: Path


def baseline_key(cfg: Config) -> str:
    """A short hash of everything that determines the dense weights."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in _NOT_IN_KEY}
    model = asdict(cfg.model)
    if cfg.model.checkpoint:
        model["checkpoint"] = file_digest(Path(cfg.model.checkpoint))
    dataset = asdict(cfg.dataset)
    dataset.pop("num_workers")
    payload = {"v": _CACHE_VERSION, "dataset": dataset, "model": model, "train": train, "seed": cfg.seed}
    text = json.dumps(payload, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


INTERRUPTED = "interrupted.pt"  # the loop state of a dense training that was interrupted; resumed next time


def load_or_train(
    cfg: Config,
    model: nn.Module,
    train: Callable[[nn.Module, Path], tuple[float, float]],
    cache_root: Path,
    world: distributed.World = distributed.SINGLE,
) -> Baseline:
    """Load the cached baseline into ``model``, or run ``train(model, checkpoint)`` and cache the result.

    ``train`` trains ``model`` in place and returns its (val, test) accuracy; ``checkpoint`` is where it
    keeps, and resumes from, the state of an interrupted training. A damaged cache entry is set aside
    and trained again, never loaded. On several processes (``world``), rank 0 alone takes the lock,
    checks and writes the cache; the others follow its answer (they load the entry it checked, or train
    with it).
    """
    key = baseline_key(cfg)
    folder = cache_root / key
    weights, meta = folder / "model.pt", folder / "meta.json"
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    # a second run with this key waits here, then loads; ranks other than 0 never take the lock (rank 0
    # holds it while they train with it)
    with file_lock(folder / ".lock") if world.is_main else contextlib.nullcontext():
        cached = _load_cached(key, folder, model) if world.is_main and weights.exists() and meta.exists() else None
        cached = distributed.broadcast(cached, world)
        if cached is not None:
            if not world.is_main:
                model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return cached
        val_accuracy, test_accuracy = train(model, folder / INTERRUPTED)
        if world.is_main:
            _atomic_save(model.state_dict(), weights)
            info = {"val_accuracy": val_accuracy, "test_accuracy": test_accuracy, "key": key,
                    "sha256": file_digest(weights),
                    "config": {"dataset": asdict(cfg.dataset), "model": asdict(cfg.model),
                               "train": asdict(cfg.train), "seed": cfg.seed}}
            _atomic_write(meta, json.dumps(info, indent=2, default=_jsonable))
    return Baseline(key, val_accuracy, test_accuracy, False, folder)


def _load_cached(key: str, folder: Path, model: nn.Module) -> Baseline | None:
    """The cached baseline loaded into ``model``; None, with the entry set aside, when it is damaged."""
    weights, meta = folder / "model.pt", folder / "meta.json"
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        info = json.loads(meta.read_text())
        if "sha256" in info and file_digest(weights) != info["sha256"]:  # entries before checksums: load check
            raise ValueError("model.pt does not match the checksum in meta.json")
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return Baseline(key, float(info["val_accuracy"]), float(info["test_accuracy"]), True, folder)
    except Exception as err:  # whatever fails to read our own cache means it is damaged
        model.load_state_dict(initial)  # a half-loaded model would train from other weights than its seed's
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
        for path in (weights, meta):
            set_aside(path, reason)
        return None


def _atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot hash config value {value!r}")

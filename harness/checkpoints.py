"""Checkpoints of interrupted runs: written on SIGINT/SIGTERM during fine-tuning, read by
``python -m harness resume=<run dir, checkpoint file or MLflow run id>``; and the loop state of an
interrupted dense baseline's training, which the next run with that baseline resumes.

A checkpoint holds the composed config, the training loop's state (model, optimizer,
learning-rate schedule, data order, random states), the pruning engine's state (masks,
schedule position, running scores), the mask updates so far and the MLflow run to continue.
It is the harness's own file: it is loaded with ``weights_only=False`` (random states are
not tensors), so load only checkpoints you wrote.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from harness import distributed
from harness.caches import set_aside
from harness.config import Config, TrackingBackend, config_dict
from harness.errors import ConfigError
from harness.pruning import MaskUpdate
from harness.tracking import tracking_uri
from harness.training import EpochResult, LoopState

log = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"
_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: Config
    loop: LoopState
    pruning: dict[str, Any]
    updates: list[MaskUpdate]
    run_id: str | None


def save(run_dir: Path, cfg: Config, loop: LoopState, pruning: dict[str, Any], updates: list[MaskUpdate],
         run_id: str | None, world_size: int = 1) -> Path:
    return _atomic_save(run_dir / FILENAME, {"version": _VERSION, "config": config_dict(cfg), "loop": asdict(loop),
                                             "pruning": pruning, "updates": [asdict(u) for u in updates],
                                             "run_id": run_id, "world_size": world_size})


def save_loop(path: Path, loop: LoopState) -> Path:
    """The state of an interrupted dense training (no engine, no MLflow run: the next run resumes it)."""
    return _atomic_save(path, {"version": _VERSION, "loop": asdict(loop)})


def load_loop(path: Path) -> LoopState | None:
    """The loop state :func:`save_loop` wrote; None, with the file set aside, when it is damaged."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(raw, dict) or raw.get("version") != _VERSION:
            raise ValueError("not a loop state of this version")
        return _loop(raw["loop"])
    except Exception as err:  # whatever fails to read our own file means it is damaged
        set_aside(path, f"{type(err).__name__}: {err}"[:200])
        return None


def _atomic_save(path: Path, payload: dict[str, Any]) -> Path:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint
    return path


def _loop(raw: dict[str, Any]) -> LoopState:
    loop = dict(raw)
    loop["history"] = [EpochResult(**h) for h in loop["history"]]
    return LoopState(**loop)


def load(where: str, cfg: Config) -> Checkpoint:
    """Find and read the checkpoint of a run dir, a checkpoint file, or an MLflow run id."""
    path = _locate(where, cfg)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"resume={where}: {path} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(raw, dict) or raw.get("version") != _VERSION:
        raise ConfigError(f"resume={where}: {path} is not a harness checkpoint")
    config: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw["config"]))
    saved_by, now = raw.get("world_size", 1), distributed.from_env().size
    if saved_by != now:  # the loop's state is the whole batch's (harness.data.RankShard): it continues exactly
        log.info("resume: the checkpoint was written by a run on %d process(es), resumed on %d; batch_size is per "
                 "step over all processes, so the steps are the same", saved_by, now)
    return Checkpoint(path, config, _loop(raw["loop"]), raw["pruning"],
                      [MaskUpdate(**u) for u in raw["updates"]], raw["run_id"])


def _locate(where: str, cfg: Config) -> Path:
    candidate = Path(where)
    if candidate.is_dir():
        candidate = candidate / FILENAME
    if candidate.is_file():
        return candidate
    if not candidate.suffix and "/" not in where and cfg.tracking.backend == TrackingBackend.mlflow:
        path = _from_mlflow_run(where, cfg)
        if path is not None:
            return path
    raise ConfigError(f"resume={where}: no checkpoint there (expected a run dir holding {FILENAME}, the file, "
                      "or the MLflow run id of an interrupted run)")


def _from_mlflow_run(run_id: str, cfg: Config) -> Path | None:
    from mlflow.tracking import MlflowClient  # seconds to import; only when resuming by run id

    try:
        run = MlflowClient(tracking_uri=tracking_uri(cfg.tracking, Path(cfg.outputs_dir))).get_run(run_id)
    except Exception:  # not a run id of this store
        return None
    path = run.data.tags.get("harness.checkpoint")
    return Path(path) if path and Path(path).is_file() else None

"""What every task of one experiment starts from: the data, the model on its device, the
tracked run and the dense baseline (trained once, then loaded from its cache).

The runner (prune and judge) and the sensitivity analysis both begin with these steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import checkpoints
from harness import metrics as m
from harness.baseline import Baseline, load_or_train
from harness.config import Config, config_dict
from harness.data import DataBundle, build_data
from harness.errors import ConfigError, Interrupted
from harness.goal import Verdict
from harness.models import build_model
from harness.tracking import Tracker, finished_or_failed, flatten, make_tracker
from harness.training import evaluate, fit, resolve_device, seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    metrics: dict[str, float]  # the summary metrics, as logged
    verdict: Verdict | None  # None when nothing was pruned
    run_id: str | None
    output_dir: Path

    def summary(self) -> dict[str, float]:
        """The metrics plus ``goal/excess_drop`` (the drop beyond the allowed one; <= 0 meets the goal)."""
        excess = {m.GOAL_EXCESS_DROP: self.verdict.drop - self.verdict.max_drop} if self.verdict else {}
        return self.metrics | excess


@dataclass
class Experiment:
    cfg: Config
    data: DataBundle
    model: nn.Module  # on ``device``; holds the dense baseline's weights once :func:`dense_baseline` ran
    device: torch.device
    outputs: Path  # caches and stores (``outputs_dir``)


def prepare(cfg: Config) -> Experiment:
    """The data splits and the freshly initialised model (its weights follow ``seed``)."""
    outputs = _writable(Path(cfg.outputs_dir))  # before any work: caches and stores go there
    device = resolve_device(cfg.train.device)
    data = build_data(cfg.dataset, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    log.info("data: %s", data.description)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    return Experiment(cfg, data, model, device, outputs)


@contextlib.contextmanager
def tracked_run(exp: Experiment, output_dir: Path, trial: Any = None,
                resume: checkpoints.Checkpoint | None = None) -> Iterator[Tracker]:
    """The tracked run (a new one, or the interrupted run ``resume`` continues), with the config as
    params, ended FINISHED, FAILED or KILLED with the block (:func:`finished_or_failed`).

    ``trial`` (a sweep's :class:`~harness.sweep.trial.TrialLink`) adds its tags and hears the run id; what a
    tracking server that went away never got is kept under ``output_dir``.
    """
    cfg = exp.cfg
    tags = run_tags(cfg) | (trial.tags() if trial else {})
    tracker = make_tracker(cfg.tracking, exp.outputs, run_name=run_name(cfg), tags=tags,
                           resume_run_id=resume.run_id if resume else None, spool_dir=output_dir)
    with finished_or_failed(tracker):
        if trial:
            trial.on_run_started(tracker.run_id)
        tracker.log_params(flatten(config_dict(cfg)))
        yield tracker


def dense_baseline(exp: Experiment, tracker: Tracker, trial: Any = None) -> Baseline:
    """Load the cached dense baseline into ``exp.model``, or train it and cache it."""
    cfg = exp.cfg

    def train_dense(model: nn.Module, checkpoint: Path) -> tuple[float, float]:
        tracker.flush()  # the params, in the MLflow UI during a long phase without metrics
        resume = checkpoints.load_loop(checkpoint) if checkpoint.exists() else None
        if resume is None:
            log.info("training the dense baseline (%d epochs)", cfg.train.epochs)
        else:
            log.info("training the dense baseline (%d epochs), resumed from %s at epoch %d, step %d",
                     cfg.train.epochs, checkpoint, resume.epoch, resume.step)
        try:
            fit(model, exp.data.train, exp.data.val, cfg.train, epochs=cfg.train.epochs, lr=cfg.train.lr,
                device=exp.device, desc="dense", resume=resume)
        except Interrupted as stop:
            stop.checkpoint = checkpoints.save_loop(checkpoint, stop.state)
            stop.how_to_continue = (f"the dense baseline's training was saved in {checkpoint} and resumes when "
                                    "a run needs this baseline again (the same command)")
            raise
        checkpoint.unlink(missing_ok=True)
        return evaluate(model, exp.data.val, exp.device), evaluate(model, exp.data.test, exp.device)

    baseline = load_or_train(cfg, exp.model, train_dense, exp.outputs / "baselines")
    exp.model.to(exp.device)
    log.info(baseline_note(baseline))
    if trial:
        trial.on_baseline(baseline.val_accuracy)
    return baseline


def baseline_note(baseline: Baseline) -> str:
    how = "reused from cache, no dense epochs run" if baseline.reused else "trained and cached"
    return f"dense baseline {baseline.key}: {how} ({baseline.path})"


def baseline_metrics(baseline: Baseline) -> dict[str, float]:
    return {m.BASELINE_ACCURACY: baseline.val_accuracy, m.BASELINE_TEST_ACCURACY: baseline.test_accuracy}


def run_name(cfg: Config) -> str:
    model = cfg.model.name
    if not cfg.prune.enabled:
        return f"dense-{model}-{cfg.dataset.name}"
    p = cfg.prune
    return f"{p.pattern.value}-{p.criterion.value}-{p.target_sparsity:g}-{model}-{cfg.dataset.name}"


def run_tags(cfg: Config) -> dict[str, str]:
    p = cfg.prune
    return {"harness.dataset": cfg.dataset.name, "harness.model": cfg.model.name,
            "harness.pattern": p.pattern.value if p.enabled else "dense",
            "harness.criterion": p.criterion.value if p.enabled else "dense"}


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"outputs_dir={folder}: not a writable folder ({err.strerror})") from None
    return folder

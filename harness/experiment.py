"""What every task of one experiment starts from: the data, the model on its device, the
tracked run and the dense baseline (trained once, then loaded from its cache).

The runner (prune and judge) and the sensitivity analysis both begin with these steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import checkpoints, distributed
from harness import metrics as m
from harness.baseline import Baseline, load_or_train
from harness.config import Config, config_dict
from harness.data import DataBundle, build_data
from harness.errors import ConfigError, Interrupted
from harness.goal import Verdict
from harness.models import build_model
from harness.pruning import TensorSparsity
from harness.report import shape_text
from harness.tracking import (
    NOTE_TAG,
    RUN_COLOR_TAG,
    TRIAL_PALETTE,
    Tracker,
    finished_or_failed,
    flatten,
    make_tracker,
    ui_run_page,
)
from harness.training import evaluate, fit, resolve_device, seed_everything

log = logging.getLogger(__name__)

_MAX_NOTE_ROWS = 60  # tensors listed in a run's description; all of them are in sparsity_report.csv
_MAX_NOTE_CHARS = 20000


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
    world: distributed.World = distributed.SINGLE  # under torchrun: this process's rank; rank 0 writes


def prepare(cfg: Config) -> Experiment:
    """The data splits and the freshly initialised model (its weights follow ``seed``); under torchrun,
    the process group joined and this rank's share of the data."""
    outputs = _writable(Path(cfg.outputs_dir))  # before any work: caches and stores go there
    device = resolve_device(cfg.train.device)
    world = distributed.start(device)
    device = distributed.device_for(device, world)
    data = build_data(cfg.dataset, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed, world)
    log.info("data: %s", data.description)
    if world.distributed:
        log.info("distributed: %d processes (%s), this is rank %d; batch_size %d per step over all ranks",
                 world.size, "nccl" if device.type == "cuda" else "gloo", world.rank, cfg.train.batch_size)
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    return Experiment(cfg, data, model, device, outputs, world)


@contextlib.contextmanager
def tracked_run(exp: Experiment, output_dir: Path, trial: Any = None,
                resume: checkpoints.Checkpoint | None = None) -> Iterator[Tracker]:
    """The tracked run (a new one, or the interrupted run ``resume`` continues), with the config as
    params, ended FINISHED, FAILED or KILLED with the block (:func:`finished_or_failed`).

    ``trial`` (a sweep's :class:`~harness.sweep.trial.TrialLink`) adds its tags and hears the run id; what a
    tracking server that went away never got is kept under ``output_dir``.
    """
    cfg = exp.cfg
    if not exp.world.is_main:  # rank 0 tracks the run for all
        yield Tracker()
        return
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
            if exp.world.is_main:
                stop.checkpoint = checkpoints.save_loop(checkpoint, stop.state)
            stop.how_to_continue = (f"the dense baseline's training was saved in {checkpoint} and resumes when "
                                    "a run needs this baseline again (the same command)")
            raise
        if exp.world.is_main:
            checkpoint.unlink(missing_ok=True)
        return evaluate(model, exp.data.val, exp.device), evaluate(model, exp.data.test, exp.device)

    baseline = load_or_train(cfg, exp.model, train_dense, exp.outputs / "baselines", exp.world)
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
    """A name that reads in MLflow's run list, the most telling fields first: a sweep trial
    ``t03-global-magnitude-0.95`` (its trial number), a confirmation run ``t03-confirm-s2`` (its
    fine-tuning seed), a plain run ``global-magnitude-0.95-resnet18-cifar10`` (``dense-...`` unpruned)."""
    link = cfg.sweep_trial
    in_sweep = bool(link.study) and link.number >= 0
    if in_sweep and link.confirmation_seed is not None:
        return f"t{link.number:02d}-confirm-s{link.confirmation_seed}"
    if cfg.analyze.mode.value != "none":  # a sensitivity analysis: nothing fine-tuned
        return f"{cfg.analyze.mode.value}-{cfg.prune.criterion.value}-{cfg.model.name}-{cfg.dataset.name}"
    if not cfg.prune.enabled:
        head = f"t{link.number:02d}-dense" if in_sweep else "dense"
        return f"{head}-{cfg.model.name}-{cfg.dataset.name}"
    p = cfg.prune
    # A sampled target (a trial's): four digits tell the trials apart.
    target = f"{len(p.pruners)}pruners" if p.pruners else f"{p.target_sparsity:{'.4g' if in_sweep else 'g'}}"
    fields = [p.scope.value, *([p.pattern.value] if p.pattern.value != "unstructured" else []),
              p.criterion.value, target]
    if in_sweep:
        return "-".join([f"t{link.number:02d}", *fields])
    return "-".join([*fields, cfg.model.name, cfg.dataset.name])


def run_tags(cfg: Config) -> dict[str, str]:
    p = cfg.prune
    tags = {"harness.dataset": cfg.dataset.name, "harness.model": cfg.model.name,
            "harness.pattern": p.pattern.value if p.enabled else "dense",
            "harness.criterion": p.criterion.value if p.enabled else "dense"}
    if cfg.sweep_trial.study and cfg.sweep_trial.number >= 0:  # a trial and its confirmations: one colour
        tags[RUN_COLOR_TAG] = trial_color(cfg.sweep_trial.number)
    return tags


def describe_run(tracker: Tracker, cfg: Config, metrics: Mapping[str, float], verdict: Verdict | None,
                 rows: Sequence[TensorSparsity], picture: str | None = None) -> str:
    """Set the run's MLflow description (``mlflow.note.content``, markdown) at the end of the run:
    the verdict (judged on val), the per-layer picture (the run's artifact ``picture``), the final sparsity
    and val/test accuracy, the per-tensor sparsity and, for a sweep's run, a link to the sweep's run.
    Returns the markdown."""
    link = cfg.sweep_trial
    lines = []  # no title: the page shows the run's name above, and the collapsed description is short
    if verdict is not None:
        unit = "relative" if verdict.criterion.value == "relative" else "absolute"
        lines.append(f"**Goal {'MET' if verdict.met else 'MISSED'}** (judged on val): {unit} accuracy drop "
                     f"{verdict.drop:+.2%}, allowed {verdict.max_drop:.2%}")
    else:
        lines.append("**Dense run**: nothing pruned, no goal judged")
    lines.append("")
    run_id = getattr(tracker, "run_id", None)
    if picture and run_id:
        # The description is the top of the run's page in the MLflow UI, so the per-layer story shows first
        # there; the address is the tracking server's artifact route, relative to the UI's page.
        lines += [f"![per-layer sparsity, val accuracy and the layer-by-update heatmap]"
                  f"(get-artifact?path={picture}&run_uuid={run_id})", ""]

    def value(name: str) -> str:
        return f"{metrics[name]:.4f}" if name in metrics else "-"

    lines += ["| | sparsity | val accuracy | test accuracy |", "|---|---|---|---|",
              f"| final | {value(m.FINAL_SPARSITY)} | {value(m.FINAL_ACCURACY)} | {value(m.FINAL_TEST_ACCURACY)} |",
              f"| dense baseline | 0 | {value(m.BASELINE_ACCURACY)} | {value(m.BASELINE_TEST_ACCURACY)} |", ""]
    if rows:
        lines += ["| tensor | shape | sparsity |", "|---|---|---|"]
        lines += [f"| `{r.name}` | {shape_text(r)} | {r.sparsity:.4f} |"
                  for r in rows[:_MAX_NOTE_ROWS]]
        if len(rows) > _MAX_NOTE_ROWS:
            lines.append(f"| ... {len(rows) - _MAX_NOTE_ROWS} more in sparsity_report.csv | | |")
        lines.append("")
    parent = link.parent_run_id
    if link.study and link.number >= 0:
        what = (f"confirmation of trial {link.number} (train.finetune_seed={link.confirmation_seed})"
                if link.confirmation_seed is not None else f"trial {link.number}")
        sweep = f"[the sweep's run]({run_link(tracker, parent)})" if parent else "the sweep"
        lines.append(f"Sweep `{link.study}`: {what} of {sweep}.")
    text = "\n".join(lines).rstrip() + "\n"
    tracker.set_tags({NOTE_TAG: text[:_MAX_NOTE_CHARS]})
    return text


def run_link(tracker: Tracker, run_id: str) -> str:
    """The MLflow UI's address of a run of the tracker's experiment, relative to the UI's page."""
    return ui_run_page(getattr(tracker, "experiment_id", None) or "0", run_id)


def trial_color(number: int) -> str:
    """A sweep trial's colour in MLflow's charts (the sweep's own run has :data:`SWEEP_COLOR`)."""
    return TRIAL_PALETTE[number % len(TRIAL_PALETTE)]


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"outputs_dir={folder}: not a writable folder ({err.strerror})") from None
    return folder

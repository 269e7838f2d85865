"""One experiment, top to bottom: data, model, dense baseline, pruning, verdict, report."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from harness import checkpoints, report
from harness.baseline import load_or_train
from harness.config import Allocation, AnalyzeMode, Config, PruneConfig
from harness.data import build_data
from harness.errors import ConfigError, Interrupted, RunStopped
from harness.export import deployment_report
from harness.goal import Verdict, judge
from harness.models import build_model
from harness.pruning import (
    MaskUpdate,
    Pattern,
    PrunerSpec,
    Pruning,
    count_sparsity,
    overall_sparsity,
    prunable_weights,
)
from harness.sensitivity import SensitivityTable, allocate_budgets, budgets_to_pruners, cached_sensitivity
from harness.tracking import MlflowTracker, Tracker, flatten, make_tracker
from harness.training import evaluate, fit, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    metrics: dict[str, float]  # the summary metrics, as logged
    verdict: Verdict | None  # None when nothing was pruned
    run_id: str | None
    output_dir: Path

    def summary(self) -> dict[str, float]:
        """The metrics plus ``goal/excess_drop`` (the drop beyond the allowed one; <= 0 meets the goal)."""
        excess = {"goal/excess_drop": self.verdict.drop - self.verdict.max_drop} if self.verdict else {}
        return self.metrics | excess


def run(cfg: Config, output_dir: Path, trial: Any = None,
        resume: checkpoints.Checkpoint | None = None) -> RunResult:
    """Run one experiment as configured and write its artifacts to ``output_dir``.

    ``trial`` (a sweep's :class:`~harness.sweep.trial.TrialLink`, or None) adds its tags to the
    run, hears the run id and each epoch's val accuracy, and may stop the run. ``resume``
    continues an interrupted run from its checkpoint, in the same MLflow run.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs = _writable(Path(cfg.outputs_dir))  # before any work: caches and stores go there
    device = resolve_device(cfg.train.device)

    data = build_data(cfg.dataset, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    log.info("data: %s", data.description)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    pruning = _attach_pruning(cfg.prune, model, len(data.train))  # bad tensor names fail here
    if pruning is not None and cfg.prune.dry_run:
        print(report.format_plan(pruning, pruning.plan(cfg.train.finetune_epochs)), flush=True)
        return RunResult({}, None, None, output_dir)

    tags = _tags(cfg) | (trial.tags() if trial else {})
    tracker = make_tracker(cfg.tracking, outputs, run_name=_run_name(cfg), tags=tags,
                           resume_run_id=resume.run_id if resume else None)
    with finished_or_failed(tracker):
        if trial:
            trial.on_run_started(tracker.run_id)
        tracker.log_params(flatten(config_dict(cfg)))

        def train_dense(m: torch.nn.Module) -> tuple[float, float]:
            tracker.flush()  # the params, in the MLflow UI during a long phase without metrics
            log.info("training the dense baseline (%d epochs)", cfg.train.epochs)
            fit(m, data.train, data.val, cfg.train, epochs=cfg.train.epochs, lr=cfg.train.lr,
                device=device, desc="dense")
            return evaluate(m, data.val, device), evaluate(m, data.test, device)

        baseline = load_or_train(cfg, model, train_dense, outputs / "baselines")
        model.to(device)
        dense = copy.deepcopy(model) if pruning is not None else None  # to measure what pruning bought
        baseline_note = (f"dense baseline {baseline.key}: "
                         f"{'reused from cache, no dense epochs run' if baseline.reused else 'trained and cached'}"
                         f" ({baseline.path})")
        log.info(baseline_note)
        if trial:
            trial.on_baseline(baseline.val_accuracy)
        metrics = {"baseline/accuracy": baseline.val_accuracy, "baseline/test_accuracy": baseline.test_accuracy}

        if cfg.analyze.mode == AnalyzeMode.sensitivity or cfg.prune.allocation == Allocation.sensitivity:
            tracker.flush()  # as above: the analysis can take long
        if cfg.analyze.mode == AnalyzeMode.sensitivity:
            table = _sensitivity(cfg, model, data, baseline, device, cfg.analyze.names)
            _report_sensitivity(table, output_dir, tracker)
            return RunResult(metrics, None, tracker.run_id, output_dir)
        if pruning is not None and cfg.prune.allocation == Allocation.sensitivity:
            table = _sensitivity(cfg, model, data, baseline, device, list(pruning.params))
            budgets = allocate_budgets(table, cfg.prune.target_sparsity, beta=cfg.prune.allocation_strength,
                                       max_sparsity=cfg.prune.max_sparsity or 0.99)
            pruners = [PrunerSpec(**p) for p in budgets_to_pruners(budgets)]
            budgeted = dataclasses.replace(cfg.prune, pruners=pruners, names=None, allocation=Allocation.uniform)
            pruning = _attach_pruning(budgeted, model,
                                      len(data.train))
            tracker.log_params({f"budget.{name}": round(value, 6) for name, value in budgets.items()})
            log.info("per-tensor targets from sensitivity: %s",
                     ", ".join(f"{n} {v:.3f}" for n, v in budgets.items()))

        verdict: Verdict | None = None
        updates: list[MaskUpdate] = []
        if pruning is None:
            names = list(prunable_weights(model))
            metrics |= {"final/accuracy": baseline.val_accuracy, "final/test_accuracy": baseline.test_accuracy}
            history = []
        else:
            # Same fine-tuning randomness whether the baseline was just trained or loaded.
            finetune_seed = cfg.train.finetune_seed_for(cfg.seed)
            seed_everything(finetune_seed)
            data.train.generator.manual_seed(finetune_seed)
            if resume is not None:
                pruning.load_state_dict(resume.pruning)
                updates.extend(resume.updates)
                log.info("resuming %s at epoch %d, step %d", resume.path, resume.loop.epoch, resume.loop.step)
            pruning.add_listener(updates.append)
            pruning.add_listener(lambda u: tracker.log_metrics(sparsity_metrics(u), u.global_step))
            try:
                history = fit(model, data.train, data.val, cfg.train, epochs=cfg.train.finetune_epochs,
                              lr=cfg.train.finetune_lr, device=device, callbacks=[pruning, *([trial] if trial else [])],
                              log_metrics=tracker.log_metrics, desc="prune",
                              resume=resume.loop if resume else None)
            except Interrupted as stop:
                path = checkpoints.save(output_dir, cfg, stop.state, pruning.state_dict(), updates, tracker.run_id)
                tracker.set_tags({"harness.checkpoint": str(path)})
                stop.checkpoint = path
                raise
            model = pruning.finalize()
            names = list(pruning.params)
            metrics |= {"final/accuracy": evaluate(model, data.val, device),
                        "final/test_accuracy": evaluate(model, data.test, device)}
            verdict = judge(cfg.goal, metrics["baseline/accuracy"], metrics["final/accuracy"])
            metrics |= {"goal/met": float(verdict.met), "goal/accuracy_drop": verdict.drop}

        rows = count_sparsity(model, names)  # from the weights, never from the schedule
        metrics["final/sparsity"] = overall_sparsity(rows)
        deploy = None
        if dense is not None:
            example = next(iter(data.test))[0][:64].to(device)
            deploy = deployment_report(dense, model, example, output_dir / "pruned_model.compressed.pt",
                                       channels=cfg.prune.pattern == Pattern.channel)
            metrics |= deploy.metrics
            for note in deploy.notes:
                log.info(note)
        tracker.log_metrics(metrics)
        tracker.flush()  # stored by the tracker's writer while the artifacts are made
        _write_artifacts(cfg, model, rows, updates, history, output_dir, tracker, metrics, verdict,
                         deploy.notes if deploy else [])

        if resume is not None:
            resume.path.unlink(missing_ok=True)  # done: nothing left to resume
        ui = tracker.ui_command() if isinstance(tracker, MlflowTracker) else None
        print(report.format_summary(rows, metrics, verdict, baseline_note, tracker.describe(), ui), flush=True)
        if deploy is not None:
            print(report.format_deployment(deploy.metrics), flush=True)
    return RunResult(metrics, verdict, tracker.run_id, output_dir)


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"outputs_dir={folder}: not a writable folder ({err.strerror})") from None
    return folder


def _attach_pruning(prune: PruneConfig, model: torch.nn.Module, steps_per_epoch: int) -> Pruning | None:
    """The engine on ``model``, or None for ``prune=none``; tensor-name errors become config errors."""
    if not prune.enabled:
        return None
    try:
        pruning = Pruning(prune).attach(model, steps_per_epoch=steps_per_epoch)
    except ValueError as err:
        raise ConfigError(f"prune.{err}") from None
    for name, reason in pruning.skipped.items():
        log.info("not pruned: %s (%s)", name, reason)
    return pruning


def _sensitivity(cfg: Config, model: torch.nn.Module, data: Any, baseline: Any, device: torch.device,
                 names: list[str] | None) -> SensitivityTable:
    """Each tensor pruned alone at each sparsity, on val; cached beside the dense baseline."""
    log.info("sensitivity analysis: %s sparsities per tensor, one-shot, on val", len(cfg.analyze.sparsities))
    table, path, reused = cached_sensitivity(
        model, names, lambda m: evaluate(m, data.val, device), cfg.analyze.sparsities,
        Path(cfg.outputs_dir) / "sensitivity", baseline.key, pattern=cfg.prune.pattern.value)
    log.info("sensitivity table %s: %s", path, "reused from cache" if reused else "measured and cached")
    return table


def _report_sensitivity(table: SensitivityTable, output_dir: Path, tracker: Tracker) -> None:
    files = [table.write_csv(output_dir / "sensitivity.csv"), table.plot(output_dir / "sensitivity.png")]
    tracker.log_metrics({f"sensitivity/{name}": table.sensitivity(name) for name in table.names})
    for path in files:
        tracker.log_artifact(path)
    print(table.format(), flush=True)
    print(f"most sensitive first: {', '.join(table.most_sensitive(5))}", flush=True)


def sparsity_metrics(update: MaskUpdate) -> dict[str, float]:
    """The contract's per-update metrics: target, overall and one per tensor."""
    metrics = {"sparsity/target": update.target, "sparsity/overall": update.overall}
    metrics |= {f"sparsity/{name}": value for name, value in update.sparsity.items()}
    return metrics


@contextlib.contextmanager
def finished_or_failed(tracker: Tracker) -> Iterator[None]:
    """End the tracked run as FINISHED, FAILED (with the error as a tag) or KILLED; never RUNNING."""
    try:
        yield
    except (KeyboardInterrupt, RunStopped) as err:
        if isinstance(err, RunStopped):
            with contextlib.suppress(Exception):
                tracker.set_tags({"harness.stopped": str(err)})
        tracker.finish("KILLED")
        raise
    except BaseException as err:
        with contextlib.suppress(Exception):
            tracker.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_dict(cfg: Config) -> dict[str, Any]:
    """The composed config as plain data (enums as their names), for params and config.yaml."""
    return _plain(asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.value if isinstance(value, Enum) else value


def _write_artifacts(cfg: Config, model: torch.nn.Module, rows: list, updates: list[MaskUpdate],
                     history: list, output_dir: Path, tracker: Tracker, metrics: dict[str, float],
                     verdict: Verdict | None, notes: list[str]) -> None:
    # Each file goes to the tracker once written: its writer copies it while the next is made.
    compressed = output_dir / "pruned_model.compressed.pt"
    if compressed.exists():
        tracker.log_artifact(compressed)
    config_yaml = yaml.safe_dump(config_dict(cfg), sort_keys=False)
    (output_dir / "config.yaml").write_text(config_yaml)
    tracker.log_artifact(output_dir / "config.yaml")
    report.write_sparsity_csv(rows, output_dir / "sparsity_report.csv")
    tracker.log_artifact(output_dir / "sparsity_report.csv")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, output_dir / "pruned_model.pt")
    tracker.log_artifact(output_dir / "pruned_model.pt")
    plot = output_dir / "curves.png" if updates else None
    if plot:
        report.plot_curves(updates, history, plot)
        tracker.log_artifact(plot)
    report.write_summary_html(output_dir / "summary.html", _run_name(cfg), rows, metrics, verdict, notes,
                              config_yaml, plot)
    tracker.log_artifact(output_dir / "summary.html")


def _run_name(cfg: Config) -> str:
    model = cfg.model.name
    if not cfg.prune.enabled:
        return f"dense-{model}-{cfg.dataset.name}"
    p = cfg.prune
    return f"{p.pattern.value}-{p.criterion.value}-{p.target_sparsity:g}-{model}-{cfg.dataset.name}"


def _tags(cfg: Config) -> dict[str, str]:
    p = cfg.prune
    return {"harness.dataset": cfg.dataset.name, "harness.model": cfg.model.name,
            "harness.pattern": p.pattern.value if p.enabled else "dense",
            "harness.criterion": p.criterion.value if p.enabled else "dense"}

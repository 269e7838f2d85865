"""One experiment, top to bottom: set up, dense baseline, budgets, fine-tune with pruning,
evaluate and judge, publish. :func:`run` tells the story; each phase is a function below it."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from harness import analysis, checkpoints, distributed, report
from harness import metrics as m
from harness.baseline import Baseline
from harness.config import Allocation, AnalyzeMode, Config, PruneConfig, config_dict
from harness.errors import ConfigError, Interrupted
from harness.experiment import (
    Experiment,
    RunResult,
    baseline_metrics,
    baseline_note,
    dense_baseline,
    describe_run,
    prepare,
    run_name,
    tracked_run,
)
from harness.export import DeploymentReport, deployment_report
from harness.goal import Verdict, judge
from harness.pruning import (
    MaskUpdate,
    Pattern,
    PrunerSpec,
    Pruning,
    TensorSparsity,
    count_sparsity,
    overall_sparsity,
    prunable_weights,
)
from harness.sensitivity import allocate_budgets, budgets_to_pruners
from harness.tracking import MlflowTracker, Tracker
from harness.training import EpochResult, evaluate, fit, seed_everything

log = logging.getLogger(__name__)

__all__ = ["RunResult", "run"]


def run(cfg: Config, output_dir: Path, trial: Any = None, resume: checkpoints.Checkpoint | None = None) -> RunResult:
    """Run one experiment as configured and write its artifacts to ``output_dir``.

    ``trial`` (a sweep's :class:`~harness.sweep.trial.TrialLink`, or None) adds its tags to the
    run, hears the run id and each epoch's val accuracy, and may stop the run. ``resume``
    continues an interrupted run from its checkpoint, in the same MLflow run.
    """
    if cfg.analyze.mode == AnalyzeMode.sensitivity:
        return analysis.run(cfg, output_dir, trial)  # a task of its own: measure, no fine-tuning
    output_dir.mkdir(parents=True, exist_ok=True)
    exp = prepare(cfg)
    pruning = attach_pruning(cfg.prune, exp) if cfg.prune.enabled else None  # bad tensor names fail here
    if pruning is not None and cfg.prune.dry_run:
        print(report.format_plan(pruning, pruning.plan(cfg.train.finetune_epochs)), flush=True)
        return RunResult({}, None, None, output_dir)
    with tracked_run(exp, output_dir, trial, resume) as tracker:
        baseline = dense_baseline(exp, tracker, trial)
        dense = copy.deepcopy(exp.model) if pruning is not None else None  # to measure what pruning bought
        if pruning is not None and cfg.prune.allocation == Allocation.sensitivity:
            pruning = sensitivity_budgets(exp, baseline, pruning, tracker)
        tuned = (finetune_with_pruning(exp, pruning, tracker, trial, resume, output_dir, teacher=dense)
                 if pruning else Tuned(exp.model))
        metrics, verdict, rows = evaluate_and_judge(exp, baseline, tuned)
        if not exp.world.is_main:  # rank 0 measures, writes and reports for all
            return RunResult(metrics, verdict, None, output_dir)
        deploy = measure_deployment(exp, dense, tuned.model, output_dir) if dense is not None else None
        metrics |= deploy.metrics if deploy else {}
        publish(exp, tuned, rows, metrics, verdict, deploy, baseline, output_dir, tracker)
        if resume is not None:
            resume.path.unlink(missing_ok=True)  # done: nothing left to resume
    return RunResult(metrics, verdict, tracker.run_id, output_dir)


@dataclass
class Tuned:
    """The model after fine-tuning with pruning (or the dense baseline, for ``prune=none``)."""

    model: nn.Module
    names: list[str] | None = None  # the pruned tensors; None: nothing was pruned
    updates: list[MaskUpdate] = field(default_factory=list)
    history: list[EpochResult] = field(default_factory=list)


def finetune_steps(exp: Experiment) -> int:
    """Optimizer steps per fine-tuning epoch: every batch, or ``train.finetune_steps_per_epoch`` of them."""
    cap = exp.cfg.train.finetune_steps_per_epoch
    return len(exp.data.train) if cap is None else min(cap, len(exp.data.train))


def attach_pruning(prune: PruneConfig, exp: Experiment) -> Pruning:
    """The engine on the model; tensor-name errors become config errors."""
    try:
        pruning = Pruning(prune).attach(exp.model, steps_per_epoch=finetune_steps(exp))
    except ValueError as err:
        raise ConfigError(f"prune.{err}") from None
    for name, reason in pruning.skipped.items():
        log.info("not pruned: %s (%s)", name, reason)
    return pruning


def sensitivity_budgets(exp: Experiment, baseline: Baseline, pruning: Pruning, tracker: Tracker) -> Pruning:
    """``prune.allocation=sensitivity``: the engine again, one pruner per tensor with its own target,
    the same overall sparsity."""
    prune = exp.cfg.prune
    table = analysis.measure_sensitivity(exp, baseline, tracker, list(pruning.params))
    budgets = allocate_budgets(table, prune.target_sparsity, beta=prune.allocation_strength,
                               max_sparsity=prune.max_sparsity or 0.99)
    pruners = [PrunerSpec(**p) for p in budgets_to_pruners(budgets)]
    budgeted = attach_pruning(dataclasses.replace(prune, pruners=pruners, names=None,
                                                  allocation=Allocation.uniform), exp)
    tracker.log_params({f"budget.{name}": round(value, 6) for name, value in budgets.items()})
    log.info("per-tensor targets from sensitivity: %s", ", ".join(f"{n} {v:.3f}" for n, v in budgets.items()))
    return budgeted


def finetune_with_pruning(exp: Experiment, pruning: Pruning, tracker: Tracker, trial: Any,
                          resume: checkpoints.Checkpoint | None, output_dir: Path,
                          teacher: nn.Module | None = None) -> Tuned:
    """Fine-tune while the engine prunes on its schedule; an interrupt saves a checkpoint to resume from.
    ``teacher`` (the dense baseline) is what ``train.distill_weight`` > 0 distills from."""
    cfg = exp.cfg
    # Same fine-tuning randomness whether the baseline was just trained or loaded.
    finetune_seed = cfg.train.finetune_seed_for(cfg.seed)
    seed_everything(finetune_seed)
    exp.data.train.generator.manual_seed(finetune_seed)
    updates: list[MaskUpdate] = []
    if resume is not None:
        pruning.load_state_dict(resume.pruning)
        updates.extend(resume.updates)
        log.info("resuming %s at epoch %d, step %d", resume.path, resume.loop.epoch, resume.loop.step)
    pruning.add_listener(updates.append)
    pruning.add_listener(lambda u: tracker.log_metrics(m.update_metrics(u), u.global_step))
    if exp.world.distributed:  # every rank must have chosen the same masks: checked at each update
        pruning.add_listener(lambda u: distributed.check_same_masks(pruning.masks, exp.world,
                                                                    f"mask update at step {u.global_step}"))
    try:
        history = fit(exp.model, exp.data.train, exp.data.val, cfg.train, epochs=cfg.train.finetune_epochs,
                      lr=cfg.train.finetune_lr, device=exp.device, callbacks=[pruning, *([trial] if trial else [])],
                      log_metrics=tracker.log_metrics, desc="prune", resume=resume.loop if resume else None,
                      steps_per_epoch=finetune_steps(exp), teacher=teacher)
    except Interrupted as stop:
        if exp.world.is_main:  # one checkpoint for all ranks: they stopped at the same step
            path = checkpoints.save(output_dir, cfg, stop.state, pruning.state_dict(), updates, tracker.run_id,
                                    world_size=exp.world.size)
            tracker.set_tags({"harness.checkpoint": str(path)})
            stop.checkpoint = path
        raise
    if exp.world.distributed:
        log.info("masks: the same on all %d ranks at each of the %d mask updates (compared by checksum)",
                 exp.world.size, len(updates))
    return Tuned(pruning.finalize(), list(pruning.params), updates, history)


def evaluate_and_judge(exp: Experiment, baseline: Baseline,
                       tuned: Tuned) -> tuple[dict[str, float], Verdict | None, list[TensorSparsity]]:
    """The summary metrics on val and test, the goal's verdict (on val), and the sparsity of each tensor."""
    metrics = baseline_metrics(baseline)
    verdict = None
    if tuned.names is None:
        names = list(prunable_weights(tuned.model))
        metrics |= {m.FINAL_ACCURACY: baseline.val_accuracy, m.FINAL_TEST_ACCURACY: baseline.test_accuracy}
    else:
        names = tuned.names
        metrics |= {m.FINAL_ACCURACY: evaluate(tuned.model, exp.data.val, exp.device),
                    m.FINAL_TEST_ACCURACY: evaluate(tuned.model, exp.data.test, exp.device)}
        verdict = judge(exp.cfg.goal, metrics[m.BASELINE_ACCURACY], metrics[m.FINAL_ACCURACY])
        metrics |= {m.GOAL_MET: float(verdict.met), m.GOAL_ACCURACY_DROP: verdict.drop}
    rows = count_sparsity(tuned.model, names)  # from the weights, never from the schedule
    metrics[m.FINAL_SPARSITY] = overall_sparsity(rows)
    return metrics, verdict, rows


def measure_deployment(exp: Experiment, dense: nn.Module, pruned: nn.Module, output_dir: Path) -> DeploymentReport:
    """What pruning bought: latency (within ``deploy.time_limit_s``, unless ``deploy.measure=false``), MACs
    and checkpoint size, pruned against dense, on the first ``deploy.batch_size`` test images."""
    deploy_cfg = exp.cfg.deploy
    started = time.monotonic()
    example = _test_images(exp, deploy_cfg.batch_size).to(exp.device)
    deploy = deployment_report(dense, pruned, example, output_dir / "pruned_model.compressed.pt",
                               channels=exp.cfg.prune.pattern == Pattern.channel, measure=deploy_cfg.measure,
                               time_limit_s=deploy_cfg.time_limit_s)
    for note in deploy.notes:
        log.info(note)
    # the whole phase (export, MACs, checkpoint, timing): what deploy.time_limit_s / deploy.measure trade
    log.info("deployment measured in %.1f s", time.monotonic() - started)
    return deploy


def _test_images(exp: Experiment, count: int) -> torch.Tensor:
    """The first ``count`` images of the test split (fewer if it has fewer), across its batches."""
    images, have = [], 0
    for batch in exp.data.test:
        images.append(batch[0][:count - have])
        have += len(images[-1])
        if have >= count:
            break
    return torch.cat(images)


def publish(exp: Experiment, tuned: Tuned, rows: list[TensorSparsity], metrics: dict[str, float],
            verdict: Verdict | None, deploy: DeploymentReport | None, baseline: Baseline, output_dir: Path,
            tracker: Tracker) -> None:
    """The metrics and artifacts to the tracker, the files to ``output_dir``, the summary to the terminal."""
    tracker.log_metrics(metrics)
    # the verdict, per-layer picture and table, as the run's note
    describe_run(tracker, exp.cfg, metrics, verdict, rows, picture=report.CURVES if tuned.updates else None)
    tracker.flush()  # stored by the tracker's writer while the artifacts are made
    _write_artifacts(exp.cfg, tuned, rows, output_dir, tracker, metrics, verdict, deploy.notes if deploy else [])
    model_note = None
    if isinstance(tracker, MlflowTracker) and exp.cfg.tracking.logs_model:
        try:  # the run's numbers and files are stored already: a model the store refuses does not fail it
            model_note = tracker.log_model(tuned.model, _test_images(exp, 1), output_dir / "mlflow_model",
                                           exp.cfg.tracking.register_as)
        except Exception as err:
            model_note = f"model: not logged to MLflow ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            log.warning("%s", model_note)
    ui = tracker.ui_command() if isinstance(tracker, MlflowTracker) else None
    print(report.format_summary(rows, metrics, verdict, baseline_note(baseline), tracker.describe(), ui), flush=True)
    if deploy is not None:
        print(deploy.describe(), flush=True)
    if model_note:
        print(model_note, flush=True)


def _write_artifacts(cfg: Config, tuned: Tuned, rows: list[TensorSparsity], output_dir: Path, tracker: Tracker,
                     metrics: dict[str, float], verdict: Verdict | None, notes: list[str]) -> None:
    # Each file goes to the tracker once written: its writer copies it while the next is made.
    compressed = output_dir / "pruned_model.compressed.pt"
    if compressed.exists():
        tracker.log_artifact(compressed)
    config_yaml = yaml.safe_dump(config_dict(cfg), sort_keys=False)
    (output_dir / "config.yaml").write_text(config_yaml)
    tracker.log_artifact(output_dir / "config.yaml")
    report.write_sparsity_csv(rows, output_dir / "sparsity_report.csv")
    tracker.log_artifact(output_dir / "sparsity_report.csv")
    torch.save({k: v.detach().cpu() for k, v in tuned.model.state_dict().items()}, output_dir / "pruned_model.pt")
    tracker.log_artifact(output_dir / "pruned_model.pt")
    # The per-layer picture (sparsity per tensor, val accuracy, heatmap): an artifact, and first in summary.html.
    plot = output_dir / report.CURVES if tuned.updates else None
    if plot:
        report.plot_curves(tuned.updates, tuned.history, plot, dense_accuracy=metrics[m.BASELINE_ACCURACY],
                           goal=cfg.goal)
        tracker.log_artifact(plot)
    report.write_summary_html(output_dir / "summary.html", run_name(cfg), rows, metrics, verdict, notes,
                              config_yaml, plot)
    tracker.log_artifact(output_dir / "summary.html")

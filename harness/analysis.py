"""The sensitivity analysis (``analyze=sensitivity``), a task beside the runner: each tensor of
the dense baseline pruned alone at each sparsity, one-shot, measured on val; no fine-tuning.

Its table is cached beside the baseline, so ``prune.allocation=sensitivity`` reuses it to
give each tensor its own target (the runner calls :func:`measure_sensitivity`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from harness import metrics as m
from harness.baseline import Baseline
from harness.config import Config
from harness.experiment import Experiment, RunResult, baseline_metrics, dense_baseline, prepare, tracked_run
from harness.sensitivity import SensitivityTable, cached_sensitivity
from harness.tracking import Tracker
from harness.training import evaluate

log = logging.getLogger(__name__)


def run(cfg: Config, output_dir: Path, trial: object = None) -> RunResult:
    """Measure every tensor's sensitivity (``analyze.names``, or every conv and linear weight) and report it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    exp = prepare(cfg)
    with tracked_run(exp, output_dir, trial) as tracker:
        baseline = dense_baseline(exp, tracker, trial)
        table = measure_sensitivity(exp, baseline, tracker, cfg.analyze.names)
        _report(table, output_dir, tracker)
    return RunResult(baseline_metrics(baseline), None, tracker.run_id, output_dir)


def measure_sensitivity(exp: Experiment, baseline: Baseline, tracker: Tracker,
                        names: list[str] | None) -> SensitivityTable:
    """Each tensor pruned alone at each sparsity, on val; cached beside the dense baseline."""
    cfg = exp.cfg
    tracker.flush()  # the params, in the MLflow UI while the analysis runs
    log.info("sensitivity analysis: %s sparsities per tensor, one-shot, on val", len(cfg.analyze.sparsities))
    table, path, reused = cached_sensitivity(
        exp.model, names, lambda model: evaluate(model, exp.data.val, exp.device), cfg.analyze.sparsities,
        exp.outputs / "sensitivity", baseline.key, pattern=cfg.prune.pattern.value)
    log.info("sensitivity table %s: %s", path, "reused from cache" if reused else "measured and cached")
    return table


def _report(table: SensitivityTable, output_dir: Path, tracker: Tracker) -> None:
    files = [table.write_csv(output_dir / "sensitivity.csv"), table.plot(output_dir / "sensitivity.png")]
    tracker.log_metrics({m.sensitivity_of(name): table.sensitivity(name) for name in table.names})
    for path in files:
        tracker.log_artifact(path)
    print(table.format(), flush=True)
    print(f"most sensitive first: {', '.join(table.most_sensitive(5))}", flush=True)

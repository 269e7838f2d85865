"""The metric names of the public contract (../shared/DESIGN.md section 6), written once.

Users chart these names in MLflow, sweep files optimize them and scripts read them back,
so every writer (the training loop, the runner, the sweeper) takes them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

TRAIN_LOSS = "train/loss"  # per optimizer step
VAL_ACCURACY = "val/accuracy"  # per epoch end, at its global step

SPARSITY_TARGET = "sparsity/target"  # per mask update: the scheduled sparsity
SPARSITY_OVERALL = "sparsity/overall"  # per mask update: counted over every pruned tensor

BASELINE_ACCURACY = "baseline/accuracy"  # the dense model on val
BASELINE_TEST_ACCURACY = "baseline/test_accuracy"
FINAL_ACCURACY = "final/accuracy"  # the pruned model on val
FINAL_TEST_ACCURACY = "final/test_accuracy"
FINAL_SPARSITY = "final/sparsity"  # counted from the pruned model's weights

GOAL_MET = "goal/met"  # 0 or 1
GOAL_ACCURACY_DROP = "goal/accuracy_drop"
GOAL_EXCESS_DROP = "goal/excess_drop"  # the drop beyond the allowed one; <= 0 meets the goal (sweeps' constraint)

# What pruning bought, measured at the end of a pruned run (harness.export.deployment_report).
LATENCY_DENSE_MS = "latency/dense_ms"
LATENCY_PRUNED_MS = "latency/pruned_ms"  # the exported model, timed side by side with the dense one
SPEEDUP = "speedup"
SIZE_DENSE_BYTES = "size/dense_bytes"
SIZE_COMPRESSED_BYTES = "size/compressed_bytes"
MACS_DENSE = "macs/dense"
MACS_NONZERO = "macs/nonzero"
DEPLOY_BATCH_SIZE = "deploy/batch_size"  # the images in the batch timed and counted on
DEPLOY_ROUNDS = "deploy/rounds"  # the side-by-side rounds timed; 0: latency not measured
DEPLOY_TIMING_S = "deploy/timing_s"  # the seconds the latency timing took, warm-up included

# What a run returns to a sweep (objectives are chosen among these).
RUN_SUMMARY = (BASELINE_ACCURACY, BASELINE_TEST_ACCURACY, FINAL_ACCURACY, FINAL_TEST_ACCURACY, FINAL_SPARSITY,
               GOAL_MET, GOAL_ACCURACY_DROP, GOAL_EXCESS_DROP, LATENCY_DENSE_MS, LATENCY_PRUNED_MS, SPEEDUP,
               SIZE_DENSE_BYTES, SIZE_COMPRESSED_BYTES, MACS_DENSE, MACS_NONZERO)
BEST_PREFIX = "best/"  # a sweep's parent run: the best trial's summary metrics
CONFIRMED_PREFIX = "best/confirmed/"  # ... and the confirmed best's


def sparsity_of(tensor: str) -> str:
    """Per mask update: one tensor's sparsity, e.g. ``sparsity/layer1.0.conv1.weight``."""
    return f"sparsity/{tensor}"


def sensitivity_of(tensor: str) -> str:
    """A sensitivity analysis: how much val accuracy one tensor costs when pruned alone."""
    return f"sensitivity/{tensor}"


class _MaskUpdate(Protocol):  # harness.pruning.MaskUpdate, without importing the engine (and torch)
    target: float
    overall: float
    sparsity: Mapping[str, float]


def update_metrics(update: _MaskUpdate) -> dict[str, float]:
    """The contract's metrics of one mask update: target, overall and one per tensor."""
    metrics = {SPARSITY_TARGET: update.target, SPARSITY_OVERALL: update.overall}
    metrics |= {sparsity_of(name): value for name, value in update.sparsity.items()}
    return metrics

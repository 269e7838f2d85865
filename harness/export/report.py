"""What a run reports: the pruned model exported, timed against the dense one within a time budget,
its MACs counted and its compressed checkpoint written (:func:`deployment_report`, used by
``harness.runner``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from harness import metrics as m

from .channels import remove_pruned_channels
from .compressed import save_compressed
from .measure import batch_within_budget, compare_latency_within, count_macs
from .sparse_linear import sparsify_linears

# What was measured, beside the contract's LATENCY_*, SPEEDUP, SIZE_* and MACS_* (harness.metrics).
MAX_ROUNDS = 15  # a median over more rounds than this changes little
WARMUP = 3


@dataclass(frozen=True)
class DeploymentReport:
    """What pruning bought, measured on one batch: latency of the exported model against the
    dense one (timed side by side, when measured), multiply-adds, and the compressed checkpoint's size."""

    metrics: dict[str, float]
    notes: list[str]

    def describe(self) -> str:
        """One line: what the pruned model costs against the dense one, and on what it was measured."""
        ms, batch = self.metrics, int(self.metrics[m.DEPLOY_BATCH_SIZE])
        rounds = int(ms[m.DEPLOY_ROUNDS])
        if m.LATENCY_PRUNED_MS in ms:
            latency = (f"{ms[m.LATENCY_PRUNED_MS]:.3f} ms vs {ms[m.LATENCY_DENSE_MS]:.3f} ms dense "
                       f"(speedup {ms[m.SPEEDUP]:.2f}x; median of {rounds} round{'s' * (rounds != 1)} in "
                       f"{ms[m.DEPLOY_TIMING_S]:.1f} s)")
        else:
            latency = "latency not measured (deploy.measure=false)"
        return (f"deploy (batch of {batch} test images): {latency}; compressed checkpoint "
                f"{ms[m.SIZE_COMPRESSED_BYTES] / 1e6:.2f} MB vs {ms[m.SIZE_DENSE_BYTES] / 1e6:.2f} MB; "
                f"non-zero MACs {ms[m.MACS_NONZERO] / max(1.0, ms[m.MACS_DENSE]):.1%} of dense")


def deployment_report(dense: nn.Module, pruned: nn.Module, example: Tensor, checkpoint: Path,
                      channels: bool, measure: bool = True, time_limit_s: float = 10.0) -> DeploymentReport:
    """Count MACs of ``pruned`` on ``example`` and write its compressed checkpoint; with ``measure``,
    also export it the way its sparsity allows (channels removed, or sparse linear kernels where
    they are faster) and time it against ``dense`` for at most about ``time_limit_s`` seconds
    (:func:`~harness.export.measure.compare_latency_within`)."""
    notes: list[str] = []
    metrics: dict[str, float] = {m.DEPLOY_BATCH_SIZE: float(len(example)), m.DEPLOY_ROUNDS: 0.0}
    if measure:
        try:
            if channels:
                exported = remove_pruned_channels(pruned, example)
                notes.append("export: pruned channels removed from the layers")
            else:
                exported, choices = sparsify_linears(pruned, example)
                notes += [f"export: {c.name} runs {c.kind} ({c.reason})" for c in choices]
        except Exception as err:  # a model the exporters cannot trace: measure it as it is, and say so
            exported = pruned
            notes.append(f"export: kept the masked model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})")
        batch = batch_within_budget(dense, exported, example, time_limit_s)
        if len(batch) < len(example):
            notes.append(f"latency: a round on {len(example)} images would not fit in deploy.time_limit_s="
                         f"{time_limit_s:g}; timed on the first {len(batch)} (raise it to time them all)")
            example = batch  # the batch timed is also the one MACs are counted on (deploy/batch_size)
            metrics[m.DEPLOY_BATCH_SIZE] = float(len(batch))
        timed = compare_latency_within(dense, exported, example, time_limit_s, max_rounds=MAX_ROUNDS, warmup=WARMUP)
        metrics |= {
            m.LATENCY_DENSE_MS: timed.a_ms,
            m.LATENCY_PRUNED_MS: timed.b_ms,
            m.SPEEDUP: timed.a_ms / timed.b_ms if timed.b_ms > 0 else float("nan"),
            m.DEPLOY_ROUNDS: float(timed.rounds),
            m.DEPLOY_TIMING_S: timed.seconds,
        }
        notes.append(f"latency: median of {timed.rounds} side-by-side rounds on a batch of {len(example)}, "
                     f"{timed.seconds:.1f} s of a {time_limit_s:g} s budget (deploy.time_limit_s)")
    else:
        notes.append("latency: not measured (deploy.measure=false)")
    dense_macs, nonzero_macs = count_macs(pruned, example)
    size = save_compressed(pruned, checkpoint)
    metrics |= {
        m.SIZE_DENSE_BYTES: float(size.dense_bytes),
        m.SIZE_COMPRESSED_BYTES: float(size.compressed_bytes),
        m.MACS_DENSE: float(dense_macs),
        m.MACS_NONZERO: float(nonzero_macs),
    }
    return DeploymentReport(metrics, notes)

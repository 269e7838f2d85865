"""What a run reports: the pruned model exported, timed against the dense one, its MACs counted and
its compressed checkpoint written (:func:`deployment_report`, used by ``harness.runner``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from harness import metrics as m

from .channels import remove_pruned_channels
from .compressed import save_compressed
from .measure import compare_latency, count_macs
from .sparse_linear import sparsify_linears


@dataclass(frozen=True)
class DeploymentReport:
    """What pruning bought, measured on one batch: latency of the exported model against the
    dense one (timed side by side), multiply-adds, and the compressed checkpoint's size."""

    metrics: dict[str, float]
    notes: list[str]


def deployment_report(dense: nn.Module, pruned: nn.Module, example: Tensor, checkpoint: Path,
                      channels: bool) -> DeploymentReport:
    """Export ``pruned`` the way its sparsity allows (channels removed, or sparse linear kernels where
    they are faster), time it against ``dense``, count MACs, and write the compressed checkpoint."""
    notes: list[str] = []
    try:
        if channels:
            exported = remove_pruned_channels(pruned, example)
            notes.append("export: pruned channels removed from the layers")
        else:
            exported, choices = sparsify_linears(pruned, example)
            notes += [f"export: {c.name} runs {c.kind} ({c.reason})" for c in choices]
    except Exception as err:  # a model the exporters cannot trace: measure it as it is, and say so
        exported = pruned
        notes.append(f"export: kept the masked model ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    dense_ms, pruned_ms = compare_latency(dense, exported, example, rounds=15, warmup=3)
    dense_macs, nonzero_macs = count_macs(pruned, example)
    size = save_compressed(pruned, checkpoint)
    return DeploymentReport({
        m.LATENCY_DENSE_MS: dense_ms,
        m.LATENCY_PRUNED_MS: pruned_ms,
        m.SPEEDUP: dense_ms / pruned_ms if pruned_ms > 0 else float("nan"),
        m.SIZE_DENSE_BYTES: float(size.dense_bytes),
        m.SIZE_COMPRESSED_BYTES: float(size.compressed_bytes),
        m.MACS_DENSE: float(dense_macs),
        m.MACS_NONZERO: float(nonzero_macs),
    }, notes)

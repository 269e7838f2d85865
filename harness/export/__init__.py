"""Make pruned models smaller and faster for real, and measure it.

Plain PyTorch (no Hydra, MLflow or Optuna), like ``harness.pruning``; it works on the plain
model that :meth:`harness.pruning.Pruning.finalize` returns, whose pruned weights are exact zeros.

- ``measure.py``: :func:`measure_latency`, :func:`compare_latency` (median milliseconds per forward,
  side by side), :func:`compare_latency_within` (the same within a time budget) and :func:`count_macs`
  (dense and non-zero multiply-adds of the conv and linear layers).
- ``sparse_linear.py``: :func:`sparsify_linears`, unstructured sparsity -> :class:`SparseLinear` kernels
  where they are faster than dense.
- ``channels.py``: :func:`remove_pruned_channels`, channel pruning -> physically smaller layers
  (:class:`PrunedConv2d`, :class:`ScatteredBatchNorm2d`, :class:`ScatteredMaxPool2d`).
- ``compressed.py``: :func:`save_compressed`, :func:`load_compressed`, a bitmask-plus-values checkpoint.
- ``semi_structured.py``: :func:`semi_structured_2to4`, 2:4 sparse Linear weights on sparse tensor cores.
- ``report.py``: :func:`deployment_report`, the exports and measurements that a run reports.
- ``_common.py``: the helpers they share (example inputs, eval mode, fair timing, module swaps).

``python -m harness.bench --only g,h,i`` measures the exports against the dense models and
against plain ``torch.sparse``.
"""

from .channels import PrunedConv2d, ScatteredBatchNorm2d, ScatteredMaxPool2d, remove_pruned_channels
from .compressed import CompressionReport, load_compressed, save_compressed
from .measure import LatencyComparison, compare_latency, compare_latency_within, count_macs, measure_latency
from .report import DeploymentReport, deployment_report
from .semi_structured import semi_structured_2to4
from .sparse_linear import LayerChoice, SparseLinear, sparsify_linears

__all__ = [
    "CompressionReport",
    "DeploymentReport",
    "LatencyComparison",
    "LayerChoice",
    "PrunedConv2d",
    "ScatteredBatchNorm2d",
    "ScatteredMaxPool2d",
    "SparseLinear",
    "compare_latency",
    "compare_latency_within",
    "count_macs",
    "deployment_report",
    "load_compressed",
    "measure_latency",
    "remove_pruned_channels",
    "save_compressed",
    "semi_structured_2to4",
    "sparsify_linears",
]

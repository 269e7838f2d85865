"""The pruning engine: plain PyTorch, usable from any training loop.

It imports nothing else from the harness and knows nothing of Hydra, MLflow or Optuna.
"""

from .pruning import MaskUpdate, Pruning, TensorSparsity, count_sparsity, overall_sparsity, prunable_weights
from .spec import Criterion, PrunerSpec, PruningSpec, ResolvedPruner, Schedule

__all__ = [
    "Criterion",
    "MaskUpdate",
    "PrunerSpec",
    "Pruning",
    "PruningSpec",
    "ResolvedPruner",
    "Schedule",
    "TensorSparsity",
    "count_sparsity",
    "overall_sparsity",
    "prunable_weights",
]

"""The pruning engine: plain PyTorch, usable from any training loop.

It imports nothing else from the harness and knows nothing of Hydra, MLflow or Optuna.
Names are loaded on first use, so that reading a config (``spec``) does not import torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Criterion": "spec",
    "PrunerSpec": "spec",
    "PruningSpec": "spec",
    "ResolvedPruner": "spec",
    "Schedule": "spec",
    "Pattern": "spec",
    "ChannelNorm": "spec",
    "Scope": "spec",
    "MaskUpdate": "pruning",
    "PlannedUpdate": "clock",
    "select_tensors": "selection",
    "Pruning": "pruning",
    "TensorSparsity": "counting",
    "count_sparsity": "counting",
    "overall_sparsity": "counting",
    "prunable_weights": "selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.pruning' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)

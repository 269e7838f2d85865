"""Pruning Sweep Harness: prune PyTorch models during fine-tuning, tracked in MLflow, swept with Optuna."""

__version__ = "0.1.0"

"""Hyperparameter sweeps on Optuna: the search-space grammar and the trial overrides."""

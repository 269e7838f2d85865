"""Shared helpers: run the real command line, compose real configs, read a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import config
from harness.config import Config
from tests.postgres import postgres_server  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parent.parent

# A short schedule that still has several mask updates: 2 dense epochs, 3 fine-tuning epochs,
# pruning from epoch 0 to 2 with two updates per epoch.
FAST = [
    "train.epochs=2",
    "train.finetune_epochs=3",
    "prune.end_epoch=2",
    "prune.update_frequency=0.5",
]


def run_cli(args: list[str], outputs: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    """``python -m harness ARGS`` with every output under ``outputs``."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "harness", *args, f"outputs_dir={outputs}", f"hydra.run.dir={outputs}/run"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def compose_config(overrides: list[str] | None = None) -> Config:
    """The typed config for ``overrides``, composed exactly as the command line does."""
    return config.compose_config(overrides or [])


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"

"""LPOT / Intel Neural Compressor 1.x pruning, migrated: one reader of its YAML, feeding both the
command line (``python -m harness lpot=conf.yaml``, :mod:`harness.lpot_config`) and the Python API.

An LPOT user changes one line, the import::

    from harness.lpot import Pruning, common    # was: from lpot.experimental import Pruning, common

- ``document``: the YAML, read once (``read_lpot``): the engine's spec, ``pruning.train``, notes.
- ``migration``: the document -> harness config values (``prune.*``, ``train.*``, ``dataset.*``, ``goal.*``).
- ``yaml_training``: the YAML-only usage's data, optimizer and loop, from those values.
- ``api``: ``Pruning`` and ``common.Model``, on the engine (``harness.pruning``).

Names load on first use, so that the command line reads a config before torch loads.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LpotDocument": "document",
    "read_lpot": "document",
    "LPOT_DEFAULTS": "document",
    "LpotMigration": "migration",
    "migrate": "migration",
    "Model": "api",
    "Pruning": "api",
    "common": "api",
    "format_sparsity": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.lpot' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)

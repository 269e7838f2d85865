"""The user's stores (an MLflow tracking store, an Optuna storage), checked before use.

A store is the user's record of past work: the harness never repairs, replaces or deletes
one. A file that is damaged, or that belongs to another program, stops the command with one
line naming the file and what to do, before anything is written into it (MLflow and Optuna
would otherwise fail with a SQLAlchemy traceback, or add their tables to a foreign database).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from harness.errors import ConfigError

MLFLOW_TABLES = {"experiments", "runs"}
OPTUNA_TABLES = {"studies", "trials"}


def check_sqlite_store(url: str, key: str, owner: str, tables: set[str]) -> None:
    """When ``url`` is a SQLite file that exists, it must be a database holding ``owner``'s ``tables``
    (or no table yet); anything else is a :class:`ConfigError` naming ``key``, the file and what to do."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file() or path.stat().st_size == 0:
        return  # created by MLflow or Optuna
    move_aside = f"move it aside (the harness never deletes a store) or set {key} to another file"
    try:
        # Read-only: a damaged or foreign file is looked at, never changed.
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            found = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise ConfigError(f"{key}={url}: {path} is not a readable {owner} store ({err}); {move_aside}") from None
    if found and not tables <= found:
        raise ConfigError(f"{key}={url}: {path} is a database, but not an {owner} store (it holds "
                          f"{', '.join(sorted(found)[:4])}); {move_aside}")

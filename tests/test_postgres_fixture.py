"""The throwaway PostgreSQL server of tests/postgres.py: SQLAlchemy and an Optuna study shared across processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from sqlalchemy import text

from tests import postgres
from tests.postgres import PostgresServer, postgres_server  # noqa: F401

# Reopens the study by name from a fresh RDBStorage in another process, adds one trial, reports all of them.
REOPEN = """
import json, sys
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = optuna.storages.RDBStorage(sys.argv[2])
study = optuna.load_study(study_name=sys.argv[1], storage=storage)
before = [(t.number, t.state.name, t.params["x"]) for t in study.trials]
study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=1)
print(json.dumps({"before": before, "after": len(study.trials)}))
storage.engine.dispose()
"""


@pytest.mark.postgres
def test_sqlalchemy_roundtrip(postgres_server: PostgresServer) -> None:  # noqa: F811
    postgres_server.create_database("roundtrip")
    assert postgres_server.host == "127.0.0.1"
    engine = sqlalchemy.create_engine(postgres_server.url("roundtrip"))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE items (id SERIAL PRIMARY KEY, name TEXT NOT NULL, score DOUBLE PRECISION)"))
            conn.execute(
                text("INSERT INTO items (name, score) VALUES (:name, :score)"),
                [{"name": "dense", "score": 0.5}, {"name": "pruned-ünïcode", "score": 0.25}],
            )
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT name, score FROM items ORDER BY id")).all()
            version = conn.execute(text("SHOW server_version")).scalar_one()
            address = conn.execute(text("SELECT host(inet_server_addr())")).scalar_one()
        assert [tuple(r) for r in rows] == [("dense", 0.5), ("pruned-ünïcode", 0.25)]
        assert engine.dialect.name == "postgresql"
        assert address == "127.0.0.1"  # a TCP connection on loopback, not the unix socket
        assert version
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_optuna_study_shared_across_processes(postgres_server: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    postgres_server.create_database("optuna_shared")
    url = postgres_server.url("optuna_shared")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.create_study(study_name="shared", storage=storage, direction="minimize")
        study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=5)
        xs = [t.params["x"] for t in study.trials]
        assert len(xs) == 5

        proc = subprocess.run(
            [sys.executable, "-c", REOPEN, "shared", url],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        assert [(n, state) for n, state, _ in seen["before"]] == [(i, "COMPLETE") for i in range(5)]
        assert [x for _, _, x in seen["before"]] == xs
        assert seen["after"] == 6

        # ... and the trial the other process added is visible here.
        reloaded = optuna.load_study(study_name="shared", storage=storage)
        assert len(reloaded.trials) == 6
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in reloaded.trials)
    finally:
        storage.engine.dispose()


def test_unavailable_postgres_skips_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No binaries and no way to install them: a one-line reason, and running_postgres skips (no server needed)."""
    monkeypatch.setattr(postgres, "find_bin_dir", lambda: None)
    monkeypatch.setattr(postgres, "_install_result", "install-postgres.sh failed (exit 1): no network")
    reason = postgres.start_postgres(tmp_path)
    assert isinstance(reason, str)
    assert "not found" in reason and "no network" in reason and "\n" not in reason
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL unavailable"), postgres.running_postgres(tmp_path):
        pytest.fail("the block must not run")

"""A real ``mlflow server`` on a loopback port, for the tests that need a tracking server.

Its backend store is a SQLite file in its folder, or any store URI given (a PostgreSQL database of
``tests/postgres.py``'s server); its artifacts are served from its folder. ``stop()`` and ``start()``
again keep the same port and store (a server that goes away mid-run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVER_START_S = 90  # a PostgreSQL store is migrated at the first start: tens of seconds on a busy machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``mlflow server`` on one loopback port and one store, stopped and started again at will."""

    def __init__(self, folder: Path, backend_store_uri: str | None = None) -> None:
        self.folder, self.port, self.process = folder, free_port(), None
        folder.mkdir(parents=True, exist_ok=True)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{folder}/mlflow.db"
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.folder / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", str(self.folder / "mlartifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts faster
        with open(log, "w") as out:  # its own session: stop() ends its workers with it
            self.process = subprocess.Popen(cmd, cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"mlflow server did not start: {log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_session(self.process, timeout=15)


def stop_session(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a server started in its own session (its workers with it), SIGKILL after ``timeout``; a server
    already gone has any worker it left in its session killed."""
    if process.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

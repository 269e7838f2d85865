"""MLflow's store calls, made by a helper process so that training does not wait for them.

Each MLflow write through the SQLAlchemy store costs the Python interpreter tens of
microseconds per row (ORM objects, a transaction): ~45 ms for a default run, 5% of it, and
importing MLflow takes a second. Weights & Biases moves this work out of the training process
for the same reason; here one helper process per training process (``python -m
harness.mlflow_writer``, started as soon as the config says MLflow, or by the first tracked
run) makes the calls in order with ``MlflowClient``, and the training process pickles each call
onto a socket and goes on. Calls for a run name it by a handle the training process chose, so
even opening the run does not wait: its id is awaited only where it is used. Ending a run waits until the store holds
everything sent before. Replies are read at the next call of the same tracker, so a failed
call raises there (within a training step), and never in another tracker.

When the training process dies without ending its runs (SIGKILL, a crash), its socket
closes and the helper ends those runs as FAILED. The helper ignores SIGINT and SIGTERM, which
a terminal or a job scheduler also sends to it: the training process handles them, ends its
run as KILLED through the helper, and the helper exits when the socket closes.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.locking import file_lock, process_alive

DIED = "the process running this run died (found RUNNING at a later start)"


class TrackingError(HarnessError):
    """An MLflow call failed in the writer (the store's own message, one line)."""


class Reply:
    """The writer's answer to one call, once read: ``ok`` and the result or the error text."""

    __slots__ = ("done", "ok", "op", "owner", "value")

    def __init__(self, owner: str, op: str) -> None:
        self.owner, self.op, self.done, self.ok, self.value = owner, op, False, False, None

    def error(self) -> TrackingError:
        return TrackingError(f"MLflow {self.op} failed: {self.value}")


class MlflowWriter:
    """The training process's end. Each call has an owner (a tracker): replies are read in order,
    and a failed call is raised once, at its owner's next call, never at another tracker's."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.pid = os.getpid()  # a forked child (a DataLoader worker) must not share this socket
        self.process = subprocess.Popen([sys.executable, "-m", "harness.mlflow_writer", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.connection = Connection(ours.detach())
        self.unread: deque[Reply] = deque()  # replies to calls sent, oldest first
        self.failures: dict[str, Reply] = {}  # owner -> its first failed call not raised yet
        self.owners: set[str] = set()  # trackers not finished; failures of others are dropped
        self.lock = threading.Lock()

    def send(self, owner: str, op: str, *args: Any, check: bool = True) -> Reply:
        """Send ``op(*args)`` and go on; with ``check``, raises a failure of the owner's earlier
        calls read by now (the call is sent all the same)."""
        with self.lock:
            self.owners.add(owner)
            try:
                self.connection.send((op, (owner, *args)))  # the writer's calls take the owner first
            except OSError:
                self._gone()
            reply = Reply(owner, op)
            self.unread.append(reply)
            self._read_ready()
            if check:
                self._raise_failure(owner)
            return reply

    def settle(self, reply: Reply) -> bool:
        """Whether the call succeeded, once its reply is read (and every reply before it)."""
        with self.lock:
            while not reply.done:
                self._read_one()
        return reply.ok

    def wait(self, reply: Reply) -> Any:
        """The call's result, once the writer has made it and every call sent before it; raises
        the first failure of the owner's calls up to it."""
        self.settle(reply)
        self.read_ready(reply.owner)
        if not reply.ok:
            raise reply.error()
        return reply.value

    def read_ready(self, owner: str) -> None:
        """Read the replies already there, without waiting; raises a failure of the owner's."""
        with self.lock:
            self._read_ready()
            self._raise_failure(owner)

    def forget(self, owner: str) -> None:
        """The owner is done: its failures read from now on are dropped."""
        with self.lock:
            self.owners.discard(owner)
            self.failures.pop(owner, None)

    def _raise_failure(self, owner: str) -> None:
        failed = self.failures.pop(owner, None)
        if failed is not None:
            raise failed.error()

    def _read_ready(self) -> None:
        try:
            while self.unread and self.connection.poll():
                self._read_one()
        except OSError:
            self._gone()

    def _read_one(self) -> None:
        reply = self.unread.popleft()
        try:
            reply.ok, reply.value = self.connection.recv()
        except (EOFError, OSError):
            self._gone()
        except BaseException:  # e.g. Ctrl-C inside a message: the stream is out of step from here
            self.connection.close()  # the writer sees it close and ends this process's runs FAILED
            raise
        reply.done = True
        if not reply.ok and reply.owner in self.owners:
            self.failures.setdefault(reply.owner, reply)

    def close(self) -> None:
        """At exit: close the socket and let the writer finish (it ends any run left open as FAILED)."""
        if os.getpid() != self.pid:
            return
        self.connection.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def _gone(self) -> None:
        self.unread.clear()
        status = self.process.poll()
        raise TrackingError(f"the MLflow writer process (pid {self.process.pid}) "
                            + (f"exited with status {status}; its output above says why" if status is not None
                               else "cannot be reached (its socket was closed by an interrupt)"))


_writer: MlflowWriter | None = None
_writer_lock = threading.Lock()


def writer() -> MlflowWriter:
    """This process's writer, started on first use (it imports MLflow for about a second, beside
    whatever this process does meanwhile)."""
    global _writer
    with _writer_lock:
        if _writer is None or _writer.pid != os.getpid() or _writer.process.poll() is not None:
            _writer = MlflowWriter()
            atexit.register(_writer.close)
        return _writer


# -- the helper process ---------------------------------------------------------------------------


class _Store:
    """The helper's side: one ``MlflowClient`` per store URI, and the runs opened, by the handle
    the training process gave each (it sends calls for a run before its id is known)."""

    def __init__(self) -> None:
        self.clients: dict[str, Any] = {}
        self.runs: dict[str, tuple[str, str]] = {}  # handle -> (store URI, run id), until ended
        self.artifact_repos: dict[str, Any] = {}  # handle -> the run's artifact repository
        self.failed: dict[str, str] = {}  # handle -> why its run could not be opened

    def client(self, uri: str) -> Any:
        from mlflow.tracking import MlflowClient

        if uri not in self.clients:
            self.clients[uri] = MlflowClient(tracking_uri=uri)
        return self.clients[uri]

    def run(self, handle: str) -> tuple[Any, str]:
        """The client and run id behind ``handle``."""
        if handle not in self.runs:
            raise LookupError(f"no open run ({self.failed.get(handle, 'ended already')})")
        uri, run_id = self.runs[handle]
        return self.client(uri), run_id

    def open(self, handle: str, uri: str, experiment: str, run_name: str | None, artifact_location: str | None,
             tags: dict[str, str], resume_run_id: str | None, cwd: str) -> tuple[str, str, str]:
        """Create (or reopen) a run; returns its id, name and experiment id."""
        try:
            return self._open(handle, uri, experiment, run_name, artifact_location, tags, resume_run_id, cwd)
        except Exception as err:
            self.failed[handle] = f"MLflow open failed: {_one_line(err)}"
            raise

    def _open(self, handle: str, uri: str, experiment: str, run_name: str | None, artifact_location: str | None,
              tags: dict[str, str], resume_run_id: str | None, cwd: str) -> tuple[str, str, str]:
        import contextlib

        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        os.chdir(cwd)  # a relative store or artifact path means the training process's folder
        # Two processes creating one SQLite store (or one experiment) at once race; take turns.
        lock = file_lock(Path(uri.removeprefix("sqlite:///") + ".lock")) if uri.startswith("sqlite:///") \
            else contextlib.nullcontext()
        with lock:
            client = self.client(uri)
            if resume_run_id:  # a resumed sweep's parent, or an interrupted run continued
                run = client.get_run(resume_run_id)
                client.update_run(resume_run_id, status="RUNNING")
                for key in ("harness.host", "harness.pid"):  # its new owner: not an orphan to close
                    client.set_tag(resume_run_id, key, tags[key])
            else:
                found = client.get_experiment_by_name(experiment)
                experiment_id = (found.experiment_id if found is not None else
                                 client.create_experiment(experiment, artifact_location=artifact_location))
                run = client.create_run(experiment_id, run_name=run_name, tags=tags)
                self.close_orphans(uri, experiment_id)
        self.runs[handle] = (uri, run.info.run_id)
        # Known now; MlflowClient.log_artifact would read the run back from the store to find it.
        self.artifact_repos[handle] = get_artifact_repository(run.info.artifact_uri, tracking_uri=uri)
        return run.info.run_id, run.info.run_name, run.info.experiment_id

    def close_orphans(self, uri: str, experiment_id: str) -> None:  # called by open
        """End as FAILED the RUNNING runs whose process on this machine is gone (a SIGKILL of both
        processes, a power cut)."""
        from mlflow.entities import ViewType

        client = self.client(uri)
        host = socket.gethostname()
        running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                     run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        for run in running:
            tags = run.data.tags
            if tags.get("harness.host") == host and not process_alive(int(tags.get("harness.pid", 0))):
                client.set_tag(run.info.run_id, "error", DIED)
                client.set_terminated(run.info.run_id, status="FAILED")

    def log_batch(self, handle: str, metrics: list[tuple], params: list[tuple], tags: list[tuple]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self.run(handle)
        client.log_batch(run_id, metrics=[Metric(*m) for m in metrics], params=[Param(*p) for p in params],
                         tags=[RunTag(*t) for t in tags])

    def log_artifact(self, handle: str, path: str) -> None:
        self.run(handle)  # still open
        self.artifact_repos[handle].log_artifact(path)

    def end(self, handle: str, status: str) -> None:
        client, run_id = self.run(handle)
        client.set_terminated(run_id, status=status)
        del self.runs[handle], self.artifact_repos[handle]

    def end_all_open(self) -> None:
        """The training process is gone: no run of its stays RUNNING."""
        for handle, (_, run_id) in list(self.runs.items()):
            try:
                self.run(handle)[0].set_tag(run_id, "error", "the process running this run died")
                self.end(handle, "FAILED")
            except Exception as err:  # the next start's orphan check is the fallback
                print(f"harness.mlflow_writer: could not end run {run_id}: {err}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def serve(connection: Connection) -> None:
    """Make the calls that arrive, in order, replying to each, until the socket closes."""
    import logging

    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)  # schema migrations log a screenful
    # Imported before the first call arrives: the training process starts this process early.
    import mlflow.store.tracking.sqlalchemy_store
    import mlflow.tracking  # noqa: F401

    store = _Store()
    while True:
        try:
            op, args = connection.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            break
        try:
            reply = (True, getattr(store, op)(*args))
        except Exception as err:  # sent back and raised in the training process
            reply = (False, _one_line(err))
        try:
            connection.send(reply)
        except OSError:
            break
    store.end_all_open()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))
    # Every call is made: skip the interpreter's teardown and MLflow's exit handlers (about a second
    # measured here), which the training process would wait for at its exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

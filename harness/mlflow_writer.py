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

A tracking server that goes away never stops the run: a call that fails because the server cannot
be reached (connection refused or reset, a timeout, a 5xx answer) is held, in order, with every
later call of its run behind it, and retried every few seconds while the training process goes
on; when the server is back the run's calls catch up. Ending the run waits a bounded time
(:data:`FINISH_WAIT_S`) for the server, then writes what is still held under the run's folder
(``unsent/``: metrics.csv, params.json, tags.json, artifacts.txt, run.json), which ``python -m
harness.mlflow_writer replay DIR`` sends later. A call the server refuses (a 4xx, a changed param)
fails as any failed call does. The training process logs when the server goes and comes back.

When the training process dies without ending its runs (SIGKILL, a crash), its socket
closes and the helper ends those runs as FAILED. The helper ignores SIGINT and SIGTERM, which
a terminal or a job scheduler also sends to it: the training process handles them, ends its
run as KILLED through the helper, and the helper exits when the socket closes.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import json
import logging
import os
import pickle
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.locking import file_lock, process_alive

DIED = "the process running this run died (found RUNNING at a later start)"
# How long ending a run waits for a tracking server that is away before its held calls are
# written under the run's folder instead; HARNESS_TRACKING_FINISH_WAIT_S overrides it.
FINISH_WAIT_S = 30.0
# MLflow 3's UI opens an experiment of this kind in its "Model training" view (runs, charts), not the
# GenAI "Evaluations" one; set when the writer creates the experiment, or finds it without a chosen kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RETRY_S = (2.0, 3.0, 5.0)  # between tries while a server is away, then every 5 s
# MLflow's own retries of one HTTP request (7, backoff 2: minutes), in the writer process only and
# unless set in the environment: the writer notices a server that is away in seconds and retries
# the held calls itself.
_MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
UNSENT = "unsent"

log = logging.getLogger(__name__)


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
            while self.connection.poll():  # replies, and notices that come without a call
                self._read_one()
        except OSError:
            self._gone()

    def _read_one(self) -> None:
        """Read one message: a reply to the oldest call unread, a notice (logged), or the failure of a
        call held while its server was away and refused once it was back."""
        try:
            kind, *message = self.connection.recv()
        except (EOFError, OSError):
            self._gone()
        except BaseException:  # e.g. Ctrl-C inside a message: the stream is out of step from here
            self.connection.close()  # the writer sees it close and ends this process's runs FAILED
            raise
        if kind == "notice":
            log.warning("%s", message[0])
            return
        if kind == "reply":
            reply = self.unread.popleft()
            reply.ok, reply.value = message
        else:  # "failed": owner, op, error
            reply = Reply(message[0], message[1])
            reply.ok, reply.value = False, message[2]
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

    def __init__(self, say: Callable[[tuple], None] = lambda message: None) -> None:
        self.clients: dict[str, Any] = {}
        self.runs: dict[str, tuple[str, str]] = {}  # handle -> (store URI, run id), until ended
        self.artifact_repos: dict[str, Any] = {}  # handle -> the run's artifact repository
        self.failed: dict[str, str] = {}  # handle -> why its run could not be opened
        self.folders: dict[str, str | None] = {}  # handle -> the run's folder, for what its server never got
        self.held: dict[str, _Held] = {}  # handle -> its calls waiting for a server that is away
        self.say = say  # a message to the training process, between replies

    def call(self, op: str, args: tuple) -> tuple:
        """Make one call of the training process's; the reply to send back. A call of a run whose
        server is away is held (with every later call of the run) and answered at once."""
        handle = args[0]
        if handle not in self.held:
            try:
                return "reply", True, getattr(self, op)(*args)
            except Exception as err:  # sent back and raised in the training process
                if op == "open" or not self._server_away(handle, err):
                    return "reply", False, _one_line(err)
                self._hold(handle, err)
        self.held[handle].calls.append((op, args))
        if op != "end":
            return "reply", True, None
        try:
            return "reply", True, self._end_held(handle)
        except Exception as err:  # the run's folder cannot be written
            return "reply", False, _one_line(err)

    def _server_away(self, handle: str, err: BaseException) -> bool:
        run = self.runs.get(handle)
        return run is not None and run[0].startswith(("http://", "https://")) and _unreachable(err)

    def _hold(self, handle: str, err: BaseException) -> None:
        uri = self.runs[handle][0]
        self.held[handle] = _Held(uri, retry_at=time.monotonic() + RETRY_S[0])
        self.say(("notice", f"tracking server {uri} unreachable ({_reason(err)}); logging continues locally "
                            "and catches up when it returns"))

    def retry_due(self) -> None:
        """Try again the held calls of the runs whose next try is due."""
        now = time.monotonic()
        for handle in [handle for handle, held in self.held.items() if held.retry_at <= now]:
            self._retry(handle)

    def next_retry_in(self) -> float | None:
        """Seconds until the next try of held calls is due; None when none is held."""
        if not self.held:
            return None
        return max(0.0, min(held.retry_at for held in self.held.values()) - time.monotonic())

    def _retry(self, handle: str) -> bool:
        """Make the held calls of ``handle`` in order until its server is still away; whether all are made."""
        held = self.held[handle]
        while held.calls:
            op, args = held.calls[0]
            try:
                getattr(self, op)(*args)
            except Exception as err:
                if self._server_away(handle, err):
                    held.tries += 1
                    held.retry_at = time.monotonic() + RETRY_S[min(held.tries, len(RETRY_S) - 1)]
                    return False
                self.say(("failed", handle, op, _one_line(err)))  # refused by the server, now back
            held.calls.popleft()
            held.caught_up += 1
        del self.held[handle]
        self.say(("notice", f"tracking server {held.uri} back; {held.caught_up} calls caught up"))
        return True

    def _end_held(self, handle: str) -> dict[str, Any] | None:
        """The run ends with calls held (its end last): wait up to :data:`FINISH_WAIT_S` for its
        server, then write what is still held under the run's folder; what was kept, or None."""
        if self._retry(handle):
            return None
        held = self.held[handle]
        wait = FINISH_WAIT_S
        with contextlib.suppress(KeyError, ValueError):
            wait = float(os.environ["HARNESS_TRACKING_FINISH_WAIT_S"])
        self.say(("notice", f"tracking server {held.uri} still unreachable; the run's end waits up to {wait:g} s "
                            f"to send its {len(held.calls)} held calls"))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(max(0.0, min(held.retry_at, deadline) - time.monotonic()))
            if self._retry(handle):
                return None
        return self._keep(handle)

    def _keep(self, handle: str) -> dict[str, Any]:
        """Write the held calls of ``handle`` under its run's folder and forget the run."""
        held = self.held.pop(handle)
        uri, run_id = self.runs.pop(handle)
        self.artifact_repos.pop(handle, None)
        metrics: list[tuple] = []
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        artifacts: list[str] = []
        status = None
        for op, args in held.calls:
            if op == "log_batch":
                metrics.extend(args[1])
                params.update(args[2])
                tags.update(args[3])
            elif op == "log_artifact":
                artifacts.append(args[1])
            elif op == "end":
                status = args[1]
        folder = _unsent_folder(Path(self.folders.get(handle) or os.getcwd()), run_id)
        _write_unsent(folder, uri, run_id, metrics, params, tags, artifacts, status)
        return {"uri": uri, "run_id": run_id, "folder": str(folder), "metrics": len(metrics), "params": len(params),
                "tags": len(tags), "artifacts": len(artifacts), "status": status}

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
             tags: dict[str, str], resume_run_id: str | None, cwd: str,
             folder: str | None = None) -> tuple[str, str, str]:
        """Create (or reopen) a run; returns its id, name and experiment id. ``folder``: the run's
        own folder, where what its server never got is written (default: ``cwd``)."""
        self.folders[handle] = folder
        try:
            return self._open(handle, uri, experiment, run_name, artifact_location, tags, resume_run_id, cwd)
        except Exception as err:
            self.failed[handle] = f"MLflow open failed: {_one_line(err)}"
            raise

    def _open(self, handle: str, uri: str, experiment: str, run_name: str | None, artifact_location: str | None,
              tags: dict[str, str], resume_run_id: str | None, cwd: str) -> tuple[str, str, str]:
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
                                 client.create_experiment(experiment, artifact_location=artifact_location,
                                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
                if found is not None and not _kind_chosen(found.tags.get(EXPERIMENT_KIND_TAG)):
                    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
        """The training process is gone: no run of its stays RUNNING (nor loses what its server never
        got: a run with calls held is ended FAILED when its server answers, else kept in its folder)."""
        for handle in list(self.held):
            self.held[handle].calls.extend([("log_batch", (handle, [], [], [("error", _GONE)])),
                                            ("end", (handle, "FAILED"))])
            if not self._retry(handle):
                try:
                    kept = self._keep(handle)
                    print(f"harness.mlflow_writer: {kept_line(kept)}", file=sys.stderr)
                except OSError as err:
                    print(f"harness.mlflow_writer: could not keep what the tracking server did not get: {err}",
                          file=sys.stderr)
        for handle, (_, run_id) in list(self.runs.items()):
            try:
                self.run(handle)[0].set_tag(run_id, "error", _GONE)
                self.end(handle, "FAILED")
            except Exception as err:  # the next start's orphan check is the fallback
                print(f"harness.mlflow_writer: could not end run {run_id}: {err}", file=sys.stderr)


@dataclass
class _Held:
    """A run's calls waiting for its tracking server, oldest first."""

    uri: str
    calls: deque[tuple[str, tuple]] = field(default_factory=deque)
    retry_at: float = 0.0
    tries: int = 0
    caught_up: int = 0


_GONE = "the process running this run died"


def _kind_chosen(kind: str | None) -> bool:
    """An experiment kind someone chose (kept), not one MLflow's UI only guessed (or none)."""
    return bool(kind) and not kind.endswith("_inferred") and kind != "no_inferred_type"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or an error behind it) says the server could not be reached, timed out or
    answered 5xx: worth trying again later. A 4xx (a refused value, a deleted run) is not."""
    import requests
    from mlflow.exceptions import RestException

    away = (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
            requests.exceptions.ChunkedEncodingError, ConnectionError, TimeoutError)
    seen: BaseException | None = err
    for _ in range(10):  # MLflow raises its own exception from the requests one
        if seen is None:
            return False
        if isinstance(seen, away):
            return True
        response = getattr(seen, "response", None)
        if isinstance(seen, requests.HTTPError) and response is not None and response.status_code >= 500:
            return True
        if isinstance(seen, RestException) and seen.get_http_status_code() >= 500:
            return True
        code = re.search(r"failed with error code (\d{3})", str(seen))  # a 5xx answer that is not JSON
        if code and int(code[1]) >= 500:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(err: BaseException) -> str:
    """A few words on why a server is away: 'Connection refused', 'read timed out', 'error code 503'."""
    text = str(err)
    for pattern in (r"\[Errno -?\d+\] ([^'\")]+)", r"(error code \d{3})", r"(too many \d{3} error responses)",
                    r"((?:Read|Connect)\w* timed out)", r"(Connection aborted)"):
        if found := re.search(pattern, text, re.IGNORECASE):
            return found[1].strip()
    return _one_line(err)[:120]


def _unsent_folder(folder: Path, run_id: str) -> Path:
    """``folder/unsent``, unless it holds another run's calls (a folder shared by runs)."""
    unsent = folder / UNSENT
    with contextlib.suppress(OSError, ValueError, KeyError):
        if json.loads((unsent / "run.json").read_text())["run_id"] != run_id:
            return folder / f"{UNSENT}-{run_id}"
    return unsent


def _write_unsent(folder: Path, uri: str, run_id: str, metrics: list[tuple], params: dict[str, str],
                  tags: dict[str, str], artifacts: list[str], status: str | None) -> None:
    """Add to ``folder`` (what an earlier attempt of the run kept there stays): metrics.csv
    (key, value, timestamp in ms, step), params.json, tags.json, artifacts.txt (a path a line: the
    files themselves are in the run's folder) and run.json (the server, the run id, its end status)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "metrics.csv"
    new = not table.exists()
    with open(table, "a", newline="") as out:
        rows = csv.writer(out)
        if new:
            rows.writerow(["key", "value", "timestamp", "step"])
        rows.writerows(metrics)
    for name, values in (("params.json", params), ("tags.json", tags)):
        path = folder / name
        merged = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(merged | values, indent=1) + "\n")
    with open(folder / "artifacts.txt", "a") as out:
        out.writelines(f"{path}\n" for path in artifacts)
    (folder / "run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run_id, "status": status},
                                                indent=1) + "\n")


def kept_line(kept: dict[str, Any]) -> str:
    """One line: what of a run did not reach its tracking server, where it is kept, how to send it."""
    counts = [f"{kept[key]} {key[:-1] if kept[key] == 1 else key}"
              for key in ("metrics", "params", "tags", "artifacts") if kept[key]]
    counts += [f"the run's end ({kept['status']})"] if kept["status"] else []
    what = (", ".join(counts[:-1]) + " and " + counts[-1]) if len(counts) > 1 else (counts or ["nothing"])[0]
    return (f"tracking: {what} did not reach {kept['uri']}; kept in {kept['folder']}/ (the server shows the "
            f"run as it last saw it, RUNNING; send them later with: python -m harness.mlflow_writer replay "
            f"{kept['folder']})")


def replay(folder: Path, uri: str | None = None) -> str:
    """Send what a run kept in ``folder`` (its ``unsent/``) to its tracking server (or ``uri``), in
    the order it was logged; the folder is renamed ``*.sent`` after. Returns what was sent."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    run = json.loads((folder / "run.json").read_text())
    uri = uri or run["tracking_uri"]
    client, run_id = MlflowClient(tracking_uri=uri), run["run_id"]
    params = [Param(k, v) for k, v in json.loads((folder / "params.json").read_text()).items()]
    tags = [RunTag(k, v) for k, v in json.loads((folder / "tags.json").read_text()).items()]
    with open(folder / "metrics.csv", newline="") as table:
        metrics = [Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"]))
                   for row in csv.DictReader(table)]
    artifacts = [line for line in (folder / "artifacts.txt").read_text().splitlines() if line]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for path in artifacts:
        client.log_artifact(run_id, path)
    if run["status"]:
        client.set_terminated(run_id, status=run["status"])
    sent = folder.with_name(f"{folder.name}.sent")
    folder.rename(sent)
    return (f"sent {len(metrics)} metrics, {len(params)} params, {len(tags)} tags, {len(artifacts)} artifacts"
            f"{' and the end (' + run['status'] + ')' if run['status'] else ''} to run {run_id} at {uri}; "
            f"{folder} is now {sent}")


def serve(connection: Connection) -> None:
    """Make the calls that arrive, in order, replying to each, until the socket closes; meanwhile try
    again the calls held for a server that is away."""
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)  # schema migrations log a screenful
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # a warning a try while a server is away
    for name, value in _MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(name, value)
    # Imported before the first call arrives: the training process starts this process early.
    import mlflow.store.tracking.sqlalchemy_store
    import mlflow.tracking  # noqa: F401

    calls: queue.Queue[tuple | None] = queue.Queue()
    threading.Thread(target=_receive, args=(connection, calls), daemon=True).start()

    def say(message: tuple) -> None:
        with contextlib.suppress(OSError):
            connection.send(message)

    store = _Store(say)
    while True:
        store.retry_due()
        try:
            call = calls.get(timeout=store.next_retry_in())
        except queue.Empty:
            continue
        if call is None:
            break
        try:
            connection.send(store.call(*call))
        except OSError:
            break
    store.end_all_open()


def _receive(connection: Connection, calls: queue.Queue) -> None:
    """Read the calls as they come, also while the writer waits for a server: the training process
    never waits for a full socket."""
    while True:
        try:
            calls.put(connection.recv())
        except (EOFError, OSError, pickle.UnpicklingError):
            calls.put(None)
            return


if __name__ == "__main__":
    if sys.argv[1:2] == ["replay"]:  # python -m harness.mlflow_writer replay DIR [TRACKING_URI]
        if len(sys.argv) not in (3, 4):
            sys.exit("usage: python -m harness.mlflow_writer replay <run dir>/unsent [tracking URI]")
        print(replay(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else None))
        sys.exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))
    # Every call is made: skip the interpreter's teardown and MLflow's exit handlers (about a second
    # measured here), which the training process would wait for at its exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""Experiment tracking behind one small interface: MLflow, or nothing.

The MLflow tracker talks to the store through ``MlflowClient`` (no global active run, so
several runs can live in one process) and buffers metrics, sending them with
``log_batch`` in chunks instead of one request per value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.config import TrackingBackend, TrackingConfig
from harness.errors import ConfigError
from harness.locking import file_lock, process_alive

log = logging.getLogger(__name__)

_BATCH_METRICS = 1000  # MLflow's limit per log_batch call
_BATCH_PARAMS = 100
_MAX_PARAM_CHARS = 6000
_FLUSH_SECONDS = 5.0


class Tracker:
    """The no-op tracker (``tracking=none``); the MLflow tracker overrides every method."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def flush(self) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    def describe(self) -> str:
        return "tracking off (tracking=none)"


class MlflowTracker(Tracker):
    """One MLflow run, created on construction and ended by :meth:`finish`."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None,
                 artifact_location: str | None = None, tags: Mapping[str, str] | None = None,
                 resume_run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # Two processes creating one SQLite store (or one experiment) at once race; take turns.
        lock = file_lock(Path(uri.removeprefix("sqlite:///") + ".lock")) if uri.startswith("sqlite:///") \
            else contextlib.nullcontext()
        with lock:
            self.client = MlflowClient(tracking_uri=uri)
            run = self._open_run(experiment, run_name, artifact_location, tags, resume_run_id)
        self.run_id = run.info.run_id
        self.run_name = run.info.run_name
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._finished = False

    def _open_run(self, experiment: str, run_name: str | None, artifact_location: str | None,
                  tags: Mapping[str, str] | None, resume_run_id: str | None) -> Any:
        if resume_run_id:  # reopen a run (a resumed sweep's parent, or a dead trial's run to close)
            run = self.client.get_run(resume_run_id)
            self.client.update_run(resume_run_id, status="RUNNING")
            self.experiment_id = run.info.experiment_id
        else:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (found.experiment_id if found is not None else
                                  self.client.create_experiment(experiment, artifact_location=artifact_location))
            self._close_orphans()
            owner = {"harness.host": socket.gethostname(), "harness.pid": str(os.getpid())}
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**owner, **(tags or {})})
        return run

    def _close_orphans(self) -> None:
        """End as FAILED the RUNNING runs whose process on this machine is gone (a SIGKILL, a crash)."""
        from mlflow.entities import ViewType

        host = socket.gethostname()
        running = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        for run in running:
            tags = run.data.tags
            if tags.get("harness.host") == host and not process_alive(int(tags.get("harness.pid", 0))):
                self.client.set_tag(run.info.run_id, "error", "the process running this run died "
                                    "(found RUNNING at a later start)")
                self.client.set_terminated(run.info.run_id, status="FAILED")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH_PARAMS])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        if len(self._pending) >= _BATCH_METRICS or time.monotonic() - self._last_flush > _FLUSH_SECONDS:
            self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=pending[i:i + _BATCH_METRICS])
        self._last_flush = time.monotonic()

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is buffered and end the run; safe to call twice."""
        if self._finished:
            return
        self._finished = True
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} ({self.run_name}) in experiment {self.experiment_id} at {self.uri}"

    def ui_command(self) -> str | None:
        """The command that opens the MLflow UI on this store, and the run's address in it."""
        if not self.uri.startswith("sqlite:"):
            base = self.uri.rstrip("/")
            return f"open {base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return (f"mlflow ui --backend-store-uri {_relative_sqlite_uri(self.uri)}  then open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}")


def make_tracker(cfg: TrackingConfig, outputs_dir: Path, run_name: str,
                 tags: Mapping[str, str] | None = None, resume_run_id: str | None = None) -> Tracker:
    if cfg.backend == TrackingBackend.none:
        return Tracker()
    _quiet_mlflow_logs()
    uri = tracking_uri(cfg, outputs_dir)
    if uri.startswith(("http://", "https://")):
        _check_server(uri, "tracking.uri" if cfg.uri else "MLFLOW_TRACKING_URI")
    artifact_location = None
    if uri.startswith("sqlite:///") and not (cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        outputs_dir.mkdir(parents=True, exist_ok=True)
        artifact_location = (outputs_dir / "mlartifacts").resolve().as_uri()  # artifacts under outputs/ too
    return MlflowTracker(uri, cfg.experiment, cfg.run_name or run_name, artifact_location, tags, resume_run_id)


def _check_server(uri: str, key: str) -> None:
    """Fail in seconds, before any training, when no tracking server answers (MLflow's own client
    retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"{key}={uri}: no MLflow tracking server answers ({reason}); start one with "
                          "`mlflow server`, or leave tracking.uri unset for the local store") from None


def tracking_uri(cfg: TrackingConfig, outputs_dir: Path) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store ``<outputs_dir>/mlflow.db``."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(outputs_dir / 'mlflow.db').resolve()}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys, e.g. {"prune": {"target_sparsity": 0.9}} -> {"prune.target_sparsity": 0.9}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _relative_sqlite_uri(uri: str) -> str:
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        return f"sqlite:///{path.relative_to(Path.cwd())}"
    except ValueError:
        return uri


def _quiet_mlflow_logs() -> None:
    # The store's schema migrations log a screenful at INFO on first use.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)

"""Experiment tracking behind one small interface: MLflow, or nothing.

The MLflow tracker buffers params and metrics and sends them with ``log_batch`` in chunks, not one
request per value; a helper process makes the store calls (:mod:`harness.mlflow_writer`), so
training does not wait for them. Runs are addressed by id (no global active run), so several
runs can live in one process.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from harness.config import TrackingBackend, TrackingConfig
from harness.errors import ConfigError, RunStopped
from harness.mlflow_writer import kept_line, writer
from harness.stores import MLFLOW_TABLES, check_sqlite_store

_BATCH_METRICS = 1000  # MLflow's limit per log_batch call
_BATCH_PARAMS = 100
_MAX_PARAM_CHARS = 6000
_FLUSH_SECONDS = 5.0

log = logging.getLogger(__name__)

# MLflow's display tags (mlflow/utils/mlflow_tags.py, and the UI's own constants).
NOTE_TAG = "mlflow.note.content"  # a run's description, markdown
BEST_TAG = "harness.best"  # a sweep's best trial (MlflowTracker.mark_best)
BEST_SUFFIX = " (best)"  # ... and the end of its name
RUN_COLOR_TAG = "mlflow.runColor"  # a run's colour in the UI's charts and run list, a CSS colour
SWEEP_COLOR = "#d62728"  # a sweep's own run: red, a colour no trial gets
TRIAL_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#393b79", "#637939", "#5254a3", "#6b6ecf", "#3182bd", "#31a354", "#756bb1", "#636363")


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
    """One MLflow run, created on construction and ended by :meth:`finish`; the store calls are
    made by this process's MLflow writer (:mod:`harness.mlflow_writer`)."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None,
                 artifact_location: str | None = None, tags: Mapping[str, str] | None = None,
                 resume_run_id: str | None = None, spool_dir: Path | None = None) -> None:
        """``spool_dir``: the run's own folder, where what a tracking server that went away never got is
        written at the end (``unsent/``); default: Hydra's output folder of this job, else the cwd."""
        self.uri = uri
        self.writer = writer()
        # The writer opens the run while this process goes on (it may still be importing MLflow);
        # calls for the run name it by this handle until its id is known.
        self._handle = uuid.uuid4().hex
        owner = {"harness.host": socket.gethostname(), "harness.pid": str(os.getpid())}
        folder = Path(spool_dir or _hydra_output_dir() or os.getcwd()).resolve()
        self._opened = self.writer.send(self._handle, "open", uri, experiment, run_name, artifact_location,
                                        {**owner, **(tags or {})}, resume_run_id, os.getcwd(), str(folder))
        self._run: tuple[str, str, str] | None = None  # id, name, experiment id
        self._params: list[tuple[str, str]] = []
        self._pending: list[tuple[str, float, int, int]] = []
        self._last_flush = time.monotonic()
        self._finished = False

    def _opened_run(self) -> tuple[str, str, str]:
        if self._run is None:
            self._run = self.writer.wait(self._opened)
        return self._run

    @property
    def run_id(self) -> str:  # type: ignore[override]
        return self._opened_run()[0]

    @property
    def run_name(self) -> str:
        return self._opened_run()[1]

    @property
    def experiment_id(self) -> str:
        return self._opened_run()[2]

    def _log_batch(self, metrics: list | None = None, params: list | None = None, tags: list | None = None) -> None:
        self.writer.send(self._handle, "log_batch", metrics or [], params or [], tags or [])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Buffered like metrics, sent at the next :meth:`flush`."""
        self._params.extend((k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items())

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._run is None:  # a store that cannot open the run stops training at its first step
            self.writer.read_ready(self._handle)
            if self._opened.done:
                self._opened_run()
        now = int(time.time() * 1000)
        self._pending.extend((k, float(v), now, step or 0) for k, v in metrics.items())
        if len(self._pending) >= _BATCH_METRICS or time.monotonic() - self._last_flush > _FLUSH_SECONDS:
            self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._log_batch(tags=[(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path) -> None:
        """Copied into the run's artifacts by the writer, later: the file must not change after this."""
        self.writer.send(self._handle, "log_artifact", str(Path(path).resolve()))

    def log_model(self, model: Any, example: Any, folder: Path, register_as: str | None = None) -> str:
        """Log ``model`` (a torch module) as the run's MLflow model, artifact ``model``, its signature and
        input example from ``example`` (a batch of inputs); with ``register_as``, also register it as a
        new version of that model. Saved first to ``folder`` (replaced), beside the run's other files.
        Made by this process once the writer has stored everything sent before, and done on return;
        returns one line saying where the model is."""
        # Late imports: MLflow takes seconds to import, which the training process otherwise never pays
        # (its store calls are the writer's); a run pays it once, here, at its end. The writer has no
        # call for a folder of artifacts nor the registry, so this process uploads and registers.
        import shutil

        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature
        from mlflow.tracking import MlflowClient

        model = copy.deepcopy(model).cpu().eval()
        inputs = example.detach().cpu()
        with torch.no_grad():
            outputs = model(inputs)
        signature = infer_signature(inputs.numpy(), outputs.numpy())
        shutil.rmtree(folder, ignore_errors=True)  # save_model wants a new folder (a resumed run saves again)
        # Pickled (MLflow's default here is torch.export, a graph fixed to the example's batch size, with
        # no modules to read weights from): the loaded model is the pruned nn.Module, its exact zeros
        # included; loading it needs this package installed (its model classes).
        mlflow.pytorch.save_model(model, str(folder), signature=signature, input_example=inputs.numpy(),
                                  serialization_format="pickle",
                                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        if self.uri.startswith(("http://", "https://")):
            _check_server(self.uri, "tracking.uri")  # away: fail in seconds (MLflow's own client retries for minutes)
        # A barrier: the writer has made every call sent before (the run is open, its files uploaded).
        self.writer.wait(self.writer.send(self._handle, "log_batch", [], [], []))
        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        client.log_artifacts(self.run_id, str(folder), "model")
        client.set_tag(self.run_id, "harness.model", "model")  # the artifact path of the run's MLflow model
        if register_as is None:
            return f"model: logged as the run's MLflow model (artifact `model`, runs:/{self.run_id}/model)"
        source = f"{client.get_run(self.run_id).info.artifact_uri}/model"
        with contextlib.suppress(Exception):  # registered by an earlier run already (checked just below)
            client.create_registered_model(register_as)
        client.get_registered_model(register_as)
        version = client.create_model_version(register_as, source, run_id=self.run_id).version
        client.set_tag(self.run_id, "harness.registered_model", f"models:/{register_as}/{version}")
        return (f"model: logged as the run's MLflow model (artifact `model`) and registered as "
                f"models:/{register_as}/{version}")

    def flush(self) -> None:
        """Send the buffered params and metrics to the writer, which stores them while this process
        goes on."""
        params, self._params = self._params, []
        for i in range(0, len(params), _BATCH_PARAMS):
            self._log_batch(params=params[i:i + _BATCH_PARAMS])
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), _BATCH_METRICS):
            self._log_batch(metrics=pending[i:i + _BATCH_METRICS])
        self._last_flush = time.monotonic()

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is buffered, end the run and wait until the store has all of it; safe to call twice."""
        if self._finished:
            return
        self._finished = True
        try:
            try:
                self.flush()
            finally:
                if not self.writer.settle(self._opened):
                    raise self._opened.error()  # a run the store could not open has nothing to end
                # Ended even when an earlier call of this run failed (raised once the end is stored).
                end = self.writer.send(self._handle, "end", status, check=False)
                if self.writer.settle(end) and end.value:  # a server away: what it never got, kept on disk
                    log.warning("%s", kept_line(end.value))
                self.writer.wait(end)
        finally:
            self.writer.forget(self._handle)

    def mark_best(self, run_ids: list[str]) -> bool:
        """Mark a sweep's best trials among this (parent) run's children: tagged ``harness.best=true`` and
        named ``<name> (best)``, so that the runs list alone tells which is best; a child marked by an
        earlier round of the sweep that is no longer best loses both. Made from this process, at once;
        False (and a warning) when the store refuses."""
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(tracking_uri=self.uri)
            children = client.search_runs([self.experiment_id], max_results=5000,
                                          filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'")
            for run in children:
                best = run.info.run_id in run_ids
                name = run.info.run_name or ""
                plain = name.removesuffix(BEST_SUFFIX)
                if best or run.data.tags.get(BEST_TAG) == "true":
                    client.set_tag(run.info.run_id, BEST_TAG, "true" if best else "false")
                if name != plain + (BEST_SUFFIX if best else ""):
                    client.set_tag(run.info.run_id, "mlflow.runName", plain + (BEST_SUFFIX if best else ""))
            return True
        except Exception as err:  # the sweep's result stands without the marks
            log.warning("could not mark the best MLflow runs %s: %s", ", ".join(run_ids), err)
            return False

    def describe(self) -> str:
        return f"MLflow run {self.run_id} ({self.run_name}) in experiment {self.experiment_id} at {self.uri}"

    def ui_command(self) -> str | None:
        """The command that opens the MLflow UI on this store, and the run's address in it."""
        page = ui_run_page(self.experiment_id, self.run_id)
        if not self.uri.startswith("sqlite:"):
            return f"open {self.uri.rstrip('/')}/{page}"
        return f"mlflow ui --backend-store-uri {_relative_sqlite_uri(self.uri)}  then open http://127.0.0.1:5000/{page}"


def ui_run_page(experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, relative to the UI's address. MLflow 3's UI keeps its GenAI / Model
    training switch in the browser (GenAI unless chosen), not from the experiment's kind: the
    ``workflowType`` parameter opens the page in "Model training", with the run's model metrics."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _hydra_output_dir() -> str | None:
    """This Hydra job's output folder (the run's folder), when running under Hydra."""
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


@contextlib.contextmanager
def finished_or_failed(tracker: Tracker) -> Iterator[None]:
    """End the tracked run as FINISHED, FAILED (with the error as a tag) or KILLED; never RUNNING."""
    try:
        yield
    except (KeyboardInterrupt, RunStopped) as err:
        if isinstance(err, RunStopped):  # (the description too: what the run's page shows first)
            with contextlib.suppress(Exception):
                tracker.set_tags({"harness.stopped": str(err), NOTE_TAG: f"**Stopped** before its end: {err}"})
        tracker.finish("KILLED")
        raise
    except BaseException as err:
        error = f"{type(err).__name__}: {err}"[:5000]
        with contextlib.suppress(Exception):
            tracker.set_tags({"error": error, NOTE_TAG: f"**Failed**: {error}"})
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def fail_run(uri: str, run_id: str, reason: str) -> bool:
    """End another process's run FAILED, with ``reason`` as its ``error`` tag, if it is still RUNNING: a
    sweep trial's run lost with its machine, which no process of that machine will end. False (and a
    warning) when the store cannot do it."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(run_id, "error", reason[:5000])
        client.set_terminated(run_id, status="FAILED")
        return True
    except Exception as err:  # the sweep goes on; the run stays as it was
        log.warning("could not end MLflow run %s as FAILED: %s", run_id, str(err).splitlines()[0][:300])
        return False


def make_tracker(cfg: TrackingConfig, outputs_dir: Path, run_name: str,
                 tags: Mapping[str, str] | None = None, resume_run_id: str | None = None,
                 spool_dir: Path | None = None) -> Tracker:
    """The run's tracker; ``spool_dir`` (the run's folder) keeps what a tracking server that went away
    never got (see :class:`MlflowTracker`)."""
    if cfg.backend == TrackingBackend.none:
        return Tracker()
    uri = tracking_uri(cfg, outputs_dir)
    key = "MLFLOW_TRACKING_URI" if not cfg.uri and os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    if uri.startswith(("http://", "https://")):
        _check_server(uri, key)
    check_sqlite_store(uri, key, "MLflow", MLFLOW_TABLES)
    artifact_location = None
    if uri.startswith("sqlite:///") and not (cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        outputs_dir.mkdir(parents=True, exist_ok=True)
        artifact_location = (outputs_dir / "mlartifacts").resolve().as_uri()  # artifacts under outputs/ too
    return MlflowTracker(uri, cfg.experiment, cfg.run_name or run_name, artifact_location, tags, resume_run_id,
                         spool_dir=spool_dir)


def _check_server(uri: str, key: str) -> None:
    """Fail in seconds, before any training, when no tracking server answers (MLflow's own client
    retries for minutes)."""
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


"""MLflow runs of training jobs: one run per training run, kept across restarts and resubmits.

The driver (:func:`adps.orchestration.train.train`) opens the run with :func:`open_run` before any worker starts and
hands its id to the workers; rank 0 logs through :class:`RunLogger`. Because the run is found again by its *run key*
(the storage path and run name that also identify the Ray Train run folder), a worker-group restart and a
resubmission of the same run continue the same MLflow run instead of opening a duplicate.

Tracking URI: the config's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``.adps/mlflow.db``
in the current folder (:func:`resolve_tracking_uri`). MLflow 3 refuses the plain file store, and a relative SQLite
path would point elsewhere in each Ray worker, so the URI is made absolute on the driver.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from adps.config import ConfigFile
from adps.data import storage
from adps.images import ImageDataset

__all__ = ["DEFAULT_EXPERIMENT", "RUN_KEY_TAG", "QueuedRunLogger", "RunConfig", "RunLogger", "SUBMITTED_JOB_ENV",
           "artifact_location", "config_hash", "end_run", "find_run", "flat_params", "git_commit",
           "image_listing_checksum", "manifest_checksum", "open_run", "process_tracking_uri", "refuse_job_scratch",
           "resolve_tracking_uri"]

DEFAULT_STORE = Path(".adps") / "mlflow.db"
"""The embedded default store, relative to the folder a job starts in."""
DEFAULT_EXPERIMENT = "adps"
RUN_KEY_TAG = "adps.run_key"
"""Tag that identifies the training run (storage path + run name) an MLflow run belongs to."""
_SQLITE = "sqlite:///"


@dataclass(frozen=True)
class RunConfig(ConfigFile):
    """The keys of every job that samples with a network and logs one MLflow run (the evaluations, ``adps fid``,
    ``adps tune``): each job's config adds its own."""

    seed: int = 0
    """Seeds every draw (samplers' noise, masks, measurement matrices and noise) per slice or image, reproducibly."""
    amp: str = ""
    """``bf16``: the network in bf16 autocast (GPU only; the natural-image evaluation also takes ``fp16``)."""
    tracking_uri: str = ""
    """MLflow tracking URI (default ``$MLFLOW_TRACKING_URI`` or ``.adps/mlflow.db``: :func:`resolve_tracking_uri`)."""
    experiment: str = DEFAULT_EXPERIMENT
    """MLflow experiment of the job's run."""

    AMP_MODES: ClassVar[tuple[str, ...]] = ("", "bf16")

    def validate(self) -> None:
        """Check values that need no I/O; names the key at fault."""
        if self.amp not in self.AMP_MODES:
            raise ValueError(f"config key 'amp' must be {' or '.join(repr(m) for m in self.AMP_MODES)}, got {self.amp!r}")


SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray (2.60) in the driver of a job started by ``ray job submit`` (``jobs/uploaded_tree.py`` names it again:
it runs before adps is imported)."""


def refuse_job_scratch(path: str | os.PathLike[str], what: str, remedy: str) -> None:
    """In a submitted job, refuse a local ``path`` inside the job's copy of its working dir
    (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``, where the job starts): Ray deletes it with the
    session, and the runs, results or store written there with it."""
    if SUBMITTED_JOB_ENV not in os.environ or "://" in str(path):
        return
    cwd = Path.cwd().resolve()
    if "working_dir_files" not in cwd.parts:
        return
    resolved = Path(path).expanduser().resolve()
    if resolved == cwd or cwd in resolved.parents:
        raise ValueError(f"{what} would be {resolved}, inside this job's copy of its working dir, which Ray deletes "
                         f"with its session: {remedy} (docs/deployment.md)")


def resolve_tracking_uri(configured: str = "", *, create: bool = True) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/.adps/mlflow.db``. A relative SQLite
    path is made absolute (Ray workers run in other folders) and its folder is created; with ``create=False`` (a
    reader: nothing to find in a store that is not there) a missing SQLite store is an error naming it."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or _SQLITE + str(DEFAULT_STORE)
    if uri.startswith(_SQLITE):
        path = Path(uri[len(_SQLITE):]).expanduser().resolve()
        if not create and not path.is_file():
            where = "the tracking_uri given" if configured else "$MLFLOW_TRACKING_URI" if os.environ.get(
                "MLFLOW_TRACKING_URI") else "the default store (no tracking_uri given, $MLFLOW_TRACKING_URI not set)"
            raise FileNotFoundError(f"no MLflow store at {path} ({where}): point MLFLOW_TRACKING_URI or tracking_uri "
                                    "at the store or server the model was registered in")
        refuse_job_scratch(path, "the MLflow store", "pass MLFLOW_TRACKING_URI in the job's runtime env "
                           "(--runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": ...}}') or the config key "
                           "tracking_uri")
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = _SQLITE + str(path)
    elif "://" not in uri:
        raise ValueError(f"config key 'tracking_uri': {uri!r} is not a tracking URI; use http(s)://host:port or "
                         "sqlite:///path/mlflow.db (MLflow 3 refuses plain folders)")
    return uri


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block, then put back what was there before,
    ``$MLFLOW_TRACKING_URI`` included. MLflow's fluent API (``start_run``, ``log_model``, resolving ``models:/`` URIs)
    follows only the process-wide URI, and ``mlflow.set_tracking_uri`` also rewrites the environment variable: without
    the restore, a library call would leave its caller (a notebook, a test session, the next job in a driver) pointed
    at another server."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    explicit = getattr(tracking_utils, "_tracking_uri", None)  # None: MLflow follows the environment
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(explicit)
        if environment is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environment


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store (``file://<store folder>/mlartifacts``, a
    subfolder per experiment; MLflow's own ``./mlruns`` of the current folder scatters artifacts into the working trees
    of jobs and Ray workers), else None (the server's default, e.g. its proxied artifact store)."""
    if not tracking_uri.startswith(_SQLITE):
        return None
    return (Path(tracking_uri[len(_SQLITE):]).parent / "mlartifacts").as_uri()


def flat_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Config values as MLflow params (strings; sequences comma-joined, empty strings kept)."""
    return {key: ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
            for key, value in values.items()}


def config_hash(values: Mapping[str, Any]) -> str:
    """Short sha256 of a config's canonical JSON: equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str:
    """Commit of the package's checkout, ``$ADPS_GIT_COMMIT`` (set in images built without ``.git``), or ``unknown``."""
    if os.environ.get("ADPS_GIT_COMMIT"):
        return os.environ["ADPS_GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                                text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def manifest_checksum(dataset: str) -> str:
    """sha256 of the prepared dataset's ``manifest.json`` (which holds every shard's sha256)."""
    return hashlib.sha256(storage.read_bytes(storage.join(dataset, "manifest.json"))).hexdigest()


def image_listing_checksum(dataset: str) -> str:
    """sha256 of an image dataset's sorted listing (:class:`adps.images.ImageDataset`): the image names relative to
    the folder, prefix or zip, one per line. An image folder has no manifest, and hashing every image would read the
    whole dataset on the driver; the listing identifies the set of images, and the per-image erasure masks are keyed
    on its order (:func:`adps.images.fixed_erasure_mask`). It misses an image whose content changed under its name."""
    with ImageDataset(dataset, 1) as images:
        names = images.files if images.is_zip else [storage.basename(path) for path in images.files]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def _experiment_artifacts(tracking_uri: str, experiment: str) -> str | None:
    root = artifact_location(tracking_uri)
    return None if root is None else f"{root}/{re.sub(r'[^A-Za-z0-9._-]', '_', experiment)}"


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_run(tracking_uri: str, experiment: str, run_key: str) -> Any:
    """The (first) MLflow run of ``run_key`` in ``experiment``, or None."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = {_quoted(run_key)}",
                              max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def open_run(tracking_uri: str, experiment: str, run_key: str, run_name: str, params: Mapping[str, Any],
             tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of ``run_key``, created on first use (with ``params`` and ``tags``) or reopened (status back to
    RUNNING): ``(run_id, resumed)``. A resume logs no params (MLflow refuses changing a param's value); the keys whose
    value changed since the run was created are listed in the tag ``adps.changed_on_resume`` instead."""
    client = _client(tracking_uri)
    run = find_run(tracking_uri, experiment, run_key)
    flat = flat_params(params)
    if run is not None:
        changed = sorted(key for key, value in flat.items() if run.data.params.get(key, value) != value)
        client.update_run(run.info.run_id, status="RUNNING")
        if changed:
            client.set_tag(run.info.run_id, "adps.changed_on_resume", ",".join(changed))
        return run.info.run_id, True
    from mlflow.entities import Param, RunTag

    experiment_id = _experiment_id(client, tracking_uri, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    items = [Param(key, value) for key, value in flat.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    client.set_tag(run.info.run_id, "mlflow.runName", run_name)
    client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    return run.info.run_id, False


def _experiment_id(client: Any, tracking_uri: str, experiment: str) -> str:
    """The id of ``experiment``, created (with its own artifact location) if it does not exist. Runs of a sweep start
    concurrently: two may both find the experiment missing and both create it; the loser's creation fails on the
    store's unique name, and it takes the winner's experiment."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_experiment_artifacts(tracking_uri, experiment))
    except MlflowException:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ``FINISHED`` / ``FAILED`` / ``KILLED``."""
    _client(tracking_uri).set_terminated(run_id, status=status)


def metric_entries(metrics: Mapping[str, Any], step: int) -> list[Any]:
    """The finite numeric entries of ``metrics`` (no lists or NaN) as MLflow ``Metric`` s at ``step``, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)]


class RunLogger:
    """Logs metrics and tags to one MLflow run, synchronously (the driver)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = _client(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the finite numeric entries of ``metrics`` at ``step`` (others are skipped)."""
        entries = metric_entries(metrics, step)
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


class QueuedRunLogger:
    """Logs metrics and tags to one MLflow run without ever holding up training (rank 0).

    A call only queues what it logs (metrics keep the time they were logged at); a background thread sends the queue
    in order, merging queued metrics into batches. While the tracking server cannot be reached, the thread keeps the
    queue and retries after 1 s, doubling up to ``max_backoff_s``; one line says when MLflow became unreachable, one
    when it is back. :meth:`close` waits (up to a limit) for the queue to drain. The thread's requests fail fast
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 0 and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 30 s in this process, unless set):
    MLflow's own retries would hold the queue for minutes after the server is back.
    """

    _BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, tracking_uri: str, run_id: str, *, max_backoff_s: float = 30.0) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.run_id = run_id
        self.max_backoff_s = max_backoff_s
        self.failed_attempts = 0
        """Sends that failed (a test can show that an outage was met)."""
        self._sender = RunLogger(tracking_uri, run_id)
        self._queue: collections.deque[tuple[str, list[Any]]] = collections.deque()
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._send_forever, name="adps-mlflow-logger", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue the finite numeric entries of ``metrics`` at ``step``."""
        self._put("metrics", metric_entries(metrics, step))

    __call__ = log_metrics

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._put("tags", [RunTag(key, str(value)) for key, value in tags.items()])

    @property
    def pending(self) -> int:
        """Queued items not yet sent."""
        with self._changed:
            return len(self._queue)

    def close(self, timeout_s: float = 300.0) -> int:
        """Send what is queued, waiting up to ``timeout_s``; returns how many items stayed unsent (and says so: they are
        lost when this process ends)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            while self._queue and time.monotonic() < deadline:
                self._changed.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            left = len(self._queue)
        if left:
            print(f"adps: warning: MLflow still unreachable after {timeout_s:g} s: {left} queued metric / tag "
                  f"batches of run {self.run_id} were not sent", flush=True)
        return left

    def _put(self, kind: str, items: list[Any]) -> None:
        if not items:
            return
        with self._changed:
            self._queue.append((kind, items))
            self._changed.notify_all()

    def _next_batch(self) -> tuple[str, list[Any], int]:
        """The head of the queue, with the metric items behind it merged in: (kind, items, count)."""
        kind, items = self._queue[0]
        count = 1
        if kind == "metrics":
            items = list(items)
            while count < len(self._queue) and self._queue[count][0] == "metrics" \
                    and len(items) + len(self._queue[count][1]) <= self._BATCH:
                items.extend(self._queue[count][1])
                count += 1
        return kind, items, count

    def _send_forever(self) -> None:
        backoff = 1.0
        outage_since: float | None = None
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                kind, items, count = self._next_batch()
            try:
                self._sender.client.log_batch(self.run_id, **{kind: items})  # kind is "metrics" or "tags"
            except Exception as err:  # noqa: BLE001 - any client or server error: keep it and retry
                self.failed_attempts += 1
                if outage_since is None:
                    outage_since = time.monotonic()
                    print(f"adps: warning: MLflow unreachable ({type(err).__name__}: {str(err)[:200]}); "
                          "training goes on, and metrics are queued and retried until it is back", flush=True)
                with self._changed:
                    # Hurry while closing, but still back off: the server may be restarting.
                    self._changed.wait(timeout=min(backoff, 2.0) if self._closing else backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            with self._changed:
                for _ in range(count):
                    self._queue.popleft()
                self._changed.notify_all()
                left = len(self._queue)
            if outage_since is not None:
                print(f"adps: MLflow reachable again after {time.monotonic() - outage_since:.0f} s; sending the "
                      f"queued metrics ({left} batches still queued)", flush=True)
                outage_since = None
            backoff = 1.0

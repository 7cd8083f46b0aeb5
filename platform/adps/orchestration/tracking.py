"""MLflow runs of training jobs: one run per training run, kept across restarts and resubmits.

The driver (:func:`adps.orchestration.train.train`) opens the run with :func:`open_run` before
any worker starts and hands its id to the workers; rank 0 logs through :class:`RunLogger`.
Because the run is found again by its *run key* (the storage path and run name that also
identify the Ray Train run folder), a worker-group restart and a resubmission of the same run
continue the same MLflow run instead of opening a duplicate.

Tracking URI: the config's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
store ``.adps/mlflow.db`` in the current folder (:func:`resolve_tracking_uri`). MLflow 3 refuses
the plain file store, and a relative SQLite path would point elsewhere in each Ray worker, so
the URI is made absolute on the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_EXPERIMENT",
    "RUN_KEY_TAG",
    "RunLogger",
    "artifact_location",
    "config_hash",
    "end_run",
    "find_run",
    "flat_params",
    "git_commit",
    "manifest_checksum",
    "open_run",
    "resolve_tracking_uri",
]

DEFAULT_STORE = Path(".adps") / "mlflow.db"
"""The embedded default store, relative to the folder a job starts in."""
DEFAULT_EXPERIMENT = "adps"
RUN_KEY_TAG = "adps.run_key"
"""Tag that identifies the training run (storage path + run name) an MLflow run belongs to."""
_SQLITE = "sqlite:///"


def resolve_tracking_uri(configured: str = "") -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/.adps/mlflow.db``.

    A relative SQLite path is made absolute (Ray workers run in other folders) and its folder
    is created.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or _SQLITE + str(DEFAULT_STORE)
    if uri.startswith(_SQLITE):
        path = Path(uri[len(_SQLITE):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = _SQLITE + str(path)
    elif "://" not in uri:
        raise ValueError(
            f"config key 'tracking_uri': {uri!r} is not a tracking URI; use http(s)://host:port or "
            "sqlite:///path/mlflow.db (MLflow 3 refuses plain folders)"
        )
    return uri


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store
    (``file://<store folder>/mlartifacts``; each experiment gets a subfolder), else None (the
    server's default, e.g. its proxied artifact store).

    MLflow's own default for a SQLite store is ``./mlruns`` of whatever folder the process runs
    in, which scatters model artifacts into the working trees of jobs and Ray workers.
    """
    if not tracking_uri.startswith(_SQLITE):
        return None
    return (Path(tracking_uri[len(_SQLITE):]).parent / "mlartifacts").as_uri()


def flat_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Config values as MLflow params (strings; sequences comma-joined, empty strings kept)."""
    params = {}
    for key, value in values.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        params[key] = str(value)
    return params


def config_hash(values: Mapping[str, Any]) -> str:
    """Short sha256 of a config's canonical JSON: equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str:
    """Commit of the package's source checkout, ``$ADPS_GIT_COMMIT`` (set in images built
    without ``.git``), or ``unknown``."""
    if os.environ.get("ADPS_GIT_COMMIT"):
        return os.environ["ADPS_GIT_COMMIT"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def manifest_checksum(dataset: str) -> str:
    """sha256 of the prepared dataset's ``manifest.json`` (which holds every shard's sha256)."""
    from adps.data import storage

    return hashlib.sha256(storage.read_bytes(storage.join(dataset, "manifest.json"))).hexdigest()


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
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = {_quoted(run_key)}", max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def open_run(
    tracking_uri: str,
    experiment: str,
    run_key: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """The MLflow run of ``run_key``, created on first use (with ``params`` and ``tags``) or
    reopened (status back to RUNNING); returns ``(run_id, resumed)``.

    On a resume, params are not logged again (MLflow refuses changing a param's value); keys
    whose value changed since the run was created are listed in the tag
    ``adps.changed_on_resume`` instead.
    """
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

    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(
        experiment, artifact_location=_experiment_artifacts(tracking_uri, experiment)
    )
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    items = [Param(key, value) for key, value in flat.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    client.set_tag(run.info.run_id, "mlflow.runName", run_name)
    client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    return run.info.run_id, False


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ``FINISHED`` / ``FAILED`` / ``KILLED``."""
    _client(tracking_uri).set_terminated(run_id, status=status)


class RunLogger:
    """Logs metrics and tags to one MLflow run (rank 0 of a training run)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = _client(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the finite numeric entries of ``metrics`` at ``step`` (others are skipped)."""
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        """:meth:`log_metrics`, but a tracking outage only warns: training goes on."""
        try:
            self.log_metrics(metrics, step)
        except Exception as err:  # noqa: BLE001 - any client or server error
            print(f"adps: warning: MLflow logging failed at step {step} (training continues): {err}", flush=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

"""The paper's whole training grid as concurrent Ray Train runs (``adps sweep``).

One config file per run (``configs/<method>_r<R>.yaml``, the grid of :data:`adps.nn.learning_config.PAPER_GRID`;
``configs/images/image_p<p>.yaml``, the natural-image models of :data:`~adps.nn.learning_config.IMAGE_GRID`), the
same ``--set`` overrides applied to each. Every run is one :func:`adps.orchestration.train.train` call inside a Ray
task (a zero-CPU driver: its workers hold the resources), at most ``max_concurrent`` at a time: by default as many as
the cluster's GPUs (or CPUs, for CPU runs) hold runs of ``num_workers`` workers.

Resumable: a run whose MLflow run has finished and registered its model is skipped; any other is (re)started, and Ray
Train resumes it from its latest checkpoint. A failed run does not stop the others; the sweep ends with a table of
runs, status and registered versions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adps.nn.learning_config import IMAGE_GRID, PAPER_GRID, image_run_name
from adps.orchestration.tracking import find_run, resolve_tracking_uri
from adps.orchestration.train import finished_in_another_store, finished_record, train, with_absolute_paths
from adps.orchestration.train_config import TrainConfig

__all__ = ["SweepRun", "format_summary", "grid_gaps", "load_sweep_configs", "run_sweep", "runs_at_once"]


@dataclass
class SweepRun:
    """One row of the sweep's summary."""

    run_name: str
    method: str
    r_train: float
    status: str = "pending"
    """pending, done (skipped: finished before), finished, or failed."""
    step: int | None = None
    loss: float | None = None
    val_nrmse: float | None = None
    model: str = ""
    """The registered ``name/version``."""
    seconds: float = 0.0
    error: str = ""
    val_mse: float | None = None
    """Image runs' validation metric (their ``val_nrmse`` stays None)."""


def load_sweep_configs(folder: str | Path, overrides: Mapping[str, Any] | None = None,
                       only: Sequence[str] = ()) -> list[TrainConfig]:
    """Every ``*.yaml`` config of ``folder`` with ``overrides`` applied, checked (dataset included) before anything
    starts; ``only`` keeps the named runs."""
    files = sorted(Path(folder).glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.yaml training configs (see configs/ and scripts/make_train_configs.py)")
    loaded = [(path, TrainConfig.from_yaml(path, dict(overrides or {}))) for path in files]
    names = [config.resolved_run_name for _, config in loaded]
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"{folder}: several configs share the run name(s) {', '.join(duplicates)}")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"--only: no config runs {', '.join(unknown)} (known: {', '.join(names)})")
        loaded = [(path, config) for path, config in loaded if config.resolved_run_name in only]
    for path, config in loaded:
        try:
            config.validate()
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return [config for _, config in loaded]


def grid_gaps(configs: Sequence[TrainConfig]) -> list[str]:
    """Runs of the paper grid that ``configs`` do not cover: ``<method>_r<R>`` of the MRI grid
    (:data:`~adps.nn.learning_config.PAPER_GRID`) if any config is an MRI run, ``image_p<p>`` of the image grid
    (:data:`~adps.nn.learning_config.IMAGE_GRID`) if any is an image run."""
    mri = [config for config in configs if not config.is_image]
    images = [config for config in configs if config.is_image]
    gaps = []
    if mri or not images:
        present = {(config.method, float(config.r_train)) for config in mri}
        gaps += [f"{m}_r{r:g}" for m, rs in PAPER_GRID.items() for r in rs if (m, float(r)) not in present]
    if images:
        erased = {float(config.erasure_p) for config in images}
        gaps += [image_run_name(p) for p in IMAGE_GRID if float(p) not in erased]
    return gaps


def runs_at_once(configs: Sequence[TrainConfig], resources: Mapping[str, float]) -> int:
    """How many runs the cluster's ``resources`` (``ray.cluster_resources()``) hold at once: GPUs / GPUs per run for
    GPU runs, else CPUs / CPUs per run (at least 1)."""
    biggest = max(configs, key=lambda c: c.num_workers * (1 if c.use_gpu else c.cpus_per_worker))
    if biggest.use_gpu:
        return max(1, int(resources.get("GPU", 0) // biggest.num_workers))
    return max(1, int(resources.get("CPU", 0) // (biggest.num_workers * biggest.cpus_per_worker)))


def _finished_before(config: TrainConfig, storage: str) -> str:
    """``name/version`` if this run finished and registered its model earlier, else ``""``: by its folder's
    :data:`~adps.orchestration.train.FINISHED_FILE`, else (a run older than that file) by its MLflow run."""
    record = finished_record(storage, config.resolved_run_name)
    if record is not None and finished_in_another_store(record, config):
        return ""  # not this store's: its train refuses it, naming both stores
    if record is not None:
        return record.get("registered_model") or "(not registered)"
    if not config.tracking:
        return ""
    run = find_run(resolve_tracking_uri(config.tracking_uri), config.experiment,
                   f"{storage.rstrip('/')}/{config.resolved_run_name}")
    if run is None or run.info.status != "FINISHED":
        return ""
    return run.data.tags.get("adps.registered_model", "") if config.register else "(not registered)"


def _train_remote(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task that drives one run."""
    started = time.perf_counter()
    run = train(TrainConfig.from_dict(config_dict))
    metrics = run.metrics or {}
    return {"step": metrics.get("step"), "loss": metrics.get("loss"), "val_nrmse": metrics.get("val_nrmse"),
            "val_mse": metrics.get("val_mse"), "model": run.registered_model, "seconds": time.perf_counter() - started}


def run_sweep(configs: Sequence[TrainConfig], *, max_concurrent: int = 0, ray_address: str | None = None,
              progress: bool = True, on_run_end: Callable[[SweepRun], Any] | None = None) -> list[SweepRun]:
    """Train ``configs`` concurrently (see the module docstring); returns one row per run. ``on_run_end(row)`` is
    called once per run as it ends (finished, failed, or skipped as finished before), e.g. to advance a progress bar."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address)
    configs = [with_absolute_paths(config) for config in configs]
    limit = max_concurrent or runs_at_once(configs, ray.cluster_resources())
    rows = {c.resolved_run_name: SweepRun(c.resolved_run_name, c.method, c.r_train) for c in configs}
    queue = []
    for config in configs:
        storage = config.storage_path  # absolute, the default filled in (with_absolute_paths)
        done = _finished_before(config, storage)
        if done:
            rows[config.resolved_run_name].status, rows[config.resolved_run_name].model = "done (skipped)", done
            if on_run_end is not None:
                on_run_end(rows[config.resolved_run_name])
        else:
            queue.append(config)
    say = print if progress else (lambda *_, **__: None)
    say(f"adps sweep: {len(queue)} run(s) to train, {len(configs) - len(queue)} finished before; "
        f"{limit} at a time", flush=True)
    # A zero-CPU driver per run: the run's Train workers hold the cluster's resources.
    remote = ray.remote(num_cpus=0, max_retries=0)(_train_remote)
    pending: dict[Any, str] = {}
    while queue or pending:
        while queue and len(pending) < limit:
            config = queue.pop(0)
            pending[remote.remote(config.to_dict())] = config.resolved_run_name
            rows[config.resolved_run_name].status = "running"
            say(f"adps sweep: started {config.resolved_run_name}", flush=True)
        ready, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready[0])
        row = rows[name]
        try:
            outcome = ray.get(ready[0])
        except Exception as err:  # noqa: BLE001 - one run's failure must not stop the sweep
            row.status, row.error = "failed", str(err).strip().splitlines()[-1][:200] if str(err).strip() else repr(err)
        else:
            row.status = "finished"
            for key, value in outcome.items():
                setattr(row, key, value)
        say(f"adps sweep: {name} {row.status}" + (f": {row.error}" if row.error else ""), flush=True)
        if on_run_end is not None:
            on_run_end(row)
    return list(rows.values())


def format_summary(rows: Sequence[SweepRun]) -> str:
    """The sweep's table: run, status, steps, last loss, validation NRMSE (MRI runs) and / or validation MSE (image
    runs: the column appears when the sweep has one), registered model."""

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    with_images = any(r.method == "image" for r in rows)
    with_mri = any(r.method != "image" for r in rows) or not with_images
    header = ("run", "status", "step", "loss", *(("val_nrmse",) if with_mri else ()),
              *(("val_mse",) if with_images else ()), "model", "minutes")
    lines = [
        (r.run_name, r.status, number(r.step, "d"), number(r.loss, ".4g"),
         *((number(r.val_nrmse, ".4f"),) if with_mri else ()), *((number(r.val_mse, ".4g"),) if with_images else ()),
         r.model or "-", number(r.seconds / 60 if r.seconds else None, ".1f"))
        for r in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
           for line in (header, *lines)]
    failures = [f"  {r.run_name}: {r.error}" for r in rows if r.status == "failed"]
    return "\n".join(out + (["failed:", *failures] if failures else []))

"""Distributed training of every method on Ray Train V2 (``adps train``); docs/training.md.

:func:`train` checks a :class:`~adps.orchestration.train_config.TrainConfig` on the driver, opens the run's MLflow run
before any worker starts (:func:`~adps.orchestration.tracking.open_run`: found again by storage path + run name, so a
restart or a resubmission continues it), then runs a :class:`ray.train.torch.TorchTrainer` whose workers each run
:func:`adps.orchestration.train_worker.worker_loop` (DDP over disjoint, equal shares of the split; checkpoints; exact
resume from ``ray.train.get_checkpoint()``). Re-running with the same ``run_name`` and ``storage_path`` resumes the run
(Ray Train V2 has no ``Trainer.restore``). At the end the driver registers the EMA model as ``adps-<method>-r<R_train>``
(natural images: ``adps-image-p<erasure_p>``). The only module of the training path that imports Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from adps.data import storage
from adps.nn.checkpoint import CONFIG_FILE
from adps.orchestration.registry import register_model, registered_name
from adps.orchestration.run_storage import run_storage
from adps.orchestration.tracking import (
    QueuedRunLogger,
    RunLogger,
    config_hash,
    end_run,
    git_commit,
    image_listing_checksum,
    manifest_checksum,
    open_run,
    refuse_job_scratch,
    resolve_tracking_uri,
)
from adps.orchestration.train_config import TrainConfig
from adps.orchestration.train_worker import (
    EMA_DIR,
    WorkerContext,
    model_record,
    scratch_folder,
    training_length,
    training_set,
    worker_loop,
)

__all__ = ["DEFAULT_RUNS", "FINISHED_FILE", "TrainedRun", "checkpoint_uri", "finished_in_another_store", "finished_record",
           "planned_steps", "train", "with_absolute_paths"]

FINISHED_FILE = "adps_finished.json"
"""Written into a run's folder (``<storage_path>/<run_name>/``) when it finishes: its final step, checkpoint, MLflow run
and model version. A resubmission that would train nothing is refused by it."""


# Ray Train -----------------------------------------------------------------------------------
def _ray_worker(payload: dict[str, Any]) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    config = TrainConfig.from_dict(payload["config"])
    context = ray.train.get_context()
    # One intra-op thread per CPU reserved: two workers on a small node must not fight.
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))

    rank = context.get_world_rank()
    log = None
    if rank == 0 and payload.get("mlflow_run_id"):
        # Queued: a tracking outage never holds up training; what is logged meanwhile arrives once the server is back.
        log = QueuedRunLogger(config.tracking_uri, payload["mlflow_run_id"])

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if folder else None)
        persisted = ray.train.get_checkpoint() if folder and log is not None else None
        if persisted is not None:
            # The MLflow run records where each checkpoint went (the weights stay in the run storage).
            log.set_tags({"adps.checkpoint": checkpoint_uri(config.storage_path, persisted.path)})
            log.log_metrics({"checkpoint_step": metrics["step"]}, metrics["step"])

    checkpoint_dir: str | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # A local copy: the checkpoint may live on S3, and the loop reads it after this block.
        checkpoint_dir = str(scratch_folder("resume", config, rank))
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, checkpoint_dir, dirs_exist_ok=True)
    ctx = WorkerContext(rank=rank, world_size=context.get_world_size(), report=report, checkpoint=checkpoint_dir,
                        wrap=ray.train.torch.prepare_model, fault_dir=payload.get("fault_dir"), log=log)
    try:
        worker_loop(config, ctx)
    finally:
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if log is not None:
            log.close(timeout_s=config.tracking_flush_s)


DEFAULT_RUNS = Path(".adps") / "runs"
"""Where run folders go without a ``storage_path``: beside the default MLflow store (``.adps/mlflow.db``) and the
searches (``.adps/tune``) of the folder the command runs in, so that a project's runs, store and models go (and start
over) together."""


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local ``dataset`` and ``storage_path`` (empty: :data:`DEFAULT_RUNS`) made absolute: Ray workers run in other
    folders."""
    return config.replace(storage_path=config.storage_path or str(DEFAULT_RUNS)).absolute_paths("dataset",
                                                                                                 "storage_path")


@dataclass
class TrainedRun:
    """What :func:`train` returns: Ray's result, the MLflow run and the registered version."""

    result: Any
    """Ray's :class:`ray.train.Result` (``metrics``: the last report; ``checkpoint``: the latest)."""
    run_id: str | None = None
    """The MLflow run (None when ``tracking`` is off)."""
    model_version: str | None = None
    """The registered version of ``adps-<method>-r<R>`` / ``adps-image-p<p>`` (None when not registered)."""
    model_name: str | None = None
    tracking_uri: str | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result.metrics

    @property
    def checkpoint(self) -> Any:
        return self.result.checkpoint

    @property
    def error(self) -> Any:
        return self.result.error

    @property
    def registered_model(self) -> str:
        """``<name>/<version>`` of the model this run registered (empty when none)."""
        return f"{self.model_name}/{self.model_version}" if self.model_version else ""

    @property
    def model_uri(self) -> str | None:
        """``models:/<name>/<version>`` of the model this run registered."""
        return f"models:/{self.model_name}/{self.model_version}" if self.model_version else None


def _run_tags(config: TrainConfig) -> dict[str, str]:
    """Run tags: method, R_train / erasure p, dataset and its sha256 (images: of the listing), commit, config hash."""
    if config.is_image:
        setting, checksum = {"adps.erasure_p": f"{config.erasure_p:g}"}, image_listing_checksum(config.dataset)
    else:
        setting, checksum = {"adps.r_train": f"{config.r_train:g}"}, manifest_checksum(config.dataset)
    return {"adps.method": config.method, **setting, "adps.dataset": config.dataset, "adps.dataset_sha256": checksum,
            "adps.git_commit": git_commit(), "adps.config_hash": config_hash(config.to_dict())}


def planned_steps(config: TrainConfig) -> int:
    """The steps ``config`` trains in all, from its training set's size (opened on the driver); refuses a batch that
    does not fit the split, naming the key, before any worker starts."""
    dataset, _ = training_set(config)
    try:
        return training_length(config, len(dataset), config.num_workers)[1]
    finally:
        dataset.close()


def finished_record(storage_root: str, run_name: str) -> dict[str, Any] | None:
    """What :data:`FINISHED_FILE` of ``<storage_root>/<run_name>`` records, or None (not finished)."""
    path = storage.join(storage_root, run_name, FINISHED_FILE)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def finished_in_another_store(record: dict[str, Any], config: TrainConfig) -> str:
    """The MLflow store a finished run's record names when it is not ``config``'s (``""`` when it is, or either is
    unknown): the run folder then belongs to another project or a store since deleted, whose model this store lacks."""
    recorded = record.get("tracking_uri") or ""
    if not recorded or not config.tracking:
        return ""
    return "" if recorded == resolve_tracking_uri(config.tracking_uri) else recorded


def _unless_finished(config: TrainConfig, storage_root: str, total_steps: int) -> TrainConfig:
    """``config``, or with ``on_finished: new_run`` the same under the first free ``<run_name>-<k>``, when its run
    folder holds a run finished at ``total_steps`` or more; else refused."""
    name = config.resolved_run_name
    record = finished_record(storage_root, name)
    if record is None or int(record.get("step") or 0) < total_steps:
        return config
    if config.on_finished == "new_run":
        k = 2
        while finished_record(storage_root, f"{name}-{k}") is not None or (
                "://" not in storage_root and (Path(storage_root) / f"{name}-{k}").exists()):
            k += 1
        print(f"adps train: {name} finished before (step {record['step']}); training a new run {name}-{k}", flush=True)
        return config.replace(run_name=f"{name}-{k}")
    elsewhere = finished_in_another_store(record, config)
    if elsewhere:
        raise ValueError(
            f"config key 'storage_path': {storage_root.rstrip('/')}/{name} holds a run that finished at step "
            f"{record['step']} and registered its model in another MLflow store ({elsewhere}), not in this one "
            f"({resolve_tracking_uri(config.tracking_uri)}). Give this project a storage_path of its own (e.g. "
            "--set storage_path=$PWD/.adps/runs), a new run_name, or set on_finished: new_run")
    raise ValueError(
        f"config key 'run_name': {storage_root.rstrip('/')}/{name} holds a run that finished at step {record['step']} "
        f"(MLflow run {record.get('mlflow_run_id') or '-'}, model {record.get('registered_model') or '-'}); submitting "
        "it again would train nothing. Give a new run_name, set on_finished: new_run to train a new run beside it, or "
        "ask for more steps (max_steps, epochs) to train it further")


def check_resume(config: TrainConfig, storage_root: str) -> None:
    """Refuse, on the driver, to resume a run from checkpoints of another network (method, network preset, R_train or
    erasure_p): in the workers, loading the weights would fail, and Ray would retry it ``max_failures`` times."""
    path, filesystem = run_storage(storage_root)
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    folder = f"{path.rstrip('/')}/{config.resolved_run_name}"
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    checkpoints = sorted(info.path for info in found
                         if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"))
    if not checkpoints:
        return
    try:
        with filesystem.open_input_stream(f"{checkpoints[-1]}/{EMA_DIR}/{CONFIG_FILE}") as stream:
            recorded = json.loads(stream.read())
    except FileNotFoundError:
        return  # a checkpoint cut short by a kill: Ray resumes from the one it recorded
    changed = {key: value for key, value in model_record(config).items() if key in recorded and recorded[key] != value}
    if changed:
        where = checkpoint_uri(storage_root, checkpoints[-1])
        raise ValueError(
            "; ".join(f"config key {key!r}: {value!r}, but the run's checkpoint {where} has {recorded[key]!r}"
                      for key, value in changed.items())
            + f". The run {config.resolved_run_name} resumes from its checkpoints, so it must train the same network: "
            "give a new run_name for this network")


def checkpoint_uri(storage_path: str, path: str) -> str:
    """A checkpoint's location as users open it: Ray's ``checkpoint.path`` (``bucket/key`` on S3), scheme put back."""
    return f"{storage_path.split('://')[0]}://{path}" if "://" in storage_path else path


def run_description(config: TrainConfig, run_folder: str, *, checkpoint: str = "", model: str = "",
                    step: Any = None) -> str:
    """The MLflow run's description (Markdown): where its checkpoints and registered model are. The weights stay in
    the run storage and the registry, not in the run's artifacts: this is where a user browsing the run finds them."""
    what = (f"{config.method} at erasure p = {config.erasure_p:g}" if config.is_image
            else f"{config.method} at R_train = {config.r_train:g}")
    lines = [f"**{config.resolved_run_name}**: {what}, trained with Ray Train ({config.num_workers} worker(s)).", "",
             f"- Ray Train run folder (checkpoints, `{FINISHED_FILE}`): `{run_folder}`"]
    if checkpoint:
        lines.append(f"- Final checkpoint (step {step}): `{checkpoint}`")
    if model:
        lines.append(f"- Registered model: `{model}`, loaded with `adps.load_model(\"{model}\")`; the pyfunc model "
                     "is this run's logged model (the Models tab)")
    elif not checkpoint:
        lines.append("- Running: submitting the same run again resumes it from its latest checkpoint")
    return "\n".join(lines)


def _finish_tracking(config: TrainConfig, run: TrainedRun, tags: dict[str, str], where: str, run_folder: str) -> None:
    """Record the final checkpoint (``where``, its location), register the EMA model, describe the run and close it."""
    logger = RunLogger(run.tracking_uri, run.run_id)
    checkpoint = run.result.checkpoint
    if checkpoint is not None:
        logger.set_tags({"adps.checkpoint": where, "adps.final_step": run.metrics.get("step", "")})
    if config.register and checkpoint is not None:
        name = registered_name(config)
        with checkpoint.as_directory() as folder:
            version = register_model(
                Path(folder) / EMA_DIR, tracking_uri=run.tracking_uri, run_id=run.run_id, name=name,
                tags={**tags, "adps.run_name": config.resolved_run_name, "adps.checkpoint": where},
                description=f"Trained by the run {config.resolved_run_name} ({run.run_id}) to step "
                            f"{run.metrics.get('step')}; its checkpoint: {where}",
            )
        run.model_name, run.model_version = name, str(version.version)
        logger.set_tags({"adps.registered_model": run.registered_model})
        print(f"adps train: registered {name} version {version.version} (models:/{name}@latest)", flush=True)
    description = run_description(config, run_folder, checkpoint=where, model=run.model_uri or "",
                                  step=run.metrics.get("step"))
    logger.set_tags({"mlflow.note.content": description})
    end_run(run.tracking_uri, run.run_id, "FINISHED")


@contextlib.contextmanager
def _controller_poll_interval(seconds: float):
    """Set ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` while the trainer starts its controller (Ray propagates it from the
    driver's environment to the controller), unless the user set it."""
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if key in os.environ:
        yield
        return
    os.environ[key] = f"{seconds:g}"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def train(config: TrainConfig, *, ray_address: str | None = None) -> TrainedRun:
    """Validate ``config`` (before any worker starts), then run or resume it on Ray Train, tracked in MLflow and
    registered at the end when ``tracking`` is on. ``ray_address``: the cluster to join when Ray is not initialised yet
    (default: RAY_ADDRESS, else a local instance, as ``ray.init`` decides)."""
    config.validate()
    config = with_absolute_paths(config)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_root = config.storage_path
    refuse_job_scratch(storage_root, "Ray Train's run folders", "set storage_path to durable storage (s3://..., or "
                       "a folder outside the job)")
    config = _unless_finished(config, storage_root, planned_steps(config))
    check_resume(config, storage_root)
    run_name = config.resolved_run_name
    run_folder = f"{storage_root.rstrip('/')}/{run_name}"  # Ray Train's, and the MLflow run's key
    run = TrainedRun(result=None)
    tags: dict[str, str] = {}
    if config.tracking:
        config = config.replace(tracking_uri=resolve_tracking_uri(config.tracking_uri))
        tags = _run_tags(config)
        run.tracking_uri = config.tracking_uri
        run.run_id, resumed = open_run(config.tracking_uri, config.experiment, run_folder, run_name,
                                       config.to_dict(), tags)
        RunLogger(run.tracking_uri, run.run_id).set_tags({"mlflow.note.content": run_description(config, run_folder)})
        print(f"adps train: MLflow run {run.run_id} ({'resumed' if resumed else 'new'}) at {config.tracking_uri}",
              flush=True)

    if not ray.is_initialized():
        ray.init(address=ray_address)
    fault_dir = str(Path(storage_root) / run_name) if "://" not in storage_root and config.fail_at_steps else None

    storage_path, storage_filesystem = run_storage(storage_root)
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    # The dashboard's Train view lists a run only if its driver tracks state (off in Ray 2.60).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": config.to_dict(), "fault_dir": fault_dir, "mlflow_run_id": run.run_id},
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
    )
    try:
        with _controller_poll_interval(config.controller_poll_s):
            run.result = trainer.fit()
        if run.result.error is not None:
            raise run.result.error
        stopped = (run.result.metrics or {}).get("stopped")
        if stopped:
            checkpoint = run.result.checkpoint
            where = checkpoint_uri(storage_root, checkpoint.path) if checkpoint is not None else "(none)"
            if run.run_id is not None:
                RunLogger(run.tracking_uri, run.run_id).set_tags({"adps.stopped": stopped, "adps.checkpoint": where})
            raise RuntimeError(f"{run_name}: stopped: {stopped}. Nothing was registered; the last good weights are "
                               f"in the checkpoint {where}, and submitting the same run again resumes from it.")
    except BaseException:
        if run.run_id is not None:
            end_run(run.tracking_uri, run.run_id, "FAILED")
        raise
    checkpoint = run.result.checkpoint
    where = checkpoint_uri(storage_root, checkpoint.path) if checkpoint is not None else ""
    if run.run_id is not None:
        _finish_tracking(config, run, tags, where, run_folder)
    record = {"run_name": run_name, "step": run.metrics.get("step"), "mlflow_run_id": run.run_id,
              "tracking_uri": run.tracking_uri, "registered_model": run.registered_model, "checkpoint": where}
    storage.write_bytes_atomic(storage.join(storage_root, run_name, FINISHED_FILE), json.dumps(record, indent=2).encode())
    return run

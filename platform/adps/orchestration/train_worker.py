"""What each Ray Train worker of ``adps train`` runs: :func:`worker_loop`, and the state it trains.

* :class:`Trainee`: the model (seeded: identical on every rank), Adam and the EMA (:func:`build_trainee`), stepped by
  :func:`train_one_step` with the learning-rate warm-up;
* the data: each epoch the split's slices are permuted from ``(seed, epoch)``, dealt out by rank (:func:`worker_share`)
  and read batch by batch from the shards in a background thread (:func:`shard_batches`, ``Prefetcher``);
* checkpoints (:func:`save_training_checkpoint` / :func:`load_training_checkpoint`): model and EMA weights, Adam's
  tensors in safetensors, scalars and the data position in JSON, no pickle; a resumed run continues at the exact step;
* fault injection for the tests (``fail_at_steps``).

No Ray here: the loop talks to Ray Train through :class:`WorkerContext` (``report``, ``checkpoint``), which
:mod:`adps.orchestration.train` fills in, and a benchmark can run the loop in-process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adps.data.dataset import PreparedSliceDataset
from adps.data.prefetch import Prefetcher
from adps.data.shards import read_manifest
from adps.images import ImageDataset
from adps.nn.checkpoint import load_model, save_model
from adps.nn.ema import EMA, unwrap_model
from adps.nn.reconstruct import validation_metric
from adps.nn.train_step import BATCH_KEYS, LossBySigma, build_model, make_optimizer, train_step
from adps.nn.unet import set_activation_checkpointing
from adps.orchestration.train_config import TrainConfig

__all__ = ["build_trainee", "dataset_acceleration", "EMA_DIR", "image_training_set", "image_validation_batch",
           "ImageTrainingSet", "learning_rate", "load_training_checkpoint", "MODEL_DIR", "model_record",
           "mri_training_set", "rampup_steps", "save_training_checkpoint", "training_length", "training_set",
           "shard_batches", "STATE_FILE", "steps_per_epoch", "train_one_step", "Trainee", "validation_batch",
           "worker_loop", "worker_share", "WorkerContext"]

# The training checkpoint's layout (save_training_checkpoint / load_training_checkpoint).
STATE_FILE = "state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
MODEL_DIR = "model"
EMA_DIR = "ema"


# Data shares -----------------------------------------------------------------------------------
def worker_share(n_slices: int, world_size: int, rank: int, epoch: int, seed: int) -> list[int]:
    """Indices (into the split) that worker ``rank`` trains on in ``epoch``, in its order: one permutation of
    ``range(n_slices)`` per epoch (from ``seed`` and ``epoch``) dealt out round-robin, cut to ``n_slices // world_size``
    each. Disjoint, equally long shares that miss at most ``world_size - 1`` slices (different ones each epoch)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n_slices)
    per_rank = n_slices // world_size
    return [int(i) for i in order[rank::world_size][:per_rank]]


def steps_per_epoch(n_slices: int, world_size: int, batch_size: int) -> int:
    """Optimiser steps per epoch: full batches of each worker's share (the remainder is dropped)."""
    return (n_slices // world_size) // batch_size


# The per-worker training state ---------------------------------------------------------------
@dataclass
class Trainee:
    """What one worker trains: the (possibly DDP-wrapped) model, its optimizer and EMA."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    rank: int = 0
    world_size: int = 1
    step: int = 0
    """Optimiser steps done so far (over the whole run, resumes included)."""
    total_steps: int = 0
    """Optimiser steps of the whole run (the learning-rate warm-up is a fraction of it; 0 = unknown: no warm-up)."""
    extra: dict[str, Any] = field(default_factory=dict)


def build_trainee(config: TrainConfig, *, rank: int = 0, world_size: int = 1,
                  wrap: Callable[[nn.Module], nn.Module] | None = None, device: torch.device | str = "cpu") -> Trainee:
    """Model (seeded: identical on every rank), Adam (METHOD.md settings) and EMA for ``config``; the model is wrapped
    by ``wrap`` (``ray.train.torch.prepare_model`` in a Ray worker: DDP and the device), else moved to ``device``."""
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts them)
    # An image model takes the mask channel exactly when its training set is corrupted.
    kind = {"ambient": config.erasure_p > 0} if config.is_image else {}
    model = build_model(config.method, config.resolved_preset, **kind, **config.network_options())
    if config.activation_checkpointing:
        set_activation_checkpointing(model)
    model = wrap(model) if wrap is not None else model.to(device)
    model.train()
    if next(model.parameters()).device.type == "cuda":  # where the wrap put it (Ray: this worker's GPU)
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    if config.compile_mode:
        import torch._functorch.config as functorch_config

        # Read when the first step compiles; set on every compiled build (one model per worker).
        functorch_config.activation_memory_budget = config.activation_memory_budget
        # After DDP's wrap, so that DDP's optimiser splits the graph at its gradient buckets. The EMA, checkpoints and
        # validation look through the wrapper to the plain module.
        model = torch.compile(model, mode=None if config.compile_mode == "default" else config.compile_mode)
    optimizer = make_optimizer(model, lr=config.lr, betas=config.betas, eps=config.eps)
    ema = EMA(model, half_life_images=config.ema_half_life_images, rampup_ratio=config.ema_rampup)
    return Trainee(config, model, optimizer, ema, rank=rank, world_size=world_size)


def rampup_steps(config: TrainConfig, total_steps: int) -> int:
    """Steps of the learning-rate warm-up: ``lr_rampup`` of the run (at least 1 when it is on)."""
    return max(1, round(config.lr_rampup * total_steps)) if config.lr_rampup > 0 and total_steps > 0 else 0


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The rate of optimiser step ``step`` (1-based): linear from ``lr / ramp`` to ``lr`` over the first
    :func:`rampup_steps` steps, then ``lr``."""
    ramp = rampup_steps(config, total_steps)
    return config.lr if ramp == 0 else config.lr * min(1.0, step / ramp)


def train_one_step(trainee: Trainee, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One optimiser step of ``trainee`` on ``batch`` (this worker's part of the global batch) at the warm-up's
    :func:`learning_rate`; the loss's draws are seeded by ``(seed, rank, step)``, so a resumed run repeats them."""
    config = trainee.config
    global_batch = config.batch_size * trainee.world_size
    for group in trainee.optimizer.param_groups:
        group["lr"] = learning_rate(config, trainee.step + 1, trainee.total_steps)
    seed = int(np.random.SeedSequence([config.seed, trainee.rank, trainee.step]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    out = train_step(config.method, trainee.model, batch, trainee.optimizer, generator=generator,
                     amp=config.amp or None, grad_clip=config.grad_clip or None, ema=trainee.ema,
                     ema_batch_size=global_batch,  # the EMA half-life counts images over all workers
                     **config.loss_options())
    trainee.step += 1
    out["lr"] = trainee.optimizer.param_groups[0]["lr"]
    return out


# Checkpoints ---------------------------------------------------------------------------------
def save_training_checkpoint(folder: str | os.PathLike[str], trainee: Trainee, state: dict[str, Any]) -> Path:
    """Write a resumable checkpoint: model and EMA weights (:func:`adps.nn.checkpoint.save_model`), optimizer tensors
    (safetensors) and scalars (JSON), and ``state`` (step, epoch, data position, ...) as ``state.json``. Nothing is
    pickled, so loading cannot execute code."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = model_record(trainee.config)
    save_model(folder / MODEL_DIR, trainee.model, record)
    save_model(folder / EMA_DIR, trainee.ema.model, {**record, "ema_images_seen": trainee.ema.images_seen})
    opt = trainee.optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_JSON).write_text(json.dumps({"param_groups": opt["param_groups"], "scalars": scalars}))
    full_state = {**state, "step": trainee.step, "ema_images_seen": trainee.ema.images_seen}
    (folder / STATE_FILE).write_text(json.dumps(full_state, indent=2, sort_keys=True))
    return folder


def model_record(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint's (and so a registered model's) ``config.json`` records of the run besides the network, for
    the evaluation: ``method``, ``preset`` and ``r_train`` (image models: ``erasure_p``, ``delta``, ``resolution``)."""
    if config.is_image:
        return {"method": config.method, "erasure_p": config.erasure_p, "delta": config.delta,
                "resolution": config.resolution, "preset": config.resolved_preset}
    return {"method": config.method, "r_train": config.r_train, "preset": config.resolved_preset}


def load_training_checkpoint(folder: str | os.PathLike[str], trainee: Trainee) -> dict[str, Any]:
    """Restore ``trainee`` from :func:`save_training_checkpoint`'s folder; returns its state."""
    folder = Path(folder)
    model, _ = load_model(folder / MODEL_DIR)
    unwrap_model(trainee.model).load_state_dict(unwrap_model(model).state_dict())
    ema_model, _ = load_model(folder / EMA_DIR)
    state = json.loads((folder / STATE_FILE).read_text())
    trainee.ema.load_state_dict(unwrap_model(ema_model).state_dict(), images_seen=state["ema_images_seen"])
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    meta = json.loads((folder / OPTIMIZER_JSON).read_text())
    device = next(trainee.model.parameters()).device
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        # Adam keeps "step" on the CPU; moments live with the parameters.
        opt_state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    for index, entry in meta["scalars"].items():
        opt_state.setdefault(int(index), {}).update(entry)
    trainee.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    trainee.step = int(state["step"])
    return state


# The worker loop -----------------------------------------------------------------------------
@dataclass
class WorkerContext:
    """What :func:`worker_loop` needs from its runtime (Ray Train, or a test's stand-in)."""

    rank: int
    world_size: int
    report: Callable[[dict[str, Any], str | None], None]
    """``report(metrics, checkpoint_folder_or_None)``; called on every rank at the same steps."""
    checkpoint: str | None = None
    """Folder of the checkpoint to resume from, if any."""
    wrap: Callable[[nn.Module], nn.Module] | None = None
    fault_dir: str | None = None
    """Where fault-injection markers live (``fail_at_steps``); None disables injection."""
    log: Callable[[dict[str, Any], int], None] | None = None
    """Rank 0's metric logger (MLflow): ``log(metrics, step)``; None = no logging."""


def scratch_path(kind: str, config: TrainConfig, rank: int) -> Path:
    """``<tmp>/adps-<kind>-<run key>-r<rank>``: the local folder of this run and rank for ``kind`` (``resume``: the
    copy of the checkpoint resumed from; ``ckpt``: one being written)."""
    key = hashlib.sha1(f"{config.storage_path}/{config.resolved_run_name}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"adps-{kind}-{key}-r{rank}"


def scratch_folder(kind: str, config: TrainConfig, rank: int) -> Path:
    """:func:`scratch_path`, emptied and created: a worker killed while using it leaves it behind, and the next start
    of the same run and rank empties and reuses it, instead of leaving one more (a random name would)."""
    folder = scratch_path(kind, config, rank)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def shard_batches(dataset: Any, indices: list[int], batch_size: int, start: int, *, pin_memory: bool = False):
    """Batches of ``dataset[indices]`` from batch number ``start`` on (full batches only). A dataset with
    ``read_batch`` (the prepared shards) reads each batch straight into its tensors, page-locked with ``pin_memory``;
    others are stacked item by item (and pinned by the Prefetcher)."""
    read_batch = getattr(dataset, "read_batch", None)
    for b in range(start, len(indices) // batch_size):
        chosen = indices[b * batch_size : (b + 1) * batch_size]
        if read_batch is not None:
            yield read_batch(chosen, pin_memory=pin_memory)
            continue
        items = [dataset[i] for i in chosen]
        yield {key: torch.stack([item[key] for item in items]) for key in items[0]}


def training_length(config: TrainConfig, n: int, world_size: int) -> tuple[int, int]:
    """``(steps per epoch, steps in all)`` of a run over ``n`` training slices (images) on ``world_size`` workers;
    refuses a batch that does not fit the split, naming the key."""
    per_epoch = steps_per_epoch(n, world_size, config.batch_size)
    if per_epoch < 1:
        what = f"{n} images of {config.dataset}" if config.is_image else f"{n} slices of split {config.split!r}"
        raise ValueError(f"config key 'batch_size': {config.batch_size} per worker x {world_size} workers exceeds the "
                         f"{what}")
    total = config.resolved_epochs * per_epoch
    return per_epoch, min(total, config.max_steps) if config.max_steps else total


def training_set(config: TrainConfig) -> tuple[Any, float | None]:
    """The run's training set (MRI slices or images) and the R whose masks it carries (None for images)."""
    return (image_training_set(config), None) if config.is_image else mri_training_set(config)


def mri_training_set(config: TrainConfig) -> tuple[PreparedSliceDataset, float]:
    """The run's training slices (split ``split`` of ``dataset``) and the R whose masks they carry. Only the keys the
    method's step reads come off the disk (:data:`BATCH_KEYS`): an ambient run never reads the clean reference, and
    the data path moves 11 % fewer bytes per ambient slice, 9x fewer per EDM slice."""
    acceleration = dataset_acceleration(config, read_manifest(config.dataset)["config"]["accelerations"])
    dataset = PreparedSliceDataset(config.dataset, config.split, acceleration=acceleration,
                                   load_l1=config.method == "edm_l1", keys=BATCH_KEYS[config.method])
    return dataset, acceleration


def dataset_acceleration(config: TrainConfig, accelerations: list[float]) -> float:
    """The R whose masks the dataset loads: ``r_train``; R = 1 methods ignore masks, so any stored R serves."""
    return accelerations[0] if config.r_train == 1 else config.r_train


def validation_batch(config: TrainConfig, acceleration: float) -> dict[str, torch.Tensor] | None:
    """The first ``validation_slices`` slices of the ``val`` split as one batch (None: empty split or no validation)."""
    if config.validation_slices < 1:
        return None
    dataset = PreparedSliceDataset(config.dataset, "val", acceleration=acceleration)
    try:
        items = [dataset[i] for i in range(min(config.validation_slices, len(dataset)))]
    finally:
        dataset.close()
    if not items:
        print(f"adps train: the dataset {config.dataset} has no val slices; no validation metric", flush=True)
        return None
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class ImageTrainingSet:
    """An image dataset as the training loop reads it: each item also carries ``slice_id`` (its ``index``), the key
    the loop's metrics name the trained items by."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[index]
        item["slice_id"] = item["index"]
        return item

    def close(self) -> None:
        self.dataset.close()


def image_training_set(config: TrainConfig) -> ImageTrainingSet:
    """The run's training images: ``dataset`` at ``resolution``, erased with ``erasure_p`` (one fixed mask per image
    from ``(seed, index)``; clean when 0)."""
    return ImageTrainingSet(ImageDataset(config.dataset, config.resolution, erasure_p=config.erasure_p, seed=config.seed))


def image_validation_batch(config: TrainConfig, dataset: ImageTrainingSet) -> dict[str, torch.Tensor] | None:
    """The first ``validation_slices`` training images as one batch, as the model trains on them (erased where the
    run erases: an ambient model is scored on observed pixels only); None when validation is off."""
    if config.validation_slices < 1:
        return None
    items = [dataset[i] for i in range(min(config.validation_slices, len(dataset)))]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _gpu_memory_gb() -> dict[str, float]:
    return {"gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}


def worker_loop(config: TrainConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train this worker's share until ``max_steps`` or the configured epochs; returns the final state."""
    dataset, acceleration = training_set(config)
    n = len(dataset)
    per_epoch, total = training_length(config, n, ctx.world_size)

    trainee = build_trainee(config, rank=ctx.rank, world_size=ctx.world_size, wrap=ctx.wrap)
    trainee.total_steps = total
    warmup = rampup_steps(config, total)
    resumed_from = None
    skipped_steps = 0  # steps skipped for a non-finite loss, over the whole run
    if ctx.checkpoint is not None:
        resumed = load_training_checkpoint(ctx.checkpoint, trainee)
        resumed_from, skipped_steps = int(resumed["step"]), int(resumed.get("skipped_steps", 0))
    skipped_in_a_row = 0
    # Rank 0 validates the EMA model; the other ranks wait for it in the next all-reduce.
    if ctx.rank != 0:
        val_batch = None
    elif config.is_image:
        val_batch = image_validation_batch(config, dataset)
    else:
        val_batch = validation_batch(config, acceleration)

    def validate(step: int) -> dict[str, float]:
        every = config.validate_every_steps
        if val_batch is None or not (step == total or (every and step % every == 0)):
            return {}
        generator = torch.Generator().manual_seed(config.seed)  # the same noise at every validation
        return validation_metric(config.method, trainee.ema.model, val_batch, sigma=config.validation_sigma or None,
                                 delta=config.delta, generator=generator)

    ctx_run_id = getattr(ctx.log, "run_id", None)

    def state(epoch: int, position: int) -> dict[str, Any]:
        # position: the batches of this epoch already trained on
        return {"epoch": epoch, "position": position, "steps_per_epoch": per_epoch, "total_steps": total,
                "world_size": ctx.world_size, "seed": config.seed, "resumed_from": resumed_from,
                "skipped_steps": skipped_steps, "mlflow_run_id": ctx_run_id, "config": config.to_dict()}

    def checkpoint_and_report(metrics: dict[str, Any], epoch: int, position: int) -> None:
        if ctx.rank == 0:
            folder = scratch_folder("ckpt", config, ctx.rank)
            try:
                save_training_checkpoint(folder, trainee, state(epoch, position))
                ctx.report(metrics, str(folder))  # Ray copies the folder to storage before returning
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        else:
            ctx.report(metrics, None)

    fail_rank = 1 if ctx.world_size > 1 else 0
    # Page-locked batches make the copy to the GPU asynchronous (train_step moves them non-blocking).
    pin_memory = next(trainee.model.parameters()).device.type == "cuda"
    metrics: dict[str, Any] = {"step": trainee.step}
    # The loss binned by sigma between two logs (this rank's samples): docs/evaluation.md.
    by_sigma = LossBySigma()
    while trainee.step < total:
        epoch, position = divmod(trainee.step, per_epoch)
        share = worker_share(n, ctx.world_size, ctx.rank, epoch, config.seed)
        started = time.perf_counter()
        # The next batches load in a background thread while this one trains (Prefetcher).
        source = shard_batches(dataset, share, config.batch_size, position, pin_memory=pin_memory)
        with Prefetcher(source, config.prefetch_batches, pin_memory=pin_memory) as batches:
            for batch in batches:
                out = train_one_step(trainee, batch)
                if "sigma" in out:
                    by_sigma.add(out["sigma"], out["sample_loss"])
                # Every rank agrees on a skip (train_step decides it together): all count the same and stop together.
                skipped_steps += out["skipped"]
                skipped_in_a_row = skipped_in_a_row + 1 if out["skipped"] else 0
                now = time.perf_counter()
                # Global throughput of this step (loading included): every rank steps in lockstep.
                slices_per_s = config.batch_size * ctx.world_size / max(now - started, 1e-9)
                started = now
                epoch, position = divmod(trainee.step, per_epoch)
                metrics = {
                    "step": trainee.step, "epoch": trainee.step / per_epoch, "loss": out["loss"],
                    "grad_norm": out["grad_norm"] if math.isfinite(out["grad_norm"]) else -1.0, "lr": out["lr"],
                    "skipped": out["skipped"], "skipped_steps": skipped_steps,
                    "images_seen": trainee.step * config.batch_size * ctx.world_size, "slices_per_s": slices_per_s,
                    "slice_ids": [int(s) for s in batch["slice_id"]], "resumed_from": resumed_from, **_gpu_memory_gb(),
                    **validate(trainee.step)
                }
                if config.max_skipped_in_a_row and skipped_in_a_row >= config.max_skipped_in_a_row:
                    # Diverged: skipped steps changed nothing, so this checkpoint holds the last good weights. The run
                    # ends here (no Ray retry: a restart would diverge again).
                    metrics["stopped"] = (f"{skipped_in_a_row} steps in a row (to step {trainee.step}) had a NaN / Inf "
                                          f"loss: the model diverged (lower lr, check grad_clip and the data)")
                    if ctx.log is not None:
                        ctx.log(metrics, trainee.step)
                    checkpoint_and_report(metrics, epoch, position)
                    batches.close()  # the loading thread reads the dataset: stop it first
                    dataset.close()
                    return metrics
                if ctx.log is not None and (trainee.step % config.log_every_steps == 0 or "val_nrmse" in metrics
                                            or "val_mse" in metrics or trainee.step == total):
                    ctx.log({**metrics, **by_sigma.means()}, trainee.step)
                elif ctx.log is not None and trainee.step <= warmup:
                    ctx.log({"lr": out["lr"]}, trainee.step)  # the warm-up, step by step
                if trainee.step % config.checkpoint_every_steps == 0 or trainee.step == total:
                    checkpoint_and_report(metrics, epoch, position)
                elif trainee.step % config.log_every_steps == 0:
                    ctx.report(metrics, None)
                _maybe_fail(config, ctx, fail_rank, trainee.step)
                if trainee.step >= total:
                    break
    dataset.close()
    return metrics


def _maybe_fail(config: TrainConfig, ctx: WorkerContext, fail_rank: int, step: int) -> None:
    """Fault injection: the worker process is killed (SIGKILL, as by a preempted node or the OOM killer: no exception,
    no clean-up) once at each of ``fail_at_steps``; a marker file written first makes it once."""
    if step not in config.fail_at_steps or ctx.rank != fail_rank or ctx.fault_dir is None:
        return
    marker = Path(ctx.fault_dir) / f".adps-fault-step-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fired\n")
    print(f"adps fault injection: killing rank {ctx.rank} (pid {os.getpid()}) at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

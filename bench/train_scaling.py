"""Training throughput under Ray Train against the bare learning core: slices/s and overhead.

    python -m bench.train_scaling                          # CPU: bare, worker_loop, Ray 1 and 2 workers
    python -m bench.train_scaling --json out.json --steps 40 --batch-size 4
    python -m bench.train_scaling --gpu                    # CUDA: paper-size ambient, bf16 and fp32, no Ray
    python -m bench.train_scaling --compile default        # every row torch.compile'd (Ray: DDP + compile)

Every configuration trains ``--warmup`` + ``--steps`` optimiser steps of the same method,
preset and per-worker batch on the same prepared dataset; warm-up steps are left out of the
statistics. The rows, from the inside out:

``bare``
    :func:`adps.nn.train_step.train_step` alone, in this process, on one batch already on the
    device (the learning core: loss, backward, clipping, Adam, EMA). CPU: on
    ``--cpus-per-worker`` intra-op threads, as a Ray worker gets.
``loop``
    :func:`adps.orchestration.train_worker.worker_loop`, the platform's per-worker loop, in this
    process with a stand-in :class:`~adps.orchestration.train_worker.WorkerContext` (``report`` only
    collects): adds reading the prepared HDF5 shards, batching, the per-step seeding and
    learning-rate schedule, and metric bookkeeping. No Ray, no DDP.
``ray``
    :func:`adps.orchestration.train.train` (a Ray Train V2 ``TorchTrainer``) with 1 and 2 CPU
    workers (Gloo DDP, ``use_gpu: false``): adds the Ray worker processes and the gradient
    all-reduce. CPU mode only. A second row per run, ``step after a report``, times the steps
    that follow a plain ``ray.train.report``: Train V2's controller polls its workers every
    2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``) and a worker's result queue holds one report,
    so a worker that reports faster than that waits in ``report`` for the next poll.

Per-step times come from the ``slices_per_s`` metric that ``worker_loop`` computes for every
step: the time from the end of one optimiser step to the end of the next, so a step's time
includes the data loading of its batch and whatever its predecessor did after its own
measurement (report, checkpoint). Ray Train V2 keeps only the metrics reported together with a
checkpoint (``Result.best_checkpoints`` / ``metrics_dataframe``), so each Ray run checkpoints
every 2nd step (keeping them all) and reports every 3rd step as well; of the recorded (even)
steps after the warm-up, those whose predecessor reported go to the ``step after a report``
row, those whose predecessor neither reported nor checkpointed to the ``Ray Train`` row, and
none includes a checkpoint. The ``loop`` row reports every step to its stand-in (free).
MLflow tracking and the validation pass are off in every row (training alone). ``wall s`` is
the whole run (Ray: ``trainer.fit()``, start-up of the worker group included).

``ms/step`` is the median step time, ``slices/s`` the global batch (per-worker batch x
workers) over it, ``/worker`` that divided by the workers, and ``vs bare`` the per-worker
throughput over the bare step's: the share of the learning core's speed that each worker keeps.

The data: by default a small synthetic prepared dataset in a temporary folder. CPU mode makes
it like ``tests/test_train.py``'s fixture (``adps.data.synth`` volumes through
``adps.orchestration.prepare``: Ray and sigpy); ``--data direct`` (and GPU mode, always) writes
the shards directly with :mod:`adps.data.shards` from synthetic batches (phantoms with smooth
coil maps when sigpy is missing). ``--dataset PATH`` uses an existing prepared dataset; the
image size and coil count are then the dataset's. Throughput does not depend on the content.

GPU mode (``--gpu``) needs only torch, numpy, h5py and safetensors: it imports neither Ray nor
MLflow nor sigpy, so it runs on a bare GPU machine with ``PYTHONPATH=platform``. It measures the
``bare`` and ``loop`` rows of the method's paper preset at batch 8, 384 x 320, 4 coils, for
bf16 autocast and fp32 (TF32 as torch's defaults allow), with the peak CUDA memory of each row;
a row that runs out of memory is reported as such and the others go on. ``--gpu --device cpu``
runs the same code on the CPU (with small sizes) to check it without a GPU.

``--compile MODE`` sets ``compile_mode`` (TrainConfig) for every row: the bare step's network
is compiled as :func:`adps.orchestration.train_worker.build_trainee` compiles it, and the Ray rows
train with DDP and ``torch.compile`` together, as a paper run with ``compile_mode`` would. The
compilation falls in the first (warm-up) step of each row; ``--warmup`` must be at least 1.

Prints progress on stderr, then the table on stdout; ``--json PATH`` writes every number.
Exits non-zero if a configuration failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform as std_platform  # the standard library module (our package is adps)
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adps.data.prefetch import Prefetcher
from adps.data.preprocess import PrepareConfig, mask_key
from adps.data.shards import (
    FORMAT_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    encode_json,
    read_manifest,
    shard_name,
    write_shard,
)
from adps.mri import lines_at
from adps.nn.learning_config import COMPILE_MODES, FULLY_SAMPLED
from adps.nn.train_step import MRI_METHODS, PAPER_PRESETS, train_step
from adps.orchestration.train_config import TrainConfig
from adps.orchestration.train_worker import WorkerContext, build_trainee, mri_training_set, shard_batches, worker_loop
from bench import train_step as bench_train_step

AMPS = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}
NEVER = 10**9  # checkpoint_every_steps that never fires before the final step
RAY_CHECKPOINT_EVERY = 2  # Ray runs: the even steps' metrics are kept (with their checkpoints)...
RAY_REPORT_EVERY = 3  # ...and every 3rd step reports too: some even steps follow a report, most not
SHARD_SIZE = 8

# Defaults per mode (None in the parser = "the mode's default").
CPU_DEFAULTS = {"preset": "tiny", "batch_size": 2, "height": 64, "width": 64, "coils": 4, "amp": ["fp32"],
                "configs": ["bare", "loop", "ray"], "slices": 16, "data": "prepare", "device": "cpu"}
GPU_DEFAULTS = {"preset": "paper", "batch_size": 8, "height": 384, "width": 320, "coils": 4, "amp": ["bf16", "fp32"],
                "configs": ["bare", "loop", "load"], "slices": 16, "data": "direct", "device": "cuda"}

_STARTED = time.perf_counter()
# Settings that keep a benchmark run to training alone, where this version of TrainConfig has
# them: no MLflow tracking or registration, no validation pass.
QUIET = {"tracking": False, "register": False, "validation_slices": 0}


def log(message: str) -> None:
    """Progress on stderr (stdout holds only the table)."""
    print(f"[train_scaling +{time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({std_platform.processor() or std_platform.machine()}, {os.cpu_count()} cores)"


# Data ---------------------------------------------------------------------------------------------
def dataset_accelerations(method: str, acceleration: float) -> tuple[float, ...]:
    """The R the dataset stores: the run's (R = 1 methods read masks of any stored R: 2)."""
    return (2.0,) if method in FULLY_SAMPLED else (float(acceleration),)


def acs_for(width: int, accelerations: tuple[float, ...]) -> int:
    """METHOD.md's 20 ACS columns, fewer where the width cannot hold them at R + 1."""
    return min(20, *(lines_at(width, r + 1) for r in accelerations))


def make_dataset_prepare(root: Path, *, slices: int, coils: int, height: int, width: int,
                         accelerations: tuple[float, ...], l1: bool) -> str:
    """synthetic FastMRI volumes -> ``adps.orchestration.prepare`` (Ray, sigpy), as tests/test_train.py."""
    from adps.data.synth import synthetic_volume, volume_name, write_volume
    from adps.orchestration.prepare import prepare_dataset

    per_volume = 4
    n_volumes = max(1, math.ceil(slices / per_volume))
    raw = root / "raw"
    raw.mkdir(parents=True)
    for i in range(n_volumes):
        volume = synthetic_volume(500 + i, n_slices=per_volume, n_coils=2 * coils, height=height, width=width,
                                  noise_std=0.005)
        write_volume(raw / volume_name(i, "AXT2"), volume, acquisition="AXT2", patient_id=f"p{i}")
    output = root / "prepared"
    config = PrepareConfig.from_dict({
        "source": str(raw), "output": str(output), "n_volumes": n_volumes, "slices_per_volume": per_volume,
        "test_volumes": 0, "val_volumes": 0, "crop": (height, width), "noise_patch": min(8, height, width),
        "virtual_coils": coils, "calib_width": min(12, height, width), "accelerations": accelerations,
        "acs": acs_for(width, accelerations), "shard_size": SHARD_SIZE, "reference_iterations": 5,
        "l1": l1, "l1_iterations": 10, "seed": 3,
    })
    prepare_dataset(config, progress=False)
    return str(output)


def make_dataset_direct(root: Path, *, slices: int, coils: int, height: int, width: int,
                        accelerations: tuple[float, ...], l1: bool) -> str:
    """A prepared dataset (train split only) written with adps.data.shards: no Ray, no sigpy."""
    output = root / "prepared"
    output.mkdir(parents=True)
    acs = acs_for(width, accelerations)
    (r,) = accelerations
    key = mask_key(r)
    shards, entries = [], []
    for index, start in enumerate(range(0, slices, SHARD_SIZE)):
        n = min(SHARD_SIZE, slices - start)
        batch = bench_train_step.benchmark_batch(n, coils, height, width, r, seed=index)
        items = []
        for i in range(n):
            item = {
                "kspace": batch["kspace"][i].numpy().astype(np.complex64),
                "maps": batch["maps"][i].numpy().astype(np.complex64),
                "reference": batch["reference"][i].numpy().astype(np.complex64),
                f"mask/{key}": batch["mask"][i].numpy().astype(bool),
                f"mask_further/{key}": batch["mask_further"][i].numpy().astype(bool),
            }
            if l1:
                item[f"l1/{key}"] = batch["l1"][i].numpy().astype(np.complex64)
            items.append(item)
        name = shard_name("train", index)
        ids = list(range(start, start + n))
        shards.append(write_shard(str(output / name), items, slice_ids=ids, attrs={"split": "train"}).to_dict())
        entries += [{"source": "synthetic", "slice_index": i, "volume_id": f"synthetic-{index}", "slice_id": sid,
                     "shard": name, "row": i, "coils": coils} for i, sid in enumerate(ids)]
    config = PrepareConfig(source="synthetic (bench/train_scaling.py)", output=str(output), crop=(height, width),
                           virtual_coils=coils, accelerations=accelerations, acs=acs, l1=l1, shard_size=SHARD_SIZE)
    empty = {"coils": coils, "shape": [height, width], "n_volumes": 0, "n_slices": 0, "volumes": [], "shards": [],
             "slices": []}
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "config": config.to_dict(),
        "source": {"synthetic": True},
        "datasets": sorted(["kspace", "maps", "reference", "slice_id", f"mask/{key}", f"mask_further/{key}"]
                           + ([f"l1/{key}"] if l1 else [])),
        "splits": {"train": {**empty, "n_slices": slices, "shards": shards, "slices": entries},
                   "val": empty, "test": empty},
        "rejected": [],
    }
    (output / MANIFEST_NAME).write_bytes(encode_json(manifest))
    return str(output)


def load_batch(config: TrainConfig, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` train slices, batched exactly as worker_loop batches them."""
    dataset, _ = mri_training_set(config)
    try:
        items = [dataset[i] for i in range(n)]
    finally:
        dataset.close()
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def with_settings(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``config.replace(**changes)`` without the keys this version of TrainConfig lacks."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return config.replace(**{key: value for key, value in changes.items() if key in known})


# Statistics ---------------------------------------------------------------------------------------
def row_from_times(name: str, kind: str, config: TrainConfig, times: list[float], *, workers: int, threads: int | None,
                   device: str, amp: str, wall_s: float, peak_memory_gb: float | None = None,
                   note: str = "") -> dict[str, Any]:
    median = statistics.median(times)
    global_batch = config.batch_size * workers
    return {
        "name": name,
        "kind": kind,
        "device": device,
        "method": config.method,
        "preset": config.resolved_preset,
        "amp": amp,
        "compile": config.compile_mode or "off",
        "workers": workers,
        "threads_per_worker": threads,
        "batch_per_worker": config.batch_size,
        "global_batch": global_batch,
        "samples": len(times),
        "median_ms": round(1e3 * median, 3),
        "mean_ms": round(1e3 * statistics.fmean(times), 3),
        "min_ms": round(1e3 * min(times), 3),
        "max_ms": round(1e3 * max(times), 3),
        "slices_per_s": round(global_batch / median, 3),
        "slices_per_s_per_worker": round(config.batch_size / median, 3),
        "vs_bare": None,
        "wall_s": round(wall_s, 2),
        "peak_memory_gb": None if peak_memory_gb is None else round(peak_memory_gb, 3),
        "note": note,
        "error": None,
    }


def failed_row(name: str, kind: str, config: TrainConfig, *, workers: int, device: str, amp: str,
               error: BaseException) -> dict[str, Any]:
    message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return {"name": name, "kind": kind, "device": device, "method": config.method, "preset": config.resolved_preset,
            "amp": amp, "workers": workers, "batch_per_worker": config.batch_size,
            "global_batch": config.batch_size * workers, "samples": 0, "median_ms": None, "slices_per_s": None,
            "slices_per_s_per_worker": None, "vs_bare": None, "peak_memory_gb": None, "error": message}


def step_times(reports: list[tuple[int, float]], batch: int, workers: int, warmup: int) -> list[float]:
    """Seconds per step from worker_loop's ``slices_per_s`` metrics (global), after the warm-up."""
    return [batch * workers / speed for step, speed in reports if step > warmup and speed > 0]


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# The three kinds of row ----------------------------------------------------------------------------
def bench_bare(config: TrainConfig, batch: dict[str, torch.Tensor], device: torch.device, *, amp: str,
               warmup: int, steps: int, threads: int | None) -> dict[str, Any]:
    """adps.nn.train_step on one resident batch, with train_one_step's settings (Adam, clip, EMA;
    the network compiled with ``compile_mode``)."""
    trainee = build_trainee(config, device=device)
    model, optimizer, ema = trainee.model, trainee.optimizer, trainee.ema
    del trainee
    on_device = {k: v.to(device) for k, v in batch.items()}
    generator = torch.Generator(device=device).manual_seed(config.seed)
    _reset_peak(device)
    times = []
    started = time.perf_counter()
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = train_step(config.method, model, on_device, optimizer, generator=generator, amp=AMPS[amp],
                         grad_clip=config.grad_clip or None, ema=ema)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"non-finite loss {out['loss']} at step {i + 1}")
    wall = time.perf_counter() - started
    row = row_from_times("bare train_step", "bare", config, times, workers=1, threads=threads,
                         device=device_name(device), amp=amp, wall_s=wall, peak_memory_gb=_peak_gb(device),
                         note="batch resident on the device")
    del model, optimizer, ema, on_device
    return row


def bench_load(config: TrainConfig, device: torch.device, *, warmup: int, steps: int,
               threads: int | None) -> dict[str, Any]:
    """The data path alone, as a worker runs it with ``prefetch_batches: 0``: read a batch from
    the shards (the worker loop's batching: straight into page-locked memory on CUDA) and copy it
    to the device. Its slices/s is the rate one loading thread sustains; issue 10 asks for 5x the
    step's."""
    dataset, _ = mri_training_set(config)
    indices = list(range(len(dataset)))
    times: list[float] = []
    started = time.perf_counter()
    pin_memory = device.type == "cuda"

    def one_pass() -> Prefetcher:  # depth 0: in this thread, so each batch's time is its own
        return Prefetcher(shard_batches(dataset, indices, config.batch_size, 0, pin_memory=pin_memory), 0,
                          pin_memory=pin_memory)

    try:
        source = one_pass()
        while len(times) < warmup + steps:
            start = time.perf_counter()
            batch = next(source, None)
            if batch is None:  # one pass done: the next pass (the page cache is warm by now)
                source = one_pass()
                continue
            if pin_memory:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        dataset.close()
    wall = time.perf_counter() - started
    return row_from_times("data path alone", "load", config, times[warmup:], workers=1, threads=threads,
                          device=device_name(device), amp="-", wall_s=wall,
                          note="read" + (" into page-locked memory + copy to the GPU" if device.type == "cuda" else ""))


def bench_loop(config: TrainConfig, device: torch.device, *, amp: str, warmup: int, steps: int,
               threads: int | None) -> dict[str, Any]:
    """worker_loop in this process, with a WorkerContext whose report only collects."""
    loop_config = with_settings(config, max_steps=warmup + steps, log_every_steps=1, checkpoint_every_steps=NEVER)
    reports: list[tuple[float, dict[str, Any]]] = []

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        reports.append((time.perf_counter(), dict(metrics)))

    ctx = WorkerContext(rank=0, world_size=1, report=report,
                        wrap=(lambda model: model.to(device)) if device.type != "cpu" else None)
    _reset_peak(device)
    started = time.perf_counter()
    worker_loop(loop_config, ctx)
    wall = time.perf_counter() - started
    per_step = [(int(m["step"]), float(m["slices_per_s"])) for _, m in reports]
    # The final step's checkpoint is written after its time was taken: no step follows it.
    times = step_times(per_step, config.batch_size, 1, warmup)
    if not times:
        raise RuntimeError(f"worker_loop reported no step after the {warmup} warm-up step(s)")
    return row_from_times("worker_loop, no Ray", "loop", config, times, workers=1, threads=threads,
                          device=device_name(device), amp=amp, wall_s=wall, peak_memory_gb=_peak_gb(device),
                          note="HDF5 reads + batching per step; stand-in report")


def bench_ray(config: TrainConfig, workers: int, *, amp: str, warmup: int, steps: int,
              storage: Path) -> list[dict[str, Any]]:
    """adps.orchestration.train.train with ``workers`` CPU workers: two rows, the steps that
    follow no report and the steps that follow a plain ``ray.train.report``.

    Ray Train V2 keeps only the metrics reported with a checkpoint, so the run checkpoints
    every 2nd step (and keeps them all) and also reports every 3rd: of the recorded (even)
    steps, those after an odd multiple of 3 follow a plain report, the others follow nothing
    (a step's time includes what its predecessor did after its own measurement)."""
    from adps.orchestration.train import train

    total = warmup + steps
    ray_config = with_settings(
        config, num_workers=workers, use_gpu=False, max_steps=total, log_every_steps=RAY_REPORT_EVERY,
        checkpoint_every_steps=RAY_CHECKPOINT_EVERY, keep_checkpoints=total, max_failures=0,
        storage_path=str(storage), run_name=f"scaling-{amp}-w{workers}",
    )
    started = time.perf_counter()
    run = train(ray_config)
    wall = time.perf_counter() - started
    result = getattr(run, "result", run)  # train() returns Ray's Result, or a TrainedRun holding it
    if getattr(result, "error", None) is not None:
        raise RuntimeError(f"the Ray Train run failed: {result.error}")
    recorded = sorted((int(m["step"]), float(m["slices_per_s"])) for _, m in (result.best_checkpoints or []))
    checkpointed = {step for step, _ in recorded}
    reported = checkpointed | set(range(RAY_REPORT_EVERY, total + 1, RAY_REPORT_EVERY))
    global_batch = config.batch_size * workers
    clean = [global_batch / speed for step, speed in recorded
             if step > warmup and step - 1 not in reported and speed > 0]
    after_report = [global_batch / speed for step, speed in recorded
                    if step > warmup and step - 1 in reported and step - 1 not in checkpointed and speed > 0]
    threads = max(1, int(config.cpus_per_worker))
    rows = []
    for name, kind, times, note in (
        ("Ray Train (Gloo)", "ray", clean, "steps after no report or checkpoint"),
        ("  step after a report", "ray_report", after_report, "steps after a plain ray.train.report"),
    ):
        if times:
            row = row_from_times(name, kind, config, times, workers=workers, threads=threads, device="cpu", amp=amp,
                                 wall_s=wall, note=note)
            row["recorded_steps"] = [step for step, _ in recorded]
            rows.append(row)
    if not rows:
        raise RuntimeError(f"too few steps after the {warmup} warm-up step(s) to time (recorded: {recorded})")
    return rows


# Ray ----------------------------------------------------------------------------------------------
def ensure_ray(address: str | None, cpus_needed: float) -> tuple[bool, str | None]:
    """Reuse an initialised Ray; else join ``address`` or start a small local instance.

    Returns (whether this call started it, its temporary folder to remove)."""
    import ray

    if ray.is_initialized():
        log("reusing the initialised Ray instance")
        return False, None
    if address:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address)
        return True, None
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance for this process only
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
    log(f"starting a local Ray instance ({cpus} CPUs)")
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir)
    return True, temp_dir


# Output -------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["configuration", "amp", "workers", "thr/w", "batch/w", "n", "ms/step", "slices/s", "/worker",
               "vs bare", "peak GB", "wall s"]
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append([row["name"], row["amp"], str(row["workers"]), "-", str(row["batch_per_worker"]), "0",
                          "FAILED", "-", "-", "-", "-", "-"])
            continue
        lines.append([
            row["name"], row["amp"], str(row["workers"]), _fmt(row.get("threads_per_worker")),
            str(row["batch_per_worker"]), str(row["samples"]), _fmt(row["median_ms"]), _fmt(row["slices_per_s"], 2),
            _fmt(row["slices_per_s_per_worker"], 2), _fmt(row["vs_bare"], 2), _fmt(row["peak_memory_gb"], 2),
            _fmt(row["wall_s"]),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [render(headers), render(["-" * w for w in widths])]
    out += [render(line) for line in lines]
    errors = [f"  {row['name']} ({row['amp']}, {row['workers']} w): {row['error']}" for row in rows if row.get("error")]
    return "\n".join(out + (["failures:", *errors] if errors else []))


def derive(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios that split the overhead: loop vs bare, Ray vs loop, 2 workers vs 1."""
    ok = [r for r in rows if not r.get("error")]
    derived: dict[str, Any] = {}
    for amp in dict.fromkeys(r["amp"] for r in ok):
        by = {(r["kind"], r["workers"]): r for r in ok if r["amp"] == amp}
        bare, loop = by.get(("bare", 1)), by.get(("loop", 1))
        entry: dict[str, Any] = {}
        if bare and loop:
            entry["loop_overhead_ms_per_step"] = round(loop["median_ms"] - bare["median_ms"], 3)
            entry["loop_vs_bare"] = round(loop["slices_per_s"] / bare["slices_per_s"], 3)
        load = next((r for r in ok if r["kind"] == "load"), None)
        if bare and load:
            # Issue 10: the data path must run at least 5x faster than the step consumes.
            entry["data_path_vs_step"] = round(load["slices_per_s"] / bare["slices_per_s"], 2)
        ray1 = by.get(("ray", 1))
        if ray1 and loop:
            entry["ray_1_worker_overhead_ms_per_step"] = round(ray1["median_ms"] - loop["median_ms"], 3)
            entry["ray_1_worker_vs_loop"] = round(ray1["slices_per_s"] / loop["slices_per_s"], 3)
        for (kind, workers), row in sorted(by.items()):
            if kind == "ray_report" and ("ray", workers) in by:
                entry[f"ray_{workers}_workers_report_cost_ms"] = round(
                    row["median_ms"] - by[("ray", workers)]["median_ms"], 3)
            if kind == "ray" and workers > 1 and ray1:
                entry[f"ray_{workers}_workers_speedup_over_1"] = round(row["slices_per_s"] / ray1["slices_per_s"], 3)
                entry[f"ray_{workers}_workers_scaling_efficiency"] = round(
                    row["slices_per_s"] / (workers * ray1["slices_per_s"]), 3)
        if entry:
            derived[amp] = entry
    return derived


def environment(device: torch.device, mode: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": std_platform.python_version(),
        "torch": torch.__version__,
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # other processes skew CPU timings
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
    if mode == "cpu":
        import ray

        env["ray"] = ray.__version__
    return env


# Main ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_scaling", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_argument_group("mode")
    mode.add_argument("--gpu", action="store_true",
                      help="GPU mode: bare and worker_loop rows on CUDA, paper preset at paper size; no Ray/MLflow/sigpy")
    mode.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="device of the bare and loop rows (default: cpu; cuda with --gpu). "
                           "--gpu --device cpu checks the GPU-mode code on the CPU")
    mode.add_argument("--configs", nargs="+", choices=["bare", "loop", "load", "ray"], default=None,
                      help="rows to measure (default: bare loop ray; --gpu: bare loop)")
    model = parser.add_argument_group("model and data")
    model.add_argument("--method", choices=MRI_METHODS, default="ambient")
    model.add_argument("--preset", choices=["tiny", "paper"], default=None,
                       help="network preset: tiny (CPU default) or the method's paper preset (--gpu default)")
    model.add_argument("--amp", nargs="+", choices=list(AMPS), default=None,
                       help="precision(s) to measure (default: fp32; --gpu: bf16 fp32)")
    model.add_argument("--batch-size", type=int, default=None, help="slices per worker per step (default: 2; --gpu: 8)")
    model.add_argument("--height", type=int, default=None, help="image rows of the synthetic data (default: 64; --gpu: 384)")
    model.add_argument("--width", type=int, default=None, help="image columns (default: 64; --gpu: 320)")
    model.add_argument("--coils", type=int, default=None, help="(virtual) coils of the synthetic data (default: 4)")
    model.add_argument("--acceleration", type=float, default=4,
                       help="training R (methods trained at R = 1 use 1 whatever this says)")
    model.add_argument("--slices", type=int, default=None, help="train slices of the synthetic dataset (default: 16)")
    model.add_argument("--dataset", default=None,
                       help="an existing prepared dataset (its size and coils are used) instead of a synthetic one")
    model.add_argument("--data", choices=["prepare", "direct"], default=None,
                       help="how the synthetic dataset is made: prepare (synth volumes + adps prepare: Ray, sigpy; "
                            "CPU default) or direct (shards written with adps.data.shards; --gpu: always)")
    model.add_argument("--compile", choices=COMPILE_MODES, default=None,
                       help="torch.compile every row's network with this mode (TrainConfig.compile_mode; "
                            "the Ray rows: DDP + compile); default eager")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=20, help="timed steps per configuration (after the warm-up)")
    timing.add_argument("--warmup", type=int, default=5, help="warm-up steps per configuration (not timed)")
    ray_group = parser.add_argument_group("Ray Train (CPU mode)")
    ray_group.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts")
    ray_group.add_argument("--cpus-per-worker", type=int, default=1,
                           help="CPUs per Ray worker; also the intra-op threads of the bare and loop rows on CPU")
    ray_group.add_argument("--ray-address", default=None,
                           help="Ray cluster to join when Ray is not initialised (default: start a local instance)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, default=None, help="write settings, environment and rows to this file")
    output.add_argument("--keep-data", action="store_true", help="keep the temporary dataset and Ray run folders")
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    defaults = GPU_DEFAULTS if args.gpu else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu:
        if "ray" in args.configs:
            parser.error("--gpu measures bare and loop rows only (the GPU machine has no Ray)")
        if args.data == "prepare" and not args.dataset:
            parser.error("--gpu cannot use --data prepare (it needs Ray and sigpy): use --data direct or --dataset")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (use --device cpu to check the GPU-mode code on the CPU)")
    if not args.gpu and args.device == "cuda":
        parser.error("CPU mode compares with CPU Ray workers: use --gpu for CUDA")
    if args.method in FULLY_SAMPLED:
        args.acceleration = 1.0
    for key in ("steps", "batch_size", "slices", "cpus_per_worker"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1 (the first step compiles)")
    if any(w < 1 for w in args.workers):
        parser.error("--workers must be >= 1")
    return args


def finish(result: dict[str, Any], *, complete: bool) -> dict[str, Any]:
    """``result`` with each row's ``vs_bare`` and the derived ratios filled in."""
    rows = result["rows"]
    for row in rows:  # per-worker throughput as a share of the bare step's (same precision)
        bare = next((r for r in rows if r["kind"] == "bare" and r["amp"] == row["amp"] and not r.get("error")), None)
        if bare and not row.get("error"):
            row["vs_bare"] = round(row["slices_per_s_per_worker"] / bare["slices_per_s_per_worker"], 3)
    result["derived"] = derive(rows)
    result["complete"] = complete
    result["environment"]["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
    return result


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    device = torch.device(args.device)
    mode = "gpu" if args.gpu else "cpu"
    threads = args.cpus_per_worker if device.type == "cpu" else None
    threads_before = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="adps-scaling-"))
    started_ray, ray_temp = False, None
    rows: list[dict[str, Any]] = []

    def measured(new_rows: list[dict[str, Any]]) -> None:
        """Keep rows, show them, and rewrite the JSON (a run cut short still leaves them)."""
        rows.extend(new_rows)
        for row in new_rows:
            log(_progress(row))
        write_json(args.json, finish(result, complete=False))

    try:
        if mode == "cpu":
            cpus = max(args.workers) * args.cpus_per_worker if "ray" in args.configs else 1
            if "ray" in args.configs or (args.data == "prepare" and not args.dataset):
                started_ray, ray_temp = ensure_ray(args.ray_address, cpus)
        if args.dataset:
            root = args.dataset
            log(f"dataset: {root}")
        else:
            accelerations = dataset_accelerations(args.method, args.acceleration)
            make = make_dataset_prepare if args.data == "prepare" else make_dataset_direct
            log(f"making a synthetic prepared dataset ({args.data}): {args.slices} slices, {args.coils} coils, "
                f"{args.height} x {args.width}, R {', '.join(f'{r:g}' for r in accelerations)}")
            root = make(work / "data", slices=args.slices, coils=args.coils, height=args.height, width=args.width,
                        accelerations=accelerations, l1=args.method == "edm_l1")
        manifest = read_manifest(root)
        train_split = manifest["splits"]["train"]
        height, width = train_split["shape"]
        coils, n_slices = train_split["coils"], train_split["n_slices"]
        preset = PAPER_PRESETS[args.method] if args.preset == "paper" else "tiny"
        base = with_settings(
            TrainConfig(method=args.method, r_train=args.acceleration, preset=preset, dataset=str(root),
                        batch_size=args.batch_size, cpus_per_worker=args.cpus_per_worker, seed=0,
                        compile_mode=args.compile or ""),
            **QUIET,
        )
        base.validate()
        log(f"dataset ready: {n_slices} train slices, {coils} coils, {height} x {width}")
        result: dict[str, Any] = {
            "bench": "train_scaling",
            "mode": mode,
            "complete": False,
            "settings": {
                "method": args.method, "preset": preset, "acceleration": args.acceleration,
                "batch_per_worker": args.batch_size, "height": height, "width": width, "coils": coils,
                "train_slices": n_slices, "steps": args.steps, "warmup": args.warmup, "amp": args.amp,
                "compile": args.compile or "off",
                "configs": args.configs, "workers": args.workers if "ray" in args.configs else [1],
                "cpus_per_worker": args.cpus_per_worker, "threads": threads,
                "dataset": args.dataset or f"synthetic ({args.data})",
            },
            "environment": environment(device, mode),
            "rows": rows,
            "derived": {},
        }
        if mode == "gpu" and args.method == "ambient" and preset != "tiny":
            result["paper_reference"] = bench_train_step.PAPER_REFERENCE
        if threads is not None:
            torch.set_num_threads(threads)

        for amp in args.amp:
            config = with_settings(base, amp=AMPS[amp] or "")
            if "bare" in args.configs:
                log(f"bare train_step ({config.method}/{config.resolved_preset}, {amp}, batch {config.batch_size}, "
                    f"{device.type}): {args.warmup} + {args.steps} steps")
                try:
                    batch = load_batch(config, config.batch_size)
                    new = [bench_bare(config, batch, device, amp=amp, warmup=args.warmup, steps=args.steps,
                                      threads=threads)]
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: report it, measure the rest
                    new = [failed_row("bare train_step", "bare", config, workers=1, device=device_name(device),
                                      amp=amp, error=err)]
                _free_device_memory(device)
                measured(new)
            if "loop" in args.configs:
                log(f"worker_loop with a stand-in context ({amp}): {args.warmup} + {args.steps} steps")
                try:
                    new = [bench_loop(config, device, amp=amp, warmup=args.warmup, steps=args.steps, threads=threads)]
                except Exception as err:  # noqa: BLE001
                    new = [failed_row("worker_loop, no Ray", "loop", config, workers=1, device=device_name(device),
                                      amp=amp, error=err)]
                _free_device_memory(device)
                measured(new)
            if "load" in args.configs and amp == args.amp[0]:  # no model: once, not per precision
                log(f"the data path alone: {args.warmup} + {args.steps} batches")
                try:
                    new = [bench_load(config, device, warmup=args.warmup, steps=args.steps, threads=threads)]
                except Exception as err:  # noqa: BLE001
                    new = [failed_row("data path alone", "load", config, workers=1, device=device_name(device),
                                      amp="-", error=err)]
                measured(new)
            if "ray" in args.configs:
                for workers in args.workers:
                    log(f"Ray Train, {workers} worker(s) x {args.cpus_per_worker} CPU ({amp}): "
                        f"{args.warmup} + {args.steps} steps")
                    try:
                        new = bench_ray(config, workers, amp=amp, warmup=args.warmup, steps=args.steps,
                                        storage=work / "ray_runs")
                    except Exception as err:  # noqa: BLE001
                        new = [failed_row("Ray Train (Gloo)", "ray", config, workers=workers, device="cpu", amp=amp,
                                          error=err)]
                    measured(new)
        finish(result, complete=True)
    finally:
        torch.set_num_threads(threads_before)
        if started_ray:
            import ray

            ray.shutdown()
        if ray_temp:
            shutil.rmtree(ray_temp, ignore_errors=True)
        if args.keep_data:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(_title(result))
    print(format_table(rows))
    for amp, entry in result["derived"].items():
        print(f"{amp}: " + ", ".join(f"{k} {v}" for k, v in entry.items()))
    if "paper_reference" in result:
        ref = result["paper_reference"]
        print(f"paper reference: {ref['slices_per_s']} slices/s, {ref['peak_memory_gb']} GB "
              f"({ref['device']}, {ref['precision']}, batch {ref['batch']}, {ref['height']} x {ref['width']})")
    sys.stdout.flush()
    write_json(args.json, result)
    if args.json:
        log(f"wrote {args.json}")
    return 1 if any(row.get("error") for row in rows) else 0


def _progress(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"  -> failed: {row['error']}"
    memory = f", peak {row['peak_memory_gb']:.2f} GB" if row.get("peak_memory_gb") is not None else ""
    return (f"  -> {row['median_ms']:.1f} ms/step, {row['slices_per_s']:.2f} slices/s "
            f"({row['samples']} steps, {row['wall_s']:.1f} s in all{memory})")


def _title(result: dict[str, Any]) -> str:
    s, env = result["settings"], result["environment"]
    load = f", load average {env['load_average_at_start'][0]:.1f} -> {env['load_average_now'][0]:.1f}"
    versions = (f", CUDA {env['cuda']}" if env.get("cuda") else "") + (f", Ray {env['ray']}" if env.get("ray") else "")
    return (f"train_scaling ({result['mode']} mode) on {env['device']}, torch {env['torch']}{versions}{load}"
            + f"\n{s['method']}/{s['preset']}, R {s['acceleration']:g}, {s['batch_per_worker']} slices per worker of "
            f"{s['coils']} x {s['height']} x {s['width']}, median of {s['steps']} steps after {s['warmup']} warm-up")


if __name__ == "__main__":
    sys.exit(main())

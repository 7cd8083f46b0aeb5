"""What one trial of an ``adps tune`` search runs, in a Ray Tune worker process.

:func:`search_trial` serves both studies: with the sampled settings it reconstructs the search's validation slices at
``R_inf`` (MRI), or measures and reconstructs the search's images with its task's operator (natural images), and
reports after each batch the running mean of the objective's metrics (so that ASHA can stop a poor trial early) and
of the sampler's seconds per slice (image). Every trial sees the same data and noise. Ray Tune is imported inside it:
the driver imports this module, and must not need a Ray worker to load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from adps.data.dataset import PreparedSliceDataset
from adps.data.shards import read_manifest
from adps.images import GaussianCompressedSensing, ImageDataset, SuperResolution, add_noise
from adps.metrics import image_metrics, rgb_mse
from adps.nn.image_diffusion import DEFAULT_DELTA, image_sampler, image_sampler_options
from adps.nn.samplers import run_sampler
from adps.orchestration.cells import reconstruct_batch, stack_batch
from adps.orchestration.registry import load_model_entry
from adps.orchestration.tune_config import IMAGE_OBJECTIVE_METRICS, OBJECTIVE_METRICS, SECONDS_PER, SearchConfig

__all__ = ["search_trial"]


def _load_batches(config: SearchConfig, device: str) -> tuple[list[dict[str, Any]], int | None]:
    acs = read_manifest(config.dataset)["config"].get("acs")
    dataset = PreparedSliceDataset(config.dataset, config.split, acceleration=config.r_inf)
    try:
        count = min(len(dataset), config.slices) if config.slices else len(dataset)
        batches = []
        for start in range(0, count, config.slices_per_report):
            items = [dataset[i] for i in range(start, min(start + config.slices_per_report, count))]
            batches.append(stack_batch(items, device))
    finally:
        dataset.close()
    return batches, acs


def search_trial(params: dict[str, Any], *, config: dict[str, Any], sampler: str = "", resolution: int = 0) -> None:
    """The Ray Tune function trainable of both studies (see the module docstring), with the trial's settings
    ``params``: an MRI search (no ``task``) reconstructs with ``sampler`` (:func:`_mri_scores`), a natural-image search
    samples at ``resolution`` with the model's sampler (:func:`_image_scores`)."""
    from ray import tune

    search = SearchConfig.from_dict(config)
    # The trial's params as the samplers take them (Tune hands numpy / float values).
    settings = {key: int(value) if key == "steps" else float(value) for key, value in params.items()}
    torch.set_num_threads(max(1, int(search.cpus_per_trial)))
    device = "cuda" if search.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    model, model_config = load_model_entry(search.model, device, search.tracking_uri)
    if search.task:
        metrics, unit = IMAGE_OBJECTIVE_METRICS, "images"
        batches = _image_scores(search, model, model_config, settings, device, resolution)
    else:
        metrics, unit = OBJECTIVE_METRICS, "slices"
        batches = _mri_scores(search, model, model_config, settings, device, sampler)
    totals = dict.fromkeys(metrics, 0.0)
    seen, seconds = 0, 0.0
    for index, (scores, batch_seconds) in enumerate(batches):
        for metric in metrics:
            # A diverged reconstruction scores as the worst possible, not as NaN (ASHA compares).
            worst = 1e6 if metric in ("nrmse", "mse") else -1e6
            totals[metric] += float(torch.nan_to_num(scores[metric].double().cpu(), nan=worst).sum())
        seen += len(scores[metrics[0]])
        seconds += batch_seconds
        tune.report({**{m: totals[m] / seen for m in metrics}, unit: seen, "batch": index + 1,
                     SECONDS_PER[unit]: seconds / seen})


def _timed(device: str, run: Any) -> tuple[Any, float]:
    """``(run(), seconds)``, the device synchronised before the clock is read."""
    started = time.perf_counter()
    result = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def _mri_scores(search: SearchConfig, model: Any, model_config: dict[str, Any], settings: dict[str, Any],
                device: str, sampler: str) -> Iterator[tuple[dict[str, Any], float]]:
    """Per batch of validation slices: the NRMSE / PSNR / SSIM of ``sampler``'s reconstructions and their seconds."""
    batches, acs = _load_batches(search, device)
    for batch in batches:
        image, seconds = _timed(device, lambda batch=batch: reconstruct_batch(
            sampler, model, batch, r_train=float(model_config["r_train"]), seed=search.seed, acs=acs, amp=search.amp,
            **settings))
        yield image_metrics(batch["reference"], image.detach()), seconds


def _image_scores(search: SearchConfig, model: Any, model_config: dict[str, Any], settings: dict[str, Any],
                  device: str, resolution: int) -> Iterator[tuple[dict[str, Any], float]]:
    """Per batch of images: MSE (``[0, 1]`` scale, estimates clipped to ``[-1, 1]``) and PSNR of the model's posterior
    samples from the task's measurements, and the seconds they took."""
    settings = dict(settings)
    schedule = {key: settings.pop(key) for key in ("sigma_min", "sigma_max", "rho") if key in settings}
    ambient = image_sampler(model) == "a_dps"
    options = image_sampler_options(model, steps=settings.pop("steps", None), guidance=settings.pop("guidance", None),
                                    erasure_p=float(model_config["erasure_p"]) if ambient else None,
                                    delta=float(model_config.get("delta", DEFAULT_DELTA)), **schedule)
    operator = _image_operator(search, resolution)
    for indices, images in _load_image_batches(search, resolution, device):
        y = operator(images)
        if search.noise > 0:  # each image's noise from its own seed: any batching gives the same y
            y = torch.cat([add_noise(y[i : i + 1], search.noise, generator=_seeded(search.seed, 1, image_index))
                           for i, image_index in enumerate(indices)])
        estimate, seconds = _timed(device, lambda y=y, indices=indices: run_sampler(
            model=model, y=y, operator=operator, generator=_seeded(search.seed, 2, indices[0]), amp=search.amp or None,
            **options, **settings))
        mse = torch.nan_to_num(rgb_mse(images, estimate.detach().float().clamp(-1, 1)).cpu(), nan=1e6)
        yield {"mse": mse, "psnr": -10 * torch.log10(mse.clamp_min(1e-12))}, seconds


def _seeded(*keys: int) -> Any:
    """A CPU ``torch.Generator`` seeded from ``keys`` through numpy's SeedSequence (independent streams), keyed as in
    ``adps evaluate --study images``: a search and the evaluation draw the same measurement and start noise."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def _image_operator(search: SearchConfig, resolution: int) -> Any:
    """The image task's operator: one Gaussian matrix per (m, seed), or the downscaling."""
    if search.task == "sr":
        return SuperResolution(search.factor)
    return GaussianCompressedSensing(search.measurements, (3, resolution, resolution), search.seed)


def _load_image_batches(search: SearchConfig, resolution: int, device: str) -> list[tuple[list[int], Any]]:
    """The first ``slices`` clean images in batches of ``slices_per_report``: ``(indices, (n, 3, R, R) in [-1, 1])``."""
    with ImageDataset(search.dataset, resolution) as dataset:
        count = min(len(dataset), search.slices) if search.slices else len(dataset)
        batches = []
        for start in range(0, count, search.slices_per_report):
            indices = list(range(start, min(start + search.slices_per_report, count)))
            batches.append((indices, torch.stack([dataset.decode(i) for i in indices]).to(device)))
    return batches

"""Unconditional samples and FID per diffusion model (paper table 1): ``adps fid``.

One Ray task per model (one GPU each with ``use_gpu``) draws ``samples`` unconditional images, computes the
FID against the reference images of the dataset's ``split`` (VGG16 features by default, Inception-v3 as an
option; local weights only, see :mod:`adps.perceptual`) and draws a sample grid. The driver logs one MLflow
run: ``fid.csv`` (model, FID, the paper's value, the sampler and its settings), metrics ``fid.<model>``, tags
``adps.fid_sampler.<model>`` and ``samples_<model>.png``.

Table 1's FIDs must compare models, not samplers (METHOD.md "prior"), so each family samples with one fixed
sampler (:func:`fid_sampler`); ambient models with the network fed ``[A_tr^H A_tr x, mask_tr]`` as in training
(a fresh R_train + 1 mask per sample from the A_tr stream, and the coil maps of the split's slices, cycled,
since its input is defined through them).
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adps.data.dataset import PreparedSliceDataset
from adps.data.shards import read_manifest
from adps.mri import SenseOperator
from adps.mri.masks import DEFAULT_ACS, lines_at
from adps.nn import samplers
from adps.nn.ema import unwrap_model
from adps.nn.samplers import SAMPLER_DEFAULTS, default_sigmas, train_masks
from adps.orchestration.registry import load_model_entry, model_label, model_uri
from adps.orchestration.tracking import RunConfig, RunLogger, end_run, open_run, resolve_tracking_uri
from adps.perceptual import fid, find_weights

__all__ = ["PAPER_FID", "FidConfig", "fid_sampler", "format_fid_table", "run_fid", "unconditional_samples"]

PAPER_FID = {"edm_r1": 10.41, "edm_l1_r2": 18.55, "edm_l1_r4": 27.64, "edm_l1_r6": 51.43, "edm_l1_r8": 102.98,
             "ncsnv2_r1": 13.20, "ambient_r2": 30.34, "ambient_r4": 32.31, "ambient_r6": 31.50, "ambient_r8": 48.15}
"""Table 1 of the paper (METHOD.md): FID of 100 unconditional samples, lower is better."""


@dataclass(frozen=True)
class FidConfig(RunConfig):
    """Settings of ``adps fid``; unknown keys are refused by name."""

    dataset: str = ""
    """Prepared dataset whose reference images are the real set."""
    models: tuple[str, ...] = ()
    """Models, as for ``adps evaluate`` (``models:/...``, ``adps-edm-r1``, ``runs:/...``, a folder)."""
    split: str = "test"
    """Split of the real images."""
    samples: int = 100
    """Unconditional samples per model (paper: 100)."""
    steps: int = 0
    """Sampler steps (0 = METHOD.md's: EDM Heun 18, ALD 1,300); the same for every model of a family."""
    sigma_max: float = 0.0
    """EDM Heun's first level for every EDM-preconditioned model (0 = METHOD.md's 80)."""
    sigma_min: float = 0.0
    """EDM Heun's last level (0 = METHOD.md's 0.002)."""
    rho: float = 0.0
    """EDM Heun's schedule curvature (0 = METHOD.md's 7)."""
    batch: int = 25
    """Samples drawn at once."""
    backbone: str = "vgg16"
    """FID features: ``vgg16`` (512-d, the paper's text) or ``inception_v3`` (2048-d)."""
    fid_weights: str = ""
    """The backbone's weights file (empty: found on the driver, as adps.perceptual.find_weights)."""
    use_gpu: bool = False
    """The sampling on a GPU (one Ray task per model)."""
    experiment: str = "adps-fid"
    run_name: str = "fid"
    """MLflow run name."""

    def validate(self) -> None:
        super().validate()
        if not self.dataset:
            raise ValueError("config key 'dataset' is empty: give the prepared dataset (folder or s3://)")
        if not self.models:
            raise ValueError("config key 'models' is empty: name at least one diffusion model")
        if self.samples < 2:
            raise ValueError(f"config key 'samples' must be >= 2 (FID needs a covariance), got {self.samples}")
        if any(getattr(self, key) < 0 for key in ("sigma_max", "sigma_min", "rho")):
            raise ValueError("config keys 'sigma_max', 'sigma_min', 'rho' must be >= 0 (0 = METHOD.md's)")
        if self.batch < 1 or self.steps < 0:
            raise ValueError(f"config keys 'batch' (>= 1) and 'steps' (>= 0): got {self.batch}, {self.steps}")
        if self.backbone not in ("vgg16", "inception_v3"):
            raise ValueError(f"config key 'backbone' must be vgg16 or inception_v3, got {self.backbone!r}")


def fid_sampler(method: str, model: torch.nn.Module | None = None, steps: int = 0, *, sigma_max: float = 0.0,
                sigma_min: float = 0.0, rho: float = 0.0) -> dict[str, Any]:
    """The unconditional sampler of ``method`` and every setting of it (what is logged with an FID):
    ``prior_heun`` (18 steps, sigma 80 -> 0.002, rho 7) for ``edm``, ``edm_l1`` and ``ambient``;
    ``ald`` over the NCSNv2's full noise range (from its largest level; 1,300 steps, 3 per level,
    no data term) for ``ncsnv2``. A setting > 0 replaces METHOD.md's (for every model alike)."""
    if method in ("edm", "edm_l1", "ambient"):
        defaults = SAMPLER_DEFAULTS["prior_heun"]
        return {"sampler": "prior_heun", "steps": steps or defaults["steps"],
                "sigma_max": sigma_max or defaults["sigma_max"], "sigma_min": sigma_min or defaults["sigma_min"],
                "rho": rho or defaults["rho"]}
    if method == "ncsnv2":
        defaults = SAMPLER_DEFAULTS["ald"]
        levels = model.sigmas() if model is not None else None
        return {"sampler": "ald", "steps": steps or defaults["steps"], "steps_per_level": defaults["steps_per_level"],
                "sigma_start": float(levels[0]) if levels is not None else None,
                "sigma_end": float(levels[-1]) if levels is not None else None,
                "step_scale": defaults["step_scale"], "likelihood_weight": 0.0}
    raise ValueError(f"{method}: no unconditional sampler (edm, edm_l1, ncsnv2 and ambient have one)")


def unconditional_samples(method: str, model: torch.nn.Module, n: int, shape: tuple[int, int], *, steps: int = 0,
                          batch: int = 25, seed: int = 0, amp: str = "", device: str = "cpu",
                          maps: torch.Tensor | None = None, r_train: float | None = None, acs: int | None = None,
                          sigma_max: float = 0.0, sigma_min: float = 0.0, rho: float = 0.0) -> torch.Tensor:
    """``n`` unconditional complex images ``(n, H, W)`` from a diffusion prior, with the sampler of
    :func:`fid_sampler`. ``maps`` ``(M, C, H, W)`` and ``r_train`` (R_train) are needed for ``ambient`` models
    (see the module docstring); sample ``i`` uses ``maps[i % M]``; ``acs``: the ACS width of its masks (the
    prepared dataset's; None = METHOD.md's 20 where it fits)."""
    settings = fid_sampler(method, unwrap_model(model) if method == "ncsnv2" else None, steps, sigma_max=sigma_max,
                           sigma_min=sigma_min, rho=rho)
    if method == "ambient" and (maps is None or r_train is None):
        raise ValueError("ambient: unconditional samples need coil maps and the training acceleration")
    out = []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        if settings["sampler"] == "prior_heun":
            sigmas = default_sigmas("prior_heun", steps=settings["steps"], sigma_max=settings["sigma_max"],
                                    sigma_min=settings["sigma_min"], rho=settings["rho"])
            if method == "ambient":
                picked = maps[torch.arange(start, start + count) % maps.shape[0]].to(device)
                acs_width = min(DEFAULT_ACS, lines_at(shape[1], r_train + 1)) if acs is None else int(acs)
                mask = train_masks(shape[1], r_train, count, seed, list(range(start, start + count)), acs=acs_width)
                out.append(samplers.prior_heun(model, None, SenseOperator(picked), sigmas, generator=generator,
                                               train_mask=mask, amp=amp or None))
            else:
                out.append(samplers.prior_heun(model, None, None, sigmas, generator=generator, shape=shape,
                                               batch=count, amp=amp or None))
        else:
            # ALD with the data term switched off: one all-ones coil, nothing measured.
            ones = torch.ones(count, 1, *shape, dtype=torch.complex64, device=device)
            operator = SenseOperator(ones, torch.zeros(count, shape[1], dtype=torch.bool, device=device))
            y = torch.zeros(count, 1, *shape, dtype=torch.complex64, device=device)
            sigmas = default_sigmas("ald", model, steps=settings["steps"], sigma_start=settings["sigma_start"])
            out.append(samplers.ald(model, y, operator, sigmas, generator=generator, likelihood_weight=0.0,
                                    amp=amp or None))
    return torch.cat(out).cpu()


def _sample_grid(images: torch.Tensor, title: str, columns: int = 5) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = images[: columns * 2].abs().numpy()
    rows = math.ceil(len(shown) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image in zip(axes.flat, shown, strict=False):
        axis.imshow(image, cmap="gray", vmin=0, vmax=float(np.quantile(image, 0.995)) or 1.0)
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _fid_task(config: dict[str, Any], uri: str) -> dict[str, Any]:
    cfg = FidConfig.from_dict(config)
    torch.set_num_threads(1)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model, model_config = load_model_entry(uri, device, cfg.tracking_uri)
    label = model_label(model_config)
    prepared = read_manifest(cfg.dataset)["config"]
    dataset = PreparedSliceDataset(cfg.dataset, cfg.split, acceleration=prepared["accelerations"][0])
    try:
        items = [dataset[i] for i in range(len(dataset))]
        real = torch.stack([item["reference"] for item in items])
        maps = torch.stack([item["maps"] for item in items])
    finally:
        dataset.close()
    row: dict[str, Any] = {"model": label, "fid": None, "paper_fid": PAPER_FID.get(label), "samples": cfg.samples,
                           "sampler": "", "note": ""}
    try:
        schedule = {"sigma_max": cfg.sigma_max, "sigma_min": cfg.sigma_min, "rho": cfg.rho}
        settings = fid_sampler(model_config["method"], model, cfg.steps, **schedule)
        row["sampler"] = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
        fake = unconditional_samples(model_config["method"], model, cfg.samples, tuple(real.shape[-2:]), steps=cfg.steps,
                                     batch=cfg.batch, seed=cfg.seed, amp=cfg.amp, device=device, maps=maps,
                                     r_train=float(model_config["r_train"]), acs=prepared.get("acs"), **schedule)
    except ValueError as err:
        row["note"] = str(err)
        return row
    row["fid"] = fid(real, fake, cfg.backbone, weights=cfg.fid_weights or None, device=device, method="eigh")
    row["grid"] = _sample_grid(fake, f"{label}: unconditional samples")
    return row


def format_fid_table(rows: list[dict[str, Any]]) -> str:
    """Model, FID, the paper's FID (table 1), the sampler and its settings, and why a model has no FID."""
    lines = [f"{'model':12s} {'FID':>9s} {'paper':>7s}  sampler / note"]
    for row in rows:
        ours = f"{row['fid']:9.2f}" if row["fid"] is not None else f"{'-':>9s}"
        paper = f"{row['paper_fid']:7.2f}" if row["paper_fid"] is not None else f"{'-':>7s}"
        lines.append(f"{row['model']:12s} {ours} {paper}  {row.get('sampler', '')} {row['note']}".rstrip())
    return "\n".join(lines)


def run_fid(config: FidConfig, *, ray_address: str | None = None) -> dict[str, Any]:
    """Sample, measure and log every model; returns ``{"rows", "run_id"}``."""
    import ray

    config.validate()
    config = config.replace(tracking_uri=resolve_tracking_uri(config.tracking_uri))
    # Fails before any task: a missing weights file or model names itself here.
    config = config.replace(fid_weights=str(find_weights(config.backbone, config.fid_weights or None)))
    uris = [model_uri(entry) for entry in config.models]
    for uri in uris:
        load_model_entry(uri, "cpu", config.tracking_uri)
    if not ray.is_initialized():
        ray.init(address=ray_address)
    resources = {"num_gpus": 1, "num_cpus": 1} if config.use_gpu else {"num_cpus": 1}
    task = ray.remote(**resources)(_fid_task)
    rows = ray.get([task.remote(config.to_dict(), uri) for uri in uris])
    tracking_uri = config.tracking_uri
    run_id, _ = open_run(tracking_uri, config.experiment, f"fid#{config.run_name}", config.run_name, config.to_dict())
    log = RunLogger(tracking_uri, run_id)
    with tempfile.TemporaryDirectory(prefix="adps-fid-") as tmp:
        folder = Path(tmp)
        lines = ["model,fid,paper_fid,samples,sampler,note"]
        for row in rows:
            lines.append(",".join("" if row[k] is None else str(row[k]).replace(",", ";")
                                  for k in ("model", "fid", "paper_fid", "samples", "sampler", "note")))
            if "grid" in row:
                (folder / f"samples_{row['model']}.png").write_bytes(row.pop("grid"))
        (folder / "fid.csv").write_text("\n".join(lines) + "\n")
        for path in sorted(folder.iterdir()):
            log.client.log_artifact(run_id, str(path))
    measured = {f"fid.{row['model']}": row["fid"] for row in rows if row["fid"] is not None}
    if measured:
        log.log_metrics(measured, 0)
    log.set_tags({f"adps.fid_sampler.{row['model']}": row["sampler"] for row in rows if row["sampler"]})
    end_run(tracking_uri, run_id, "FINISHED")
    return {"rows": rows, "run_id": run_id}

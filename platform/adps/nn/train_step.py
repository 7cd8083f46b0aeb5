"""One optimisation step of every method in the study, on one device, from plain Python.

The training platform (Ray Train) and the benchmarks call exactly :func:`train_step`; it knows nothing of
distribution (wrap the model in DDP outside) or of logging.

A batch is a dict of tensors as the prepared-shard dataset returns them:

=================  ==================  ===============================================
key                shape / dtype       meaning
=================  ==================  ===============================================
``kspace``         (N, C, H, W) c64    FULLY SAMPLED prepared k-space
``maps``           (N, C, H, W) c64    coil sensitivity maps
``reference``      (N, H, W) c64       R = 1 reference image (CG-SENSE)
``mask``           (N, W) bool         the slice's mask at R
``mask_further``   (N, W) bool         its further-corrupted mask at R + 1
``l1``             (N, H, W) c64       optional: L1-wavelet reconstruction at R
``slice_id``       (N,) int64          optional
=================  ==================  ===============================================

The natural-image method ``image`` (paper section 3.1) reads an :class:`adps.images.ImageDataset` batch instead:
``image`` real ``(N, 3, H, W)`` in ``[-1, 1]`` (erased pixels already 0 when corrupted) and, for a corrupted
training set (``erasure_p > 0``), ``mask`` bool ``(N, 1, H, W)``, True where a pixel is kept.

What each method trains on (:data:`METHODS`):

* ``ambient``: ``kspace * mask`` only (the ambient loss, k-space form); never the full k-space nor the reference.
* ``edm``: ``reference`` (the fully sampled model, R = 1).
* ``edm_l1``: ``l1`` (the L1-EDM baseline at R).
* ``ncsnv2``: ``reference``, denoising score matching over the network's noise levels.
* ``modl``: input ``kspace * mask``, supervised by ``reference`` (NRMSE).
* ``ssdu``: ``kspace * mask`` split into Theta (input) and Lambda (loss); no reference. A fresh split is drawn every
  step from the step's generator, so every acquired column serves as loss column over training (SSDU's multi-mask
  spirit; SSDU's code draws one split per slice before training).
* ``image``: natural images. With ``mask`` in the batch, Ambient Diffusion's inpainting loss
  (:func:`adps.nn.image_diffusion.ambient_image_loss`, the further-corrupted mask drawn each step from the step's
  generator); without it, EDM's loss on the clean images. The model must match: an ambient image model (mask
  channel) exactly when the batch has masks.

The step: loss (optionally under autocast) -> backward -> non-finite gradient entries set to zero -> gradient-norm
clipping -> optimizer step -> EMA update. A non-finite loss skips the step entirely (no parameter, optimizer or EMA
change); under DistributedDataParallel the ranks decide that together, so that no rank waits alone in the gradient
all-reduce.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .ema import EMA, unwrap_model
from .image_diffusion import DEFAULT_DELTA, ambient_image_loss, build_image_model, is_ambient_image_model
from .modl import MoDL, build_modl
from .ncsnv2 import NCSNv2, build_ncsnv2
from .objectives import (
    _randn,
    ambient_loss,
    dsm_loss,
    edm_loss,
    keep_columns,
    modl_loss,
    sample_noise,
    sample_sigma,
    ssdu_loss,
    ssdu_split,
)
from .precond import EDMPrecond
from .unet import build_unet

__all__ = [
    "BATCH_KEYS", "IMAGE_METHODS", "LossBySigma", "METHODS", "MRI_METHODS", "PAPER_PRESETS", "SIGMA_BIN_EDGES",
    "build_model", "make_optimizer", "method_loss", "model_device", "train_step"
]

MRI_METHODS = ("ambient", "edm", "edm_l1", "ncsnv2", "modl", "ssdu")
"""The methods of the MRI study (trained on prepared k-space shards)."""
IMAGE_METHODS = ("image",)
"""The natural-image methods (paper section 3.1; trained on an image folder or zip)."""
METHODS = MRI_METHODS + IMAGE_METHODS
"""Every method :func:`train_step` trains."""

# The batch keys each method reads (the step never touches the others).
BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "ambient": ("kspace", "maps", "mask", "mask_further"),
    "edm": ("reference",),
    "edm_l1": ("l1",),
    "ncsnv2": ("reference",),
    "modl": ("kspace", "maps", "mask", "reference"),
    "ssdu": ("kspace", "maps", "mask"),
    "image": ("image",),  # and "mask" when the training set is corrupted (optional)
}

# The paper-scale network preset of each method ("tiny" exists for all of them).
PAPER_PRESETS = {
    "ambient": "ambient", "edm": "edm", "edm_l1": "edm", "ncsnv2": "ncsnv2", "modl": "modl", "ssdu": "modl",
    "image": "image"
}

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(method: str, preset: str = "tiny", *, sigma_data: float = 0.5, ambient: bool | None = None,
                scale_cond: bool = True, **overrides: Any) -> nn.Module:
    """The network a method trains, in the form :func:`train_step` expects.

    * ``ambient``: :class:`EDMPrecond` around a SongUNet with 4 inputs (``ambient`` / ``tiny``);
    * ``edm``, ``edm_l1``: EDMPrecond around a 2-input SongUNet (``edm`` / ``tiny``);
    * ``ncsnv2``: :class:`NCSNv2` (``ncsnv2`` / ``tiny``);
    * ``modl``, ``ssdu``: :class:`MoDL` (``modl`` / ``tiny``);
    * ``image``: :func:`adps.nn.image_diffusion.build_image_model` (``image`` / ``tiny``), an RGB denoiser;
      ``ambient`` (required for this method, refused for the others) says whether it takes the mask channel
      (trained on erased pixels, ``erasure_p > 0``).

    ``sigma_data``: EDM's data standard deviation (METHOD.md 0.5) of the EDM-preconditioned models; ``scale_cond``:
    whether the ambient model's mask channels are scaled by ``c_in`` with the image (the reference code's behaviour,
    the default; :class:`EDMPrecond`). ``overrides`` are fields of the network's config, for the preset builder.
    """
    _check_method(method)
    if preset not in (PAPER_PRESETS[method], "tiny"):
        raise ValueError(f"{method}: preset must be {PAPER_PRESETS[method]!r} or 'tiny', got {preset!r}")
    if method == "image":
        if ambient is None:
            raise ValueError("image: build_model needs ambient=True (a model trained on erased pixels, erasure_p > 0) "
                             "or ambient=False (plain EDM, erasure_p = 0)")
        return build_image_model(preset, ambient=bool(ambient), sigma_data=sigma_data, **overrides)
    if ambient is not None:
        raise ValueError(f"{method}: 'ambient' applies to method 'image' only (the MRI ambient model is method 'ambient')")
    if method == "ambient":
        return EDMPrecond(build_unet(preset, **overrides), sigma_data=sigma_data, scale_cond=scale_cond)
    if method in ("edm", "edm_l1"):
        # The tiny preset has the ambient layout (4 in); the EDM models see [Re, Im] only.
        extra = {"in_channels": 2, "out_channels": 2} if preset == "tiny" else {}
        return EDMPrecond(build_unet(preset, **{**extra, **overrides}), sigma_data=sigma_data)
    if method == "ncsnv2":
        return build_ncsnv2(preset, **overrides)
    return build_modl(preset, **overrides)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prepare_batch(method: str, batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The keys ``method`` needs, checked and moved to ``device``."""
    if method == "image":
        return _prepare_image_batch(batch, device)
    missing = [k for k in BATCH_KEYS[method] if batch.get(k) is None]
    if missing:
        raise KeyError(f"{method}: batch lacks key(s) {missing} (has {sorted(k for k, v in batch.items() if v is not None)})")
    out = {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS[method]}
    for key in ("mask", "mask_further"):
        if key in out:
            if out[key].ndim != 2:
                raise ValueError(f"{method}: batch[{key!r}] must be (N, W), got shape {tuple(out[key].shape)}")
            out[key] = out[key].to(torch.bool)
    return out


def _prepare_image_batch(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``image`` (and ``mask`` where present) of an image batch, checked and moved to ``device``."""
    if batch.get("image") is None:
        raise KeyError(f"image: batch lacks key 'image' (has {sorted(k for k, v in batch.items() if v is not None)})")
    out = {"image": batch["image"].to(device, torch.float32, non_blocking=True)}
    if batch.get("mask") is not None:
        mask = batch["mask"]
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"image: batch['mask'] must be (N, 1, H, W), got shape {tuple(mask.shape)}")
        out["mask"] = mask.to(device, non_blocking=True).to(torch.bool)
    return out


def method_loss(method: str, model: nn.Module, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None,
                p_mean: float = -1.2, p_std: float = 1.2, ssdu_rho: float = 0.2, ssdu_keep_center: int = 4,
                delta: float = DEFAULT_DELTA, details: dict[str, Tensor] | None = None) -> Tensor:
    """The scalar training loss of ``method`` on ``batch`` (no backward, no step).

    Args:
        method: one of :data:`METHODS`.
        model: the network from :func:`build_model` (DDP / compile wrappers are fine).
        batch: the dataset's dict (see the module docstring); moved to the model's device.
        generator: source of every random draw (sigma, noise, SSDU split, NCSN levels, the image method's
            further-corrupted mask); on the model's device for speed (a CPU generator works anywhere).
        p_mean, p_std: EDM's log-normal sigma distribution (METHOD.md: -1.2, 1.2).
        ssdu_rho: SSDU's ``|Lambda| / |Omega|`` (0.2).
        ssdu_keep_center: central columns SSDU never puts in Lambda (see :func:`ssdu_split`).
        delta: ``image`` with masks: probability of erasing each kept pixel for the further-corrupted mask (the
            paper's 0.1).
        details: if a dict is given, the diffusion methods (``ambient``, ``edm``, ``edm_l1``, ``image``) put in it
            ``sigma`` and ``sample_loss``, the ``(N,)`` noise levels drawn and the per-slice losses (detached), whose
            mean is the returned loss.
    """
    _check_method(method)
    device = model_device(model)
    data = _prepare_batch(method, batch, device)
    core = unwrap_model(model)

    if method == "image":
        return _image_loss(model, data, generator, p_mean=p_mean, p_std=p_std, delta=delta, details=details)

    if method in ("ambient", "edm", "edm_l1"):
        sigma_data = getattr(core, "sigma_data", 0.5)
        # The ambient loss adds its noise in image space too: (N, H, W) like a coil image.
        images = data["maps"][:, 0] if method == "ambient" else data["reference" if method == "edm" else "l1"]
        sigma = sample_sigma(images.shape[0], generator, p_mean=p_mean, p_std=p_std, device=device)
        noise = sample_noise(images, generator)
        if method == "ambient":
            per_slice = ambient_loss(model, data["kspace"], data["maps"], data["mask"], data["mask_further"], sigma,
                                     noise, sigma_data=sigma_data, reduce=False)
        else:
            per_slice = edm_loss(model, images, sigma, noise, sigma_data=sigma_data, reduce=False)
        return _reduce(per_slice, sigma, details)

    if method == "ncsnv2":
        if not isinstance(core, NCSNv2):
            raise TypeError(f"ncsnv2: expected an NCSNv2 model, got {type(core).__name__}")
        return dsm_loss(model, data["reference"], core.sigmas(), generator=generator)

    if not isinstance(core, MoDL):
        raise TypeError(f"{method}: expected a MoDL model, got {type(core).__name__}")
    mask = data["mask"]
    measured = keep_columns(data["kspace"], mask)  # the undersampled acquisition y = P F S x
    if method == "modl":
        return modl_loss(model(measured, data["maps"], mask), data["reference"])
    theta, lam = ssdu_split(mask, rho=ssdu_rho, generator=generator, keep_center=ssdu_keep_center)
    recon = model(keep_columns(measured, theta), data["maps"], theta)
    return ssdu_loss(recon, measured, data["maps"], lam)


def _reduce(per_sample: Tensor, sigma: Tensor, details: dict[str, Tensor] | None) -> Tensor:
    """The batch mean of per-sample losses, recording them with their sigma in ``details``."""
    if details is not None:
        details["sigma"] = sigma.detach().reshape(-1)
        details["sample_loss"] = per_sample.detach().reshape(-1)
    return per_sample.mean()


def _image_loss(model: nn.Module, data: Mapping[str, Tensor], generator: torch.Generator | None, *, p_mean: float,
                p_std: float, delta: float, details: dict[str, Tensor] | None = None) -> Tensor:
    """The ``image`` method's loss: ambient inpainting loss with masks, EDM's loss without."""
    core = unwrap_model(model)
    ambient = is_ambient_image_model(core)
    images = data["image"]
    has_mask = "mask" in data
    if has_mask and not ambient:
        raise ValueError("image: the batch has erasure masks (a corrupted training set, erasure_p > 0) but the model "
                         "takes no mask channel; build it with ambient=True")
    if ambient and not has_mask:
        raise ValueError("image: the model is an ambient image model (it takes a mask channel) but the batch has no "
                         "'mask' (a clean training set, erasure_p = 0); build it with ambient=False")
    sigma_data = core.sigma_data
    device = images.device
    sigma = sample_sigma(images.shape[0], generator, p_mean=p_mean, p_std=p_std, device=device)
    noise = _randn(tuple(images.shape), generator, device)  # real standard normal
    if has_mask:
        per_image = ambient_image_loss(model, images, data["mask"], sigma, noise, delta=delta, generator=generator,
                                       sigma_data=sigma_data, reduce=False)
    else:
        per_image = edm_loss(model, images, sigma, noise, sigma_data=sigma_data, reduce=False)
    return _reduce(per_image, sigma, details)


def make_optimizer(model: nn.Module, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.Adam:
    """Adam over ``model``'s parameters with METHOD.md's defaults.

    On CUDA the fused implementation: one kernel updates every parameter, where the default multi-tensor one makes
    several passes (the same update up to rounding, and the same state dict). Elsewhere torch's default.
    """
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, fused=True if on_cuda else None)


def train_step(method: str, model: nn.Module, batch: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, *,
               generator: torch.Generator | None = None, amp: str | None = None,
               scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = 1.0, ema: EMA | None = None,
               ema_batch_size: int | None = None, **loss_kwargs: Any) -> dict[str, Any]:
    """One training step of ``method``: loss, backward, gradient hygiene, optimizer step, EMA.

    Args:
        method: one of :data:`METHODS`.
        model: the network (from :func:`build_model`), in train mode; weights stay float32 whatever ``amp`` is.
        batch: the dataset's dict (module docstring); moved to the model's device.
        optimizer: e.g. Adam(lr 2e-4, betas (0.9, 0.999), eps 1e-8) as METHOD.md.
        generator: source of every random draw of the loss (see :func:`method_loss`).
        amp: None (full float32; the default, and the sensible choice on CPU), ``"bf16"`` or ``"fp16"``: autocast
            of the forward pass to that dtype.
        scaler: a ``torch.amp.GradScaler`` for ``fp16`` (optional): with it, overflowing steps are skipped and the
            scale adapted; without it, non-finite gradient entries are zeroed as for every other setting.
        grad_clip: maximum global gradient norm (METHOD.md: 1.0); None or 0 = no clipping.
        ema: an :class:`~adps.nn.ema.EMA` to update after the step.
        ema_batch_size: images the EMA counts for this step. Its half-life is in images over all workers (EDM), so
            under DDP pass the global batch; default: this batch's size.
        loss_kwargs: hyper-parameters of :func:`method_loss` (``p_mean``, ``p_std``, ...).

    Returns:
        ``{"loss": float, "grad_norm": float, "skipped": bool, "nonfinite_grads": int}``: the loss, the gradient
        norm before clipping (after zeroing), whether the step was skipped (non-finite loss, or a GradScaler
        overflow), and how many gradient entries were non-finite and zeroed; for the diffusion methods also
        ``sigma`` and ``sample_loss``, lists of each sample's noise level and loss (:class:`LossBySigma` bins them).
    """
    if amp is not None and amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    device = model_device(model)
    n_slices = int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])
    optimizer.zero_grad(set_to_none=True)

    autocast = torch.autocast(device.type, dtype=_AMP_DTYPES[amp]) if amp is not None else contextlib.nullcontext()
    details: dict[str, Tensor] = {}
    with autocast:
        loss = method_loss(method, model, batch, generator=generator, details=details, **loss_kwargs)
    loss_value = float(loss.detach())
    # Per-sample losses with their sigma (diffusion methods): the loss-by-sigma curve of training.
    by_sigma = {key: details[key].float().cpu().tolist() for key in ("sigma", "sample_loss")} if details else {}
    if not _finite_on_every_rank(model, math.isfinite(loss_value), device):
        # A NaN/Inf loss means a bad batch or a diverged net: nothing of this step may land.
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": float("nan"), "skipped": True, "nonfinite_grads": 0, **by_sigma}

    use_scaler = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if use_scaler else loss).backward()
    if use_scaler:
        scaler.unscale_(optimizer)  # records overflow for scaler.step, then true gradients

    with_grad = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in with_grad]
    nonfinite, grad_norm = 0, 0.0
    if grads:
        # The global norm first (a few multi-tensor kernels, one sync): only a non-finite norm needs the per-tensor
        # count of non-finite entries (three small kernels per tensor, over 600 tensors for the ambient network).
        total = torch.nn.utils.get_total_norm(grads)
        grad_norm = float(total)
        if not math.isfinite(grad_norm):
            nonfinite = int(torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum())
            if nonfinite and not use_scaler:
                # METHOD.md: NaN/Inf gradient entries are zeroed (the reference maps +-Inf to +-1e5 before clipping).
                for g in grads:
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
                total = torch.nn.utils.get_total_norm(grads)
                grad_norm = float(total)
        torch.nn.utils.clip_grads_with_norm_(with_grad, grad_clip if grad_clip else float("inf"), total)

    skipped = False
    if use_scaler:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale_before  # the scaler backs off only after skipping
    else:
        optimizer.step()
    if ema is not None and not skipped:
        ema.update(model, batch_size=ema_batch_size or n_slices)
    return {"loss": loss_value, "grad_norm": grad_norm, "skipped": skipped, "nonfinite_grads": nonfinite, **by_sigma}


SIGMA_BIN_EDGES = (0.01, 0.05, 0.2, 1.0, 5.0)
"""Edges of the noise-level bins of :class:`LossBySigma` (6 bins: below 0.01 ... above 5). With EDM's
``ln sigma ~ N(-1.2, 1.2^2)`` about 0.2 % of draws fall below 0.01 and 1.7 % above 5."""


class LossBySigma:
    """The training loss binned by noise level: where in sigma a diffusion model still learns.

    Logged by training as the MLflow metrics ``loss_by_sigma/lt0.01``, ``loss_by_sigma/0.01-0.05``, ...,
    ``loss_by_sigma/gt5``: the mean loss of the samples drawn in each bin since the last log.

    The loss is weighted by ``lambda(sigma) ~ 1 / sigma^2`` at low sigma, so one mean over all sigma is dominated by
    the few low draws. Binned, it shows the curve: an EDM model's loss falls at every level as it trains; an ambient
    model's keeps a floor at low sigma (the columns of ``A`` outside ``A~`` cannot be predicted exactly, and
    ``lambda`` multiplies that error), and where that floor sits tells how far down a sampler can trust it
    (docs/evaluation.md).
    """

    def __init__(self, edges: tuple[float, ...] = SIGMA_BIN_EDGES) -> None:
        self.edges = tuple(float(e) for e in edges)
        self.sums = [0.0] * (len(self.edges) + 1)
        self.counts = [0] * (len(self.edges) + 1)

    def labels(self) -> list[str]:
        """The bins' names (MLflow's metric-name characters): ``lt0.01``, ``0.01-0.05``, ..., ``gt5``."""
        inner = [f"{lo:g}-{hi:g}" for lo, hi in zip(self.edges[:-1], self.edges[1:], strict=True)]
        return [f"lt{self.edges[0]:g}", *inner, f"gt{self.edges[-1]:g}"]

    def add(self, sigmas: list[float], losses: list[float]) -> None:
        """Count each finite sample's loss in its sigma's bin."""
        for sigma, loss in zip(sigmas, losses, strict=True):
            if math.isfinite(loss):
                index = int(np.searchsorted(self.edges, sigma, side="right"))
                self.sums[index] += loss
                self.counts[index] += 1

    def means(self, prefix: str = "loss_by_sigma/") -> dict[str, float]:
        """The mean loss of each bin that holds a sample, as ``{prefix + label: mean}``; then empties."""
        found = {f"{prefix}{label}": total / count
                 for label, total, count in zip(self.labels(), self.sums, self.counts, strict=True) if count}
        self.sums, self.counts = [0.0] * len(self.sums), [0] * len(self.counts)
        return found


def _finite_on_every_rank(model: nn.Module, finite: bool, device: torch.device) -> bool:
    """Whether the loss is finite on every DDP rank (just ``finite`` without DDP): a rank that skipped its backward
    alone would leave the others waiting in the gradient all-reduce."""
    if not (isinstance(model, nn.parallel.DistributedDataParallel) and torch.distributed.is_initialized()):
        return finite
    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)

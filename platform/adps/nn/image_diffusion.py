"""Diffusion models of natural images trained on randomly inpainted data (paper section 3.1).

Ambient Diffusion (Daras et al. 2023) learns a denoiser from images whose pixels were erased at random with
probability ``p`` (:func:`adps.images.erasure_mask`). The A-DPS paper uses those models, trained at the ``p`` of
:data:`PAPER_ERASURE_P`, as priors for *other* inverse problems (compressed sensing, super-resolution). This module
holds the learning side of that study:

* :func:`build_image_model`: EDM preconditioning around a SongUNet with ``3`` image channels in and out; an
  *ambient* model (``p > 0``) also takes the further-corrupted mask as one extra input channel
  (``[mask~ * x_t, mask~]``: 4 inputs); the ``p = 0`` model is plain EDM (3 inputs). :func:`is_ambient_image_model`
  tells them apart from the weights alone.
* :func:`ambient_image_loss`: the ambient loss for random inpainting; :func:`~adps.nn.objectives.edm_loss`: EDM's
  loss on clean images (``p = 0``).
* :func:`ambient_image_input` and :func:`sampling_mask`: what an ambient model sees when it is used as a prior
  (A-DPS), so that training and sampling build the input the same way.

Images are real ``(N, 3, H, W)`` in ``[-1, 1]``; masks boolean ``(N, 1, H, W)``, True where a pixel is kept, shared
by the three colour channels. Denoisers are called as ``D(x, sigma, cond=None)`` like
:class:`~adps.nn.precond.EDMPrecond`. ``sigma_data = 0.5`` (EDM's value for images in ``[-1, 1]``).

Layer 2 (no Ray, no MLflow).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adps.images.operators import erasure_mask, further_corrupt

from .ema import unwrap_model
from .objectives import Denoiser, _per_sample, edm_weight
from .precond import EDMPrecond
from .unet import build_unet

__all__ = [
    "IMAGE_CHANNELS", "IMAGE_PRESETS", "IMAGE_SAMPLING", "PAPER_ERASURE_P", "ambient_image_input", "ambient_image_loss",
    "build_image_model", "image_sampler", "image_sampler_options", "is_ambient_image_model", "sampling_mask"
]

IMAGE_CHANNELS = 3
"""RGB."""
PAPER_ERASURE_P = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)
"""The erasure probabilities of the paper's natural-image models (p = 0: trained on clean images)."""
DEFAULT_DELTA = 0.1
"""Further corruption of the training masks (Ambient Diffusion; the paper's 0.1)."""
IMAGE_SAMPLING: dict[str, Any] = {"solver": "heun", "steps": 100, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0,
                                  "guidance": 1.0}
"""How the natural-image study samples (section 3.1) with :func:`adps.nn.samplers.a_dps` / ``dps``: EDM's Heun over
its image schedule (Karras et al. 2022: sigma 80 -> 0.002, rho 7), 100 steps, and DPS's step size ``guidance``
(``zeta``, Chung et al. 2023, the gradient's factor on ``||y - A D||``) of 1. The samplers' ``guidance`` is the
A-DPS reference code's ``l_ss`` on ``||r||^2 / ||r||``, which is ``zeta / 2`` (:func:`image_sampler_options`
converts)."""

# UNet settings of the two image presets (the channel counts are set by build_image_model).
IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    # EDM's DDPM++ for 64 x 64 images (CelebA / FFHQ / AFHQ, as Ambient Diffusion and the A-DPS paper use them),
    # attention at 16 x 16 (level 2). Ungated convolutions: the gates are the MRI reference's addition.
    "image": {"model_channels": 128, "channel_mult": (1, 2, 2, 2), "num_blocks": 4, "attn_levels": (2,),
              "dropout": 0.1, "gated": False},
    # Tests and the CPU demo: the same code paths at a few thousand parameters.
    "tiny": {"model_channels": 8, "channel_mult": (1, 2, 2, 2), "num_blocks": 1, "attn_levels": (),
             "dropout": 0.0, "gated": False},
}


def build_image_model(preset: str = "tiny", *, ambient: bool, sigma_data: float = 0.5, **overrides: Any) -> EDMPrecond:
    """The denoiser of an image model: EDMPrecond around a SongUNet.

    Args:
        preset: ``"image"`` (the paper's 64 x 64 DDPM++) or ``"tiny"`` (tests, demo).
        ambient: True for a model trained on inpainted images (``p > 0``): it takes the mask as a fourth input
            channel. False: a plain EDM model (``p = 0``), 3 channels in.
        sigma_data: EDM's data standard deviation (0.5 for images in ``[-1, 1]``).
        overrides: any :class:`~adps.nn.unet.UNetConfig` field.
    """
    if preset not in IMAGE_PRESETS:
        raise ValueError(f"unknown image preset {preset!r}; choose one of {sorted(IMAGE_PRESETS)}")
    settings = {**IMAGE_PRESETS[preset], "in_channels": IMAGE_CHANNELS + (1 if ambient else 0),
                "out_channels": IMAGE_CHANNELS, **overrides}
    # "tiny" names the UNet preset whose other fields (embedding, filters) every image preset shares.
    net = build_unet("tiny", **settings)
    return EDMPrecond(net, sigma_data=sigma_data, image_channels=IMAGE_CHANNELS)


def is_ambient_image_model(model: nn.Module) -> bool:
    """Whether ``model`` (an image denoiser from :func:`build_image_model`, possibly wrapped) takes a mask channel: its
    network has more input channels than image channels."""
    core = unwrap_model(model)
    if not isinstance(core, EDMPrecond) or core.image_channels != IMAGE_CHANNELS:
        raise TypeError(f"expected an image denoiser (EDMPrecond with {IMAGE_CHANNELS} image channels), "
                        f"got {type(core).__name__}")
    return int(unwrap_model(core.net).config.in_channels) > IMAGE_CHANNELS


def _check_images(images: Tensor, name: str = "images") -> None:
    if images.is_complex() or images.ndim != 4 or images.shape[1] != IMAGE_CHANNELS:
        raise ValueError(f"{name}: expected real (N, {IMAGE_CHANNELS}, H, W) images, got {tuple(images.shape)} {images.dtype}")


def _check_image_mask(mask: Tensor, images: Tensor, name: str) -> Tensor:
    n, _, h, w = images.shape
    if mask.shape != (n, 1, h, w):
        raise ValueError(f"{name}: expected shape ({n}, 1, {h}, {w}) for images {tuple(images.shape)}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(images.device, torch.bool)


def ambient_image_input(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """An ambient image model's input, as EDMPrecond takes it: ``(mask * x, mask)``.

    ``x`` ``(N, 3, H, W)`` (a noisy image); ``mask`` ``(N, 1, H, W)`` boolean, the further-corrupted mask ``A~``.
    Erased pixels are exactly 0 (``where``, not a product, so a NaN in an erased pixel cannot leak in). The mask goes
    in as a float channel (EDMPrecond scales only the image channels by ``c_in``).
    """
    _check_images(x, "x")
    mask = _check_image_mask(mask, x, "mask")
    return torch.where(mask, x, x.new_zeros(())), mask.to(torch.float32)


def ambient_image_loss(denoiser: Denoiser, images: Tensor, mask: Tensor, sigma: Tensor, noise: Tensor, *,
                       delta: float = DEFAULT_DELTA, generator: torch.Generator | None = None,
                       mask_further: Tensor | None = None, sigma_data: float = 0.5, reduce: bool = True) -> Tensor:
    """The Ambient Diffusion loss for random inpainting (Daras et al. 2023, eq. 3.2)::

        A~      = further_corrupt(A, delta)             (fresh every call, from ``generator``)
        input   = (A~ (A x0 + sigma n), A~)
        loss    = lambda(sigma) || A (D(input, sigma) - x0) ||^2

    Only ``A x0`` enters (pixels outside the training mask are zeroed first, so ``images`` may be clean or masked).
    The loss is on the pixels of ``A``, so the model must predict the pixels that ``A~`` hid and ``A`` did not: that
    is what makes it learn ``E[x0 | A~ x_t, A~]`` (the paper's requirement ``delta > 0``).

    Args:
        denoiser: ``D(x, sigma, cond=mask)``, from :func:`build_image_model` (``ambient=True``).
        images: ``(N, 3, H, W)``, the training images as measured (``A x0``).
        mask: the training masks ``A``, boolean ``(N, 1, H, W)``.
        sigma: noise levels ``(N,)`` (or one value).
        noise: ``n``, ``(N, 3, H, W)`` standard normal.
        delta: probability of erasing each kept pixel for ``A~`` (> 0; the paper's 0.1).
        generator: source of ``A~``'s draw (ignored when ``mask_further`` is given).
        mask_further: ``A~`` itself (tests), a subset of ``mask``.
        sigma_data, reduce: as for :func:`~adps.nn.objectives.edm_loss`.
    """
    _check_images(images)
    if noise.shape != images.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from images shape {tuple(images.shape)}")
    mask = _check_image_mask(mask, images, "mask")
    if mask_further is None:
        if generator is None:
            generator = torch.Generator(device=images.device.type if images.device.type == "cuda" else "cpu")
            generator.seed()
        mask_further = further_corrupt(mask, delta, generator=generator)
    mask_further = _check_image_mask(mask_further, images, "mask_further") & mask
    sigma = _per_sample(torch.as_tensor(sigma, dtype=torch.float32, device=images.device), images.shape[0])
    measured = torch.where(mask, images, images.new_zeros(()))
    x, cond = ambient_image_input(measured + sigma.view(-1, 1, 1, 1) * noise, mask_further)
    denoised = denoiser(x, sigma, cond=cond).float()
    residual = torch.where(mask, denoised - measured, denoised.new_zeros(()))
    per_image = edm_weight(sigma, sigma_data) * residual.square().sum(dim=(1, 2, 3))
    return per_image.mean() if reduce else per_image


def sampling_mask(shape: tuple[int, ...], erasure_p: float, *, delta: float = DEFAULT_DELTA,
                  generator: torch.Generator) -> Tensor:
    """The mask an ambient model is fed as a prior (A-DPS): a training-like ``A~``.

    A fresh random-inpainting mask at the model's training erasure ``erasure_p``, further corrupted by ``delta``,
    drawn once per image: the model has only ever seen inputs masked this way (the image analogue of METHOD.md's
    "fresh R_train + 1 mask drawn once per slice"). Returns boolean ``(N, 1, H, W)``.
    """
    return further_corrupt(erasure_mask(shape, erasure_p, generator=generator), delta, generator=generator)


def image_sampler(model: nn.Module) -> str:
    """The sampler of an image model: ``a_dps`` for an ambient model (a mask input channel), ``dps`` for a clean one."""
    try:
        return "a_dps" if is_ambient_image_model(unwrap_model(model)) else "dps"
    except TypeError as err:
        raise ValueError(f"image_sampler: {err}") from None


def image_sampler_options(model: nn.Module, *, steps: int | None = None, guidance: float | None = None,
                          erasure_p: float | None = None, delta: float = DEFAULT_DELTA,
                          **schedule: float) -> dict[str, Any]:
    """The keywords of :func:`adps.nn.samplers.run_sampler` that sample an image model as the natural-image study does
    (:data:`IMAGE_SAMPLING`): its sampler's ``name``, Heun, the image schedule with ``steps`` (and any of
    ``sigma_min``, ``sigma_max``, ``rho`` in ``schedule``), ``guidance`` as DPS's ``zeta`` (converted to the samplers'
    ``zeta / 2``) and, for an ambient model, its training ``erasure_p`` (required) and ``delta``, from which
    ``run_sampler`` draws its fresh mask."""
    name = image_sampler(model)
    if name == "a_dps" and (isinstance(erasure_p, bool) or not isinstance(erasure_p, (int, float))
                            or not 0 < erasure_p < 1):
        raise ValueError(f"a_dps: erasure_p (the ambient model's training erasure probability, in (0, 1)) is "
                         f"required, got {erasure_p!r}; a loader reads it from the model config's 'erasure_p'")
    if name == "dps" and erasure_p not in (None, 0, 0.0):
        raise ValueError(f"dps: erasure_p={erasure_p!r} names an ambient model, but this network takes no mask "
                         "channel (a model trained on clean images, p = 0)")
    unknown = sorted(set(schedule) - {"sigma_min", "sigma_max", "rho"})
    if unknown:
        raise ValueError(f"image_sampler_options: unknown schedule option(s) {unknown}")
    zeta = IMAGE_SAMPLING["guidance"] if guidance is None else guidance
    options = {"name": name, "solver": IMAGE_SAMPLING["solver"],
               "steps": int(IMAGE_SAMPLING["steps"] if steps is None else steps), "guidance": zeta / 2,
               **{key: schedule.get(key, IMAGE_SAMPLING[key]) for key in ("sigma_min", "sigma_max", "rho")}}
    if name == "a_dps":
        options.update(erasure_p=float(erasure_p), delta=float(delta))
    return options

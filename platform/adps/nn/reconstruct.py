"""One-pass reconstructions and the periodic validation metric of every method.

Layer 2 (no Ray, no MLflow): plain torch on top of :mod:`adps.mri`, :mod:`adps.metrics` and the networks of
:mod:`adps.nn`. Each function calls its model exactly as the training loss of its method does
(:mod:`adps.nn.train_step`, :mod:`adps.nn.objectives`), so that a trained model is used in-distribution:

* ``ambient``: A-OS (METHOD.md "Samplers"), one call ``D([A^H y, mask], sigma = 0.003)``, the input built by
  :func:`~adps.nn.objectives.ambient_network_input` as in :func:`~adps.nn.objectives.ambient_loss`;
* ``modl``, ``ssdu``: the unrolled network on the measured k-space ``P y`` (SSDU reconstructs from every acquired
  column: the Theta/Lambda split exists only in training);
* ``edm``, ``edm_l1``, ``ncsnv2``: priors, which reconstruct only through posterior sampling (DPS, ALD);
  :func:`denoise_once` is their cheap validation proxy;
* ``image``: natural-image priors (no k-space); their validation metric is a denoising MSE on the kept pixels.

:func:`validation_metric` is the periodic validation of training for every method of both studies. Every function
runs under ``torch.no_grad`` with the model in eval mode (dropout off: a reconstruction must not be random),
restoring each submodule's train/eval flag afterwards. Inputs are moved to the model's device, results stay there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from adps.images.operators import further_corrupt
from adps.metrics import complex_nrmse, nrmse
from adps.mri import SenseOperator, check_maps

from .ema import unwrap_model
from .image_diffusion import DEFAULT_DELTA, ambient_image_input, is_ambient_image_model
from .modl import MoDL
from .ncsnv2 import NCSNv2
from .objectives import ambient_network_input, channels_to_complex, complex_to_channels, keep_columns, sample_noise
from .precond import EDMPrecond
from .train_step import IMAGE_METHODS, METHODS, model_device

__all__ = [
    "A_OS_SIGMA", "IMAGE_VALIDATION_SIGMA", "DENOISING_CHECK_SIGMAS", "DENOISER_METHODS", "a_os", "denoise_once",
    "denoising_check", "reconstruct", "unrolled", "validation_metric"
]

# Methods whose model is a prior D(x, sigma): no one-pass reconstruction exists for them.
PRIOR_METHODS = ("edm", "edm_l1", "ncsnv2")

A_OS_SIGMA = 0.003
"""METHOD.md: A-OS tells the network sigma = 0.003 (its one call, no noise added)."""
MRI_VALIDATION_SIGMA = 0.1
"""Noise level of the MRI priors' denoising proxy in :func:`validation_metric`, on the data's scale (bright tissue
about 1: the prepared k-space is divided by the 99th percentile of the low-resolution RSS image, METHOD.md "Data"):
inside EDM's training range (``ln sigma ~ N(-1.2, 1.2^2)``, median 0.30) and NCSNv2's levels (0.0066 to 232), noisy
enough that the noisy input itself scores clearly worse than a good denoiser, not so noisy that the score only
measures blur."""
IMAGE_VALIDATION_SIGMA = 0.2
"""Noise level of the natural-image models' validation in :func:`validation_metric`, on the images' ``[-1, 1]``
scale, chosen as :data:`MRI_VALIDATION_SIGMA` (the noisy input's MSE is ``sigma^2 = 0.04``)."""


def _refuse_image_method(method: str, what: str) -> None:
    if method in IMAGE_METHODS:
        raise ValueError(f"{method!r} is a natural-image prior (a denoiser of RGB images, it never sees k-space): "
                         f"{what}; its validation metric is a denoising MSE (validation_metric), and it reconstructs "
                         "through posterior sampling (adps evaluate, the image samplers)")


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; every submodule's own flag restored after (not one blanket
    ``model.train(was_training)``: a caller may hold parts of a model in eval on purpose)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def _check_acquisition(kspace: Tensor, maps: Tensor, mask: Tensor) -> None:
    if not kspace.is_complex() or kspace.ndim != 4:
        raise ValueError(f"kspace: expected complex (N, C, H, W), got {tuple(kspace.shape)} {kspace.dtype}")
    if kspace.shape != maps.shape:
        raise ValueError(f"kspace shape {tuple(kspace.shape)} differs from maps shape {tuple(maps.shape)}")
    if mask.ndim not in (1, 2) or mask.shape[-1] != kspace.shape[-1]:
        raise ValueError(f"mask: expected (N, W) or (W,) with W = {kspace.shape[-1]}, got {tuple(mask.shape)}")
    check_maps(maps)


def _core_of_type(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...], what: str) -> nn.Module:
    """The model under DDP / compile wrappers, checked to be a ``kind``."""
    core = unwrap_model(model)
    if not isinstance(core, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"{what}: expected {names}, got {type(core).__name__}")
    return core


# ------------------------------------------------------------------------------ reconstructors


def a_os(model: nn.Module, kspace: Tensor, maps: Tensor, mask: Tensor, *, sigma: float = A_OS_SIGMA) -> Tensor:
    """Ambient One-Step (A-OS): one call ``D([A^H y, mask], sigma)`` (METHOD.md "Samplers").

    The input is built as :func:`~adps.nn.objectives.ambient_loss` builds it in training,
    ``ambient_network_input(A~^H y~, mask~)``, with the acquisition's own mask in the place of ``A~`` and no added
    noise (``sigma`` = 0.003 tells the network the input is almost clean). In-distribution only when the acquisition
    is at about the training acceleration (METHOD.md: R_inf = R_train).

    Args:
        model: the ambient denoiser, ``D(x, sigma, cond=...)`` (EDMPrecond of the ``ambient`` UNet; wrappers are fine).
        kspace: multi-coil k-space ``(N, C, H, W)`` complex, fully sampled or already masked: only the columns in
            ``mask`` are used.
        maps: coil maps ``(N, C, H, W)`` complex.
        mask: acquired columns ``(N, W)`` bool (or ``(W,)`` shared by the batch).
        sigma: the noise level the network is told (upstream: 0.003).

    Returns:
        The complex image ``(N, H, W)`` (complex64) on the model's device.
    """
    _check_acquisition(kspace, maps, mask)
    device = model_device(model)
    kspace, maps, mask = kspace.to(device), maps.to(device), mask.to(device, torch.bool)
    op = SenseOperator(maps, mask)
    net_x, net_cond = ambient_network_input(op.adjoint(keep_columns(kspace, mask)), mask)
    sigmas = torch.full((maps.shape[0],), float(sigma), dtype=torch.float32, device=device)
    with _inference(model):
        return channels_to_complex(model(net_x, sigmas, cond=net_cond))


def unrolled(model: nn.Module, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
    """The MoDL / SSDU unrolled network on the measured k-space ``P y``, as in training.

    ``model`` is a :class:`~adps.nn.modl.MoDL` (wrappers are fine); ``kspace``, ``maps``, ``mask`` and the result are
    as for :func:`a_os` (for SSDU ``mask`` holds all acquired columns: no Theta/Lambda split).
    """
    _check_acquisition(kspace, maps, mask)
    _core_of_type(model, MoDL, "unrolled")
    device = model_device(model)
    kspace, maps, mask = kspace.to(device), maps.to(device), mask.to(device, torch.bool)
    with _inference(model):
        return model(keep_columns(kspace, mask), maps, mask)


def denoise_once(model: nn.Module, image: Tensor, sigma: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Add Gaussian noise of level ``sigma`` to ``image`` and return the model's denoised estimate.

    * EDM family (``edm``, ``edm_l1``: :class:`~adps.nn.precond.EDMPrecond`): ``D(x + sigma n, sigma)``, called as
      :func:`~adps.nn.objectives.edm_loss` calls it.
    * NCSNv2: Tweedie's formula ``x~ + sigma^2 s(x~, sigma)``. The network knows only its discrete levels
      (:meth:`NCSNv2.sigmas`), and the formula is exact only when its level is the noise's, so ``sigma`` is first
      snapped to the nearest level (in log scale; by less than 0.3 % with the paper's 2,311 levels).

    The noise is complex, independent ``N(0, 1)`` real and imaginary parts times sigma (as in training).

    Args:
        model: an EDMPrecond with 2 input channels or an NCSNv2 (wrappers are fine).
        image: clean complex images ``(N, H, W)``.
        sigma: noise level (> 0), on the scale of the data.
        generator: source of the noise (reproducible with a seed); None = the global RNG.

    Returns:
        The denoised complex image ``(N, H, W)`` (complex64) on the model's device.
    """
    if not sigma > 0:
        raise ValueError(f"denoise_once: sigma must be > 0, got {sigma}")
    core = _core_of_type(model, (EDMPrecond, NCSNv2), "denoise_once")
    return _denoise(model, core, image.to(model_device(model), torch.complex64), sigma, generator)[2]


def _denoise(model: nn.Module, core: nn.Module, image: Tensor, sigma: float,
             generator: torch.Generator | None) -> tuple[float, Tensor, Tensor]:
    """:func:`denoise_once` of ``image`` by ``model`` (whose unwrapped ``core`` is an EDMPrecond or NCSNv2):
    ``(sigma, noisy, denoised)`` with ``sigma`` the level used (snapped for NCSNv2), the complex images on
    ``image``'s device."""
    if isinstance(core, NCSNv2):
        sigma = _nearest_level(core, sigma)
    noisy = image + sigma * sample_noise(image, generator)
    channels = complex_to_channels(noisy)
    level = torch.full((image.shape[0],), float(sigma), dtype=torch.float32, device=image.device)
    with _inference(model):
        if isinstance(core, NCSNv2):
            return sigma, noisy, channels_to_complex(channels + sigma**2 * model(channels, level).float())
        return sigma, noisy, channels_to_complex(model(channels, level))


def _nearest_level(model: NCSNv2, sigma: float) -> float:
    """The trained NCSNv2 noise level nearest to ``sigma`` in log scale (levels are geometric)."""
    levels = model.sigmas().double()
    index = int((levels.log() - torch.log(torch.tensor(float(sigma), dtype=torch.float64))).abs().argmin())
    return float(levels[index])


def reconstruct(method: str, model: nn.Module, kspace: Tensor, maps: Tensor, mask: Tensor, **options: Any) -> Tensor:
    """The one-pass reconstruction of ``method``: ``ambient`` -> :func:`a_os`, ``modl`` /
    ``ssdu`` -> :func:`unrolled`; ``options`` go to that function (e.g. ``sigma`` of A-OS).

    Raises:
        ValueError: for the priors (``edm``, ``edm_l1``, ``ncsnv2``), which reconstruct only
            by posterior sampling, and for an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    _refuse_image_method(method, "there is no one-pass MRI reconstruction with it")
    if method in PRIOR_METHODS:
        raise ValueError(f"{method!r} is a prior (a denoiser of images, it never sees k-space): reconstructing with it "
                         "needs posterior sampling (DPS, or ALD for ncsnv2), which is not a one-pass reconstruction; "
                         "one-pass methods: ambient (A-OS), modl, ssdu")
    if method == "ambient":
        return a_os(model, kspace, maps, mask, **options)
    return unrolled(model, kspace, maps, mask, **options)


# ------------------------------------------------------------------------------ the denoising check

DENOISER_METHODS = ("ambient", "edm", "edm_l1", "ncsnv2")
"""The MRI methods whose network is a denoiser ``D(x, sigma)`` (what :func:`denoising_check` tests)."""

DENOISING_CHECK_SIGMAS = (0.05, 0.1, 0.2)
"""Noise levels of :func:`denoising_check`, on the data's scale (tissue about 1): low enough that the model must keep
the image's phase to beat its input (a prior that learned ``x`` but is shown ``-x`` scores 0.33 against its input's
0.30 at 0.1, measured on the sign defect of schema version 1), inside EDM's training range. At large sigma even a
mismatched prior beats its input (the input's error grows like sigma, a blurred mean's does not)."""


def denoising_check(method: str, model: nn.Module, batch: Mapping[str, Tensor], *,
                    sigmas: tuple[float, ...] = DENOISING_CHECK_SIGMAS, train_mask: Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[float, dict[str, Tensor]]:
    """Does the model denoise these slices? Its input's and its output's distance to the truth.

    A trained denoiser's output must be closer to the clean image than its noisy input. When it is not, the data
    differ from what it was trained on (another phase convention, scale or orientation), and every posterior sampler
    built on it will be worse than the zero-filled image: a cheap test before spending sampler time.

    For each ``sigma``, with complex noise ``n`` (from ``generator``) and ``x = batch["reference"]``:

    * ``edm``, ``edm_l1``, ``ncsnv2``: input ``x + sigma n``, output as :func:`denoise_once`;
    * ``ambient``: input ``A~^H A~ (x + sigma n)`` with ``A~`` the slices' ``maps`` and ``train_mask``, output
      ``D([A~^H A~ (x + sigma n), mask~], sigma)``: what the network is fed in training and in A-DPS. Its input is
      aliased as well as noisy, so it is an easier bar than the priors'.

    Distances are :func:`adps.metrics.complex_nrmse` (the complex images: a phase error counts).

    Args:
        method: one of :data:`DENOISER_METHODS`.
        model: the method's network (wrappers are fine); run in eval mode, without gradients.
        batch: ``reference`` ``(N, H, W)`` complex; ``maps`` ``(N, C, H, W)`` for ``ambient``.
        sigmas: the noise levels (each > 0).
        train_mask: ``ambient`` only, ``(N, W)`` bool: the further-corrupted masks ``A~``.
        generator: source of the noise (a fixed seed gives the same draws every time).

    Returns:
        ``{sigma: {"input": (N,), "output": (N,)}}``, float64 per-slice complex NRMSE.
    """
    if method not in DENOISER_METHODS:
        raise ValueError(f"denoising_check: {method!r} has no denoiser; methods: {', '.join(DENOISER_METHODS)}")
    if not sigmas or any(not float(sigma) > 0 for sigma in sigmas):
        raise ValueError(f"denoising_check: sigmas must be > 0, got {list(sigmas)}")
    core = unwrap_model(model)
    device = model_device(core)
    reference = batch["reference"].to(device, torch.complex64)
    if method == "ambient":
        if train_mask is None or batch.get("maps") is None:
            raise ValueError("denoising_check('ambient'): needs the batch's 'maps' and train_mask (N, W), the "
                             "R_train + 1 masks the network is fed")
        train_mask = train_mask.to(device, torch.bool)
        operator = SenseOperator(batch["maps"].to(device, torch.complex64), train_mask)
    results: dict[float, dict[str, Tensor]] = {}
    for sigma in (float(value) for value in sigmas):
        if method != "ambient":
            sigma, noisy, output = _denoise(core, core, reference, sigma, generator)
        else:
            noisy = operator.normal(reference + sigma * sample_noise(reference, generator))
            net_x, net_cond = ambient_network_input(noisy, train_mask)
            with _inference(core):
                level = torch.full((reference.shape[0],), sigma, dtype=torch.float32, device=device)
                output = channels_to_complex(core(net_x, level, cond=net_cond))
        results[sigma] = {"input": complex_nrmse(reference, noisy).cpu(), "output": complex_nrmse(reference, output).cpu()}
    return results


# ------------------------------------------------------------------------------ validation


def validation_metric(method: str, model: nn.Module, batch: Mapping[str, Tensor], *, sigma: float | None = None,
                      delta: float = DEFAULT_DELTA, generator: torch.Generator | None = None) -> dict[str, float]:
    """The periodic validation metric of training, for every method of both studies.

    Returns ``{"val_nrmse": ...}`` for the MRI methods and ``{"val_mse": ...}`` for ``image`` (the metric each study
    reports), computed on ``batch`` with the model in eval mode: :func:`_validation_nrmse` and
    :func:`_image_validation_mse` say how. ``sigma`` is the noise level of the denoising proxies (None:
    :data:`MRI_VALIDATION_SIGMA`, :data:`IMAGE_VALIDATION_SIGMA`); ``delta`` the further corruption of an ambient
    image model's input; ``generator`` the source of the noise (a fixed seed scores every validation on the same draws).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method in IMAGE_METHODS:
        chosen = IMAGE_VALIDATION_SIGMA if sigma is None else sigma
        return {"val_mse": _image_validation_mse(model, batch, sigma=chosen, delta=delta, generator=generator)}
    chosen = MRI_VALIDATION_SIGMA if sigma is None else sigma
    return {"val_nrmse": _validation_nrmse(method, model, batch, sigma_denoise=chosen, generator=generator)}


def _validation_nrmse(method: str, model: nn.Module, batch: Mapping[str, Tensor], *,
                      sigma_denoise: float = MRI_VALIDATION_SIGMA, generator: torch.Generator | None = None) -> float:
    """The MRI validation metric: mean per-slice NRMSE against ``reference``.

    On magnitude images as :func:`adps.metrics.nrmse` defines it, one value per slice, then the mean over the batch:

    * ``ambient``: the A-OS reconstruction from ``kspace`` at the batch's ``mask`` (R_train, where A-OS is
      in-distribution). The reference is used only here, never in training.
    * ``modl``, ``ssdu``: the unrolled reconstruction at ``mask``.
    * ``edm``, ``edm_l1``, ``ncsnv2``: priors have no one-pass reconstruction, so the proxy is one denoising step of
      the reference, :func:`denoise_once` at ``sigma_denoise``. ``edm_l1`` is also scored on the reference (not its
      ``l1`` training images): as a DPS prior it must denoise real images.

    Args:
        method: one of :data:`~adps.nn.train_step.METHODS`.
        model: the method's network (a DDP or compiled wrapper is unwrapped: a DDP forward would start collectives
            that only this rank may be running).
        batch: the prepared dataset's dict (``kspace`` fully sampled, ``maps``, ``reference``, ``mask`` at R_train,
            ...; see :mod:`adps.nn.train_step`).
        sigma_denoise: noise level of the priors' denoising proxy (:data:`MRI_VALIDATION_SIGMA`).
        generator: source of that noise (reproducible with a seed).

    Returns:
        The mean NRMSE over the batch's slices. The model's train/eval flags are unchanged.
    """
    core = unwrap_model(model)
    reference = batch["reference"].to(model_device(core))
    if method == "ambient":
        estimate = a_os(core, batch["kspace"], batch["maps"], batch["mask"])
    elif method in ("modl", "ssdu"):
        estimate = unrolled(core, batch["kspace"], batch["maps"], batch["mask"])
    else:
        estimate = denoise_once(core, reference, sigma_denoise, generator=generator)
    return float(nrmse(reference, estimate).mean())


def _image_validation_mse(model: nn.Module, batch: Mapping[str, Tensor], *, sigma: float = IMAGE_VALIDATION_SIGMA,
                          delta: float = DEFAULT_DELTA, generator: torch.Generator | None = None) -> float:
    """The periodic validation metric of a natural-image model: denoising MSE on observed pixels.

    ``batch`` is a batch of :class:`adps.images.ImageDataset` items as the model trains on them: ``image``
    ``(N, 3, H, W)``, with ``mask`` ``(N, 1, H, W)`` for a corrupted training set. The model denoises
    ``A x0 + sigma n`` once, fed as in training:

    * an ambient model (``mask`` present) sees ``(A~ x_t, A~)`` with ``A~`` the mask further corrupted by ``delta``
      (:func:`~adps.images.further_corrupt`), and is scored on the pixels ``A`` keeps, as its loss is (it never sees
      a clean pixel, so no clean one scores it either);
    * a clean model (no ``mask``) sees ``x0 + sigma n`` and is scored on every pixel.

    The MSE is per image (squared error summed over the kept pixels and the 3 channels, divided by their number),
    then averaged over the batch. The noise and ``A~`` come from ``generator``.

    Raises:
        ValueError: the model and the batch disagree (an ambient model without masks, or masks for a clean model),
            or ``sigma <= 0``.

    Returns:
        The mean MSE. The model's train/eval flags are unchanged.
    """
    if not sigma > 0:
        raise ValueError(f"validation_metric: sigma must be > 0, got {sigma}")
    core = unwrap_model(model)
    ambient = is_ambient_image_model(core)
    device = model_device(core)
    images = batch["image"].to(device, torch.float32)
    mask = batch.get("mask")
    if ambient != (mask is not None):
        raise ValueError("validation_metric: " + ("an ambient image model needs the batch's 'mask'" if ambient
                                                  else "the batch has masks, but the model takes no mask channel"))
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(images.shape), generator=generator, device=gen_device).to(device)
    if mask is None:
        observed = torch.ones((images.shape[0], 1, *images.shape[2:]), dtype=torch.bool, device=device)
    else:
        observed = mask.to(device, torch.bool)
        images = torch.where(observed, images, images.new_zeros(()))
    with _inference(core):
        if mask is None:
            denoised = core(images + sigma * noise, sigma)
        else:
            fallback = torch.Generator(device=gen_device).manual_seed(0) if generator is None else generator
            x, cond = ambient_image_input(images + sigma * noise, further_corrupt(observed, delta, generator=fallback))
            denoised = core(x, sigma, cond=cond)
    squared = torch.where(observed, denoised.float() - images, images.new_zeros(())).square().sum(dim=(1, 2, 3))
    counts = observed.sum(dim=(1, 2, 3)).clamp_min(1) * images.shape[1]
    return float((squared / counts).mean())

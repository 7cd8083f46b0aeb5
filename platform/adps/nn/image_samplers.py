"""Posterior samplers for natural images (paper section 3.1): DPS and Ambient DPS over EDM's Heun.

Layer 2 (no Ray, no MLflow): plain torch on :mod:`adps.images` (the operators) and the image
models of :mod:`adps.nn.image_diffusion`. Like the MRI samplers (:mod:`adps.nn.samplers`), every
sampler here is a flat function with one signature::

    sampler(model, y, operator, sigmas=None, *, guidance=1.0, generator=None, callback=None,
            **options) -> Tensor (N, 3, H, W)

* ``model``: an image denoiser ``D(x, sigma, cond=None)`` from
  :func:`~adps.nn.image_diffusion.build_image_model` (DDP / compiled / EMA wrappers are fine);
  ambient (``p > 0``, 4 input channels) for :func:`a_dps_image`, clean (``p = 0``, 3 input
  channels) for :func:`dps_image`; :func:`image_sampler_for` picks the one that fits a model;
* ``y``: the measurements ``A x0 (+ noise)``, real, of the shape ``operator`` gives for the
  images (``(N, m)`` for :class:`~adps.images.GaussianCompressedSensing`, ``(N, 3, H/f, W/f)``
  for :class:`~adps.images.SuperResolution`, ...). The image size ``(N, 3, H, W)`` is that of
  ``operator.adjoint(y)``, checked against ``operator.measurement_shape``;
* ``operator``: an :class:`adps.images.ImageOperator` (the test-time task ``A_inf``);
* ``sigmas``: a Heun grid ending in 0; None = :func:`image_sigmas` ``(steps)``, EDM's image
  settings (sigma 80 -> 0.002, rho 7) with ``steps`` (keyword, default 100) levels;
* ``guidance``: the DPS step size ``zeta`` (see below; the paper searches [0.1, 10]);
* ``generator``: a ``torch.Generator``, the source of every random draw (the start noise and,
  for A-DPS, the model's input masks); same seed, same result. None = torch's global RNG;
* ``callback(info)``: called once per step with the keys of the MRI samplers: ``sampler``,
  ``step`` (0-based), ``total``, ``sigma``, ``sigma_next``, ``x`` (the state after the step),
  ``denoised`` (``D`` at the step's start), ``residual_norm`` (``(N,)`` per image
  ``||y - A D||``), and for A-DPS ``mask`` (the model's input mask, ``(N, 1, H, W)`` bool).
  Tensors in it are detached; copy them if you keep them.

The loop (:func:`_guided_heun`), for each interval ``(sigma, sigma_next)`` of the grid::

    D  = D(x, sigma)                               (with autograd, through the network)
    r  = y - A D;  g = grad_x ||r||                (per image: each image's own ||r_i||)
    x' = x + (sigma_next - sigma) (x - D) / sigma  (Euler)
    x' = x + (sigma_next - sigma) (d + d') / 2     (Heun, d' at (x', sigma_next); not when sigma_next = 0)
    x  = x' - guidance * g

This is EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1, no churn) with
the DPS correction of Chung et al. 2023 (their official code: ``x -= zeta grad_x ||y - A
x0_hat(x)||``, the plain, not squared, norm; here of each image: ``g = grad ||r||^2 /
(2 ||r||)``, so an image's step does not depend on the batch it is in). The MRI A-DPS uses
``(guidance / ||r||) grad ||r||^2 = 2 guidance grad ||r||``: the image ``guidance`` is that
one's double, DPS's own scale. The gradient comes from the first denoiser call of the step,
so guidance costs one backward pass and no extra network evaluation:
:func:`image_nfe` ``(steps) = 2 steps - 1`` evaluations (the last step, to sigma = 0, is Euler).
On a grid ending in 0 the last step lands on ``D`` (then corrected by its guidance step):
the returned image is that final denoised estimate. Measurement noise is not modelled
separately (DPS's Gaussian likelihood with the constant step ``zeta``).

Settings in practice: the step ``guidance * grad ||r||`` has a constant length (about
``guidance ||A||``) whatever the residual, so at low noise it makes the iterate oscillate
around data consistency with an amplitude that grows with ``guidance`` and shrinks, relative
to the image, with its size: a good ``guidance`` depends on the image size and the task
(the paper searches it per model, :mod:`adps.orchestration.tune`). The smallest level
``sigma_min`` matters for a model that has seen few low noise levels in training: an ambient
model copies its kept pixels there, and the last steps of EDM's grid (down to 0.002) can undo
the reconstruction; ``image_sigmas(steps, sigma_min=0.1)`` avoids them (measured with tiny
models trained for seconds: tests/test_image_samplers.py).

Samplers:

* :func:`dps_image`: DPS with a prior trained on clean images (``p = 0``);
* :func:`a_dps_image`: Ambient DPS (paper eq. 2.12) with a model trained on randomly inpainted
  images: the denoiser is fed ``ambient_image_input(x, mask_tr)``, ``mask_tr`` a fresh mask
  at the model's training erasure ``erasure_p`` (further corrupted by ``delta``), drawn once
  per image (:func:`~adps.nn.image_diffusion.sampling_mask`).

Both run under ``torch.no_grad`` but for the guidance gradient, in eval mode (restored
afterwards), return float32 ``(N, 3, H, W)`` on the model's device, and run on CPU and CUDA
(``amp="bf16"`` / ``"fp16"``: autocast of the network calls on CUDA, ignored with a warning
elsewhere, as in :mod:`adps.nn.samplers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from adps.images.operators import ImageOperator

from .ema import unwrap_model
from .image_diffusion import DEFAULT_DELTA, IMAGE_CHANNELS, ambient_image_input, is_ambient_image_model, sampling_mask
from .objectives import _randn
from .precond import EDMPrecond
from .samplers import Callback, _autocast, _device, _emit, _eval_mode, _grid, _sigma_vector
from .schedules import edm_sigmas

__all__ = [
    "IMAGE_GUIDANCE_RANGE",
    "IMAGE_SAMPLERS",
    "IMAGE_SAMPLER_DEFAULTS",
    "IMAGE_STEP_CHOICES",
    "a_dps_image",
    "dps_image",
    "image_nfe",
    "image_sampler_for",
    "image_sigmas",
]

IMAGE_SAMPLER_DEFAULTS: dict[str, Any] = {
    "steps": 100,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "rho": 7.0,
    "guidance": 1.0,
    "delta": DEFAULT_DELTA,
}
"""Defaults of :func:`dps_image` / :func:`a_dps_image`: EDM's image schedule (Karras et al. 2022:
sigma 80 -> 0.002, rho 7), 100 Heun steps, guidance 1, the ambient models' delta 0.1."""
IMAGE_STEP_CHOICES: tuple[int, ...] = (50, 100, 150, 200, 250, 300)
"""The step counts the paper runs each method for, reporting the best (section 3.1)."""
IMAGE_GUIDANCE_RANGE: tuple[float, float] = (0.1, 10.0)
"""DPS's recommended range of the guidance ``zeta``, searched log-uniformly by ``adps tune``."""

Denoise = Callable[[Tensor, float], Tensor]
"""``denoise(x (N, 3, H, W), sigma) -> (N, 3, H, W)``: the estimate of the clean image."""


# ------------------------------------------------------------------------------ schedule, cost


def image_sigmas(
    steps: int = 100,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> Tensor:
    """The Heun grid of the image samplers: :func:`~adps.nn.schedules.edm_sigmas` with EDM's
    image settings, ``steps`` positive levels from ``sigma_max`` down to ``sigma_min``, then 0.

    Args:
        steps: number of Heun steps (>= 1; the paper: 50 .. 300).
        sigma_min: the last positive level (EDM: 0.002).
        sigma_max: the first level, the start noise's std (EDM: 80).
        rho: the schedule's curvature (EDM: 7).
    """
    return edm_sigmas(int(steps), sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)


def image_nfe(steps: int) -> int:
    """Network evaluations of a :func:`dps_image` / :func:`a_dps_image` run of ``steps`` Heun
    steps on a grid ending in 0: ``2 steps - 1`` (two per step, one for the last, Euler, step
    to sigma = 0). The guidance gradient reuses the step's first call (a backward pass, no
    extra evaluation). The x-axis of the paper's speed plots (Figure 4)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"image_nfe: steps must be an integer >= 1, got {steps!r}")
    return 2 * steps - 1


# ------------------------------------------------------------------------------ checks


def _check_image_model(model: nn.Module, sampler: str, *, ambient: bool) -> None:
    """Reject a missing model, an EDMPrecond that is not an image model (an MRI network), and an
    ambient / clean image model given to the sampler of the other kind (naming the one to use).
    Modules of other types are accepted as long as they follow the denoiser call convention
    ``D(x, sigma, cond=None)`` (as in :mod:`adps.nn.samplers`; e.g. exact denoisers in tests)."""
    if model is None:
        raise ValueError(f"{sampler}: a model is required (an image denoiser from build_image_model)")
    if not isinstance(unwrap_model(model), EDMPrecond):
        return
    try:
        is_ambient = is_ambient_image_model(model)
    except TypeError as err:
        raise ValueError(f"{sampler}: {err}") from None
    if is_ambient != ambient:
        other = "a_dps_image" if is_ambient else "dps_image"
        kind = "an ambient model (trained at erasure p > 0, 4 input channels)" if is_ambient \
            else "a clean model (p = 0, 3 input channels)"
        raise ValueError(f"{sampler}: got {kind}; use {other} for it (image_sampler_for(model) picks the sampler)")


def _image_shape(y: Tensor, operator: ImageOperator, sampler: str) -> tuple[int, int, int, int]:
    """Validate ``(y, operator)``; the image batch shape ``(N, 3, H, W)`` that ``y`` measures."""
    if not isinstance(operator, ImageOperator):
        raise ValueError(f"{sampler}: operator must be an adps.images.ImageOperator, got {type(operator).__name__}")
    if not isinstance(y, Tensor) or y.is_complex() or not y.is_floating_point():
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{sampler}: y must be real floating-point measurements, got {got}")
    if y.ndim < 1 or y.shape[0] < 1:
        raise ValueError(f"{sampler}: y must hold at least one measurement vector (N >= 1), got shape {tuple(y.shape)}")
    try:
        shape = tuple(operator.adjoint(y).shape)
        expected = tuple(operator.measurement_shape(shape))
    except ValueError as err:
        raise ValueError(f"{sampler}: y of shape {tuple(y.shape)} does not fit the operator "
                         f"{type(operator).__name__}: {err}") from None
    if len(shape) != 4 or shape[1] != IMAGE_CHANNELS:
        raise ValueError(f"{sampler}: the operator {type(operator).__name__} maps y {tuple(y.shape)} to images of "
                         f"shape {shape}; the image models take (N, {IMAGE_CHANNELS}, H, W)")
    if expected != tuple(y.shape):
        raise ValueError(f"{sampler}: y has shape {tuple(y.shape)}, but {type(operator).__name__} measures images "
                         f"{shape} as {expected}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{sampler}: y holds NaN or Inf values")
    return shape  # type: ignore[return-value]


def _check_guidance(guidance: float, sampler: str) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not (0 <= guidance < float("inf")):
        raise ValueError(f"{sampler}: guidance must be a finite number >= 0, got {guidance!r}")
    return float(guidance)


def _schedule(sigmas: Tensor | None, steps: int | None, sampler: str) -> list[float]:
    if sigmas is not None and steps is not None:
        raise ValueError(f"{sampler}: give sigmas or steps, not both")
    if sigmas is None:
        steps = IMAGE_SAMPLER_DEFAULTS["steps"] if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{sampler}: steps must be an integer >= 1, got {steps!r}")
        sigmas = image_sigmas(steps)
    return _grid(sigmas, sampler)


# ------------------------------------------------------------------------------ the guided Heun loop


def _guided_heun(
    denoise: Denoise,
    y: Tensor,
    operator: ImageOperator,
    grid: list[float],
    shape: tuple[int, int, int, int],
    *,
    guidance: float,
    generator: torch.Generator | None,
    callback: Callback | None,
    sampler: str,
    extra_info: dict[str, Any] | None = None,
) -> Tensor:
    """EDM Heun with the DPS correction (see the module docstring for the update).

    ``x = grid[0] n`` from ``generator``; returns the final iterate. ``||r_i||`` and the
    gradient are each image's own: one backward pass of ``sum_i ||r_i||^2`` gives every
    image's ``grad ||r_i||^2`` (the images share no term), scaled by ``guidance / (2 ||r_i||)``.
    An image whose residual is exactly 0 gets no correction (its gradient is 0 too).
    """
    device = y.device
    n = shape[0]
    x = grid[0] * _randn(shape, generator, device)
    total = len(grid) - 1
    for step in range(total):
        sigma, sigma_next = grid[step], grid[step + 1]
        if guidance > 0:
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                denoised = denoise(x_in, sigma)
                squared = (y - operator.forward(denoised)).square().reshape(n, -1).sum(dim=1)
                (grad,) = torch.autograd.grad(squared.sum(), x_in)
            denoised = denoised.detach()
            norm = squared.detach().sqrt()
        else:  # no gradient needed: keep the step as cheap as the unconditional sampler
            denoised = denoise(x, sigma)
            norm = (y - operator.forward(denoised)).square().reshape(n, -1).sum(dim=1).sqrt()
            grad = None
        slope = (x - denoised) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if sigma_next > 0:  # Heun's correction; at sigma = 0 the slope is undefined (EDM: Euler)
            slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        if grad is not None:
            scale = guidance / (2.0 * norm.clamp_min(torch.finfo(norm.dtype).tiny))
            x_next = x_next - scale.view(-1, 1, 1, 1) * grad
        x = x_next.detach()
        _emit(callback, sampler=sampler, step=step, total=total, sigma=sigma, sigma_next=sigma_next,
              x=x, denoised=denoised, residual_norm=norm, **(extra_info or {}))
    return x


def _prepare(
    model: nn.Module, y: Tensor, operator: ImageOperator, sigmas: Tensor | None, steps: int | None,
    guidance: float, sampler: str, *, ambient: bool,
) -> tuple[torch.device, Tensor, tuple[int, int, int, int], list[float], float]:
    _check_image_model(model, sampler, ambient=ambient)
    guidance = _check_guidance(guidance, sampler)
    grid = _schedule(sigmas, steps, sampler)
    device = _device(model)
    if isinstance(y, Tensor) and y.is_floating_point():
        y = y.detach().to(device, torch.float32)
    shape = _image_shape(y, operator, sampler)
    return device, y, shape, grid, guidance


# ------------------------------------------------------------------------------ samplers


def dps_image(
    model: nn.Module,
    y: Tensor,
    operator: ImageOperator,
    sigmas: Tensor | None = None,
    *,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    steps: int | None = None,
    erasure_p: float | None = None,
    amp: str | None = None,
) -> Tensor:
    """Diffusion Posterior Sampling (Chung et al. 2023; paper eq. 2.3) with an image prior
    trained on clean images (``p = 0``): the guided Heun loop with ``D = model(x, sigma)``.

    Args:
        model: a clean image denoiser, ``build_image_model(preset, ambient=False)``.
        y: measurements of ``operator``, real (see the module docstring).
        operator: the task's :class:`~adps.images.ImageOperator`.
        sigmas: Heun grid ending in 0; None = ``image_sigmas(steps)``.
        guidance: DPS's ``zeta``: ``x -= guidance * grad_x ||y - A D(x)||`` per image and step.
        generator: source of the start noise (the loop itself is deterministic).
        callback: per-step progress (see the module docstring).
        steps: Heun steps of the default grid (100; only without ``sigmas``).
        erasure_p: accepted for the shared signature (a loader passes its model's
            ``erasure_p``); must be None or 0 here: a model trained at ``p > 0`` is ambient.
        amp: None, ``"bf16"`` or ``"fp16"``: autocast of the network on CUDA.

    Returns:
        ``(N, 3, H, W)`` float32, the final denoised estimate.
    """
    if erasure_p not in (None, 0, 0.0):
        raise ValueError(f"dps_image: erasure_p={erasure_p!r} names an ambient model; dps_image takes a model "
                         "trained on clean images (p = 0). Use a_dps_image (image_sampler_for(model))")
    device, y, shape, grid, guidance = _prepare(model, y, operator, sigmas, steps, guidance, "dps_image",
                                                ambient=False)
    autocast = _autocast(device, amp, "dps_image")
    n = shape[0]

    def denoise(x: Tensor, sigma: float) -> Tensor:
        with autocast:
            out = model(x, _sigma_vector(sigma, n, device))
        return out.float()

    with _eval_mode(model), torch.no_grad():
        return _guided_heun(denoise, y, operator, grid, shape, guidance=guidance, generator=generator,
                            callback=callback, sampler="dps_image")


def a_dps_image(
    model: nn.Module,
    y: Tensor,
    operator: ImageOperator,
    sigmas: Tensor | None = None,
    *,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    steps: int | None = None,
    erasure_p: float | None = None,
    delta: float = DEFAULT_DELTA,
    mask: Tensor | None = None,
    amp: str | None = None,
) -> Tensor:
    """Ambient DPS (paper eq. 2.12) with an image model trained on randomly inpainted images.

    The guided Heun loop of :func:`dps_image` with the ambient denoiser
    ``D(x, sigma) = model(*ambient_image_input(x, mask_tr), sigma)``: ``mask_tr`` is drawn once
    per image, before the start noise, from ``generator`` with
    :func:`~adps.nn.image_diffusion.sampling_mask` ``(shape, erasure_p, delta)``: a fresh mask
    like the ones the model was trained on (kept with probability ``(1 - erasure_p)(1 -
    delta)``), used at every step. The likelihood uses the test-time ``operator``.

    Args:
        model: an ambient image denoiser, ``build_image_model(preset, ambient=True)``.
        y, operator, sigmas, guidance, generator, callback, steps, amp: as for :func:`dps_image`.
        erasure_p: the model's training erasure probability ``p`` in ``(0, 1)``, required
            (a loader takes it from the model's config, key ``erasure_p``).
        delta: the further corruption of the model's training (Ambient Diffusion: 0.1).
        mask: ``mask_tr`` itself, boolean ``(N, 1, H, W)`` (then ``erasure_p`` and ``delta``
            are not used to draw one, and ``generator`` draws the start noise only).

    Returns:
        ``(N, 3, H, W)`` float32, the final denoised estimate.
    """
    if mask is None and (isinstance(erasure_p, bool) or not isinstance(erasure_p, (int, float))
                         or not 0 < erasure_p < 1):
        raise ValueError(f"a_dps_image: erasure_p (the ambient model's training erasure probability, in (0, 1)) "
                         f"is required, got {erasure_p!r}; a loader reads it from the model config's 'erasure_p'")
    device, y, shape, grid, guidance = _prepare(model, y, operator, sigmas, steps, guidance, "a_dps_image",
                                                ambient=True)
    n, _, height, width = shape
    if mask is None:
        if generator is None:  # None = torch's global RNG, which seeds the mask's own generator
            generator_mask = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        else:
            generator_mask = generator
        mask = sampling_mask(shape, float(erasure_p), delta=delta, generator=generator_mask)
    elif tuple(mask.shape) != (n, 1, height, width) or mask.is_complex():
        raise ValueError(f"a_dps_image: mask must be boolean of shape ({n}, 1, {height}, {width}), "
                         f"got {tuple(mask.shape)} {mask.dtype}")
    mask = mask.to(device, torch.bool)
    autocast = _autocast(device, amp, "a_dps_image")

    def denoise(x: Tensor, sigma: float) -> Tensor:
        net_x, cond = ambient_image_input(x, mask)
        with autocast:
            out = model(net_x, _sigma_vector(sigma, n, device), cond=cond)
        return out.float()

    with _eval_mode(model), torch.no_grad():
        return _guided_heun(denoise, y, operator, grid, shape, guidance=guidance, generator=generator,
                            callback=callback, sampler="a_dps_image", extra_info={"mask": mask})


IMAGE_SAMPLERS: dict[str, Callable[..., Tensor]] = {"dps_image": dps_image, "a_dps_image": a_dps_image}
"""The image samplers by name; both share ``(model, y, operator, sigmas, *, guidance, generator,
callback, steps, erasure_p, amp)``."""


def image_sampler_for(model: nn.Module) -> Callable[..., Tensor]:
    """The sampler of an image model: :func:`a_dps_image` for an ambient model (a mask input
    channel, :func:`~adps.nn.image_diffusion.is_ambient_image_model`), :func:`dps_image` for a
    clean one. Both accept ``erasure_p`` (the model config's), so a caller can pass it either way."""
    try:
        ambient = is_ambient_image_model(unwrap_model(model))
    except TypeError as err:
        raise ValueError(f"image_sampler_for: {err}") from None
    return a_dps_image if ambient else dps_image

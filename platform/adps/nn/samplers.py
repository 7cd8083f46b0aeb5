"""The reconstruction samplers of the study as flat functions sharing one signature.

Layer 2 (no Ray, no MLflow): plain torch on :mod:`adps.mri` and the networks of :mod:`adps.nn`.
In the style of k-diffusion's ``sample_*`` functions, every sampler is::

    sampler(model, y, operator, sigmas, *, generator=None, callback=None, **options) -> Tensor

* ``model``: the method's network (or None where none is used: ``l1_wavelet``);
* ``y``: measured multi-coil k-space ``(N, C, H, W)`` complex64; only the columns of the operator's mask are read
  (anything elsewhere is replaced by zeros first);
* ``operator``: an :class:`adps.mri.SenseOperator` ``A_inf`` (the slices' maps and acquisition masks ``(N, W)``);
* ``sigmas``: the noise schedule (:mod:`adps.nn.schedules`); None = the sampler's default from METHOD.md
  (:func:`default_sigmas`); unused by the one-pass methods;
* ``generator``: a ``torch.Generator``, the source of every random draw (same seed, same result); None = torch's
  global RNG;
* ``callback(info)``: called once per step with a dict holding at least ``sampler``, ``step`` (0-based), ``total``,
  ``sigma``, ``sigma_next``, ``x`` (the state after the step), ``denoised`` (the step's estimate of the clean image)
  and ``residual_norm`` (``(N,)`` per-slice ``||y - A_inf denoised||``, the data-consistency trace; None without
  measurements). Tensors in it are detached; copy them if you keep them.

Every sampler returns the complex image ``(N, H, W)`` complex64 on the model's device, is batched over the N slices
(one network call per step for all of them), keeps its state in complex64 / float32, and runs on CPU as well as CUDA.
``amp="bf16"`` (or ``"fp16"``) runs the network calls under ``torch.autocast`` on CUDA only; on CPU it is ignored
with a warning (CPU autocast is slow and not what the GPU numbers mean).

Samplers (settings: METHOD.md "Samplers"):

* :func:`a_dps`: Ambient DPS (paper eq. 2.12), Euler over the EDM grid, the ambient network fed
  ``[A_tr^H A_tr x, mask_tr]``;
* :func:`dps`: the same loop with a prior ``D(x, sigma)`` (FS-DPS, L1-DPS);
* :func:`a_os`: Ambient One-Step, one network call;
* :func:`ald`: annealed Langevin dynamics with the NCSNv2 score network;
* :func:`prior_heun`: EDM's deterministic Heun sampler, unconditional (FID samples);
* :func:`l1_wavelet`, :func:`unrolled`: the classical and unrolled baselines;
* :func:`zero_filled`, :func:`cg_sense_recon`: the two reconstructions every table shows for scale (the adjoint
  ``A^H y``, and CG-SENSE without regularisation).

The guided loop is written once (:func:`_guided_loop`, Euler or Heun); A-DPS and DPS differ only in the denoise
function they give it, and take any :class:`~adps.linear_operator.LinearOperator`: the SENSE operator of the MRI
study, or an operator of :mod:`adps.images` for the natural-image study (there with ``solver="heun"``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from adps.linear_operator import LinearOperator
from adps.mri import SenseOperator, cg_sense, l1_wavelet_recon
from adps.mri.masks import DEFAULT_ACS, lines_at, slice_masks

from .ema import unwrap_model
from .image_diffusion import DEFAULT_DELTA, sampling_mask
from .modl import MoDL
from .ncsnv2 import NCSNv2
from .objectives import channels_to_complex, complex_to_channels
from .precond import EDMPrecond
from .reconstruct import A_OS_SIGMA
from .reconstruct import a_os as _a_os_one_pass
from .reconstruct import unrolled as _unrolled_one_pass
from .schedules import ald_sigmas, edm_sigmas

__all__ = [
    "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "ITERATIVE_SAMPLERS", "METHOD_SAMPLERS", "SAMPLERS", "SAMPLER_DEFAULTS",
    "SCHEDULE_OPTIONS", "Callback", "a_dps", "a_os", "ald", "default_sigmas", "dps", "l1_wavelet", "prior_heun",
    "run_sampler", "sampler_for", "train_masks", "unrolled", "zero_filled", "cg_sense_recon", "network_calls", "SOLVERS"
]

Callback = Callable[[dict[str, Any]], None]
"""``callback(info)``, called once per step (see the module docstring for the keys)."""

Denoise = Callable[[Tensor, float], Tensor]
"""``denoise(x complex (N, H, W), sigma) -> complex (N, H, W)``: the estimate of the clean image."""

DEFAULT_GUIDANCE = 1.0
"""METHOD.md: A-DPS's (and DPS's) likelihood step l_ss."""

# Every default of every sampler, from METHOD.md "Samplers" (ald: Jalal et al. 2021 and a stable step, see ald()).
# "steps" is the length of the default schedule (l1_wavelet: solver iterations).
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "a_dps": {"steps": 500, "sigma_min": 0.004, "sigma_max": 10.0, "rho": 7.0, "guidance": DEFAULT_GUIDANCE},
    "dps": {"steps": 500, "sigma_min": 0.004, "sigma_max": 10.0, "rho": 7.0, "guidance": DEFAULT_GUIDANCE},
    "a_os": {"steps": 1, "sigma": A_OS_SIGMA},
    "ald": {"steps": 1300, "steps_per_level": 3, "sigma_start": None, "step_scale": 0.5, "noise_std": 0.0,
            "likelihood_weight": 1.0, "denoise_last": True},
    "prior_heun": {"steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
    "l1_wavelet": {"steps": 100, "lam": 0.001, "wavelet": "db2", "scaling": "bart"},
    "unrolled": {"steps": 1},
    "zero_filled": {"steps": 1},
    # Unregularised CG-SENSE: early stopping is its only regulariser at R > 1 (more iterations
    # amplify the noise of the undersampled system), hence 10 rather than the reference's 30.
    "cg_sense": {"steps": 10},
}

SCHEDULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "a_dps": ("sigma_min", "sigma_max", "rho"), "dps": ("sigma_min", "sigma_max", "rho"),
    "prior_heun": ("sigma_min", "sigma_max", "rho"), "ald": ("steps_per_level", "sigma_start")
}
"""The schedule settings :func:`default_sigmas` takes per sampler (besides ``steps``)."""
ITERATIVE_SAMPLERS = ("a_dps", "dps", "ald")
"""The samplers that call the network once per step, hundreds of times, from random noise: the stochastic ones
(posterior samples differ by seed) and the ones worth compiling."""
DEFAULT_STEPS: dict[str, int] = {name: int(values["steps"]) for name, values in SAMPLER_DEFAULTS.items()}
"""Network evaluations / iterations per sampler at its defaults (A-DPS, DPS 500; ALD 1,300; ...)."""

# The sampler each training method reconstructs with (l1: the classical CS baseline, no model).
METHOD_SAMPLERS: dict[str, str] = {
    "ambient": "a_dps", "edm": "dps", "edm_l1": "dps", "ncsnv2": "ald", "modl": "unrolled", "ssdu": "unrolled",
    "l1": "l1_wavelet", "zero_filled": "zero_filled", "cg_sense": "cg_sense"
}

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ schedules, masks


def default_sigmas(sampler: str, model: nn.Module | None = None, *, steps: int | None = None,
                   **schedule_options: Any) -> Tensor | None:
    """The default schedule of ``sampler`` (METHOD.md, :data:`SAMPLER_DEFAULTS`), optionally with another step count.

    :func:`~adps.nn.schedules.edm_sigmas` for ``a_dps``, ``dps`` and ``prior_heun``;
    :func:`~adps.nn.schedules.ald_sigmas` over ``model.sigmas()`` for ``ald`` (needs the model); None for the one-pass
    methods. ``schedule_options`` override the sampler's other settings in :data:`SCHEDULE_OPTIONS`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    defaults = SAMPLER_DEFAULTS[sampler]
    steps = int(defaults["steps"] if steps is None else steps)
    if sampler not in SCHEDULE_OPTIONS:
        return None
    unknown = sorted(set(schedule_options) - set(SCHEDULE_OPTIONS[sampler]))
    if unknown:
        raise ValueError(f"default_sigmas({sampler!r}): unknown schedule option(s) {unknown}")
    settings = {k: schedule_options.get(k, defaults[k]) for k in SCHEDULE_OPTIONS[sampler]}
    if sampler == "ald":
        return ald_sigmas(_model_levels(model), steps, settings["steps_per_level"], settings["sigma_start"])
    return edm_sigmas(steps, **settings)


def train_masks(width: int, r_train: float, n: int, seed: int, slice_ids: list[int] | Tensor | None = None, *,
                acs: int = DEFAULT_ACS) -> Tensor:
    """The A-DPS training-corruption masks ``A_tr``: one R_train + 1 mask per slice, ``(n, W)`` bool.

    Drawn as the training data's further-corrupted masks are (:func:`adps.mri.masks.slice_masks`), reproducible
    from ``(seed, slice id)``, but from the ``"a_tr"`` streams (:data:`adps.mri.masks.DRAWS`), never the
    acquisition's: at ``R_inf = R_train`` A_tr is a fresh draw, not the slice's stored R + 1 mask (a subset of the
    acquired columns, which would favour A-DPS on the grid's diagonal; METHOD.md "Samplers").

    Args:
        width: phase-encode columns W.
        r_train: R_train of the ambient model (the masks are at R_train + 1).
        n: number of slices.
        seed: the draw's seed.
        slice_ids: one id per slice (default ``0 .. n - 1``).
        acs: central columns always kept (METHOD.md: 20).
    """
    ids = list(range(n)) if slice_ids is None else [int(i) for i in torch.as_tensor(slice_ids).reshape(-1).tolist()]
    if len(ids) != n:
        raise ValueError(f"train_masks: expected {n} slice ids, got {len(ids)}")
    rows = [slice_masks(width, r_train, seed=seed, slice_id=i, acs=acs, draw="a_tr")[1] for i in ids]
    return torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.bool)


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _eval_mode(model: nn.Module | None) -> Iterator[None]:
    """Eval mode (dropout off: a reconstruction must not be random beyond ``generator``) and frozen weights; every
    submodule's train/eval flag and every parameter's ``requires_grad`` are restored afterwards.

    Autograd stays on for the input (DPS / A-DPS differentiate through the network). The weights are frozen because a
    ``torch.compile``'d backward graph computes a gradient for every input that requires one, weights included (CPU,
    tiny preset, ``aot_eager``: 56.8 ms per gradient to x with trainable weights, 42.3 ms frozen).
    """
    if model is None:
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for module, training in flags:
            module.training = training


def _autocast(device: torch.device, amp: str | None, sampler: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the network calls on CUDA; nothing on other devices."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in _AMP_DTYPES:
        raise ValueError(f"{sampler}: amp must be None or one of {sorted(_AMP_DTYPES)}, got {amp!r}")
    if device.type != "cuda":
        warnings.warn(f"{sampler}: amp={amp!r} is ignored on {device.type}: autocast is applied on CUDA only, "
                      "the network runs in float32 here", stacklevel=3)
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AMP_DTYPES[amp])


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        buffer = next(model.buffers(), None)
        return buffer.device if buffer is not None else torch.device("cpu")


def _problem(y: Tensor, operator: LinearOperator, device: torch.device, sampler: str, *,
             mri_only: bool = False) -> tuple[Tensor, LinearOperator]:
    """``(y, operator)`` checked and moved to ``device`` (:meth:`LinearOperator.prepare`):
    for MRI, k-space zeroed outside the mask and the mask as ``(N, W)``."""
    wanted = SenseOperator if mri_only else LinearOperator
    if not isinstance(operator, wanted):
        what = ("an adps.mri.SenseOperator" if mri_only
                else "an adps LinearOperator (adps.mri.SenseOperator or an operator of adps.images)")
        raise ValueError(f"{sampler}: operator must be {what}, got {type(operator).__name__}")
    return operator.prepare(y, device, sampler)


def _grid(sigmas: Tensor, sampler: str) -> list[float]:
    """An Euler/Heun grid as Python floats: descending, positive but for a final value >= 0."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2 or sigmas.is_complex():
        raise ValueError(f"{sampler}: sigmas must be a 1-D real schedule with >= 2 entries "
                         f"(e.g. adps.nn.schedules.edm_sigmas(steps), which ends in 0), got shape {tuple(sigmas.shape)}")
    values = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()) or not bool((values[:-1] > 0).all()) or float(values[-1]) < 0:
        raise ValueError(f"{sampler}: sigmas must be finite, > 0 except the last entry (>= 0)")
    if not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"{sampler}: sigmas must be strictly descending")
    return values.tolist()


def _model_levels(model: nn.Module | None) -> Tensor:
    core = unwrap_model(model) if model is not None else None
    if core is None or not callable(getattr(core, "sigmas", None)):
        raise ValueError("ald: the default schedule needs a score network with its trained levels "
                         "(an NCSNv2, model.sigmas()); pass sigmas explicitly otherwise")
    return core.sigmas()


def _edm_input_channels(core: nn.Module) -> int | None:
    """Input channels of an EDMPrecond's U-Net (None when unknown, e.g. a test module)."""
    config = getattr(getattr(core, "net", None), "config", None)
    channels = getattr(config, "in_channels", None)
    return int(channels) if channels is not None else None


def _check_denoiser(model: nn.Module, sampler: str, *, ambient: bool, channels: int = 2,
                    condition_channels: int = 2) -> None:
    """Reject the model types a sampler cannot use: an EDMPrecond must take the image's ``channels`` (``[Re, Im]`` for
    MRI, RGB for images), plus the mask's ``condition_channels`` for an ambient model. Other modules are accepted if
    they follow the denoiser call convention ``D(x, sigma, cond=None)`` (e.g. exact denoisers in tests)."""
    if model is None:
        raise ValueError(f"{sampler}: a model is required")
    core = unwrap_model(model)
    image = "[Re, Im]" if channels == 2 else f"{channels} image channels"
    condition = "[mask, ones]" if condition_channels == 2 else "the mask"
    expected = (f"an ambient EDMPrecond ({channels + condition_channels} input channels: {image} and {condition})"
                if ambient else f"an EDMPrecond prior on {image} ({channels} input channels)")
    if isinstance(core, (NCSNv2, MoDL)):
        raise ValueError(f"{sampler}: expected {expected}, got {type(core).__name__}")
    if isinstance(core, EDMPrecond):
        got = _edm_input_channels(core)
        if core.image_channels != channels or (got is not None and got != channels + (condition_channels if ambient else 0)):
            is_ambient = got is not None and got > core.image_channels
            hint = (f" (it is {'an ambient' if is_ambient else 'a prior'} model: use {'a_dps' if is_ambient else 'dps'})"
                    if core.image_channels == channels else "")
            raise ValueError(f"{sampler}: expected {expected}, got an EDMPrecond whose network takes "
                             f"{got if got is not None else '?'} channels for {core.image_channels}-channel images{hint}")


def _sigma_vector(sigma: float, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), float(sigma), dtype=torch.float32, device=device)


def _slice_norm(residual: Tensor) -> Tensor:
    """Per-slice 2-norm of a complex ``(N, ...)`` tensor (Re and Im parts together)."""
    return torch.linalg.vector_norm(torch.view_as_real(residual).reshape(residual.shape[0], -1), dim=1)


def _emit(callback: Callback | None, **info: Any) -> None:
    if callback is not None:
        callback(info)


def _prior_denoiser(model: nn.Module, operator: LinearOperator, n: int, device: torch.device, autocast: Any) -> Denoise:
    """``D(x, sigma)`` of a prior fed ``operator.to_channels(x)`` (``[Re, Im]`` for MRI, as in
    :func:`~adps.nn.objectives.edm_loss`)."""

    def denoise(x: Tensor, sigma: float) -> Tensor:
        with autocast:
            out = model(operator.to_channels(x), _sigma_vector(sigma, n, device))
        return operator.from_channels(out)

    return denoise


def _ambient_denoiser(model: nn.Module, operator: LinearOperator, train_mask: Tensor | None, sampler: str,
                      autocast: Any, device: torch.device) -> tuple[Denoise, int]:
    """``D(x, sigma) = net([A_tr^H A_tr x, condition(A_tr)], sigma)`` of an ambient model, its input built as in
    training with ``A_tr = operator.corruption(train_mask)`` (MRI: the slices' maps and ``(N, W)`` columns, as
    :func:`~adps.nn.objectives.ambient_network_input`; images: random inpainting with ``(N, 1, H, W)``).
    Returns the denoiser and the count of its mask channels."""
    if train_mask is None:
        raise ValueError(f"{sampler}: train_mask is required: A_tr's mask (MRI: the R_train + 1 columns (N, W) bool, "
                         "e.g. adps.nn.samplers.train_masks(W, R_train, N, seed); images: (N, 1, H, W), "
                         "adps.nn.image_diffusion.sampling_mask)")
    try:
        corruption = operator.corruption(train_mask.to(device) if isinstance(train_mask, Tensor) else train_mask)
    except ValueError as err:
        raise ValueError(f"{sampler}: train_mask {err}") from None
    condition = corruption.condition().to(device)
    n = condition.shape[0]

    def denoise(x: Tensor, sigma: float) -> Tensor:
        net_x = operator.to_channels(corruption.normal(x))
        with autocast:
            out = model(net_x, _sigma_vector(sigma, n, device), cond=condition)
        return operator.from_channels(out)

    return denoise, condition.shape[1]


# ------------------------------------------------------------------------------ the guided loop

SOLVERS = ("euler", "heun")
"""The integrators of :func:`a_dps` / :func:`dps`: METHOD.md's Euler (MRI), or EDM's Heun (the natural-image study,
as DPS's and Ambient Diffusion's code)."""


def network_calls(steps: int, solver: str = "euler") -> int:
    """Network evaluations of a guided run of ``steps`` steps on a grid ending in 0 (the x-axis of the paper's figure
    4): ``steps`` for Euler, ``2 steps - 1`` for Heun (its last step, to sigma = 0, is Euler). The guidance gradient
    reuses the step's first call (a backward pass, no extra evaluation)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"network_calls: steps must be an integer >= 1, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"network_calls: solver must be one of {SOLVERS}, got {solver!r}")
    return steps if solver == "euler" else 2 * steps - 1


def _guided_loop(denoise: Denoise, y: Tensor, operator: LinearOperator, shape: tuple[int, ...], sigmas: list[float], *,
                 guidance: float, generator: torch.Generator | None, callback: Callback | None, sampler: str,
                 solver: str = "euler", churn: float = 0.0) -> Tensor:
    """The DPS / A-DPS loop (paper eq. 2.12 / 2.3, METHOD.md "Samplers").

    Start ``x = sigma_0 n`` (``operator.start_noise``: complex N(0, 1) for MRI). For each interval
    ``(sigma, sigma_next)`` of the grid::

        D = denoise(x, sigma);   r = y - A D
        x' = x + (sigma_next - sigma) (x - D) / sigma              (Euler)
        x' = x + (sigma_next - sigma) (d + d') / 2                 (Heun: d' at (x', sigma_next);
                                                                    not when sigma_next = 0)
        x  = x' - (guidance / ||r||) grad_x ||r||^2

    per slice / image (they share no term, so one backward pass of ``sum_i ||r_i||^2`` gives every gradient). The
    gradient runs through the network and comes from the step's first call. ``(guidance / ||r||) grad ||r||^2`` is
    the A-DPS reference code's form; it equals ``2 guidance grad ||r||``, a step of constant length that reduces the
    residual (DPS's ``zeta`` is ``2 guidance``). With ``guidance = 0`` no gradient is computed. Returns the final
    iterate (on a grid ending in 0, ``D`` minus its guidance correction).

    ``churn`` > 0 (EDM's ``S_churn``, Karras et al. 2022, Algorithm 2; a Ray Tune option, not METHOD.md's) first
    raises each level to ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(churn / steps, sqrt(2) - 1)``, by adding
    fresh noise of std ``sqrt(sigma_hat^2 - sigma^2)`` from ``generator``, then steps from ``sigma_hat``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"{sampler}: solver must be one of {SOLVERS}, got {solver!r}")
    device = y.device
    x = sigmas[0] * operator.start_noise(shape, generator, device)
    total = len(sigmas) - 1
    gamma = min(churn / total, math.sqrt(2.0) - 1.0) if churn > 0 and total else 0.0
    for step in range(total):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        if gamma > 0 and sigma > 0:
            sigma_hat = sigma * (1.0 + gamma)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * operator.start_noise(shape, generator, device)
            sigma = sigma_hat
        if guidance > 0:
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                denoised = denoise(x_in, sigma)
                squared = _squared_norm(y - operator.forward(denoised))
                (grad,) = torch.autograd.grad(squared.sum(), x_in)
            denoised = denoised.detach()
        else:  # no gradient needed: the step costs what the unconditional sampler's does
            denoised = denoise(x, sigma)
            squared, grad = _squared_norm(y - operator.forward(denoised)), None
        norm = squared.detach().sqrt()
        slope = (x - denoised) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if solver == "heun" and sigma_next > 0:  # at sigma = 0 the slope is undefined (EDM: Euler)
            slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        if grad is not None:
            # A slice whose residual is exactly 0 needs (and gets) no correction: its gradient is 0 too.
            scale = (guidance / norm.clamp_min(torch.finfo(norm.dtype).tiny)).to(x.dtype)
            x_next = x_next - scale.view(-1, *([1] * (x.ndim - 1))) * grad
        x = x_next.detach()
        _emit(callback, sampler=sampler, step=step, total=total, sigma=sigma, sigma_next=sigma_next,
              x=x, denoised=denoised, residual_norm=norm)
    return x


def _squared_norm(residual: Tensor) -> Tensor:
    """Per-item ``||r_i||^2`` of a real or complex ``(N, ...)`` residual."""
    values = torch.view_as_real(residual) if residual.is_complex() else residual
    return values.square().reshape(residual.shape[0], -1).sum(dim=1)


def _guided(sampler: str, model: nn.Module, y: Tensor, operator: LinearOperator, sigmas: Tensor | None, *,
            ambient: bool, train_mask: Tensor | None, guidance: float, generator: torch.Generator | None,
            callback: Callback | None, solver: str, churn: float, amp: str | None) -> Tensor:
    """:func:`a_dps` and :func:`dps`: the checks, the denoiser, then :func:`_guided_loop`."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not (0 <= guidance < float("inf")):
        raise ValueError(f"{sampler}: guidance must be a finite number >= 0, got {guidance!r}")
    guidance = float(guidance)
    if model is None:
        raise ValueError(f"{sampler}: a model is required")
    device = _device(model)
    y, operator = _problem(y, operator, device, sampler)
    probe = operator.adjoint(y)  # the image space: its shape, and its channels as the network sees them
    shape, channels = tuple(probe.shape), operator.to_channels(probe).shape[1]
    grid = _grid(default_sigmas(sampler) if sigmas is None else sigmas, sampler)
    autocast = _autocast(device, amp, sampler)
    if ambient:
        denoise, condition_channels = _ambient_denoiser(model, operator, train_mask, sampler, autocast, device)
    else:
        denoise, condition_channels = _prior_denoiser(model, operator, shape[0], device, autocast), 0
    _check_denoiser(model, sampler, ambient=ambient, channels=channels, condition_channels=condition_channels)
    with _eval_mode(model), torch.no_grad():
        return _guided_loop(denoise, y, operator, shape, grid, guidance=guidance, generator=generator,
                            callback=callback, sampler=sampler, solver=solver, churn=churn)


def a_dps(model: nn.Module, y: Tensor, operator: LinearOperator, sigmas: Tensor | None = None, *,
          generator: torch.Generator | None = None, callback: Callback | None = None, train_mask: Tensor | None = None,
          guidance: float = DEFAULT_GUIDANCE, churn: float = 0.0, solver: str = "euler",
          amp: str | None = None) -> Tensor:
    """Ambient Diffusion Posterior Sampling (paper eq. 2.12; METHOD.md "Samplers").

    The guided loop (:func:`_guided_loop`) with the ambient denoiser ``D(x, sigma) = net([A_tr^H A_tr x, mask_tr],
    sigma)``, its input built as in training with ``A_tr = operator.corruption(train_mask)`` (MRI: the slice's maps
    and a fresh R_train + 1 column mask, as :func:`adps.nn.reconstruct.a_os` builds it; images: random inpainting
    with a fresh mask at the model's erasure probability), so at level sigma the network sees what it was trained on,
    ``A~^H A~ (x + sigma n)``. The likelihood uses the acquisition operator ``A_inf``.

    Args:
        model: the ambient denoiser ``D(x, sigma, cond=...)`` (EDMPrecond of an ambient U-Net; wrappers are fine).
        y: the measurements: MRI k-space ``(N, C, H, W)``; for images what ``operator`` gives.
        operator: ``A_inf``, any :class:`~adps.linear_operator.LinearOperator`.
        sigmas: the grid, ending in 0; None = ``edm_sigmas(500, 0.004, 10, 7)`` (METHOD.md).
        generator: source of the start noise (the loop itself is deterministic but for ``churn``).
        callback: per-step progress (see the module docstring).
        train_mask: ``A_tr``'s mask, required. MRI: columns ``(N, W)`` bool (or ``(W,)`` for all slices), from
            :func:`train_masks`; images: ``(N, 1, H, W)`` bool, :func:`adps.nn.image_diffusion.sampling_mask`.
        guidance: ``l_ss``, the likelihood step (1.0).
        churn: EDM ``S_churn`` (0 = METHOD.md's deterministic loop; see :func:`_guided_loop`).
        solver: ``"euler"`` (METHOD.md) or ``"heun"`` (the natural-image study).
        amp: None, ``"bf16"`` or ``"fp16"``: autocast of the network on CUDA.

    Returns:
        The final iterate: complex ``(N, H, W)`` for MRI, real ``(N, C, H, W)`` for images.
    """
    return _guided("a_dps", model, y, operator, sigmas, ambient=True, train_mask=train_mask, guidance=guidance,
                   generator=generator, callback=callback, solver=solver, churn=churn, amp=amp)


def dps(model: nn.Module, y: Tensor, operator: LinearOperator, sigmas: Tensor | None = None, *,
        generator: torch.Generator | None = None, callback: Callback | None = None, guidance: float = DEFAULT_GUIDANCE,
        churn: float = 0.0, solver: str = "euler", amp: str | None = None) -> Tensor:
    """Diffusion Posterior Sampling with a prior denoiser (FS-DPS with ``edm``, L1-DPS with ``edm_l1``, the clean
    image model ``p = 0``): the A-DPS loop with ``D = net(to_channels(x), sigma)``, as
    :func:`~adps.nn.objectives.edm_loss` calls it in training.

    ``model`` is ``D(x, sigma)`` (EDMPrecond of a U-Net without mask channels); the other arguments, the defaults and
    the result are as for :func:`a_dps`.
    """
    return _guided("dps", model, y, operator, sigmas, ambient=False, train_mask=None, guidance=guidance,
                   generator=generator, callback=callback, solver=solver, churn=churn, amp=amp)


# ------------------------------------------------------------------------------ one-pass methods


def _single_pass(sampler: str, model: nn.Module | None, y: Tensor, operator: SenseOperator,
                 callback: Callback | None, amp: str | None, *, solve: Callable[[Tensor, SenseOperator], Tensor],
                 sigma: float = 0.0) -> Tensor:
    """A one-pass reconstruction ``solve(y, operator)`` through the shared signature: the measurement checked and
    masked, the network (if any) under ``amp``, the result complex64 on the model's device (else ``y``'s), one
    callback."""
    if model is not None:
        device = _device(model)
    else:
        device = y.device if isinstance(y, Tensor) else torch.device("cpu")
    y, operator = _problem(y, operator, device, sampler, mri_only=True)
    with _autocast(device, amp, sampler) if model is not None else contextlib.nullcontext():
        out = solve(y, operator)
    out = out.to(device, torch.complex64)
    _emit(callback, sampler=sampler, step=0, total=1, sigma=float(sigma), sigma_next=0.0, x=out, denoised=out,
          residual_norm=_slice_norm(y - operator.forward(out)))
    return out


def a_os(model: nn.Module, y: Tensor, operator: SenseOperator, sigmas: Tensor | None = None, *,
         generator: torch.Generator | None = None, callback: Callback | None = None, sigma: float = A_OS_SIGMA,
         amp: str | None = None) -> Tensor:
    """Ambient One-Step: :func:`adps.nn.reconstruct.a_os`, one call ``D([A^H y, mask], sigma)``.

    ``sigmas`` and ``generator`` are unused (one deterministic pass); ``sigma`` is the level the network is told
    (0.003). In-distribution only at R_inf = R_train (METHOD.md).
    """
    del sigmas, generator  # part of the shared signature only
    _check_denoiser(model, "a_os", ambient=True)
    return _single_pass("a_os", model, y, operator, callback, amp, sigma=sigma, solve=lambda y, op: _a_os_one_pass(
        model, y, op.maps, op.column_mask(), sigma=sigma))


def unrolled(model: nn.Module, y: Tensor, operator: SenseOperator, sigmas: Tensor | None = None, *,
             generator: torch.Generator | None = None, callback: Callback | None = None,
             amp: str | None = None) -> Tensor:
    """MoDL / SSDU: :func:`adps.nn.reconstruct.unrolled` on the measured k-space (one pass; ``sigmas`` and
    ``generator`` are unused)."""
    del sigmas, generator
    if model is None or not isinstance(unwrap_model(model), MoDL):
        got = "None" if model is None else type(unwrap_model(model)).__name__
        raise ValueError(f"unrolled: expected a MoDL network (methods modl, ssdu), got {got}")
    return _single_pass("unrolled", model, y, operator, callback, amp,
                        solve=lambda y, op: _unrolled_one_pass(model, y, op.maps, op.column_mask()))


def l1_wavelet(model: nn.Module | None, y: Tensor, operator: SenseOperator, sigmas: Tensor | None = None, *,
               generator: torch.Generator | None = None, callback: Callback | None = None, lam: float = 0.001,
               iterations: int = 100, wavelet: str = "db2", scaling: str = "bart", amp: str | None = None) -> Tensor:
    """L1-wavelet compressed sensing, :func:`adps.mri.recon.l1_wavelet_recon` (``min 1/2 ||A x - y||^2 + lam s
    ||W x||_1``; METHOD.md: lam 0.001, 100 iterations, as BART's ``pics -l1 -r 0.001 -i 100``: Daubechies-2 wavelets
    and BART's data scale ``s``).

    No network: ``model``, ``sigmas``, ``generator`` and ``amp`` are unused (pass None). Runs on the CPU (sigpy); the
    result is returned on ``y``'s device.
    """
    del model, sigmas, generator, amp
    return _single_pass("l1_wavelet", None, y, operator, callback, None, solve=lambda y, op: l1_wavelet_recon(
        y, op.maps, op.column_mask(), lam=float(lam), iterations=int(iterations), wavelet=wavelet, scaling=scaling))


def zero_filled(model: nn.Module | None, y: Tensor, operator: SenseOperator, sigmas: Tensor | None = None, *,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                amp: str | None = None) -> Tensor:
    """The zero-filled reconstruction ``A^H y`` (unmeasured columns as 0); every argument but ``y`` and ``operator``
    is unused."""
    del model, sigmas, generator, amp
    return _single_pass("zero_filled", None, y, operator, callback, None, solve=lambda y, op: op.adjoint(y))


def cg_sense_recon(model: nn.Module | None, y: Tensor, operator: SenseOperator, sigmas: Tensor | None = None, *,
                   generator: torch.Generator | None = None, callback: Callback | None = None, iterations: int = 10,
                   amp: str | None = None) -> Tensor:
    """CG-SENSE from the measured columns, :func:`adps.mri.cg_sense` without regularisation
    (``iterations`` conjugate-gradient steps on ``A^H A x = A^H y``, from 0). No network."""
    del model, sigmas, generator, amp
    if iterations < 1:
        raise ValueError(f"cg_sense: iterations must be >= 1, got {iterations}")
    return _single_pass("cg_sense", None, y, operator, callback, None,
                        solve=lambda y, op: cg_sense(op, y, iterations=int(iterations)))


# ------------------------------------------------------------------------------ ALD


def ald(model: nn.Module, y: Tensor, operator: SenseOperator, sigmas: Tensor | None = None, *,
        generator: torch.Generator | None = None, callback: Callback | None = None, step_scale: float = 0.5,
        noise_std: float = 0.0, likelihood_weight: float = 1.0, denoise_last: bool = True,
        amp: str | None = None) -> Tensor:
    """Annealed Langevin dynamics with the NCSNv2 score network and data consistency.

    The posterior Langevin sampler of Jalal et al. 2021 ("Robust compressed sensing MRI with deep generative priors",
    Algorithm 1), here as implemented: for each step ``t`` at level ``sigma_t`` (``sigmas``, one entry per step)::

        eta_t = step_scale sigma_t^2
        x <- x + eta_t [ s(x, sigma_t) + w A^H (y - A x) / (noise_std^2 + sigma_t^2) ]
               + sqrt(2 eta_t) z,      z ~ complex N(0, I)

    The likelihood's variance anneals with the prior's (Jalal et al.'s ``gamma_t = sigma_t``) plus the measurement
    noise ``noise_std^2``. ``eta_t ~ sigma_t^2`` is NCSNv2's step size (``eta_t = step_lr (sigma_t / sigma_L)^2``,
    so ``step_lr = step_scale sigma_L^2``); the dimensionless ``step_scale`` makes the default independent of the
    network's levels. Stability: the score's Lipschitz constant is at most about ``1 / sigma_t^2`` and the data
    term's ``w / sigma_t^2`` (``||A|| <= 1`` with normalised maps), so a step is stable for ``step_scale < 2 / (1 +
    w)``; 0.5 leaves a margin. Jalal et al.'s ``step_lr = 5e-5`` at ``sigma_L = 0.0066`` is ``step_scale`` 1.15,
    beyond that bound with ``w = 1``: with an exact Gaussian score the iterates grew by 10^12 before recovering.
    Their code's rescaling of the data gradient to the score's norm (``mse = 5``) is not used: ``likelihood_weight``
    (``w``) is a plain factor.

    Start ``x = sigmas[0] n``. With ``denoise_last`` a final Tweedie step ``x + sigma_L^2 s(x, sigma_L)``
    (``sigma_L`` the smallest level of ``sigmas``; Song & Ermon 2020's ``denoise`` option) removes the last level's
    noise; otherwise the last Langevin iterate is returned.

    Defaults: ``sigmas = ald_sigmas(model.sigmas(), 1300, 3)`` (the paper's 1,300 steps; 3 per level from the
    geometric middle of NCSNv2's 2,311 levels, sigma 1.24 -> 0.0066, as Jalal et al.), ``noise_std = 0``
    (prewhitened, normalised data: the measurement noise is far below the smallest level).

    Args:
        model: an :class:`~adps.nn.ncsnv2.NCSNv2` (``s(x, sigma)`` on ``[Re, Im]``; any module with that call, and
            ``sigmas()`` for the default schedule).
        y, operator, generator, callback, amp: as for :func:`a_dps`; the callback's ``denoised`` is Tweedie's
            estimate ``x + sigma^2 s(x, sigma)`` before the step.
        sigmas: the level of each step (non-increasing, > 0, no trailing 0); None = default.
        step_scale: ``eta_t / sigma_t^2``.
        noise_std: measurement noise standard deviation (per real channel).
        likelihood_weight: ``w``, factor on the data term.
        denoise_last: end with one Tweedie denoising step.

    Returns:
        complex ``(N, H, W)``.
    """
    if model is None or isinstance(unwrap_model(model), (EDMPrecond, MoDL)):
        got = "None" if model is None else type(unwrap_model(model)).__name__
        raise ValueError(f"ald: expected an NCSNv2 score network s(x, sigma), got {got}")
    device = _device(model)
    y, operator = _problem(y, operator, device, "ald", mri_only=True)
    levels = default_sigmas("ald", model) if sigmas is None else sigmas
    values = torch.as_tensor(levels).detach().to("cpu", torch.float64).reshape(-1)
    if torch.as_tensor(levels).ndim != 1 or values.numel() < 1 or not bool((values > 0).all()) \
            or not bool(torch.isfinite(values).all()) or not bool((values[1:] <= values[:-1]).all()):
        raise ValueError("ald: sigmas must be a 1-D, non-increasing schedule of positive levels, one per step "
                         "(e.g. adps.nn.schedules.ald_sigmas(model.sigmas()))")
    if step_scale <= 0:
        raise ValueError(f"ald: step_scale must be > 0, got {step_scale}")
    grid = values.tolist()
    sigma_last = min(grid)
    n, height, width = operator.image_shape
    autocast = _autocast(device, amp, "ald")

    def score(x: Tensor, sigma: float) -> Tensor:
        with autocast:
            out = model(complex_to_channels(x), _sigma_vector(sigma, n, device))
        return channels_to_complex(out)

    x = grid[0] * operator.start_noise((n, height, width), generator, device)
    total = len(grid)
    with _eval_mode(model), torch.no_grad():
        for step, sigma in enumerate(grid):
            eta = step_scale * sigma**2
            s = score(x, sigma)
            denoised = x + sigma**2 * s
            data_grad = operator.adjoint(y - operator.forward(x)) / (noise_std**2 + sigma**2)
            noise = operator.start_noise(x.shape, generator, device)
            x = x + eta * (s + likelihood_weight * data_grad) + math.sqrt(2 * eta) * noise
            _emit(callback, sampler="ald", step=step, total=total, sigma=sigma,
                  sigma_next=grid[step + 1] if step + 1 < total else 0.0, x=x, denoised=denoised,
                  residual_norm=_slice_norm(y - operator.forward(denoised)))
        if denoise_last:
            x = x + sigma_last**2 * score(x, sigma_last)
    return x


# ------------------------------------------------------------------------------ prior sampling


def prior_heun(model: nn.Module, y: Tensor | None = None, operator: SenseOperator | None = None,
               sigmas: Tensor | None = None, *, generator: torch.Generator | None = None,
               callback: Callback | None = None, shape: tuple[int, int] | None = None, batch: int = 1,
               train_mask: Tensor | None = None, amp: str | None = None) -> Tensor:
    """Unconditional samples of a prior: EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1 without
    churn; METHOD.md "prior": 18 steps, sigma 80 -> 0.002, rho 7), for every EDM-preconditioned model alike, so that
    FIDs compare models, not samplers.

    ``x = sigma_0 n``; per interval ``d = (x - D(x, sigma)) / sigma``, Euler to ``sigma_next``, then (unless
    ``sigma_next = 0``) the trapezoidal correction with ``D`` at ``sigma_next``: 35 network calls with 18 steps.

    * A prior on ``[Re, Im]`` (``edm``, ``edm_l1``): ``D = net(x, sigma)``. The image size comes from ``operator``
      when one is given (``(N, H, W)`` of its maps, ``batch`` ignored), otherwise from ``shape = (H, W)`` and
      ``batch`` (N).
    * An ambient model: ``D = net([A_tr^H A_tr x, mask_tr], sigma)`` as in A-DPS, which needs ``operator`` (its maps
      define ``A_tr``; its mask is not used) and ``train_mask`` (one R_train + 1 mask per sample,
      :func:`train_masks`).

    ``y`` is unused (accepted for the shared signature; pass None).

    Returns:
        ``(N, H, W)`` complex samples; the callback's ``residual_norm`` is None.
    """
    del y
    ambient = train_mask is not None
    _check_denoiser(model, "prior_heun", ambient=ambient)
    device = _device(model)
    grid = _grid(default_sigmas("prior_heun") if sigmas is None else sigmas, "prior_heun")
    if operator is not None:
        if not isinstance(operator, SenseOperator):
            raise ValueError(f"prior_heun: operator must be a SenseOperator or None, got {type(operator).__name__}")
        n, height, width = operator.image_shape
    elif ambient:
        raise ValueError("prior_heun: an ambient model needs an operator whose coil maps define A_tr")
    elif shape is not None and len(shape) == 2 and batch >= 1:
        (height, width), n = (int(s) for s in shape), int(batch)
    else:
        raise ValueError(f"prior_heun: give shape=(H, W) and batch >= 1 (or an operator), got shape={shape!r}, "
                         f"batch={batch!r}")
    autocast = _autocast(device, amp, "prior_heun")
    space = SenseOperator(operator.maps.to(device, torch.complex64)) if operator is not None else SenseOperator(
        torch.ones(n, 1, height, width, dtype=torch.complex64, device=device))
    if ambient:
        denoise, _ = _ambient_denoiser(model, space, train_mask, "prior_heun", autocast, device)
    else:
        denoise = _prior_denoiser(model, space, n, device, autocast)

    x = grid[0] * space.start_noise((n, height, width), generator, device)
    total = len(grid) - 1
    with _eval_mode(model), torch.no_grad():
        for step in range(total):
            sigma, sigma_next = grid[step], grid[step + 1]
            denoised = denoise(x, sigma)
            slope = (x - denoised) / sigma
            x_next = x + (sigma_next - sigma) * slope
            if sigma_next > 0:  # Heun's correction; at sigma = 0 the slope is undefined (EDM: Euler)
                slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
            x = x_next
            _emit(callback, sampler="prior_heun", step=step, total=total, sigma=sigma, sigma_next=sigma_next,
                  x=x, denoised=denoised, residual_norm=None)
    return x


# ------------------------------------------------------------------------------ registry


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "a_dps": a_dps, "dps": dps, "a_os": a_os, "ald": ald, "prior_heun": prior_heun, "l1_wavelet": l1_wavelet,
    "unrolled": unrolled, "zero_filled": zero_filled, "cg_sense": cg_sense_recon
}
"""Every sampler by name; all share ``(model, y, operator, sigmas, *, generator, callback, **options)``."""


def sampler_for(method: str) -> Callable[..., Tensor]:
    """The default sampler of a training method, as :data:`METHOD_SAMPLERS` names it."""
    if method not in METHOD_SAMPLERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHOD_SAMPLERS)}")
    return SAMPLERS[METHOD_SAMPLERS[method]]


def run_sampler(
    name: str, model: nn.Module | None, y: Tensor, operator: SenseOperator, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, steps: int | None = None, guidance: float | None = None,
    r_train: float | None = None, slice_ids: list[int] | Tensor | None = None, seed: int = 0, acs: int | None = None,
    erasure_p: float | None = None, delta: float = DEFAULT_DELTA, amp: str | None = None, **options: Any
) -> Tensor:
    """Run sampler ``name`` from driver-level settings (what an evaluation grid varies).

    * ``steps``: the default schedule of the sampler with this many steps (:func:`default_sigmas`); for
      ``l1_wavelet`` / ``cg_sense`` the solver iterations; ignored by the one-pass methods. None = METHOD.md's.
    * ``guidance``: ``l_ss`` of ``a_dps`` / ``dps`` (None = 1.0); ignored by the others.
    * ``a_dps`` only: its ``train_mask`` is drawn here. MRI: with :func:`train_masks` from ``r_train`` (R_train,
      required), ``seed`` and ``slice_ids`` (default ``0 .. N - 1``); ``acs`` = the masks' ACS width (None =
      METHOD.md's 20, or fewer where ``floor(W / (R_train + 1))`` columns cannot hold 20). Images: with
      :func:`~adps.nn.image_diffusion.sampling_mask` from the model's training ``erasure_p`` (required) and
      ``delta``, drawn from ``generator`` before the start noise. A ``train_mask`` in ``options`` is used as given.
    * ``amp``: None / ``""`` (off), ``"bf16"``, ``"fp16"``.
    * ``options``: the schedule settings of :data:`SCHEDULE_OPTIONS` go to :func:`default_sigmas`, the rest to the
      sampler (e.g. ``churn`` of ``a_dps``, ``sigma`` of ``a_os``, ``step_scale`` of ``ald``): how a Ray Tune trial's
      settings and an evaluation's tuned settings reach a sampler.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    amp = amp or None
    sigmas = None
    schedule = {key: options.pop(key) for key in SCHEDULE_OPTIONS.get(name, ()) if key in options}
    if name in SCHEDULE_OPTIONS and (steps is not None or schedule):
        sigmas = default_sigmas(name, model, steps=steps, **schedule)
    if name in ("l1_wavelet", "cg_sense") and steps is not None:
        options.setdefault("iterations", int(steps))
    if name in ("a_dps", "dps") and guidance is not None:
        options["guidance"] = float(guidance)
    if name == "a_dps" and "train_mask" not in options:
        if isinstance(operator, SenseOperator):
            if r_train is None:
                raise ValueError("run_sampler('a_dps'): r_train (R_train of the ambient model) is "
                                 "required to draw the R_train + 1 masks A_tr")
            n, _, _, width = operator.kspace_shape
            acs_width = min(DEFAULT_ACS, lines_at(width, r_train + 1)) if acs is None else int(acs)
            options["train_mask"] = train_masks(width, r_train, n, seed, slice_ids, acs=acs_width)
        else:
            if erasure_p is None:
                raise ValueError("run_sampler('a_dps'): erasure_p (the ambient image model's training erasure "
                                 "probability) is required to draw its masks A_tr")
            # Without a generator, torch's global RNG seeds the mask's own (the sampler keeps None).
            mask_generator = generator if generator is not None else torch.Generator().manual_seed(
                int(torch.randint(0, 2**62, (1,)).item()))
            shape = operator.image_shape_of(y)
            options["train_mask"] = sampling_mask(shape, float(erasure_p), delta=delta, generator=mask_generator)
    return SAMPLERS[name](model, y, operator, sigmas, generator=generator, callback=callback, amp=amp, **options)

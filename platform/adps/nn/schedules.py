"""Noise-level schedules of the samplers, as plain functions returning 1-D tensors.

Layer 2 (no Ray, no MLflow). Every schedule is *descending* (noise is removed step by step). Two conventions,
both as in k-diffusion:

* :func:`edm_sigmas` is an *Euler/Heun grid*: ``steps`` noise levels followed by a trailing 0, so ``steps``
  intervals ``(sigma_i, sigma_{i+1})``; a sampler takes one step per interval and its last step lands on
  sigma = 0, the clean image.
* :func:`geometric_sigmas` is a *list of levels* (NCSN-style annealing): ``n`` levels, all positive, no trailing
  0; :func:`ald_sigmas` turns a network's levels into the per-step levels of annealed Langevin dynamics (a
  level repeated for each of its steps).

Defaults are METHOD.md's ("Samplers"): the posterior samplers (A-DPS, DPS) use the EDM grid with 500 steps from
sigma_max 10 to sigma_min 0.004, rho 7; the unconditional prior sampler uses EDM's own 18 steps from 80 to
0.002, rho 7.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ald_sigmas", "edm_sigmas", "geometric_sigmas"]


def edm_sigmas(steps: int, sigma_min: float = 0.004, sigma_max: float = 10.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5 noise levels with a trailing 0 (like k-diffusion's ``get_sigmas_karras``)::

        sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        i = 0 .. steps - 1,   then sigma_steps = 0

    Interpolating linearly in ``sigma^(1/rho)`` puts more steps at low noise the larger ``rho`` is (``rho = 1``:
    evenly spaced in sigma; ``rho -> inf``: evenly spaced in ``log sigma``). EDM found ``rho = 7`` best.

    Args:
        steps: number of positive levels = number of sampler steps (>= 1; 1 gives ``[sigma_max, 0]``).
        sigma_min, sigma_max: the last positive and the first level (METHOD.md A-DPS/DPS: 0.004 and 10; EDM
            prior: 0.002 and 80).
        rho: the schedule's curvature (7).

    Returns:
        ``(steps + 1,)`` float32, strictly descending, ``[sigma_max, ..., sigma_min, 0]`` (computed in float64,
        then rounded once).
    """
    if steps < 1:
        raise ValueError(f"edm_sigmas: steps must be >= 1, got {steps}")
    if not sigma_max > sigma_min > 0:
        raise ValueError(f"edm_sigmas: need sigma_max > sigma_min > 0, got {sigma_max}, {sigma_min}")
    if not rho > 0:
        raise ValueError(f"edm_sigmas: rho must be > 0, got {rho}")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def geometric_sigmas(n: int, sigma_max: float, sigma_min: float) -> Tensor:
    """``n`` (>= 1) geometrically spaced levels from ``sigma_max`` down to ``sigma_min`` > 0, no trailing 0:
    ``(n,)`` float32, descending, endpoints exactly ``sigma_max`` and ``sigma_min`` (``[sigma_max]`` for n = 1).

    NCSN's annealing schedule (Song & Ermon 2019/2020); for the NCSNv2 model of the study the levels are the
    network's own (232 -> 0.0066, 2,311 levels: :meth:`adps.nn.NCSNv2.sigmas`).
    """
    if n < 1:
        raise ValueError(f"geometric_sigmas: n must be >= 1, got {n}")
    if not sigma_max >= sigma_min > 0:
        raise ValueError(f"geometric_sigmas: need sigma_max >= sigma_min > 0, got {sigma_max}, {sigma_min}")
    logs = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return logs.exp().to(torch.float32)


def ald_sigmas(levels: Tensor, steps: int = 1300, steps_per_level: int = 3, sigma_start: float | None = None) -> Tensor:
    """Per-step noise levels of annealed Langevin dynamics, drawn from a network's trained levels.

    The NCSNv2 score network knows only its discrete ``levels`` (descending, all > 0;
    :meth:`adps.nn.NCSNv2.sigmas`), so every step uses one of them: ``ceil(steps / steps_per_level)`` levels
    spread evenly (by index, i.e. geometrically) from the first level ``<= sigma_start`` down to the last one,
    each repeated ``steps_per_level`` (>= 1) times; the first level loses the surplus steps so that there are
    exactly ``steps`` (>= 1) in all. Returns ``(steps,)`` float32, non-increasing.

    Defaults: 1,300 steps (the paper's ALD budget, section 3.3), 3 steps per level and a start (None) at the geometric
    middle of the levels (``sqrt(sigma_begin sigma_end)``), as Jalal et al. 2021 (csgm-mri-langevin) run NCSNv2 on
    brain MRI: ``n_steps_each = 3``, ``start_iter = 1155`` of 2,311 levels (232 -> 0.0066), i.e. from sigma ~ 1.24.
    Starting at 232 would spend steps at noise levels far above the data's scale (normalised tissue ~ 1).
    """
    levels = torch.as_tensor(levels).detach().to("cpu", torch.float64).reshape(-1)
    if levels.numel() < 1 or not bool((levels > 0).all()) or not bool((levels[1:] < levels[:-1]).all()):
        raise ValueError("ald_sigmas: levels must be a non-empty, strictly descending tensor of positive values")
    if steps < 1 or steps_per_level < 1:
        raise ValueError(f"ald_sigmas: steps and steps_per_level must be >= 1, got {steps}, {steps_per_level}")
    if sigma_start is None:
        sigma_start = math.sqrt(float(levels[0]) * float(levels[-1]))
    below = torch.nonzero(levels <= sigma_start * (1 + 1e-6)).flatten()
    if below.numel() == 0:
        raise ValueError(f"ald_sigmas: no level <= sigma_start = {sigma_start} (smallest level {float(levels[-1])})")
    first, last = int(below[0]), levels.numel() - 1
    index = torch.linspace(first, last, math.ceil(steps / steps_per_level), dtype=torch.float64).round().long()
    return levels[index].repeat_interleave(steps_per_level)[-steps:].to(torch.float32)

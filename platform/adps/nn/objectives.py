"""Training objectives of every method in the study, as small pure functions.

Conventions shared by all of them:

* Images are complex ``(N, H, W)``; networks see them as two real channels ``[Re, Im]`` (:func:`complex_to_channels`).
  Noise is complex with independent ``N(0, 1)`` real and imaginary parts (white noise on the two channels, as EDM).
* A *denoiser* is called as ``denoiser(x, sigma, cond=None)`` with ``x`` ``(N, 2, H, W)``, ``sigma`` ``(N,)`` and
  optional extra input channels ``cond`` ``(N, C, H, W)``, and returns ``(N, 2, H, W)``, as
  :class:`~adps.nn.precond.EDMPrecond`.
* Losses are summed over pixels (and channels, coils) and averaged over the batch, as the reference code does
  (``loss.sum() / batch``); ``reduce=False`` returns the ``(N,)`` values.
* Every random quantity (sigma, noise, splits) is an argument or drawn from an explicit ``torch.Generator``.

Numbers are METHOD.md's ("Ambient training", "Samplers"); the equations are those of the paper (Aali, Daras et al.
2025, eq. 2.6-2.11 and 3.1), Karras et al. 2022 (EDM) and Song & Ermon 2020 (NCSNv2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from adps.linear_operator import channels_to_complex, complex_to_channels
from adps.mri import SenseOperator
from adps.mri.sense import mask_channels

__all__ = [
    "Denoiser", "ambient_loss", "ambient_network_input", "channels_to_complex", "complex_to_channels", "dsm_loss",
    "edm_loss", "edm_weight", "keep_columns", "mask_channels", "modl_loss", "ncsn_sigmas", "sample_noise", "sample_sigma", "ssdu_loss",
    "ssdu_split"
]

Denoiser = Callable[..., Tensor]
"""``denoiser(x (N, 2, H, W), sigma (N,), cond=None) -> (N, 2, H, W)``."""


# ------------------------------------------------------------------------------ layout


def _per_sample(values: Tensor, n: int) -> Tensor:
    """Broadcast a scalar or ``(N,)``-like tensor to shape ``(N,)``."""
    values = values.reshape(-1)
    if values.numel() == 1:
        return values.expand(n)
    if values.numel() != n:
        raise ValueError(f"expected 1 or {n} values (one per slice), got {values.numel()}")
    return values


def keep_columns(kspace: Tensor, mask: Tensor) -> Tensor:
    """``P y``: ``kspace`` ``(N, C, H, W)`` with the columns outside ``mask`` (``(N, W)`` or ``(W,)``) zeroed. ``where``,
    not a product: a NaN/Inf in an unmeasured column must not leak in (0 * NaN = NaN)."""
    columns = mask.to(device=kspace.device, dtype=torch.bool)
    columns = columns[None, None, None, :] if columns.ndim == 1 else columns[:, None, None, :]
    return torch.where(columns, kspace, kspace.new_zeros(()))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal float32 draws on ``device`` from ``generator`` (drawn on its device)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


# ------------------------------------------------------------------------------ EDM


def sample_sigma(n: int, generator: torch.Generator | None = None, *, p_mean: float = -1.2, p_std: float = 1.2,
                 device: torch.device | str | None = None) -> Tensor:
    """EDM's training noise levels: ``ln sigma ~ N(p_mean, p_std^2)`` (METHOD.md: -1.2, 1.2).

    Returns ``(n,)`` float32 on ``device`` (default: the generator's device, else CPU).
    """
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    return (_randn((n,), generator, device or torch.device("cpu")) * p_std + p_mean).exp()


def edm_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM's loss weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (``= 1 / c_out^2``): the loss on ``D``
    equals the unit-weighted loss on the raw network's effective target (Karras et al. 2022, eq. 8, appendix B.6)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Complex noise shaped like ``like`` (complex) with independent N(0, 1) Re and Im parts."""
    if not like.is_complex():
        raise ValueError(f"sample_noise: expected a complex template, got {like.dtype}")
    real = _randn((*like.shape, 2), generator, like.device)
    return torch.view_as_complex(real).to(like.dtype)


def edm_loss(denoiser: Denoiser, images: Tensor, sigma: Tensor, noise: Tensor, *, sigma_data: float = 0.5,
             reduce: bool = True) -> Tensor:
    """EDM loss ``lambda(sigma) || D(x + sigma n; sigma) - x ||^2`` (Karras et al. 2022, eq. 2/8).

    The R = 1 model trains on reference images with it, the L1-EDM baselines on L1-wavelet reconstructions
    (METHOD.md), and the natural-image study's clean model (``p = 0``) on RGB images.

    Args:
        denoiser: ``D(x, sigma)`` on the images' channels (an EDMPrecond of an ``edm`` or image U-Net).
        images: clean images ``x``: complex ``(N, H, W)`` (MRI; the network sees ``[Re, Im]``) or real
            ``(N, C, H, W)`` (natural images, as they are).
        sigma: noise levels, ``(N,)`` (or one value for all).
        noise: ``n``, shaped like ``images`` (N(0, 1); real and imaginary parts for MRI).
        sigma_data: data standard deviation of the weight (0.5).
        reduce: mean over the batch (True) or the ``(N,)`` per-image losses.

    Returns:
        Squared error summed over pixels and channels, weighted, averaged over the batch.
    """
    if images.ndim != (3 if images.is_complex() else 4):
        raise ValueError(f"images: expected complex (N, H, W) or real (N, C, H, W) images, got "
                         f"{tuple(images.shape)} {images.dtype}")
    if noise.shape != images.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from images shape {tuple(images.shape)}")
    x, noise = (complex_to_channels(images), complex_to_channels(noise)) if images.is_complex() else (images, noise)
    sigma = _per_sample(torch.as_tensor(sigma, dtype=torch.float32, device=x.device), x.shape[0])
    denoised = denoiser(x + sigma.view(-1, 1, 1, 1) * noise, sigma)
    per_item = edm_weight(sigma, sigma_data) * (denoised.float() - x).square().sum(dim=(1, 2, 3))
    return per_item.mean() if reduce else per_item


# ------------------------------------------------------------------------------ ambient


def ambient_network_input(adjoint_image: Tensor, mask_further: Tensor) -> tuple[Tensor, Tensor]:
    """The ambient network's input, split as EDMPrecond takes it: ``(x, cond)``.

    Args:
        adjoint_image: ``A~^H A~ x_t`` (training) or ``A~^H y~`` (sampling), complex ``(N, H, W)``.
        mask_further: the further-corrupted column mask ``A~``, ``(N, W)`` or ``(W,)``.

    Returns:
        ``x``: ``(N, 2, H, W)`` ``[Re, Im]`` and ``cond``: ``(N, 2, H, W)`` ``[mask~, ones]`` (how EDMPrecond scales
        each: :class:`~adps.nn.precond.EDMPrecond`). ``torch.cat([x, cond], 1)`` is upstream's 4-channel input
        ``[Re, Im, mask, ones]``.
    """
    n, height, width = adjoint_image.shape
    if mask_further.ndim == 1:
        mask_further = mask_further.expand(n, -1)
    if mask_further.shape != (n, width):
        raise ValueError(f"mask_further: expected shape ({n}, {width}) or ({width},), got {tuple(mask_further.shape)}")
    return complex_to_channels(adjoint_image), mask_channels(mask_further.to(adjoint_image.device), height)


def ambient_loss(denoiser: Denoiser, kspace: Tensor, maps: Tensor, mask: Tensor, mask_further: Tensor, sigma: Tensor,
                 noise: Tensor, *, sigma_data: float = 0.5, reduce: bool = True) -> Tensor:
    """The ambient diffusion loss in k-space form: needs only the measured k-space.

    With ``z = P F S x`` the measured k-space at the training mask ``A = P F S`` and ``A~`` the further-corrupted
    operator (``P~`` subset of ``P``, same maps)::

        input   x~_t = A~^H (P~ z + P~ F S sigma n)        (= A~^H A~ (x + sigma n))
        D       = denoiser([Re, Im](x~_t), sigma, cond=[mask~, ones])
        loss    = lambda(sigma) || A^H A D - A^H z ||^2    (the training mask A, not A~)

    (paper eq. 2.6-2.11; METHOD.md "Ambient training"). Only ``P z`` enters: k-space outside the training mask is
    zeroed first, so the result is the same whether ``kspace`` is fully sampled, masked, or garbage outside the mask.

    Args:
        denoiser: ``D(x, sigma, cond=...)``, e.g. EDMPrecond of the ``ambient`` UNet.
        kspace: measured multi-coil k-space ``(N, C, H, W)`` (only columns in ``mask`` are used).
        maps: coil maps ``(N, C, H, W)``.
        mask: the slice's training mask ``A`` (at R), ``(N, W)`` or ``(W,)``.
        mask_further: its further-corrupted mask ``A~`` (at R + 1), a subset of ``mask``.
        sigma: noise levels ``(N,)`` (or one value).
        noise: ``n``, complex ``(N, H, W)``, N(0, 1) real and imaginary parts.
        sigma_data, reduce: as for :func:`edm_loss`.
    """
    op = SenseOperator(maps, mask)
    op_further = op.with_mask(mask_further)
    n_slices = maps.shape[0]
    sigma = _per_sample(torch.as_tensor(sigma, dtype=torch.float32, device=maps.device), n_slices)
    # P z: the model never sees more than A measures (`where`, not a product: 0 * NaN = NaN).
    measured = torch.where(op.mask != 0, kspace, kspace.new_zeros(()))
    # P~ F S (sigma n) is A~(sigma n); adjoint applies P~ to the measured part as well.
    noisy_kspace = measured + op_further.forward(sigma.view(-1, 1, 1).to(noise.dtype) * noise)
    net_x, net_cond = ambient_network_input(op_further.adjoint(noisy_kspace), mask_further.to(maps.device))
    denoised = channels_to_complex(denoiser(net_x, sigma, cond=net_cond))
    residual = op.normal(denoised) - op.adjoint(measured)  # A^H A D - A^H z
    per_slice = edm_weight(sigma, sigma_data) * torch.view_as_real(residual).square().sum(dim=(1, 2, 3))
    return per_slice.mean() if reduce else per_slice


# ------------------------------------------------------------------------------ MoDL / SSDU


def modl_loss(recon: Tensor, reference: Tensor, *, eps: float = 1e-12, reduce: bool = True) -> Tensor:
    """Supervised MoDL loss: per-slice NRMSE ``||x_hat - x||_2 / ||x||_2`` on the complex images (not magnitudes as
    the evaluation metric: smooth everywhere, and it penalises phase errors). ``eps`` guards an all-zero reference."""
    if recon.shape != reference.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} differs from reference {tuple(reference.shape)}")
    dims = tuple(range(1, recon.ndim))
    error = torch.linalg.vector_norm(recon - reference, dim=dims)
    per_slice = error / torch.linalg.vector_norm(reference, dim=dims).clamp_min(eps)
    return per_slice.mean() if reduce else per_slice


def ssdu_split(mask: Tensor, *, rho: float = 0.2, generator: torch.Generator | None = None,
               keep_center: int = 4) -> tuple[Tensor, Tensor]:
    """Split each slice's acquired columns ``Omega`` into ``Theta`` (input) and ``Lambda`` (loss).

    ``|Lambda| = round(rho |Omega|)`` columns drawn uniformly without replacement from ``Omega``, except the
    ``keep_center`` columns around the k-space centre (``W // 2``), which always stay in ``Theta``;
    ``Theta = Omega - Lambda``. Choices, against the references:

    * Whole columns, not single k-space points as SSDU (Yaman et al. 2020): the masks are column masks (METHOD.md),
      and both parts stay valid column masks for the SENSE operator.
    * The centre: SSDU never puts a small central block (4 x 4 points) in ``Lambda``, so the input always keeps the
      lowest frequencies; ``keep_center = 4`` is its column analogue. The rest of the ACS region *may* go to
      ``Lambda``: its columns carry much of the signal energy the loss should see. ``keep_center = 0`` gives a
      split uniform over all of ``Omega``.
    * ``rho = 0.2`` (paper section 3.2 / METHOD.md).

    Args:
        mask: acquired columns, boolean ``(W,)`` or ``(N, W)`` (one split per slice).
        rho: ``|Lambda| / |Omega|``.
        generator: generator of the draw (reproducible with a seed); None = global RNG.
        keep_center: central columns never put in ``Lambda``.

    Returns:
        ``(theta_mask, lambda_mask)``: boolean, shaped and placed like ``mask``; disjoint, their union is ``mask``.
    """
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"ssdu_split: rho must be in [0, 1), got {rho}")
    if keep_center < 0:
        raise ValueError(f"ssdu_split: keep_center must be >= 0, got {keep_center}")
    if mask.ndim not in (1, 2):
        raise ValueError(f"ssdu_split: expected a column mask (W,) or (N, W), got shape {tuple(mask.shape)}")
    rows = mask.detach().to("cpu", torch.bool).reshape(-1, mask.shape[-1])
    width = rows.shape[1]
    protected = torch.zeros(width, dtype=torch.bool)
    protected[max(0, width // 2 - keep_center // 2) : width // 2 - keep_center // 2 + keep_center] = True

    loss_rows = torch.zeros_like(rows)
    for i, row in enumerate(rows):
        acquired = int(row.sum())
        n_loss = math.floor(rho * acquired + 0.5)  # round half up (Python's round() rounds to even)
        candidates = torch.nonzero(row & ~protected).flatten()
        if n_loss > candidates.numel():
            raise ValueError(f"ssdu_split: slice {i} has {acquired} acquired columns; round({rho} * {acquired}) = "
                             f"{n_loss} loss columns but only {candidates.numel()} outside the {keep_center} "
                             "central ones")
        gen_device = generator.device if generator is not None else "cpu"
        order = torch.randperm(candidates.numel(), generator=generator, device=gen_device).cpu()
        loss_rows[i, candidates[order[:n_loss]]] = True
    theta_rows = rows & ~loss_rows
    return theta_rows.reshape(mask.shape).to(mask.device), loss_rows.reshape(mask.shape).to(mask.device)


def ssdu_loss(recon: Tensor, kspace: Tensor, maps: Tensor, loss_mask: Tensor, *, eps: float = 1e-12,
              reduce: bool = True) -> Tensor:
    """SSDU loss (paper eq. 3.1): ``||y_L - A_L x||_1 / ||y_L||_1 + ||y_L - A_L x||_2 / ||y_L||_2``.

    ``A_L`` is the SENSE operator with the loss mask ``Lambda``; ``y_L = P_Lambda y``. Norms are over the real and
    imaginary parts of all coils and pixels (the ``l1`` norm sums ``|Re|`` and ``|Im|``, as SSDU's real two-channel
    k-space does). Eq. 3.1 as written; SSDU's code weights the two terms by 0.5 each (a constant factor).

    Args:
        recon: the network's reconstruction ``x`` from ``Theta``, complex ``(N, H, W)``.
        kspace: measured k-space ``(N, C, H, W)``; only the ``Lambda`` columns are used.
        maps: coil maps ``(N, C, H, W)``.
        loss_mask: ``Lambda``, ``(N, W)`` or ``(W,)``.
        eps: guards an empty ``Lambda`` (then the loss is 0).
    """
    op_loss = SenseOperator(maps, loss_mask)
    target = torch.view_as_real(torch.where(op_loss.mask != 0, kspace, kspace.new_zeros(())))
    residual = target - torch.view_as_real(op_loss.forward(recon))
    dims = tuple(range(1, target.ndim))
    l1 = residual.abs().sum(dim=dims) / target.abs().sum(dim=dims).clamp_min(eps)
    l2 = torch.linalg.vector_norm(residual, dim=dims) / torch.linalg.vector_norm(target, dim=dims).clamp_min(eps)
    return (l1 + l2).mean() if reduce else l1 + l2


# ------------------------------------------------------------------------------ NCSNv2


def ncsn_sigmas(sigma_begin: float = 232.0, sigma_end: float = 0.0066, num_scales: int = 2311) -> Tensor:
    """NCSNv2's geometric noise levels ``sigma_1 > ... > sigma_L`` (float32, ``(num_scales,)``).

    Defaults: Jalal et al. 2021's NCSNv2 for FastMRI brain T2 MVUE images (csgm-mri-langevin): ``sigma_begin`` 232
    (Song & Ermon's technique 1: about the largest distance between training images), ``sigma_end`` 0.0066, 2311
    levels (technique 2).
    """
    if not sigma_begin > sigma_end > 0:
        raise ValueError(f"ncsn_sigmas: need sigma_begin > sigma_end > 0, got {sigma_begin}, {sigma_end}")
    if num_scales < 2:
        raise ValueError(f"ncsn_sigmas: need at least 2 scales, got {num_scales}")
    levels = torch.linspace(math.log(sigma_begin), math.log(sigma_end), num_scales, dtype=torch.float64)
    return levels.exp().to(torch.float32)


def dsm_loss(score_net: Callable[[Tensor, Tensor], Tensor], images: Tensor, sigmas: Tensor, *,
             generator: torch.Generator | None = None, labels: Tensor | None = None, noise: Tensor | None = None,
             anneal_power: float = 2.0, reduce: bool = True) -> Tensor:
    """NCSNv2 denoising score matching over geometric noise levels (Song & Ermon 2020).

    For each slice a level ``sigma = sigmas[label]`` is drawn uniformly; with ``z ~ N(0, I)``::

        loss = 1/2 || s(x + sigma z, sigma) + z / sigma ||^2 * sigma^anneal_power

    which for the default ``anneal_power = 2`` is ``1/2 || sigma s(x + sigma z, sigma) + z ||^2``: every level
    contributes on the same scale.

    Args:
        score_net: ``s(x (N, 2, H, W), sigma (N,)) -> (N, 2, H, W)``.
        images: clean images, complex ``(N, H, W)`` (or real ``(N, C, H, W)``).
        sigmas: the noise levels (e.g. :func:`ncsn_sigmas`).
        generator: draws the labels and the noise when they are not given.
        labels: ``(N,)`` level indices (drawn uniformly if None).
        noise: ``z`` shaped like the network input (drawn if None).
        anneal_power: exponent of the level weighting (2 in NCSNv2).
    """
    x = complex_to_channels(images) if images.is_complex() else images
    n = x.shape[0]
    sigmas = sigmas.to(x.device, torch.float32)
    if labels is None:
        gen_device = generator.device if generator is not None else x.device
        labels = torch.randint(0, sigmas.numel(), (n,), generator=generator, device=gen_device)
    labels = labels.to(x.device)
    sigma = sigmas[labels]
    if noise is None:
        noise = _randn(tuple(x.shape), generator, x.device)
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the input shape {tuple(x.shape)}")
    sigma_b = sigma.view(-1, *([1] * (x.ndim - 1)))
    score = score_net(x + sigma_b * noise, sigma).float()
    dims = tuple(range(1, x.ndim))
    # ||s + z/sigma||^2 sigma^p = ||sigma s + z||^2 sigma^(p-2): the second form stays O(1).
    per_slice = 0.5 * (sigma_b * score + noise).square().sum(dim=dims) * sigma ** (anneal_power - 2.0)
    return per_slice.mean() if reduce else per_slice

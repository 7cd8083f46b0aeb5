"""Classical reconstructions: zero-filled adjoint, MVUE, batched CG-SENSE, L1-wavelet CS.

All take and return batched complex tensors: k-space ``(N, C, H, W)``, maps ``(N, C, H, W)``,
images ``(N, H, W)``. CG-SENSE is pure torch (differentiable, any device); the L1-wavelet
reconstruction calls sigpy slice by slice on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from adps.mri.fft import ifft2c
from adps.mri.sense import SenseOperator, check_maps

LinearMap = Callable[[torch.Tensor], torch.Tensor]


def zero_filled(op: SenseOperator, kspace: torch.Tensor) -> torch.Tensor:
    """The adjoint reconstruction ``A^H y`` (unsampled k-space taken as zero)."""
    return op.adjoint(kspace)


def mvue(kspace: torch.Tensor, maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Minimum-variance unbiased estimate ``sum_c conj(S_c) F^-1 y_c / sum_c |S_c|^2``.

    With fully sampled ``y`` this is the exact per-pixel least-squares coil combination; with
    undersampled ``y`` it is the sensitivity-weighted zero-filled image.
    """
    _check_pair(kspace, maps)
    coil_images = ifft2c(kspace)
    numerator = torch.sum(maps.conj() * coil_images, dim=1)
    denominator = torch.sum(maps.abs() ** 2, dim=1)
    return numerator / denominator.clamp_min(eps)


def conjugate_gradient(
    normal: LinearMap,
    rhs: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    iterations: int = 30,
    tol: float = 0.0,
) -> torch.Tensor:
    """Batched conjugate gradient for ``M x = b`` with a Hermitian positive (semi)definite ``M``.

    Each batch entry (the first axis) gets its own step sizes, so slices of different
    difficulty converge independently. Out-of-place operations only, so the result can be
    back-propagated through (MoDL's data-consistency layer relies on this).

    Args:
        normal: the map ``x -> M x`` (e.g. ``lambda x: A.normal(x) + lam * x``).
        rhs: ``b``, shape ``(N, ...)``.
        x0: starting point (default zeros).
        iterations: maximum number of iterations.
        tol: stop once every slice's residual norm is below ``tol * ||b||`` (0: run all).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    dims = tuple(range(1, rhs.ndim))
    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs - normal(x) if x0 is not None else rhs
    p = r
    rs_old = _dot(r, r, dims)
    rhs_norm = _dot(rhs, rhs, dims).sqrt()
    tiny = torch.finfo(rs_old.dtype).tiny
    for _ in range(iterations):
        if tol > 0 and bool(torch.all(rs_old.sqrt() <= tol * rhs_norm)):
            break
        Ap = normal(p)
        # A slice that has converged exactly (rs_old == 0) takes no further step.
        alpha = rs_old / _dot(p, Ap, dims).clamp_min(tiny)
        alpha = torch.where(rs_old > 0, alpha, torch.zeros_like(alpha))
        x = x + _expand(alpha, x) * p
        r = r - _expand(alpha, r) * Ap
        rs_new = _dot(r, r, dims)
        beta = torch.where(rs_old > 0, rs_new / rs_old.clamp_min(tiny), torch.zeros_like(rs_new))
        p = r + _expand(beta, p) * p
        rs_old = rs_new
    return x


def cg_sense(
    op: SenseOperator,
    kspace: torch.Tensor,
    *,
    iterations: int = 30,
    tol: float = 0.0,
    lam: float = 0.0,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """CG-SENSE: solve ``(A^H A + lam I) x = A^H y`` by batched conjugate gradient.

    METHOD.md's reference image is CG-SENSE with 30 iterations on fully sampled k-space.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    rhs = op.adjoint(kspace)

    def normal(x: torch.Tensor) -> torch.Tensor:
        return op.normal(x) + lam * x if lam else op.normal(x)

    return conjugate_gradient(normal, rhs, x0=x0, iterations=iterations, tol=tol)


def l1_wavelet_recon(
    kspace: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    lam: float = 0.001,
    iterations: int = 100,
    wavelet: str = "db4",
    show_progress: bool = False,
) -> torch.Tensor:
    """L1-wavelet compressed sensing, ``min_x 1/2 ||A x - y||^2 + lam ||W x||_1`` (sigpy).

    ``lam = 0.001`` is METHOD.md's value on the BART scale, which sigpy shares (both use
    orthonormal FFTs and an unscaled data term). Runs slice by slice on the CPU with sigpy's
    proximal gradient solver.

    Args:
        kspace: ``(N, C, H, W)`` undersampled k-space (zeros where not sampled).
        maps: ``(N, C, H, W)`` coil maps.
        mask: column mask ``(W,)`` or ``(N, W)``; ``None`` uses the nonzero columns of ``y``.
        lam: regularisation weight.
        iterations: solver iterations.
        wavelet: PyWavelets wavelet name.
    """
    import sigpy.mri  # deferred: sigpy's import is slow and only this function needs it

    _check_pair(kspace, maps)
    n, _, h, w = kspace.shape
    if mask is None:
        weights = (kspace.abs().sum(dim=(1, 2)) > 0).cpu().numpy()
    else:
        weights = _mask_rows(mask, n, w)
    y = kspace.detach().cpu().numpy().astype(np.complex64)
    mps = maps.detach().cpu().numpy().astype(np.complex64)
    out = np.empty((n, h, w), dtype=np.complex64)
    for i in range(n):
        # sigpy's weights multiply k-space, so a (1, W) 0/1 row broadcasts as the column mask.
        app = sigpy.mri.app.L1WaveletRecon(
            y[i],
            mps[i],
            lam,
            weights=weights[i][None, :].astype(np.float32),
            wave_name=wavelet,
            max_iter=iterations,
            show_pbar=show_progress,
        )
        out[i] = app.run()
    return torch.from_numpy(out).to(kspace.device)


def _mask_rows(mask: torch.Tensor, n: int, w: int) -> np.ndarray:
    m = mask.detach().cpu().numpy().astype(bool)
    if m.shape == (w,):
        return np.broadcast_to(m, (n, w))
    if m.shape == (n, w):
        return m
    raise ValueError(f"mask: expected shape ({w},) or ({n}, {w}), got {m.shape}")


def _check_pair(kspace: torch.Tensor, maps: torch.Tensor) -> None:
    for name, t in (("kspace", kspace), ("maps", maps)):
        if not isinstance(t, torch.Tensor) or not t.is_complex() or t.ndim != 4:
            desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a complex tensor (N, C, H, W), got {desc}")
    if kspace.shape != maps.shape:
        raise ValueError(f"kspace shape {tuple(kspace.shape)} does not match maps shape {tuple(maps.shape)}")
    check_maps(maps)  # zero maps: an all-zero MVUE / L1 image, silently


def _dot(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-slice real inner product ``Re <a, b>`` (real for the Hermitian systems CG solves)."""
    return torch.sum((a.conj() * b).real, dim=dims)


def _expand(scalar_per_slice: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scalar_per_slice.view(-1, *([1] * (like.ndim - 1)))

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
    numerator = torch.sum(maps.conj() * ifft2c(kspace), dim=1)
    denominator = torch.sum(maps.abs() ** 2, dim=1)
    return numerator / denominator.clamp_min(eps)


def conjugate_gradient(normal: LinearMap, rhs: torch.Tensor, *, x0: torch.Tensor | None = None, iterations: int = 30,
                       tol: float = 0.0) -> torch.Tensor:
    """Batched conjugate gradient for ``M x = b`` with a Hermitian positive (semi)definite ``M``.

    Each batch entry (the first axis) gets its own step sizes, so slices converge independently.
    Out-of-place operations only, so MoDL's data-consistency layer can back-propagate through it.

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


def cg_sense(op: SenseOperator, kspace: torch.Tensor, *, iterations: int = 30, tol: float = 0.0, lam: float = 0.0,
             x0: torch.Tensor | None = None) -> torch.Tensor:
    """CG-SENSE: solve ``(A^H A + lam I) x = A^H y`` by batched conjugate gradient.

    METHOD.md's reference image is CG-SENSE with 30 iterations on fully sampled k-space.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    rhs = op.adjoint(kspace)

    def normal(x: torch.Tensor) -> torch.Tensor:
        return op.normal(x) + lam * x if lam else op.normal(x)

    return conjugate_gradient(normal, rhs, x0=x0, iterations=iterations, tol=tol)


L1_SCALINGS = ("bart", "none")
"""How :func:`l1_wavelet_recon`'s ``lam`` relates to the data: ``bart`` as BART's ``pics``
rescales by default, ``none`` as ``pics -w 1``."""


def bart_scale(kspace: torch.Tensor, calib_max: int = 32) -> float:
    """BART's automatic data scale of one slice's k-space ``(C, H, W)`` (``pics`` without ``-w``).

    As BART 0.8 computes it: the fully sampled central block (at most ``calib_max`` rows and
    columns around ``(H//2, W//2)``; here the rows are all sampled), the root-sum-of-squares of
    its unitary inverse FFT, and of those magnitudes, sorted, the median, the 90th percentile and
    the maximum, each divided by ``sqrt(H W / (h w))`` (the block's size ``h x w``): the 90th
    percentile unless the maximum lies more than twice the median-to-90th gap above it, then the
    maximum. (Checked against BART's printed "Scaling" on the same data: within 0.5 %.)
    """
    _, h, w = kspace.shape
    sampled = (kspace.abs().sum(dim=(0, 1)) > 0).cpu().numpy()
    centre = w // 2
    if not sampled[centre]:
        raise ValueError("bart_scale: the k-space centre column is not sampled (no calibration region)")
    low, high = centre, centre
    while low - 1 >= 0 and sampled[low - 1] and high - low + 1 < calib_max:
        low -= 1
    while high + 1 < w and sampled[high + 1] and high - low + 1 < calib_max:
        high += 1
    rows = min(h, calib_max)
    block = kspace[:, h // 2 - rows // 2 : h // 2 - rows // 2 + rows, low : high + 1]
    image = torch.sqrt(ifft2c(block).abs().square().sum(dim=0)).flatten().sort().values.double()
    rescale = float(np.sqrt(h * w / block[0].numel()))
    n = image.numel()
    median, p90, peak = (float(image[i]) / rescale for i in (n // 2, int(np.trunc(n * 0.9)), n - 1))
    return p90 if (peak - p90) < 2 * (p90 - median) else peak


def _max_eigenvalue(op: SenseOperator, iterations: int = 30) -> float:
    """The largest eigenvalue of ``A^H A`` by power iteration from a fixed start (seeded): the
    step size of the L1 solver, the same on every run (sigpy's own estimate starts from numpy's
    global random state, so the same slice gave other reconstructions from run to run)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(op.image_shape, generator=generator, dtype=torch.float64).to(op.maps.dtype)
    value = 0.0
    for _ in range(iterations):
        y = op.normal(x)
        value = float(torch.linalg.vector_norm(y) / torch.linalg.vector_norm(x).clamp_min(1e-30))
        x = y / torch.linalg.vector_norm(y).clamp_min(1e-30)
    return value


def l1_wavelet_recon(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor | None = None, *, lam: float = 0.001,
                     iterations: int = 100, wavelet: str = "db2", scaling: str = "bart",
                     show_progress: bool = False) -> torch.Tensor:
    """L1-wavelet compressed sensing, ``min_x 1/2 ||A x - y||^2 + lam s ||W x||_1`` (sigpy's
    FISTA), as the paper's baseline ran it in BART: ``pics -l1 -r 0.001 -i 100``.

    * ``wavelet``: ``db2`` (2 vanishing moments), BART's ``dau2`` (METHOD.md's lam was set for it;
      db4 gave a reconstruction 0.18 NRMSE away from BART's);
    * ``scaling``: ``bart`` (default): ``s`` = :func:`bart_scale`, as ``pics`` without ``-w`` (it
      divides the data by ``s``; ``-S`` multiplies the result back: this objective), so lam means
      what it means in BART; ``none``: ``s = 1``, as ``pics -w 1``, lam on the data's own scale;
    * deterministic: the step size ``1 / ||A^H A||`` comes from a seeded power iteration
      (:func:`_max_eigenvalue`), so ``l1: true`` shards are byte-identical on a re-run.

    Against BART 0.8 on the same data (``tests/test_mri_recon.py``, where ``bart`` is installed):
    0.04-0.06 NRMSE from ``pics -l1 -r 0.001 -i 100 -S -n``; BART's default also shifts the
    wavelets at random each iteration (cycle spinning, off with ``-n``), which this solver does
    not. Runs slice by slice on the CPU.

    Args:
        kspace: ``(N, C, H, W)`` undersampled k-space (zeros where not sampled).
        maps: ``(N, C, H, W)`` coil maps.
        mask: column mask ``(W,)`` or ``(N, W)``; ``None`` uses the nonzero columns of ``y``.
        lam: regularisation weight (METHOD.md: 0.001 on BART's scale).
        iterations: solver iterations (100).
        wavelet: PyWavelets wavelet name.
        scaling: ``bart`` or ``none`` (:data:`L1_SCALINGS`).
    """
    import sigpy.mri  # deferred: sigpy's import is slow and only this function needs it

    _check_pair(kspace, maps)
    if scaling not in L1_SCALINGS:
        raise ValueError(f"l1_wavelet_recon: scaling must be one of {', '.join(L1_SCALINGS)}, got {scaling!r}")
    n, _, h, w = kspace.shape
    weights = (kspace.abs().sum(dim=(1, 2)) > 0).cpu().numpy() if mask is None else _mask_rows(mask, n, w)
    kspace_cpu = kspace.detach().cpu().to(torch.complex64)
    maps_cpu = maps.detach().cpu().to(torch.complex64)
    y, mps = kspace_cpu.numpy(), maps_cpu.numpy()
    out = np.empty((n, h, w), dtype=np.complex64)
    for i in range(n):
        columns = torch.from_numpy(weights[i].copy())
        measured = torch.where(columns[None, None, :], kspace_cpu[i], kspace_cpu.new_zeros(()))
        scale = bart_scale(measured) if scaling == "bart" else 1.0
        step = _max_eigenvalue(SenseOperator(maps_cpu[i : i + 1], columns))
        # sigpy's weights multiply k-space, so a (1, W) 0/1 row broadcasts as the column mask.
        out[i] = sigpy.mri.app.L1WaveletRecon(
            y[i], mps[i], lam * scale, weights=weights[i][None, :].astype(np.float32), wave_name=wavelet,
            max_iter=iterations, alpha=1.0 / step if step > 0 else 1.0, show_pbar=show_progress
        ).run()
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

"""Coil tools: root-sum-of-squares, noise pre-whitening, SVD coil compression, ESPIRiT maps,
and the k-space normalisation constant.

These are the per-slice preparation steps of METHOD.md. Tensors are complex with the coil axis
given explicitly (``coil_dim``), so they apply to one slice ``(C, H, W)`` or a batch
``(N, C, H, W)`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adps.mri.fft import ifft2c


def rss(coil_images: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """Root-sum-of-squares coil combination ``sqrt(sum_c |x_c|^2)`` (real)."""
    return torch.sqrt(torch.sum(coil_images.abs() ** 2, dim=coil_dim))


# Noise pre-whitening -------------------------------------------------------------------------
def noise_covariance(noise: torch.Tensor, coil_dim: int = 0) -> torch.Tensor:
    """Sample covariance ``E[n n^H]`` of zero-mean complex coil noise: ``(C, C)``, Hermitian,
    complex128 (for a stable Cholesky). ``noise`` has coils on ``coil_dim``, samples on every other axis.
    """
    samples = torch.movedim(noise, coil_dim, 0).reshape(noise.shape[coil_dim], -1).to(torch.complex128)
    if samples.shape[1] < samples.shape[0]:
        raise ValueError(f"noise: {samples.shape[1]} samples per coil cannot estimate a {samples.shape[0]}-coil "
                         "covariance")
    return samples @ samples.conj().T / samples.shape[1]


def background_patch(coil_images: torch.Tensor, size: int = 30, corner: str = "top-left") -> torch.Tensor:
    """A ``size x size`` patch of coil images ``(C, H, W)`` taken from a corner (object-free):
    METHOD.md estimates the noise covariance from a 30 x 30 background patch in a corner."""
    if coil_images.ndim != 3:
        raise ValueError(f"coil_images: expected shape (C, H, W), got {tuple(coil_images.shape)}")
    _, h, w = coil_images.shape
    if size > min(h, w):
        raise ValueError(f"patch size {size} exceeds the image size {h} x {w}")
    if corner not in ("top-left", "top-right", "bottom-left", "bottom-right"):
        raise ValueError(f"corner must be top-left, top-right, bottom-left or bottom-right, got {corner!r}")
    rows = slice(0, size) if corner.startswith("top") else slice(h - size, h)
    cols = slice(0, size) if corner.endswith("left") else slice(w - size, w)
    return coil_images[:, rows, cols]


def whitening_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """``L^-1`` for ``covariance = L L^H`` (Cholesky): whitened noise ``L^-1 n`` has covariance I."""
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"covariance: expected a square (C, C) matrix, got {tuple(covariance.shape)}")
    cov = covariance.to(torch.complex128)
    try:
        chol = torch.linalg.cholesky(cov)
    except RuntimeError as err:  # torch raises LinAlgError (a RuntimeError) if not positive definite
        raise ValueError(f"noise covariance is not positive definite: {err}") from None
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def apply_coil_matrix(data: torch.Tensor, matrix: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """Mix coils: ``out[c'] = sum_c matrix[c', c] data[c]`` along ``coil_dim``.

    Coil mixing commutes with the FFT: whitening or compressing k-space and coil images is the same.
    """
    moved = torch.movedim(data, coil_dim, -1)
    if moved.shape[-1] != matrix.shape[1]:
        raise ValueError(f"coil matrix expects {matrix.shape[1]} coils, data has {moved.shape[-1]}")
    mixed = moved @ matrix.to(device=data.device, dtype=data.dtype).T
    return torch.movedim(mixed, -1, coil_dim)


def whiten(data: torch.Tensor, covariance: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """Pre-whiten multi-coil data with the inverse Cholesky factor of its noise covariance."""
    return apply_coil_matrix(data, whitening_matrix(covariance), coil_dim)


# SVD coil compression -------------------------------------------------------------------------
@dataclass(frozen=True)
class CoilCompression:
    """Result of :func:`coil_compress`."""

    data: torch.Tensor
    """Compressed data with ``n_virtual`` coils on the coil axis."""
    matrix: torch.Tensor
    """``(n_virtual, C)`` compression matrix ``U[:, :n]^H`` (apply with :func:`apply_coil_matrix`)."""
    energy_kept: float
    """Fraction of the data's energy in the kept virtual coils."""


def coil_compress(data: torch.Tensor, n_virtual: int, coil_dim: int = -3) -> CoilCompression:
    """SVD coil compression to ``n_virtual`` virtual coils.

    The compression matrix is ``U[:, :n]^H`` from the SVD of the ``(C, samples)`` data matrix,
    the unitary coil combination that keeps the most energy in ``n`` coils (Huang et al. 2008).
    Noise stays white since the rows of ``U^H`` are orthonormal.
    """
    n_coils = data.shape[coil_dim]
    if not 1 <= n_virtual <= n_coils:
        raise ValueError(f"n_virtual must be in [1, {n_coils}] (the coil count), got {n_virtual}")
    matrix_c = torch.movedim(data, coil_dim, 0).reshape(n_coils, -1).to(torch.complex128)
    u, s, _ = torch.linalg.svd(matrix_c, full_matrices=False)
    u = _fix_vector_phases(u)
    energy = s**2
    kept = float(energy[:n_virtual].sum() / energy.sum()) if energy.sum() > 0 else 1.0
    compression = u[:, :n_virtual].conj().T
    return CoilCompression(data=apply_coil_matrix(data, compression, coil_dim), matrix=compression.to(data.dtype),
                           energy_kept=kept)


def _fix_vector_phases(u: torch.Tensor) -> torch.Tensor:
    """Singular vectors (columns of ``u``) with each column's largest-magnitude entry made real and
    positive: LAPACK builds may choose the free unit factor differently, and fixing it makes the
    virtual coils (and :func:`principal_coil`'s phase convention) the same on every machine."""
    pivot = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    return u * (pivot.conj() / pivot.abs().clamp_min(torch.finfo(u.real.dtype).tiny))


def principal_coil(coil_images: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """The coil combination ``w`` (``(C,)``, unit norm) that holds the most of the data's energy
    (the first virtual coil of :func:`coil_compress`), with its phase fixed so that the combined
    image ``sum_r w^H x(r)`` sums to a real, positive number.

    It is the phase reference of prepared data (:func:`align_map_phase`): a property of the scan,
    not of its coil basis, so compressed and uncompressed splits, and the same scan with its coils
    in another order or phase, all get the same complex image, whose mean is real and positive.

    Args:
        coil_images: image-domain data with coils on ``coil_dim`` (the sum is over the image).
    """
    w = coil_compress(coil_images, 1, coil_dim).matrix[0].conj().to(torch.complex128)
    moved = torch.movedim(coil_images, coil_dim, -1).reshape(-1, w.shape[0]).to(torch.complex128)
    total = (moved @ w.conj()).sum()
    # An image that sums to 0 has no mean phase to fix: keep coil_compress's convention.
    # (w e^{ia})^H x = e^{-ia} w^H x: rotating w by the phase a of the sum makes the sum real.
    return (w * (total / total.abs()) if total.abs() > 0 else w).to(coil_images.dtype)


def align_map_phase(maps: torch.Tensor, weights: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """Coil maps rotated, pixel by pixel, so that ``sum_c conj(w_c) S_c(r)`` is real and >= 0.

    A SENSE model ``y_c = S_c x`` fixes the maps only up to a phase per pixel (``S e^{i t}`` with
    ``x e^{-i t}`` gives the same data). ESPIRiT (sigpy) picks the first coil's phase, which depends
    on the coil basis (compressed and uncompressed references differ by a phase; a sign for the
    synthetic scans). Rotating every pixel so that the maps' combination with ``w`` is real makes
    the image's phase that of ``w^H y`` whatever the basis, with ``w`` in the maps' basis
    (``matrix @ w`` after :func:`apply_coil_matrix` with a compression ``matrix``). Pixels where
    the combination is exactly 0 (outside ESPIRiT's support) are left unchanged.

    Args:
        maps: complex maps with coils on ``coil_dim`` (``(C, H, W)`` or ``(N, C, H, W)``).
        weights: ``(C,)`` complex coil combination, in the same coil basis as ``maps``.
    """
    moved = torch.movedim(maps, coil_dim, -1)
    if weights.ndim != 1 or weights.shape[0] != moved.shape[-1]:
        raise ValueError(f"weights: expected ({moved.shape[-1]},) for {moved.shape[-1]} coils, got {tuple(weights.shape)}")
    combined = moved @ weights.to(device=maps.device, dtype=maps.dtype).conj()
    magnitude = combined.abs()
    rotation = torch.where(magnitude > 0, combined.conj() / magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny),
                           torch.ones_like(combined))
    return torch.movedim(moved * rotation[..., None], -1, coil_dim)


# ESPIRiT --------------------------------------------------------------------------------------
def espirit_maps(kspace: torch.Tensor, *, calib_width: int = 24, thresh: float = 0.02, kernel_width: int = 6,
                 crop: float = 0.0, max_iter: int = 100, show_progress: bool = False) -> torch.Tensor:
    """ESPIRiT coil maps (one set) of one slice's k-space ``(C, H, W)``: complex64 ``(C, H, W)`` on
    the input's device. A thin wrapper around ``sigpy.mri.app.EspiritCalib`` with METHOD.md's
    defaults (calibration width 24, no crop); every parameter is passed through unchanged."""
    import sigpy.mri  # deferred: sigpy's import is slow and only ESPIRiT needs it here

    if kspace.ndim != 3 or not kspace.is_complex():
        raise ValueError(f"kspace: expected one slice, complex (C, H, W), got {tuple(kspace.shape)} {kspace.dtype}")
    array = kspace.detach().cpu().numpy().astype(np.complex64)
    maps = sigpy.mri.app.EspiritCalib(array, calib_width=calib_width, thresh=thresh, kernel_width=kernel_width,
                                      crop=crop, max_iter=max_iter, show_pbar=show_progress).run()
    return torch.from_numpy(np.asarray(maps, dtype=np.complex64)).to(kspace.device)


# Normalisation --------------------------------------------------------------------------------
def normalization_constant(kspace: torch.Tensor, acs_size: int = 24, percentile: float = 99.0) -> float:
    """The 99th percentile of the RSS image of the central ``24 x 24`` k-space (METHOD.md).

    ``kspace`` is one slice ``(C, H, W)``, complex. The central block is kept in place (the rest
    zeroed) and transformed at full size: a low-resolution image on the full image's scale.
    k-space is divided by the constant so that images have a comparable range across scans.
    """
    if kspace.ndim != 3 or not kspace.is_complex():
        raise ValueError(f"kspace: expected one slice, complex (C, H, W), got {tuple(kspace.shape)} {kspace.dtype}")
    _, h, w = kspace.shape
    if acs_size > min(h, w):
        raise ValueError(f"acs_size {acs_size} exceeds the k-space size {h} x {w}")
    r0, c0 = h // 2 - acs_size // 2, w // 2 - acs_size // 2
    centre = torch.zeros_like(kspace)
    centre[:, r0 : r0 + acs_size, c0 : c0 + acs_size] = kspace[:, r0 : r0 + acs_size, c0 : c0 + acs_size]
    image = rss(ifft2c(centre), coil_dim=0)
    value = float(torch.quantile(image.flatten().double(), percentile / 100.0))
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"normalisation constant is {value}: the k-space centre is empty or not finite")
    return value

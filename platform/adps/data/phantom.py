"""Synthetic multi-coil MRI: brain-like phantoms, birdcage coil maps, correlated coil noise.

Used by the demo and the tests wherever real FastMRI data is not available. Everything is
seeded: the same ``(seed, index)`` always gives the same phantom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adps.mri import SenseOperator, cg_sense, column_mask, further_corrupted_mask, lines_at
from adps.mri.fft import fft2c


def brain_phantom(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth, brain-like complex image ``(height, width)`` (complex64), different per draw.

    A bright skull ring around a tissue ellipse, 6 to 12 random inner ellipses (ventricles,
    lesions), a low-pass texture and a smooth phase. The object fills about 80 % of the field of
    view, leaving empty corners (the noise covariance is estimated there).
    """
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")

    def ellipse(cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
        cos, sin = np.cos(angle), np.sin(angle)
        u = ((xx - cx) * cos + (yy - cy) * sin) / rx
        v = (-(xx - cx) * sin + (yy - cy) * cos) / ry
        return (u**2 + v**2) <= 1.0

    ry, rx = rng.uniform(0.72, 0.82), rng.uniform(0.58, 0.70)
    tilt = rng.uniform(-0.15, 0.15)
    skull = ellipse(0, 0, ry, rx, tilt)
    brain = ellipse(0, 0, ry - 0.06, rx - 0.06, tilt)
    image = 0.9 * skull.astype(np.float64)
    image[brain] = 0.45
    for _ in range(rng.integers(6, 13)):
        cy, cx = rng.uniform(-0.45, 0.45), rng.uniform(-0.35, 0.35)
        region = ellipse(cy, cx, rng.uniform(0.04, 0.22), rng.uniform(0.03, 0.18), rng.uniform(0, np.pi))
        image[region & brain] = rng.uniform(0.1, 1.0)
    # Low-pass texture: white noise filtered in k-space, so it has no sharp edges of its own.
    texture = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((height, width))) * _lowpass(height, width, 0.08)))
    texture /= np.abs(texture).max() + 1e-12
    image = image * (1.0 + 0.15 * texture) * skull
    # Smooth phase, as from B0 inhomogeneity: a random low-order polynomial.
    a = rng.uniform(-1, 1, size=4)
    phase = 0.6 * (a[0] * xx + a[1] * yy + a[2] * xx * yy + a[3] * (xx**2 - yy**2))
    return (image * np.exp(1j * phase)).astype(np.complex64)


def _lowpass(height: int, width: int, cutoff: float) -> np.ndarray:
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    return np.exp(-(fx**2 + fy**2) / (2 * cutoff**2))


def birdcage_maps(n_coils: int, height: int, width: int, *, radius: float = 1.5, normalize: bool = True) -> np.ndarray:
    """Birdcage coil sensitivity maps ``(n_coils, height, width)`` (complex64) from sigpy.

    With ``normalize``, ``sum_c |S_c|^2 = 1`` at every pixel (as ESPIRiT maps inside the object),
    so the SENSE model ``A x`` of an image is consistent with its coil-combined reconstruction.
    """
    import sigpy.mri  # deferred: sigpy's import is slow

    if n_coils < 1:
        raise ValueError(f"n_coils must be >= 1, got {n_coils}")
    maps = sigpy.mri.birdcage_maps((n_coils, height, width), r=radius, nzz=n_coils).astype(np.complex64)
    if normalize:
        maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    return maps


def correlated_noise(shape: tuple[int, ...], covariance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Complex Gaussian noise with coils on axis 0 and inter-coil covariance ``covariance``.

    Draws white noise ``w`` with ``E[w w^H] = I`` and returns ``L w`` for ``covariance = L L^H``.
    """
    n_coils = shape[0]
    if covariance.shape != (n_coils, n_coils):
        raise ValueError(f"covariance: expected shape ({n_coils}, {n_coils}), got {covariance.shape}")
    white = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)
    chol = np.linalg.cholesky(covariance)
    return np.tensordot(chol, white, axes=(1, 0)).astype(np.complex64)


def random_covariance(n_coils: int, rng: np.random.Generator, *, correlation: float = 0.3) -> np.ndarray:
    """A random Hermitian positive-definite coil noise covariance with realistic coupling.

    Coil noise variances vary by a factor of about 2; correlations have magnitude around ``correlation``.
    """
    draw = rng.standard_normal((n_coils, n_coils)) + 1j * rng.standard_normal((n_coils, n_coils))
    mix = np.eye(n_coils) + correlation * draw / np.sqrt(2 * n_coils)
    scale = np.diag(rng.uniform(0.8, 1.2, n_coils))
    cov = scale @ mix @ mix.conj().T @ scale
    return (cov + cov.conj().T) / 2


@dataclass(frozen=True)
class SyntheticSlices:
    """A batch of synthetic multi-coil slices (all torch, complex64)."""

    image: torch.Tensor
    """Ground-truth images ``(N, H, W)``."""
    maps: torch.Tensor
    """Coil maps ``(N, C, H, W)`` (normalised birdcage maps)."""
    kspace: torch.Tensor
    """Fully sampled k-space ``(N, C, H, W)``, noise included."""
    noise_covariance: torch.Tensor
    """The inter-coil covariance ``(C, C)`` of the added noise (zero if noiseless)."""


def synthetic_slices(n_slices: int, *, height: int = 192, width: int = 160, n_coils: int = 8, noise_std: float = 0.0,
                     seed: int = 0) -> SyntheticSlices:
    """``n_slices`` different phantoms ``height x width`` with their ``n_coils`` birdcage maps and
    fully sampled k-space; ``noise_std``: the complex k-space noise per coil before the random
    inter-coil coupling (0: noiseless). ``seed`` seeds every draw.
    """
    rng = np.random.default_rng(seed)
    images = np.stack([brain_phantom(height, width, rng) for _ in range(n_slices)])
    maps = np.broadcast_to(birdcage_maps(n_coils, height, width), (n_slices, n_coils, height, width)).copy()
    image_t, maps_t = torch.from_numpy(images), torch.from_numpy(maps)
    kspace = fft2c(maps_t * image_t[:, None])
    covariance = np.zeros((n_coils, n_coils), dtype=np.complex128)
    if noise_std > 0:
        covariance = noise_std**2 * random_covariance(n_coils, rng)
        noise = correlated_noise((n_coils, n_slices, height, width), covariance, rng)
        kspace = kspace + torch.from_numpy(np.moveaxis(noise, 0, 1))
    return SyntheticSlices(image=image_t, maps=maps_t, kspace=kspace, noise_covariance=torch.from_numpy(covariance))


def synthetic_batch(n: int, coils: int, height: int, width: int, acceleration: float, seed: int, *,
                    acs: int | None = None, noise_std: float = 0.0, with_l1: bool = True,
                    l1_iterations: int = 10) -> dict[str, torch.Tensor]:
    """A batch in the prepared-shard layout, from synthetic phantoms (tests and benchmarks).

    The maps are normalised (``sum_c |S_c|^2 = 1``), so ``reference``, the exact least-squares
    image of the fully sampled k-space, is the phantom itself. Masks come from
    :func:`adps.mri.column_mask` / :func:`~adps.mri.further_corrupted_mask` with
    ``(seed, slice id)``; ``l1`` stands in for the L1-wavelet reconstruction at R with CG-SENSE
    (sigpy's L1 solver is too slow for tests).

    Args:
        n, coils, height, width: batch size, coil count and matrix size.
        acceleration: R of ``mask`` (``mask_further`` is at R + 1).
        seed: seeds the phantoms and the masks; slice ids are ``0 .. n - 1``.
        acs: always-kept central columns; None = METHOD.md's 20, fewer where the width is too
            small for 20 ACS columns at R + 1.
        noise_std: k-space noise of the phantoms (0 = noiseless).
        with_l1, l1_iterations: include ``l1``, computed with this many CG iterations.
    """
    if acs is None:
        acs = min(20, lines_at(width, acceleration + 1))
    data = synthetic_slices(n, height=height, width=width, n_coils=coils, noise_std=noise_std, seed=seed)
    masks = [column_mask(width, acceleration, seed=seed, slice_id=slice_id, acs=acs) for slice_id in range(n)]
    further = [further_corrupted_mask(mask, acceleration, seed=seed, slice_id=slice_id, acs=acs)
               for slice_id, mask in enumerate(masks)]
    batch = {"kspace": data.kspace.to(torch.complex64), "maps": data.maps.to(torch.complex64),
             "reference": data.image.to(torch.complex64), "mask": torch.stack(masks),
             "mask_further": torch.stack(further), "slice_id": torch.from_numpy(np.arange(n, dtype=np.int64))}
    if with_l1:
        op = SenseOperator(batch["maps"], batch["mask"])
        batch["l1"] = cg_sense(op, op.forward(batch["reference"]), iterations=l1_iterations)
    return batch

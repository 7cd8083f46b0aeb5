"""Coil tools: whitening, SVD compression, ESPIRiT, RSS and the normalisation constant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adps.data.phantom import birdcage_maps, brain_phantom, correlated_noise, random_covariance, synthetic_slices
from adps.mri import (
    apply_coil_matrix,
    background_patch,
    coil_compress,
    espirit_maps,
    fft2c,
    ifft2c,
    noise_covariance,
    normalization_constant,
    rss,
    whiten,
    whitening_matrix,
)


def test_whitening_gives_identity_covariance() -> None:
    rng = np.random.default_rng(0)
    coils = 8
    covariance = random_covariance(coils, rng, correlation=0.6)
    noise = torch.from_numpy(correlated_noise((coils, 200, 200), covariance, rng))
    white = whiten(noise, torch.from_numpy(covariance), coil_dim=0)
    # 40,000 samples per coil: entries of the sample covariance are within ~3 / sqrt(40000).
    estimate = noise_covariance(white)
    assert (estimate - torch.eye(coils, dtype=estimate.dtype)).abs().max() < 0.03


def test_covariance_from_background_patch_whitens_the_data() -> None:
    """METHOD.md's recipe: estimate the covariance from a 30 x 30 corner of the coil images."""
    data = synthetic_slices(1, height=128, width=112, n_coils=8, noise_std=0.05, seed=2)
    truth = data.noise_covariance
    patch = background_patch(ifft2c(data.kspace[0]), size=30, corner="top-left")
    estimate = noise_covariance(patch)
    # 900 samples: relative Frobenius error ~ sqrt(C / 900) ~ 0.1
    assert torch.linalg.norm(estimate - truth) / torch.linalg.norm(truth) < 0.2
    # Whitening fresh noise with the estimate gives near-identity covariance.
    rng = np.random.default_rng(9)
    fresh = torch.from_numpy(correlated_noise((8, 150, 150), truth.numpy(), rng))
    white = noise_covariance(whiten(fresh, estimate, coil_dim=0))
    assert (white - torch.eye(8, dtype=white.dtype)).abs().max() < 0.25
    for corner in ("top-right", "bottom-left", "bottom-right"):
        assert background_patch(torch.zeros(2, 40, 50, dtype=torch.complex64), 30, corner).shape == (2, 30, 30)


def test_whitening_matrix_refuses_bad_covariance() -> None:
    with pytest.raises(ValueError, match="not positive definite"):
        whitening_matrix(torch.zeros(3, 3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="square"):
        whitening_matrix(torch.zeros(3, 2, dtype=torch.complex128))
    with pytest.raises(ValueError, match="samples per coil"):
        noise_covariance(torch.zeros(8, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="corner must be"):
        background_patch(torch.zeros(2, 40, 40, dtype=torch.complex64), 30, "middle")


def test_coil_compression_keeps_energy_of_birdcage_data() -> None:
    rng = np.random.default_rng(1)
    image = torch.from_numpy(brain_phantom(192, 160, rng))
    maps = torch.from_numpy(birdcage_maps(12, 192, 160, normalize=False))
    kspace = fft2c(maps * image)
    compressed = coil_compress(kspace, 4, coil_dim=0)
    assert compressed.data.shape == (4, 192, 160)
    kept = float(compressed.data.abs().pow(2).sum() / kspace.abs().pow(2).sum())
    assert kept >= 0.99
    assert kept == pytest.approx(compressed.energy_kept, rel=1e-4)
    # Orthonormal rows: white noise stays white after compression.
    gram = compressed.matrix @ compressed.matrix.conj().T
    torch.testing.assert_close(gram, torch.eye(4, dtype=gram.dtype), rtol=1e-5, atol=1e-5)
    # The same matrix applied to the coil images gives the image of the compressed k-space.
    torch.testing.assert_close(
        apply_coil_matrix(ifft2c(kspace), compressed.matrix, coil_dim=0), ifft2c(compressed.data), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match=r"n_virtual must be in \[1, 12\]"):
        coil_compress(kspace, 13, coil_dim=0)


def test_espirit_maps_are_normalised_inside_the_object() -> None:
    data = synthetic_slices(1, height=96, width=80, n_coils=8, seed=3)
    maps = espirit_maps(data.kspace[0], calib_width=24)
    assert maps.shape == (8, 96, 80) and maps.dtype == torch.complex64
    inside = data.image[0].abs() > 0.2 * data.image[0].abs().max()
    energy = maps.abs().pow(2).sum(0)[inside]
    assert (energy - 1).abs().mean() < 0.02 and (energy - 1).abs().max() < 0.1
    with pytest.raises(ValueError, match=r"one slice, complex \(C, H, W\)"):
        espirit_maps(data.kspace)


def test_rss() -> None:
    coil_images = torch.tensor([[[3 + 0j]], [[0 + 4j]]], dtype=torch.complex64)
    assert rss(coil_images, coil_dim=0).item() == pytest.approx(5.0)


def test_normalization_constant_scales_with_data() -> None:
    data = synthetic_slices(1, height=96, width=80, n_coils=4, seed=4)
    kspace = data.kspace[0]
    constant = normalization_constant(kspace)
    assert constant > 0
    assert normalization_constant(3 * kspace) == pytest.approx(3 * constant, rel=1e-6)
    assert normalization_constant(kspace / constant) == pytest.approx(1.0, rel=1e-6)
    # Only the central 24 x 24 block matters.
    outside = kspace.clone()
    outside[:, :10, :10] += 100
    assert normalization_constant(outside) == pytest.approx(constant, rel=1e-6)
    with pytest.raises(ValueError, match="empty or not finite"):
        normalization_constant(torch.zeros_like(kspace))
    with pytest.raises(ValueError, match="exceeds the k-space size"):
        normalization_constant(kspace[:, :20, :20])

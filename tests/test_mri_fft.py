"""The k-space convention: centred, orthonormal, the same for even and odd sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adps.mri import fft2c, ifft2c
from conftest import random_complex


def shifted_reference(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The textbook definition with explicit shifts (numpy), to check the fast path against."""
    a = x.numpy()
    transform = np.fft.ifft2 if inverse else np.fft.fft2
    out = np.fft.fftshift(transform(np.fft.ifftshift(a, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape", [(3, 8, 6), (2, 384, 320), (2, 7, 9), (1, 6, 5), (4, 10, 4)])
def test_matches_shifted_definition(shape: tuple[int, ...], generator: torch.Generator) -> None:
    x = random_complex(*shape, generator=generator, dtype=torch.complex128)
    torch.testing.assert_close(fft2c(x), shifted_reference(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ifft2c(x), shifted_reference(x, inverse=True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 16, 12), (5, 9, 11)])
def test_unitary(shape: tuple[int, ...], generator: torch.Generator) -> None:
    x = random_complex(*shape, generator=generator)
    k = fft2c(x)
    # Orthonormal: norms preserved, and the inverse is the adjoint.
    torch.testing.assert_close(torch.linalg.vector_norm(k), torch.linalg.vector_norm(x), rtol=1e-5, atol=0)
    torch.testing.assert_close(ifft2c(k), x, rtol=1e-5, atol=1e-5)
    y = random_complex(*shape, generator=generator)
    lhs = torch.vdot(fft2c(x).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), ifft2c(y).flatten())
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_dc_at_centre() -> None:
    constant = torch.ones(1, 8, 6, dtype=torch.complex64)
    k = fft2c(constant)
    assert torch.argmax(k.abs()).item() == 4 * 6 + 3  # index (H // 2, W // 2)
    assert k.abs()[0, 4, 3].item() == pytest.approx(np.sqrt(48), rel=1e-6)
    assert k.abs().sum().item() == pytest.approx(np.sqrt(48), rel=1e-5)


def test_real_input_refused() -> None:
    with pytest.raises(ValueError, match="complex"):
        fft2c(torch.ones(4, 4))
    with pytest.raises(ValueError, match="complex"):
        ifft2c(torch.ones(4, 4))

"""Centred, orthonormal 2-D Fourier transforms: the one k-space convention of the platform.

Convention (used everywhere: operators, data preparation, samplers, tests):

* An image ``x`` and its k-space ``X`` have the same shape ``(..., H, W)``; the last two axes
  are (rows = readout / frequency-encode, columns = phase-encode).
* ``X = fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))``: the DC sample sits at index
  ``(H // 2, W // 2)``, and the image centre at the same index. This is the FastMRI and sigpy
  convention, so k-space read from FastMRI files and sigpy's operators need no reordering.
* ``norm="ortho"`` makes the transform unitary: ``||fft2c(x)|| == ||x||`` and the adjoint is
  the inverse. The SENSE operator's adjointness rests on this.
* Column masks select phase-encode lines, i.e. entries of the last axis.
"""

from __future__ import annotations

import functools

import torch

_DIMS = (-2, -1)


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D DFT over the last two axes (image -> k-space)."""
    _check_complex(image, "fft2c")
    return _centred(torch.fft.fft2, image)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse DFT over the last two axes (k-space -> image)."""
    _check_complex(kspace, "ifft2c")
    return _centred(torch.fft.ifft2, kspace)


def _centred(transform, data: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 (torch.fft function)
    sign = checkerboard(data)
    if sign is None:
        shifted = torch.fft.ifftshift(data, dim=_DIMS)
        return torch.fft.fftshift(transform(shifted, dim=_DIMS, norm="ortho"), dim=_DIMS)
    return transform(data * sign, dim=_DIMS, norm="ortho") * (sign * _corner_sign(data))


def checkerboard(like: torch.Tensor) -> torch.Tensor | None:
    """The ``(-1)^(i + j)`` pattern ``(H, W)`` that replaces the FFT shifts for even sizes.

    For even ``H`` and ``W``, shifting by half the size in both domains is a modulation:
    ``fftshift(fft2(ifftshift(x))) = s * (-1)^(H/2 + W/2) * fft2(s * x)`` with ``s[i, j] =
    (-1)^(i + j)`` (the same holds for the inverse). Two elementwise products cost much less
    than four ``roll`` copies, and in ``A^H A`` the inner signs cancel (see
    :meth:`adps.mri.sense.SenseOperator.normal`). Returns ``None`` for odd sizes, where the
    explicit shifts are used.
    """
    h, w = like.shape[-2:]
    if h % 2 or w % 2:
        return None
    return _checkerboard(h, w, like.device, like.real.dtype if like.is_complex() else like.dtype)


@functools.lru_cache(maxsize=32)
def _checkerboard(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    rows = 1 - 2 * (torch.arange(h, device=device) % 2)
    cols = 1 - 2 * (torch.arange(w, device=device) % 2)
    return (rows[:, None] * cols[None, :]).to(dtype)


def _corner_sign(like: torch.Tensor) -> int:
    h, w = like.shape[-2:]
    return -1 if (h // 2 + w // 2) % 2 else 1


def _check_complex(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_complex():
        raise ValueError(f"{name}: expected a complex tensor (complex64), got dtype {tensor.dtype}")
    if tensor.ndim < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (..., H, W), got shape {tuple(tensor.shape)}")

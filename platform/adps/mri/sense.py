"""The multi-coil SENSE forward model ``A = P F S`` as an operator object.

Shapes (batched over slices ``N``, coils ``C``):

* image ``x``: ``(N, H, W)`` complex
* coil maps ``S``: ``(N, C, H, W)`` complex (any coil count: 4 virtual coils in training,
  16+ physical coils at test time)
* column mask ``P``: ``(W,)`` shared by the batch or ``(N, W)`` one per slice; boolean or 0/1
* k-space ``y``: ``(N, C, H, W)`` complex; unsampled entries are zero

``forward(x) = P F (S x)``, ``adjoint(y) = sum_c conj(S_c) F^-1 (P y_c)`` and
``normal(x) = A^H A x``. The FFT is the centred orthonormal one of :mod:`adps.mri.fft`.
All three are differentiable and run on whatever device the maps live on.
"""

from __future__ import annotations

import torch

from adps.mri.fft import checkerboard, fft2c, ifft2c


class SenseOperator:
    """``A = P F S`` for a batch of slices.

    Args:
        maps: coil sensitivity maps ``(N, C, H, W)``, complex. Not checked for all-zero slices
            here (:func:`check_maps` runs where maps enter: the dataset, reconstruction and
            sampling), since training builds an operator every step, where the check would
            cost a GPU synchronisation each time.
        mask: column mask ``(W,)`` or ``(N, W)``; ``None`` means fully sampled (``P = I``).
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not isinstance(maps, torch.Tensor) or not maps.is_complex():
            got = maps.dtype if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ValueError(f"maps: expected a complex tensor (N, C, H, W), got {got}")
        if maps.ndim != 4:
            raise ValueError(f"maps: expected shape (N, C, H, W), got {tuple(maps.shape)}")
        self.maps = maps
        self.mask = None if mask is None else _broadcast_mask(mask, maps)

    # Shapes -------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.maps.shape[0]

    @property
    def coils(self) -> int:
        return self.maps.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of ``x``: ``(N, H, W)``."""
        n, _, h, w = self.maps.shape
        return (n, h, w)

    @property
    def kspace_shape(self) -> tuple[int, int, int, int]:
        """Shape of ``y``: ``(N, C, H, W)``."""
        return tuple(self.maps.shape)  # type: ignore[return-value]

    def with_mask(self, mask: torch.Tensor | None) -> SenseOperator:
        """The same maps with another column mask (e.g. the further-corrupted ``A~``)."""
        return SenseOperator(self.maps, mask)

    # Operator -----------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``y = P F S x``: image ``(N, H, W)`` -> k-space ``(N, C, H, W)``."""
        self._check(image, self.image_shape, "image")
        return self._apply_mask(fft2c(self.maps * image.unsqueeze(1)))

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """``x = S^H F^-1 P^T y``: k-space ``(N, C, H, W)`` -> image ``(N, H, W)``."""
        self._check(kspace, self.kspace_shape, "kspace")
        coil_images = ifft2c(self._apply_mask(kspace))
        return torch.sum(self.maps.conj() * coil_images, dim=1)

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        """``A^H A x``, the hot path of CG, training and sampling.

        The mask is applied once since ``P^T P = P`` for a 0/1 mask. For even sizes the
        centring signs between the forward and inverse FFT cancel (the mask is elementwise),
        leaving one checkerboard product on each side (see :func:`adps.mri.fft.checkerboard`).
        """
        self._check(image, self.image_shape, "image")
        sign = checkerboard(image)
        if sign is None:
            kspace = self._apply_mask(fft2c(self.maps * image.unsqueeze(1)))
            return torch.sum(self.maps.conj() * ifft2c(kspace), dim=1)
        kspace = self._apply_mask(torch.fft.fft2(self.maps * (image * sign).unsqueeze(1), norm="ortho"))
        return torch.sum(self.maps.conj() * torch.fft.ifft2(kspace, norm="ortho"), dim=1) * sign

    __call__ = forward

    # Helpers ------------------------------------------------------------------------------
    def _apply_mask(self, kspace: torch.Tensor) -> torch.Tensor:
        return kspace if self.mask is None else kspace * self.mask

    def _check(self, tensor: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_complex():
            raise ValueError(f"{name}: expected a complex tensor, got dtype {tensor.dtype}")
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"{name}: expected shape {tuple(expected)} to match the coil maps, got {tuple(tensor.shape)}"
            )


def check_maps(maps: torch.Tensor) -> None:
    """Refuse coil maps ``(N, C, H, W)`` in which some slice's maps are all zero.

    With every sensitivity zero, ``A x = 0`` for every image: the adjoint and CG-SENSE return
    zeros, the MVUE divides zero by zero and a sampler's data term vanishes, all silently. A
    single zero coil is fine (test slices are zero-padded to the split's coil count); only a
    slice with no nonzero map at all is refused. One pass over the maps and, on a GPU, one
    synchronisation: called once per reconstruction or sampling call, not per operator.

    Raises:
        ValueError: naming the batch index (or indices) of the all-zero slices.
    """
    nonzero = (maps != 0).flatten(1).any(dim=1)
    if bool(nonzero.all()):
        return
    zero = [str(i) for i in torch.nonzero(~nonzero).flatten().tolist()]
    which = f"batch item {zero[0]}" if len(zero) == 1 else f"batch items {', '.join(zero)}"
    raise ValueError(
        f"maps: the coil maps of {which} are all zero (every coil sensitivity is 0, so A x = 0 for "
        "any image and the slice cannot be reconstructed)"
    )


def _broadcast_mask(mask: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Validate a 1-D ``(W,)`` or per-slice ``(N, W)`` column mask; return it as ``(N|1, 1, 1, W)``.

    The mask is stored as a real tensor in the maps' real dtype so that multiplying complex
    k-space by it stays complex64 and differentiable.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    n, _, _, w = maps.shape
    if mask.is_complex():
        raise ValueError(f"mask: expected a boolean or 0/1 column mask, got dtype {mask.dtype}")
    if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask: expected a boolean or 0/1 column mask, got other values")
    if mask.ndim == 1:
        if mask.shape[0] != w:
            raise ValueError(f"mask: expected length W={w} (the maps' last axis), got length {mask.shape[0]}")
        mask = mask.view(1, 1, 1, w)
    elif mask.ndim == 2:
        if tuple(mask.shape) != (n, w):
            raise ValueError(f"mask: expected shape (N, W)=({n}, {w}), got {tuple(mask.shape)}")
        mask = mask.view(n, 1, 1, w)
    else:
        raise ValueError(f"mask: expected shape (W,) or (N, W), got {tuple(mask.shape)}")
    real_dtype = maps.real.dtype
    return mask.to(device=maps.device, dtype=real_dtype)

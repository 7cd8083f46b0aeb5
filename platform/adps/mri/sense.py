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

As a :class:`adps.linear_operator.LinearOperator`, a network sees a complex image as ``[Re, Im]``
channels, and an ambient model's training corruption ``A_tr`` is the same maps with a further-corrupted
column mask (:meth:`SenseOperator.corruption`), given as the channels ``[mask, ones]`` (:func:`mask_channels`).
"""

from __future__ import annotations

import torch

from adps.linear_operator import LinearOperator, channels_to_complex, complex_to_channels
from adps.mri.fft import checkerboard, fft2c, ifft2c


class SenseOperator(LinearOperator):
    """``A = P F S`` for a batch of slices.

    Args:
        maps: coil sensitivity maps ``(N, C, H, W)``, complex. Not checked for all-zero slices
            here (:func:`check_maps` runs where maps enter: dataset, reconstruction, sampling):
            training builds an operator every step, and the check costs a GPU synchronisation.
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

    def column_mask(self) -> torch.Tensor:
        """The column mask as ``(N, W)`` bool (all True when fully sampled)."""
        n, _, _, w = self.maps.shape
        if self.mask is None:
            return torch.ones(n, w, dtype=torch.bool, device=self.maps.device)
        return (self.mask.reshape(self.mask.shape[0], -1) != 0).expand(n, w)

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(N, C, H, W)``: the k-space of images ``(N, H, W)`` like the maps'."""
        if tuple(image_shape) != self.image_shape:
            raise ValueError(f"image shape {tuple(image_shape)} does not match the coil maps' {self.image_shape}")
        return self.kspace_shape

    def image_shape_of(self, y: torch.Tensor) -> tuple[int, ...]:
        return self.image_shape

    # The network's view, and the ambient model's corruption ----------------------------------------
    def to_channels(self, x: torch.Tensor) -> torch.Tensor:
        """``[Re, Im]`` channels ``(N, 2, H, W)``."""
        return complex_to_channels(x)

    def from_channels(self, channels: torch.Tensor) -> torch.Tensor:
        return channels_to_complex(channels)

    def start_noise(self, shape: tuple[int, ...], generator: torch.Generator | None,
                    device: torch.device) -> torch.Tensor:
        """Complex noise with independent N(0, 1) real and imaginary parts."""
        return torch.view_as_complex(super().start_noise((*shape, 2), generator, device)).to(torch.complex64)

    def corruption(self, mask: torch.Tensor) -> SenseOperator:
        """``A_tr``: these maps with the column mask ``mask`` ``(N, W)`` (or ``(W,)`` for every slice)."""
        n, _, _, width = self.kspace_shape
        if not isinstance(mask, torch.Tensor) or mask.is_complex() or tuple(mask.shape) not in ((n, width), (width,)):
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"must be a column mask of shape ({n}, {width}) or ({width},), got {got}")
        mask = mask.to(self.maps.device, torch.bool)
        return SenseOperator(self.maps, mask.expand(n, -1) if mask.ndim == 1 else mask)

    def condition(self) -> torch.Tensor:
        """``[mask, ones]`` ``(N, 2, H, W)``: the column mask as an image, and a channel of ones."""
        return mask_channels(self.column_mask(), self.maps.shape[2])

    def prepare(self, y: torch.Tensor, device: torch.device, caller: str) -> tuple[torch.Tensor, SenseOperator]:
        """``y`` checked (complex k-space like the maps), zeroed outside the mask, and moved with
        the maps (complex64) and the mask (``(N, W)`` bool) to ``device``.

        ``where`` rather than a product: a NaN / Inf in an unmeasured column cannot leak in.
        """
        if not isinstance(y, torch.Tensor) or not y.is_complex() or tuple(y.shape) != tuple(self.kspace_shape):
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{caller}: y must be complex k-space of shape {tuple(self.kspace_shape)} "
                             f"(N, C, H, W) like the operator's maps, got {got}")
        check_maps(self.maps)
        mask = self.column_mask().to(device)
        operator = SenseOperator(self.maps.to(device, torch.complex64), mask)
        y = torch.where(mask[:, None, None, :], y.to(device, torch.complex64), y.new_zeros((), dtype=torch.complex64))
        return y, operator

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
            raise ValueError(f"{name}: expected shape {tuple(expected)} to match the coil maps, "
                             f"got {tuple(tensor.shape)}")


def mask_channels(mask: torch.Tensor, height: int) -> torch.Tensor:
    """The ambient conditioning channels ``[mask broadcast over rows, ones]``: ``(N, 2, H, W)``.

    Upstream feeds the further-corrupted column mask as an image (every row the same) plus a
    channel of ones, next to ``[Re, Im]``: 4 input channels in all.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask_channels: expected a per-slice column mask (N, W), got shape {tuple(mask.shape)}")
    rows = mask.to(torch.float32)[:, None, None, :].expand(-1, 1, height, -1)
    return torch.cat([rows, torch.ones_like(rows)], dim=1)


def check_maps(maps: torch.Tensor) -> None:
    """Refuse coil maps ``(N, C, H, W)`` in which some slice's maps are all zero.

    With every sensitivity zero, ``A x = 0``: the adjoint and CG-SENSE return zeros, the MVUE
    divides zero by zero and a sampler's data term vanishes, all silently. A single zero coil is
    fine (test slices are zero-padded to the split's coil count). One pass over the maps and, on a
    GPU, one synchronisation: called once per reconstruction or sampling call, not per operator.

    Raises:
        ValueError: naming the batch index (or indices) of the all-zero slices.
    """
    nonzero = (maps != 0).flatten(1).any(dim=1)
    if bool(nonzero.all()):
        return
    zero = [str(i) for i in torch.nonzero(~nonzero).flatten().tolist()]
    which = f"batch item {zero[0]}" if len(zero) == 1 else f"batch items {', '.join(zero)}"
    raise ValueError(f"maps: the coil maps of {which} are all zero (every coil sensitivity is 0, so A x = 0 for "
                     "any image and the slice cannot be reconstructed)")


def _broadcast_mask(mask: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Validate a 1-D ``(W,)`` or per-slice ``(N, W)`` column mask; return it as ``(N|1, 1, 1, W)``
    in the maps' real dtype, so that multiplying complex k-space by it stays complex64 and differentiable."""
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
    return mask.to(device=maps.device, dtype=maps.real.dtype)

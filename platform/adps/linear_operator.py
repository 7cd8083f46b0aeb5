"""The one interface of the study's measurement operators: what samplers and reconstructions use.

Both studies solve ``y = A x (+ noise)`` with a diffusion prior on ``x``: the multi-coil MRI study with the
SENSE operator (:class:`adps.mri.SenseOperator`, complex images ``(N, H, W)``) and the natural-image study with
the operators of :mod:`adps.images` (real images ``(N, C, H, W)``). Every operator implements
:class:`LinearOperator`, so one set of samplers (:mod:`adps.nn.samplers`), one validation function and one
evaluation serve both. An operator gives the physics (``A``, ``A^H``, ``A^H A``, shapes), the network's view
of an image (complex MRI images as ``[Re, Im]`` channels, real images as they are), what an ambient model
needs to build its input (``(to_channels(A_tr^H A_tr x), A_tr.condition())``, for MRI and images alike) and
the checking of a measurement (:meth:`~LinearOperator.prepare`).

Layer 1: plain torch, no network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class LinearOperator(ABC):
    """A linear measurement operator ``A`` on a batch of images."""

    # The physics ------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """``y = A x``."""

    @abstractmethod
    def adjoint(self, y: Tensor) -> Tensor:
        """``A^H y``, an image batch."""

    def normal(self, x: Tensor) -> Tensor:
        """``A^H A x``; operators with a cheaper fused form override it."""
        return self.adjoint(self.forward(x))

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    @abstractmethod
    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``y = A x`` for images of shape ``image_shape``."""

    def image_shape_of(self, y: Tensor) -> tuple[int, ...]:
        """Shape of the images that measurements ``y`` measure (that of ``A^H y``)."""
        return tuple(self.adjoint(y).shape)

    # The network's view of an image ------------------------------------------------------------
    def to_channels(self, x: Tensor) -> Tensor:
        """An image batch as a network takes it, real ``(N, c, H, W)``: real images as they are."""
        return x

    def from_channels(self, channels: Tensor) -> Tensor:
        """A network's output back to an image batch (float32 or wider, whatever autocast did)."""
        return channels if channels.dtype in (torch.float32, torch.float64) else channels.float()

    def start_noise(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Standard normal images of ``shape`` (a sampler's start ``x = sigma_max n``), drawn from ``generator``
        on its own device and moved to ``device``."""
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device).to(device)

    # What an ambient model needs ----------------------------------------------------------------
    def corruption(self, mask: Tensor) -> LinearOperator:
        """The training corruption ``A_tr`` with ``mask`` on this operator's image space (the further-corrupted
        mask an ambient model was trained on, drawn afresh for sampling)."""
        raise NotImplementedError(f"{type(self).__name__} defines no ambient training corruption")

    def condition(self) -> Tensor:
        """The mask channels an ambient network is given next to ``to_channels(A^H A x)`` when
        this operator is its corruption ``A~`` (only corruption operators define them)."""
        raise NotImplementedError(f"{type(self).__name__} is not an ambient model's training corruption")

    # Checking a measurement ---------------------------------------------------------------------
    @abstractmethod
    def prepare(self, y: Tensor, device: torch.device, caller: str) -> tuple[Tensor, LinearOperator]:
        """``y`` checked against this operator and moved with it to ``device`` (errors name
        ``caller``); the measurement and the operator a reconstruction then works with."""


def complex_to_channels(image: Tensor) -> Tensor:
    """Complex ``(N, H, W)`` -> real ``(N, 2, H, W)`` with channels ``[Re, Im]``."""
    if not image.is_complex() or image.ndim != 3:
        raise ValueError(f"expected a complex image batch (N, H, W), got {tuple(image.shape)} {image.dtype}")
    return torch.stack([image.real, image.imag], dim=1)


def channels_to_complex(channels: Tensor) -> Tensor:
    """Real ``(N, 2, H, W)`` ``[Re, Im]`` -> complex ``(N, H, W)``, in float32 or wider: network outputs under
    autocast are cast up so that the complex result (and every FFT after it) is complex64."""
    if channels.is_complex() or channels.ndim != 4 or channels.shape[1] != 2:
        raise ValueError(f"expected real channels (N, 2, H, W), got {tuple(channels.shape)} {channels.dtype}")
    if channels.dtype not in (torch.float32, torch.float64):
        channels = channels.to(torch.float32)
    return torch.complex(channels[:, 0], channels[:, 1])

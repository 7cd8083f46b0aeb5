"""EDM preconditioning: the denoiser ``D`` built around a raw network ``F``.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Table 1 ("Preconditioning", column EDM) and eq. (7)::

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4

They make the network's input and its training target unit-variance at every noise level
(for data of standard deviation ``sigma_data``), and ``c_skip`` lets ``D`` pass ``x``
through at low noise, where ``x`` already is the answer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["EDMCoefficients", "EDMPrecond", "edm_coefficients"]


class EDMCoefficients(NamedTuple):
    """The four EDM preconditioning coefficients, each with the shape of ``sigma``."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_coefficients(sigma: Tensor | float, sigma_data: float = 0.5) -> EDMCoefficients:
    """EDM's preconditioning coefficients (Karras et al. 2022, Table 1), ``(c_skip, c_out, c_in, c_noise)``
    shaped like ``sigma``: noise level(s) > 0, a float or a tensor of any shape (floating tensors keep their
    dtype, use float64 for exact checks; anything else becomes float32). ``sigma_data``: standard deviation of
    the data (0.5 in EDM and in the MRI reference)."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    # Not checked inside torch.compile: reading the flag back would split the compiled graph.
    if not torch.compiler.is_compiling() and bool((sigma <= 0).any()):
        raise ValueError("edm_coefficients: sigma must be > 0 (c_noise = ln(sigma) / 4)")
    var = sigma**2 + sigma_data**2  # variance of the noisy input x + sigma n
    c_skip = sigma_data**2 / var  # Table 1: sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out = sigma * sigma_data / var.sqrt()  # Table 1: sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / var.sqrt()  # Table 1: 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = sigma.log() / 4  # Table 1: ln(sigma) / 4
    return EDMCoefficients(c_skip, c_out, c_in, c_noise)


class EDMPrecond(nn.Module):
    """Denoiser ``D(x, sigma, cond)`` = EDM preconditioning around a raw network.

    ``x`` holds the image channels ([Re, Im]); ``cond`` optional extra input channels (for the ambient model the
    further-corrupted mask channels). The network sees ``cat([c_in * x, cond])`` and the skip connection acts on
    the image channels only: ``D = c_skip * x + c_out * F[:, :image_channels]``. Any extra output channels of
    the network (the reference ambient net has 4 outputs, of which its loss keeps the first 2) are ignored.

    ``scale_cond``: whether ``cond`` is scaled by ``c_in`` like the image channels. The reference code concatenates
    the mask channels before preconditioning and so scales all four inputs by ``c_in``; the platform's ambient models
    do the same by default (``TrainConfig.scale_cond``, :func:`adps.nn.train_step.build_model`). ``False`` keeps the
    mask at its own scale whatever sigma (it is a mask, not a noisy image); the same weights give outputs up to 45 %
    apart at sigma 2.5 under the two settings, so a checkpoint records which one it was trained with (checkpoints
    written before the key existed were trained with ``False``).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, image_channels: int = 2, scale_cond: bool = False):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.image_channels = int(image_channels)
        self.scale_cond = bool(scale_cond)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None,
                class_labels: Tensor | None = None) -> Tensor:
        """The float32 estimate of the clean image, ``(N, image_channels, H, W)`` like the noisy ``x``, at noise
        level ``sigma`` (a float, a scalar, ``(N,)`` or ``(N, 1, 1, 1)``); ``cond``: extra input channels
        ``(N, C_cond, H, W)`` or None; ``class_labels``: passed through to the network."""
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"expected x of shape (N, {self.image_channels}, H, W), got {tuple(x.shape)}")
        # Coefficients and the skip sum in float32 even under autocast, as in EDM: at low
        # sigma D is almost exactly x, and half precision would throw that accuracy away.
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        elif sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} values for a batch of {x.shape[0]}")
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)

        net_in = c_in * x
        if cond is not None:
            cond = cond.to(torch.float32)
            net_in = torch.cat([net_in, c_in * cond if self.scale_cond else cond], dim=1)
        f_x = self.net(net_in, c_noise.flatten(), class_labels)
        if f_x.shape[1] < self.image_channels:
            raise ValueError(f"network returned {f_x.shape[1]} channels, fewer than {self.image_channels}")
        return c_skip * x + c_out * f_x[:, : self.image_channels].to(torch.float32)

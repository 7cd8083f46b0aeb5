"""MoDL: model-based deep learning for MRI (Aggarwal, Mani & Jacob 2019), the supervised (MoDL) and
self-supervised (SSDU) end-to-end baselines of the study.

The reconstruction alternates ``K`` times between a CNN denoiser ``D_w`` (one set of weights shared by every
unroll) and a data-consistency step that solves, by batched conjugate gradient,

    (A^H A + lambda I) x_{k+1} = A^H y + lambda D_w(x_k),        x_0 = A^H y

with a learnable ``lambda > 0`` (METHOD.md: K = 6 unrolls, 6 CG steps). CG is the differentiable, batched
:func:`adps.mri.conjugate_gradient`, so the loss back-propagates through every CG iteration into ``lambda`` and
the denoiser (MoDL's "exact" gradient rather than a fixed-point approximation).

Choices: the denoiser is a plain residual CNN ``x + N_w(x)`` (3x3 convs + ReLU) without MoDL's batch
normalisation, so that a slice's reconstruction never depends on the other slices of its batch and train/eval
behave the same; ``lambda = exp(log_lambda)`` keeps it positive (upstream trains ``lambda`` unconstrained and
relies on it staying positive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adps.config import ConfigFile, from_preset
from adps.mri import SenseOperator, conjugate_gradient

from .objectives import channels_to_complex, complex_to_channels

__all__ = ["MODL_PRESETS", "MoDL", "MoDLConfig", "ResidualDenoiser", "build_modl"]


@dataclass(frozen=True)
class MoDLConfig(ConfigFile):
    """Every hyper-parameter of :class:`MoDL` (defaults: the ``modl`` preset)."""

    unrolls: int = 6
    """``K``: denoiser + data-consistency iterations (METHOD.md: 6)."""
    cg_iterations: int = 6
    """CG iterations per data-consistency step (METHOD.md: 6)."""
    features: int = 64
    """Channels of the denoiser's hidden convolutions (MoDL: 64)."""
    depth: int = 5
    """Convolution layers of the denoiser (MoDL: 5)."""
    lambda_init: float = 0.05
    """Initial regularisation weight ``lambda`` (MoDL / SSDU initialise it at 0.05)."""

    def __post_init__(self) -> None:
        if self.unrolls < 1 or self.cg_iterations < 1:
            raise ValueError("MoDLConfig: unrolls and cg_iterations must be >= 1")
        if self.depth < 2 or self.features < 1:
            raise ValueError("MoDLConfig: depth must be >= 2 and features >= 1")
        if not self.lambda_init > 0:
            raise ValueError(f"MoDLConfig: lambda_init must be > 0, got {self.lambda_init}")


MODL_PRESETS: dict[str, MoDLConfig] = {"modl": MoDLConfig(),
                                       "tiny": MoDLConfig(unrolls=2, cg_iterations=3, features=8, depth=3)}


def build_modl(preset: str, **overrides: Any) -> MoDL:
    """Build a :class:`MoDL` from a named preset with any field overridden."""
    return MoDL(from_preset(MODL_PRESETS, preset, "MoDL", **overrides))


class ResidualDenoiser(nn.Module):
    """``D(x) = x + N(x)`` on ``[Re, Im]`` channels; ``N``: ``depth`` 3x3 convs with ReLU between."""

    def __init__(self, features: int, depth: int, channels: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for _ in range(depth - 1):
            layers += [nn.Conv2d(cin, features, 3, padding=1), nn.ReLU()]
            cin = features
        layers.append(nn.Conv2d(cin, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor) -> Tensor:
        """Complex ``(N, H, W)`` -> complex ``(N, H, W)``."""
        x = complex_to_channels(image)
        return channels_to_complex(x + self.net(x).float())


class MoDL(nn.Module):
    """Unrolled MoDL reconstruction ``x = MoDL(y, S, mask)``: ``forward(kspace, maps, mask)`` takes undersampled
    k-space ``(N, C, H, W)`` (only columns in ``mask`` are used), coil maps ``(N, C, H, W)`` and a column mask
    ``(N, W)`` or ``(W,)``, and returns the complex image ``(N, H, W)``."""

    def __init__(self, config: MoDLConfig):
        super().__init__()
        self.config = config
        self.denoiser = ResidualDenoiser(config.features, config.depth)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(config.lambda_init)))

    @property
    def lam(self) -> Tensor:
        """The regularisation weight ``lambda = exp(log_lambda) > 0``."""
        return self.log_lambda.exp()

    def data_consistency(self, op: SenseOperator, rhs_data: Tensor, prior: Tensor,
                         iterations: int | None = None) -> Tensor:
        """Solve ``(A^H A + lambda I) x = A^H y + lambda z`` by ``iterations`` CG steps from 0 (default
        ``config.cg_iterations``), with ``op`` the SENSE operator ``A`` (its mask is the sampling pattern),
        ``rhs_data`` ``A^H y`` and ``prior`` ``z`` (the denoiser's output), both complex ``(N, H, W)``."""
        lam = self.lam.to(rhs_data.real.dtype)
        # FFTs and CG in full precision even under autocast: CG's recurrences lose orthogonality quickly in half.
        with torch.autocast(device_type=rhs_data.device.type, enabled=False):
            return conjugate_gradient(lambda x: op.normal(x) + lam * x, rhs_data + lam * prior,
                                      iterations=self.config.cg_iterations if iterations is None else iterations)

    def forward(self, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        op = SenseOperator(maps, mask)
        rhs_data = op.adjoint(kspace)  # A^H y (the adjoint applies the mask)
        x = rhs_data
        for _ in range(self.config.unrolls):
            x = self.data_consistency(op, rhs_data, self.denoiser(x))
        return x

"""Exact denoisers of a Gaussian prior: the oracles the posterior samplers are tested and
benchmarked with (``tests/test_samplers.py``, ``bench/fewer_calls.py``).

For a prior ``x0 ~ CN(mu, s^2 I)`` (independent N(mu, s^2) real and imaginary parts) the
conditional mean ``E[x0 | x0 + sigma n]`` is closed form, and so is the ambient one
``E[x0 | A_tr (x0 + sigma n)]`` (a small dense pseudo-inverse). With them a sampler's result
depends only on the sampler: no network is learned, so what a test or a benchmark sees is the
loop itself (its steps, its solver, its guidance).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adps.mri import SenseOperator

__all__ = ["AmbientGaussianDenoiser", "GaussianDenoiser"]


class GaussianDenoiser(nn.Module):
    """``D(x, sigma) = E[x0 | x0 + sigma n] = mu + s^2 / (s^2 + sigma^2) (x - mu)`` per channel
    for ``x0 ~ CN(mu, s^2 I)``; called as an EDMPrecond prior, ``D(x (N, 2, H, W), sigma)``."""

    def __init__(self, mean: Tensor, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.stack([mean.real, mean.imag], dim=1))
        self.var = std**2

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            raise ValueError("GaussianDenoiser is a prior: it takes no conditioning channels")
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.mean + self.var / (self.var + sigma**2) * (x - self.mean)


class AmbientGaussianDenoiser(nn.Module):
    """The exact ambient denoiser ``E[x0 | A_tr x_t]`` for ``x0 ~ CN(mu, s^2 I)``, called as the
    ambient network: ``D([Re, Im](A_tr^H A_tr x_t), sigma, cond=[mask_tr, ones])``.

    With ``M = A_tr^H A_tr`` and ``u = M x_t`` (``x_t = x0 + sigma n``), jointly Gaussian
    algebra gives ``E[x0 | A_tr x_t] = mu + s^2 / (s^2 + sigma^2) M^+ (u - M mu)``: the
    Wiener shrinkage of ``x_t - mu`` on the row space of ``A_tr``, the prior mean elsewhere.
    ``M`` is built densely per slice from the mask in ``cond`` (``(H W)^2`` entries: small
    images only, 192 x 192 for 16 x 12).
    """

    def __init__(self, mean: Tensor, std: float, maps: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.to(torch.complex128))
        self.maps = maps
        self.var = std**2
        self.cache: dict[bytes, tuple[Tensor, Tensor]] = {}

    def _matrices(self, i: int, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(M, M^+)`` of slice ``i`` with column mask ``mask``."""
        key = bytes([i]) + mask.numpy().tobytes()
        if key not in self.cache:
            h, w = self.maps.shape[-2:]
            eye = torch.eye(h * w, dtype=torch.complex128).reshape(h * w, h, w)
            op = SenseOperator(self.maps[i : i + 1].to(torch.complex128).expand(h * w, -1, -1, -1), mask)
            normal = op.normal(eye).reshape(h * w, h * w).T  # column j = M e_j
            self.cache[key] = normal, torch.linalg.pinv(normal, hermitian=True, rtol=1e-8)
        return self.cache[key]

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        n, _, h, w = x.shape
        masks = cond[:, 0, 0, :] > 0.5
        u = torch.complex(x[:, 0], x[:, 1]).to(torch.complex128).reshape(n, -1)
        mean = self.mean.expand(n, h, w).reshape(n, -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        out = []
        for i in range(n):
            normal, pinv = self._matrices(i, masks[i])
            shrink = self.var / (self.var + sigma[i] ** 2)
            out.append(mean[i] + shrink * (pinv @ (u[i] - normal @ mean[i])))
        est = torch.stack(out).reshape(n, h, w)
        return torch.stack([est.real, est.imag], dim=1).to(torch.float32)

"""Image-quality metrics on magnitude images, as METHOD.md defines them.

All functions take a ground truth and an estimate of shape ``(N, H, W)`` (complex or real; complex inputs are
reduced to magnitude first) and return one value per slice, shape ``(N,)``. They are batched torch code, so they
run on the GPU next to the sampler.

* NRMSE = ``|| |gt| - |x| ||_2 / || |gt| ||_2``
* complex NRMSE = ``|| gt - x ||_2 / || gt ||_2`` on the complex values (:func:`complex_nrmse`): not a metric of
  the paper, but the one that sees a phase error, which magnitudes hide
* PSNR  = ``20 log10( max|gt| / sqrt(mean((|gt| - |x|)^2)) )``
* SSIM: 7 x 7 uniform window, K1 0.01, K2 0.03, data range ``max|gt| - min|gt|``, sample covariances and the
  mean over the valid (uncropped-window) region: the defaults of ``skimage.metrics.structural_similarity``,
  which the tests check against.

For the natural-image study (RGB ``(N, 3, H, W)`` in ``[-1, 1]``, not magnitudes): :func:`rgb_mse`. For K posterior
samples per slice: :func:`posterior_summary` (mean, spread, calibration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def magnitude(image: torch.Tensor) -> torch.Tensor:
    """``|x|`` as a real float tensor (complex or real input)."""
    magnitude_image = image.abs()
    return magnitude_image if magnitude_image.is_floating_point() else magnitude_image.float()


def _pair(gt: torch.Tensor, estimate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if gt.shape != estimate.shape:
        raise ValueError(f"ground truth shape {tuple(gt.shape)} does not match estimate shape {tuple(estimate.shape)}")
    if gt.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), got {tuple(gt.shape)}")
    # float64 so that metrics of near-perfect reconstructions are not rounding noise.
    return magnitude(gt).double(), magnitude(estimate).double()


def nrmse(gt: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Normalised root-mean-square error per slice."""
    g, x = _pair(gt, estimate)
    return torch.linalg.vector_norm(g - x, dim=(1, 2)) / torch.linalg.vector_norm(g, dim=(1, 2))


def complex_nrmse(gt: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """NRMSE per slice of the complex images themselves, ``||gt - x|| / ||gt||``: unlike :func:`nrmse` it sees a
    wrong phase (``x = -gt`` scores 2, not 0)."""
    if gt.shape != estimate.shape:
        raise ValueError(f"ground truth shape {tuple(gt.shape)} does not match estimate shape {tuple(estimate.shape)}")
    if gt.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), got {tuple(gt.shape)}")
    g, x = gt.to(torch.complex128), estimate.to(gt.device, torch.complex128)
    return torch.linalg.vector_norm(g - x, dim=(1, 2)) / torch.linalg.vector_norm(g, dim=(1, 2))


def psnr(gt: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per slice, in dB, with the peak ``max |gt|``."""
    g, x = _pair(gt, estimate)
    mse = torch.mean((g - x) ** 2, dim=(1, 2))
    peak = g.amax(dim=(1, 2))
    return 20 * torch.log10(peak / torch.sqrt(mse))


def ssim(gt: torch.Tensor, estimate: torch.Tensor, *, window: int = 7, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per slice (uniform window, sample covariances, valid region)."""
    g, x = _pair(gt, estimate)
    data_range = (g.amax(dim=(1, 2)) - g.amin(dim=(1, 2))).view(-1, 1, 1, 1)
    g, x = g.unsqueeze(1), x.unsqueeze(1)

    def mean(t: torch.Tensor) -> torch.Tensor:
        # No padding: only windows that fit inside the image, which is exactly the region
        # skimage averages over after cropping (window - 1) // 2 pixels at each border.
        return F.avg_pool2d(t, window, stride=1)

    n_px = window * window
    cov_norm = n_px / (n_px - 1)  # sample (unbiased) covariance, as skimage's default
    mu_g, mu_x = mean(g), mean(x)
    var_g = cov_norm * (mean(g * g) - mu_g**2)
    var_x = cov_norm * (mean(x * x) - mu_x**2)
    cov = cov_norm * (mean(g * x) - mu_g * mu_x)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_g * mu_x + c1) * (2 * cov + c2)) / ((mu_g**2 + mu_x**2 + c1) * (var_g + var_x + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def image_metrics(gt: torch.Tensor, estimate: torch.Tensor) -> dict[str, torch.Tensor]:
    """NRMSE, PSNR and SSIM per slice, in one dict."""
    return {"nrmse": nrmse(gt, estimate), "psnr": psnr(gt, estimate), "ssim": ssim(gt, estimate)}


def posterior_summary(samples: torch.Tensor, reference: torch.Tensor | None = None,
                      *, width: float = 2.0) -> dict[str, torch.Tensor]:
    """Summarise ``K`` posterior samples per slice: their mean, spread and calibration.

    Args:
        samples: ``(K, N, H, W)`` complex (or real) samples, ``K >= 2``.
        reference: the ground truth ``(N, H, W)``; needed for ``calibration``.
        width: the calibration's interval half-width in standard deviations.

    Returns:
        ``mean``: the posterior mean ``(N, H, W)`` (complex; its magnitude is what the metrics score); ``std``:
        the pixel-wise standard deviation of the samples' magnitudes ``(N, H, W)`` (unbiased, over K), on the
        metrics' magnitude scale; with ``reference`` also ``calibration`` ``(N,)``: the fraction of pixels whose
        error ``| |mean| - |gt| |`` lies within ``width`` standard deviations. For a sampler that draws from the
        true posterior (and a truth that could be drawn from it), about 95 % at ``width`` 2 when the magnitude is
        far from 0 (it is then nearly Gaussian); lower means over-confident, higher under-.
    """
    if samples.ndim != 4 or samples.shape[0] < 2:
        raise ValueError(f"posterior_summary: expected (K >= 2, N, H, W) samples, got {tuple(samples.shape)}")
    mean = samples.mean(dim=0)
    std = magnitude(samples).double().std(dim=0, unbiased=True)
    summary = {"mean": mean, "std": std}
    if reference is not None:
        g, x = _pair(reference, mean)
        summary["calibration"] = ((g - x).abs() <= width * std).double().mean(dim=(1, 2))
    return summary


def rgb_mse(gt: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, ``(N,)`` float64, of real RGB images ``(N, 3, H, W)`` in ``[-1, 1]`` on the
    ``[0, 1]`` scale (``mean(((x - gt) / 2)^2)``): the natural-image study's MSE (paper section 3.1)."""
    if gt.shape != estimate.shape:
        raise ValueError(f"ground truth shape {tuple(gt.shape)} does not match estimate shape {tuple(estimate.shape)}")
    if gt.ndim != 4 or gt.shape[1] != 3 or gt.is_complex() or estimate.is_complex():
        raise ValueError(f"expected real RGB images of shape (N, 3, H, W), got {tuple(gt.shape)} {gt.dtype}")
    return ((estimate.double() - gt.double()) / 2).square().mean(dim=(1, 2, 3))

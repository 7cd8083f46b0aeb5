"""Metrics as METHOD.md defines them, checked against scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from adps.data.phantom import brain_phantom
from adps.metrics import image_metrics, nrmse, psnr, ssim


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(np.stack([brain_phantom(64, 48, rng) for _ in range(3)]))
    noise = torch.from_numpy((rng.standard_normal(gt.shape) + 1j * rng.standard_normal(gt.shape)).astype(np.complex64))
    return gt, gt + 0.05 * noise


def test_against_skimage(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    gt, estimate = pair
    ours = image_metrics(gt, estimate)
    for i in range(gt.shape[0]):
        g, x = gt[i].abs().double().numpy(), estimate[i].abs().double().numpy()
        assert ours["nrmse"][i].item() == pytest.approx(normalized_root_mse(g, x, normalization="euclidean"), rel=1e-9)
        assert ours["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(g, x, data_range=g.max()), rel=1e-9)
        expected_ssim = structural_similarity(g, x, win_size=7, K1=0.01, K2=0.03, data_range=g.max() - g.min())
        assert ours["ssim"][i].item() == pytest.approx(expected_ssim, rel=1e-7)


def test_perfect_and_worse(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    gt, estimate = pair
    assert torch.all(nrmse(gt, gt) == 0)
    assert torch.allclose(ssim(gt, gt), torch.ones(3, dtype=torch.float64))
    worse = gt + 2 * (estimate - gt)
    assert torch.all(psnr(gt, worse) < psnr(gt, estimate))
    assert torch.all(ssim(gt, worse) < ssim(gt, estimate))


def test_real_inputs_and_bad_shapes(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    gt, estimate = pair
    torch.testing.assert_close(nrmse(gt.abs(), estimate.abs()), nrmse(gt, estimate))
    with pytest.raises(ValueError, match="does not match"):
        nrmse(gt, estimate[:2])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        psnr(gt[0], estimate[0])

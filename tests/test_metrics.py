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


def test_tiny_examples_by_hand_and_against_skimage() -> None:
    # NRMSE and PSNR on a 2 x 2 image: ||gt|| = 5, the error is a single 1 in four pixels.
    gt = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]], dtype=torch.float64)
    estimate = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]], dtype=torch.float64)
    assert nrmse(gt, estimate).item() == pytest.approx(1 / 5, rel=1e-12)
    # peak 4, mse 1/4, rmse 1/2: 20 log10(4 / 0.5) = 20 log10(8)
    assert psnr(gt, estimate).item() == pytest.approx(20 * np.log10(8), rel=1e-12)
    g, x = gt[0].numpy(), estimate[0].numpy()
    assert nrmse(gt, estimate).item() == pytest.approx(normalized_root_mse(g, x, normalization="euclidean"), rel=1e-12)
    assert psnr(gt, estimate).item() == pytest.approx(peak_signal_noise_ratio(g, x, data_range=g.max()), rel=1e-12)

    # SSIM on a 7 x 7 image (exactly one 7 x 7 window): gt = 0..48, estimate = 2 gt, so
    # mu_x = 2 mu, var_x = 4 var, cov = 2 var with mu = 24 and the sample variance of 0..48,
    # var = 49 * 50 / 12; data range 48 gives C1 = (0.01 * 48)^2 and C2 = (0.03 * 48)^2.
    gt7 = torch.arange(49, dtype=torch.float64).reshape(1, 7, 7)
    mu, var = 24.0, 49 * 50 / 12
    c1, c2 = (0.01 * 48) ** 2, (0.03 * 48) ** 2
    by_hand = (2 * mu * 2 * mu + c1) * (2 * 2 * var + c2) / ((mu**2 + 4 * mu**2 + c1) * (var + 4 * var + c2))
    assert ssim(gt7, 2 * gt7).item() == pytest.approx(by_hand, rel=1e-12)
    g7 = gt7[0].numpy()
    expected = structural_similarity(g7, 2 * g7, win_size=7, K1=0.01, K2=0.03, data_range=g7.max() - g7.min())
    assert ssim(gt7, 2 * gt7).item() == pytest.approx(expected, rel=1e-10)

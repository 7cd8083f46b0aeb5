"""Tests of adps.nn.objectives: EDM, ambient (k-space form), MoDL, SSDU and NCSNv2 losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from adps.mri import SenseOperator, slice_masks
from adps.nn import (
    EDMPrecond,
    ambient_loss,
    ambient_network_input,
    build_unet,
    channels_to_complex,
    complex_to_channels,
    dsm_loss,
    edm_coefficients,
    edm_loss,
    edm_weight,
    mask_channels,
    modl_loss,
    ncsn_sigmas,
    sample_noise,
    sample_sigma,
    ssdu_loss,
    ssdu_split,
)
from conftest import random_complex

# Small tensors: one intra-op thread is faster and immune to busy neighbours (see conftest).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class ToyDenoiser(nn.Module):
    """A deterministic, nonlinear, mask-aware stand-in for the network: D(x, sigma, cond)."""

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        out = torch.tanh(x) / (1 + sigma.view(-1, 1, 1, 1)) + 0.1 * x.roll(1, dims=-1)
        if cond is not None:
            out = out * (1 + 0.5 * cond[:, :1])
        return out


def _slices(n: int, coils: int, height: int, width: int, r: float, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maps = random_complex(n, coils, height, width, generator=gen) * 0.5
    image = random_complex(n, height, width, generator=gen) * 0.5
    pairs = [slice_masks(width, r, seed=seed, slice_id=i, acs=4) for i in range(n)]
    return {
        "maps": maps,
        "image": image,
        "mask": torch.stack([p[0] for p in pairs]),
        "mask_further": torch.stack([p[1] for p in pairs]),
        "sigma": torch.tensor([0.05, 1.7, 12.0][:n]),
        "noise": sample_noise(image, gen),
    }


# ------------------------------------------------------------------------------ layout and EDM


def test_channel_layout_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    image = random_complex(2, 4, 6, generator=gen)
    channels = complex_to_channels(image)
    assert channels.shape == (2, 2, 4, 6)
    assert torch.equal(channels[:, 0], image.real) and torch.equal(channels[:, 1], image.imag)
    assert torch.equal(channels_to_complex(channels), image)
    # Half-precision network outputs come back as complex64, not complex32.
    assert channels_to_complex(channels.to(torch.bfloat16)).dtype == torch.complex64


def test_sample_sigma_is_log_normal_and_reproducible() -> None:
    sigma = sample_sigma(40_000, torch.Generator().manual_seed(0))
    assert sigma.shape == (40_000,) and bool((sigma > 0).all())
    assert float(sigma.log().mean()) == pytest.approx(-1.2, abs=0.03)
    assert float(sigma.log().std()) == pytest.approx(1.2, abs=0.03)
    again = sample_sigma(40_000, torch.Generator().manual_seed(0))
    assert torch.equal(sigma, again)
    other = sample_sigma(1000, torch.Generator().manual_seed(0), p_mean=0.0, p_std=0.1)
    assert float(other.log().mean()) == pytest.approx(0.0, abs=0.02)


def test_edm_weight_is_one_over_c_out_squared() -> None:
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    expected = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    torch.testing.assert_close(edm_weight(sigma), expected)
    # The weight that makes the raw network's effective target unit-weighted (EDM eq. 8).
    torch.testing.assert_close(edm_weight(sigma), 1 / edm_coefficients(sigma, 0.5).c_out ** 2)


def test_sample_noise_has_unit_variance_real_and_imaginary_parts() -> None:
    noise = sample_noise(torch.zeros(4, 64, 64, dtype=torch.complex64), torch.Generator().manual_seed(1))
    assert noise.dtype == torch.complex64
    assert float(noise.real.var()) == pytest.approx(1.0, abs=0.03)
    assert float(noise.imag.var()) == pytest.approx(1.0, abs=0.03)
    assert abs(float((noise.real * noise.imag).mean())) < 0.02


def test_edm_loss_matches_hand_computation_and_vanishes_for_an_oracle() -> None:
    data = _slices(3, 2, 8, 12, 2, seed=0)
    x, sigma, noise = data["image"], data["sigma"], data["noise"]
    toy = ToyDenoiser()
    loss = edm_loss(toy, x, sigma, noise)
    x_ch = torch.stack([x.real, x.imag], 1)
    n_ch = torch.stack([noise.real, noise.imag], 1)
    d = toy(x_ch + sigma.view(-1, 1, 1, 1) * n_ch, sigma)
    weight = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    expected = (weight * ((d - x_ch) ** 2).sum(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)
    assert edm_loss(toy, x, sigma, noise, reduce=False).shape == (3,)

    def oracle(noisy: Tensor, s: Tensor) -> Tensor:  # knows the noise: returns x exactly
        return noisy - s.view(-1, 1, 1, 1) * n_ch

    assert float(edm_loss(oracle, x, sigma, noise)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ ambient


def test_ambient_network_input_layout() -> None:
    gen = torch.Generator().manual_seed(2)
    image = random_complex(2, 4, 6, generator=gen)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    x, cond = ambient_network_input(image, mask)
    assert torch.equal(x, complex_to_channels(image))
    assert cond.shape == (2, 2, 4, 6) and cond.dtype == torch.float32
    assert torch.equal(cond[:, 0], mask.float()[:, None, :].expand(2, 4, 6))  # every row the mask
    assert torch.equal(cond[:, 1], torch.ones(2, 4, 6))
    assert torch.equal(mask_channels(mask, 4), cond)
    with pytest.raises(ValueError, match="mask_further"):
        ambient_network_input(image, mask[:, :5])


def _image_domain_ambient_loss(denoiser: nn.Module, data: dict[str, Tensor]) -> Tensor:
    """lambda || A^H A D(A~^H A~ (x + sigma n), [mask~, 1]) - A^H A x ||^2, written out directly."""
    op = SenseOperator(data["maps"], data["mask"])
    op_further = SenseOperator(data["maps"], data["mask_further"])
    sigma, x = data["sigma"], data["image"]
    noisy = op_further.normal(x + sigma.view(-1, 1, 1) * data["noise"])
    height = x.shape[1]
    rows = data["mask_further"].float()[:, None, None, :].expand(-1, 1, height, -1)
    cond = torch.cat([rows, torch.ones_like(rows)], dim=1)
    d_ch = denoiser(torch.stack([noisy.real, noisy.imag], 1), sigma, cond=cond)
    d = torch.complex(d_ch[:, 0], d_ch[:, 1])
    residual = op.normal(d) - op.normal(x)
    weight = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    return (weight * (residual.abs() ** 2).sum(dim=(1, 2))).mean()


@pytest.mark.parametrize("which", ["toy", "tiny_unet"])
def test_ambient_kspace_loss_equals_the_image_domain_form(which: str) -> None:
    data = _slices(3, 3, 16, 40, 2, seed=3)
    if which == "toy":
        denoiser: nn.Module = ToyDenoiser()
    else:
        torch.manual_seed(0)
        net = build_unet("tiny")
        with torch.no_grad():  # random weights everywhere, so the output depends on the input
            for p in net.parameters():
                p.normal_(0, 0.1)
        denoiser = EDMPrecond(net).eval()
    kspace = SenseOperator(data["maps"], data["mask"]).forward(data["image"])  # z = A x
    with torch.no_grad():
        kspace_form = ambient_loss(
            denoiser, kspace, data["maps"], data["mask"], data["mask_further"], data["sigma"], data["noise"]
        )
        image_form = _image_domain_ambient_loss(denoiser, data)
    assert float(kspace_form) > 1.0  # not trivially zero
    torch.testing.assert_close(kspace_form, image_form, rtol=2e-5, atol=0)


def test_ambient_loss_uses_only_the_measured_columns() -> None:
    data = _slices(2, 3, 8, 40, 2, seed=4)
    op_full = SenseOperator(data["maps"])
    full = op_full.forward(data["image"])  # fully sampled
    mask = data["mask"]
    tampered = full.clone()
    tampered[:, :, :, ~mask[0]] = float("nan")  # garbage outside slice 0's mask ...
    tampered[1] = full[1] * mask[1]  # ... and slice 1 already undersampled
    tampered[0, :, :, mask[0]] = full[0, :, :, mask[0]]
    args = (data["maps"], mask, data["mask_further"], data["sigma"][:2], data["noise"])
    toy = ToyDenoiser()
    reference = ambient_loss(toy, full * mask[:, None, None, :], *args)
    torch.testing.assert_close(ambient_loss(toy, full, *args), reference)
    torch.testing.assert_close(ambient_loss(toy, tampered, *args), reference)
    assert math.isfinite(float(reference))


# ------------------------------------------------------------------------------ the toy problem

# Linear-Gaussian toy problem: a 1 x 16 complex "image" with one all-ones coil, so that
# A = P F is a column-masked centred DFT. x ~ N(0, Sigma) on Re and Im. The further-corrupted
# mask A~ is one of 3 fixed masks of 5 columns; the training mask A adds every other column
# with probability 0.3 (so E[A^H A | A~] is invertible: the ambient condition). For a fixed
# noise level the Bayes denoiser is linear in y~ = A~^H A~ (x + sigma n):
#     E[x | y~, A~] = Sigma M (M (Sigma + sigma^2 I) M)^+ y~,     M = F^H P~ F.
TOY_W, TOY_MASKS, TOY_SIGMA, TOY_EXTRA = 16, 3, 0.3, 0.3
TOY_STEPS, TOY_BATCH = 600, 512


def _toy_setup() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.arange(TOY_W)
    cov = 0.25 * np.exp(-((idx[:, None] - idx[None]) ** 2) / (2 * 3.0**2)) + 1e-3 * np.eye(TOY_W)
    rng = np.random.default_rng(0)
    further = np.zeros((TOY_MASKS, TOY_W), dtype=bool)
    for k in range(TOY_MASKS):
        further[k, rng.choice(TOY_W, 5, replace=False)] = True
    # The centred orthonormal DFT, built independently of adps.mri.
    dft = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(np.eye(TOY_W), axes=0), axis=0, norm="ortho"), axes=0)
    return cov, further, dft


class MaskLinear(nn.Module):
    """One complex linear map per further-corrupted mask, picked from the mask channel."""

    def __init__(self, masks: Tensor):
        super().__init__()
        self.register_buffer("masks", masks.float())
        self.g_re = nn.Parameter(torch.zeros(len(masks), TOY_W, TOY_W))
        self.g_im = nn.Parameter(torch.zeros(len(masks), TOY_W, TOY_W))

    def matrix(self, k: int) -> np.ndarray:
        return torch.complex(self.g_re[k], self.g_im[k]).detach().to(torch.complex128).numpy()

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        assert cond is not None
        k = (cond[:, 0, 0, None, :] == self.masks[None]).all(-1).float().argmax(1)
        y = channels_to_complex(x)[:, 0]  # (N, W)
        out = torch.einsum("nij,nj->ni", torch.complex(self.g_re[k], self.g_im[k]), y)
        return complex_to_channels(out[:, None, :])


def _train_toy(naive: bool, cov: np.ndarray, further: Tensor) -> MaskLinear:
    gen = torch.Generator().manual_seed(1)
    chol = torch.from_numpy(np.linalg.cholesky(cov)).float()
    maps = torch.ones(TOY_BATCH, 1, 1, TOY_W, dtype=torch.complex64)
    sigma = torch.full((TOY_BATCH,), TOY_SIGMA)
    model = MaskLinear(further)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, TOY_STEPS)
    for _ in range(TOY_STEPS):
        mask_further = further[torch.randint(0, TOY_MASKS, (TOY_BATCH,), generator=gen)]
        mask = mask_further | (torch.rand(TOY_BATCH, TOY_W, generator=gen) < TOY_EXTRA)
        x = torch.complex(torch.randn(TOY_BATCH, TOY_W, generator=gen) @ chol.T,
                          torch.randn(TOY_BATCH, TOY_W, generator=gen) @ chol.T)[:, None, :]
        noise = sample_noise(x, gen)
        op = SenseOperator(maps, mask)
        kspace = op.forward(x)  # the corrupted sample: all that training ever sees
        if naive:
            # The corrupted image A^H z used as if it were the clean image (same input).
            op_further = op.with_mask(mask_further)
            net_x, cond = ambient_network_input(op_further.adjoint(kspace + op_further.forward(TOY_SIGMA * noise)),
                                                mask_further)
            residual = channels_to_complex(model(net_x, sigma, cond=cond)) - op.adjoint(kspace)
            loss = (edm_weight(sigma) * torch.view_as_real(residual).square().sum(dim=(1, 2, 3))).mean()
        else:
            loss = ambient_loss(model, kspace, maps, mask, mask_further, sigma, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


def _relative_error(model: MaskLinear, targets: list[np.ndarray], cov: np.ndarray, dft: np.ndarray,
                    further: np.ndarray) -> float:
    """RMS of (model - target) over fresh y~ samples, relative to the RMS of the target."""
    rng = np.random.default_rng(123)
    chol = np.linalg.cholesky(cov)
    error = norm = 0.0
    for k in range(TOY_MASKS):
        m = dft.conj().T @ np.diag(further[k].astype(float)) @ dft
        x = rng.standard_normal((4000, TOY_W)) @ chol.T + 1j * rng.standard_normal((4000, TOY_W)) @ chol.T
        n = rng.standard_normal((4000, TOY_W)) + 1j * rng.standard_normal((4000, TOY_W))
        y = (x + TOY_SIGMA * n) @ m.T
        target = y @ targets[k].T
        error += float(np.sum(np.abs(y @ model.matrix(k).T - target) ** 2))
        norm += float(np.sum(np.abs(target) ** 2))
    return math.sqrt(error / norm)


def test_ambient_loss_learns_the_clean_posterior_mean_from_corrupted_data() -> None:
    cov, further, dft = _toy_setup()
    bayes, naive_optimum = [], []
    for k in range(TOY_MASKS):
        m = dft.conj().T @ np.diag(further[k].astype(float)) @ dft
        g = cov @ m @ np.linalg.pinv(m @ (cov + TOY_SIGMA**2 * np.eye(TOY_W)) @ m, rcond=1e-10, hermitian=True)
        bayes.append(g)  # E[x0 | y~, A~]
        # What the naive loss converges to: E[A^H A x | y~, A~] = E[A^H A | A~] E[x0 | y~, A~].
        keep = further[k] + TOY_EXTRA * ~further[k]
        naive_optimum.append(dft.conj().T @ np.diag(keep) @ dft @ g)

    further_t = torch.from_numpy(further)
    ambient = _train_toy(naive=False, cov=cov, further=further_t)
    naive = _train_toy(naive=True, cov=cov, further=further_t)
    ambient_error = _relative_error(ambient, bayes, cov, dft, further)
    naive_error = _relative_error(naive, bayes, cov, dft, further)
    naive_fit = _relative_error(naive, naive_optimum, cov, dft, further)
    print(f"toy problem: relative error vs E[x0|y~,A~]: ambient {ambient_error:.4f}, naive {naive_error:.4f} "
          f"(naive vs its own biased optimum {naive_fit:.4f})")
    assert ambient_error < 0.06
    # The naive model is trained just as well (it reaches its own optimum) ...
    assert naive_fit < 0.06
    # ... but that optimum is the wrong answer: it shrinks the unmeasured frequencies.
    assert naive_error > 0.15 and naive_error > 4 * ambient_error


# ------------------------------------------------------------------------------ MoDL / SSDU


def test_modl_loss_is_the_per_slice_nrmse() -> None:
    gen = torch.Generator().manual_seed(5)
    reference = random_complex(3, 8, 8, generator=gen)
    recon = reference + 0.1 * random_complex(3, 8, 8, generator=gen)
    per_slice = torch.stack([torch.linalg.norm(recon[i] - reference[i]) / torch.linalg.norm(reference[i])
                             for i in range(3)])
    torch.testing.assert_close(modl_loss(recon, reference, reduce=False), per_slice)
    torch.testing.assert_close(modl_loss(recon, reference), per_slice.mean())
    assert float(modl_loss(reference, reference)) == 0.0
    assert float(modl_loss(2 * reference, reference)) == pytest.approx(1.0)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_ssdu_split_partitions_the_acquired_columns(r: int) -> None:
    width = 320
    masks = torch.stack([slice_masks(width, r, seed=0, slice_id=i)[0] for i in range(4)])
    theta, lam = ssdu_split(masks, rho=0.2, generator=torch.Generator().manual_seed(7))
    assert theta.shape == lam.shape == masks.shape and theta.dtype == lam.dtype == torch.bool
    assert not bool((theta & lam).any())  # disjoint
    assert torch.equal(theta | lam, masks)  # cover Omega exactly
    omega = masks.sum(dim=1)
    assert torch.equal(lam.sum(dim=1), torch.floor(0.2 * omega + 0.5).long())  # round(rho |Omega|)
    centre = slice(width // 2 - 2, width // 2 + 2)
    assert bool(theta[:, centre].all()) and not bool(lam[:, centre].any())  # the centre stays in Theta
    # The rest of the ACS region may serve as loss columns (uniform over Omega \ centre).
    many = ssdu_split(masks[0].expand(200, -1), generator=torch.Generator().manual_seed(8))[1]
    acs_outside_centre = list(range(width // 2 - 10, width // 2 - 2)) + list(range(width // 2 + 2, width // 2 + 10))
    assert bool(many[:, acs_outside_centre].any())
    # Per-slice draws differ, and a seed reproduces them.
    assert not torch.equal(many[0], many[1])
    again = ssdu_split(masks, rho=0.2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again[0], theta) and torch.equal(again[1], lam)
    other = ssdu_split(masks, rho=0.2, generator=torch.Generator().manual_seed(9))
    assert not torch.equal(other[1], lam)


def test_ssdu_split_of_one_mask_and_errors() -> None:
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[1, 3, 7, 8, 9, 12]] = True
    theta, lam = ssdu_split(mask, rho=0.5, generator=torch.Generator().manual_seed(0), keep_center=2)
    assert theta.shape == (16,) and int(lam.sum()) == 3 and not bool(lam[[7, 8]].any())
    with pytest.raises(ValueError, match="loss columns"):
        ssdu_split(mask, rho=0.9, keep_center=4)
    with pytest.raises(ValueError, match="rho"):
        ssdu_split(mask, rho=1.0)


def test_ssdu_loss_matches_eq_3_1_and_vanishes_for_consistent_recon() -> None:
    data = _slices(2, 3, 8, 40, 2, seed=6)
    maps, image = data["maps"], data["image"]
    lam = ssdu_split(data["mask"], generator=torch.Generator().manual_seed(0), keep_center=2)[1]
    kspace = SenseOperator(maps).forward(image)
    assert float(ssdu_loss(image, kspace, maps, lam)) == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(1)
    recon = image + 0.3 * random_complex(*image.shape, generator=gen)
    expected = []
    for i in range(2):
        y_l = torch.view_as_real(kspace[i] * lam[i])
        pred = torch.view_as_real(SenseOperator(maps[i : i + 1], lam[i]).forward(recon[i : i + 1])[0])
        diff = y_l - pred
        expected.append(diff.abs().sum() / y_l.abs().sum() + diff.norm() / y_l.norm())
    torch.testing.assert_close(ssdu_loss(recon, kspace, maps, lam, reduce=False), torch.stack(expected))
    # Only the Lambda columns of the measurement count.
    kspace_theta_garbage = torch.where(lam[:, None, None, :], kspace, torch.full_like(kspace, 1e6))
    torch.testing.assert_close(ssdu_loss(recon, kspace_theta_garbage, maps, lam), ssdu_loss(recon, kspace, maps, lam))


# ------------------------------------------------------------------------------ NCSNv2


def test_ncsn_sigmas_are_geometric() -> None:
    sigmas = ncsn_sigmas(50.0, 0.01, 11).double()
    assert sigmas.shape == (11,)
    assert float(sigmas[0]) == pytest.approx(50.0, rel=1e-6) and float(sigmas[-1]) == pytest.approx(0.01, rel=1e-6)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.01 / 50.0) ** 0.1), rtol=1e-5, atol=0)
    assert ncsn_sigmas().shape == (2311,)  # the MRI NCSNv2 default
    with pytest.raises(ValueError):
        ncsn_sigmas(0.01, 50.0, 10)


def test_dsm_loss_matches_hand_computation() -> None:
    gen = torch.Generator().manual_seed(3)
    images = random_complex(3, 4, 6, generator=gen)
    sigmas = ncsn_sigmas(10.0, 0.1, 5)
    labels = torch.tensor([0, 2, 4])
    noise = torch.randn(3, 2, 4, 6, generator=gen)

    def score(x: Tensor, sigma: Tensor) -> Tensor:
        return -torch.tanh(x) / sigma.view(-1, 1, 1, 1)

    loss = dsm_loss(score, images, sigmas, labels=labels, noise=noise, reduce=False)
    x = complex_to_channels(images)
    s = sigmas[labels].view(-1, 1, 1, 1)
    target = -noise / s  # the score of the perturbation kernel, -(x~ - x) / sigma^2
    expected = 0.5 * ((score(x + s * noise, s.flatten()) - target) ** 2).sum(dim=(1, 2, 3)) * s.flatten() ** 2
    torch.testing.assert_close(loss, expected)
    # anneal_power weights the levels by sigma^p.
    loss_p0 = dsm_loss(score, images, sigmas, labels=labels, noise=noise, reduce=False, anneal_power=0.0)
    torch.testing.assert_close(loss_p0 * s.flatten() ** 2, expected)


def test_dsm_loss_of_the_true_score_of_gaussian_data() -> None:
    # x ~ N(0, v I): the score of the noisy data is -x~ / (v + sigma^2), and the expected
    # loss is 1/2 D v / (v + sigma^2) per slice (D = pixels x channels).
    v, d = 0.5, 2 * 32 * 32
    gen = torch.Generator().manual_seed(4)
    images = torch.complex(torch.randn(64, 32, 32, generator=gen), torch.randn(64, 32, 32, generator=gen)) * v**0.5
    sigmas = torch.tensor([0.1, 1.0, 10.0])

    def true_score(x: Tensor, sigma: Tensor) -> Tensor:
        return -x / (v + sigma.view(-1, 1, 1, 1) ** 2)

    for i, sigma in enumerate(sigmas.tolist()):
        labels = torch.full((64,), i)
        loss = dsm_loss(true_score, images, sigmas, labels=labels, generator=gen)
        assert float(loss) == pytest.approx(0.5 * d * v / (v + sigma**2), rel=0.02)
    worse = dsm_loss(lambda x, s: 1.1 * true_score(x, s), images, sigmas, generator=torch.Generator().manual_seed(0))
    best = dsm_loss(true_score, images, sigmas, generator=torch.Generator().manual_seed(0))
    assert float(best) < float(worse)

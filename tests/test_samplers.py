"""Tests of adps.nn.samplers and adps.nn.schedules.

The posterior samplers are checked with *exact* denoisers: for a Gaussian prior
``x0 ~ CN(mu, s^2 I)`` (independent N(mu, s^2) real and imaginary parts) the conditional
mean ``E[x0 | x0 + sigma n]`` is closed form, and so is the ambient one ``E[x0 | A_tr (x0 +
sigma n)]`` (a small dense pseudo-inverse). With them a sampler's result depends only on
the sampler, so "beats zero-filling" and "the residual falls" test the loops themselves.
Sizes are tiny (2 coils, 16 x 12) and everything runs on one CPU thread.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from adps.metrics import nrmse
from adps.mri import SenseOperator, column_mask
from adps.nn import (
    DEFAULT_STEPS,
    METHOD_SAMPLERS,
    MRI_METHODS,
    SAMPLERS,
    ambient_network_input,
    build_model,
    channels_to_complex,
    default_sigmas,
    sample_noise,
    sampler_for,
    train_masks,
)
from adps.nn import samplers as smp
from adps.nn.gaussian_denoisers import AmbientGaussianDenoiser, GaussianDenoiser
from adps.nn.schedules import ald_sigmas, edm_sigmas, geometric_sigmas
from conftest import random_complex

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

N, COILS, HEIGHT, WIDTH = 2, 2, 16, 12
ACS = 2  # 12 columns: METHOD.md's 20 ACS columns do not fit
PRIOR_STD = 0.3


# ------------------------------------------------------------------------------ problem


def _normalised_maps(generator: torch.Generator, n: int = N, height: int = HEIGHT, width: int = WIDTH) -> Tensor:
    """Random coil maps with ``sum_c |S_c|^2 = 1`` (so ``||A|| <= 1``, as with ESPIRiT maps)."""
    maps = random_complex(n, COILS, height, width, generator=generator)
    return maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()


def _acquisition_masks(width: int, acceleration: float, n: int = N, seed: int = 7) -> Tensor:
    return torch.stack([column_mask(width, acceleration, seed=seed, slice_id=i, acs=ACS) for i in range(n)])


@pytest.fixture
def problem(generator: torch.Generator) -> dict:
    """A ground truth drawn from the Gaussian prior, measured at R = 2."""
    maps = _normalised_maps(generator)
    mean = 1.0 + random_complex(N, HEIGHT, WIDTH, generator=generator)  # the prior mean: informative
    truth = mean + PRIOR_STD * random_complex(N, HEIGHT, WIDTH, generator=generator)
    operator = SenseOperator(maps, _acquisition_masks(WIDTH, 2))
    return {"maps": maps, "mean": mean, "truth": truth, "operator": operator, "y": operator.forward(truth)}


def _trace(store: list[dict]):
    def callback(info: dict) -> None:
        store.append({"step": info["step"], "total": info["total"], "sigma": info["sigma"],
                      "residual": info["residual_norm"].clone(), "x": info["x"], "denoised": info["denoised"]})
    return callback


def _check_residual_falls(trace: list[dict], steps: int) -> None:
    assert [t["step"] for t in trace] == list(range(steps)) and trace[0]["total"] == steps
    residual = torch.stack([t["residual"] for t in trace])  # (steps, N)
    quarter = steps // 4
    assert bool((residual[-quarter:].mean(0) < residual[:quarter].mean(0)).all()), residual[:, 0]


# ------------------------------------------------------------------------------ schedules


def test_edm_sigmas_endpoints_order_length() -> None:
    sigmas = edm_sigmas(500)
    assert sigmas.shape == (501,) and sigmas.dtype == torch.float32
    assert math.isclose(float(sigmas[0]), 10.0, rel_tol=1e-6)
    assert math.isclose(float(sigmas[-2]), 0.004, rel_tol=1e-5)
    assert float(sigmas[-1]) == 0.0  # trailing 0, as k-diffusion's get_sigmas_karras
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    prior = edm_sigmas(18, 0.002, 80.0)
    assert prior.shape == (19,) and math.isclose(float(prior[0]), 80.0, rel_tol=1e-6)
    assert edm_sigmas(1).tolist() == [10.0, 0.0]


def test_edm_sigmas_rho() -> None:
    # rho = 1 spaces the levels evenly in sigma; larger rho puts more of them at low noise.
    linear = edm_sigmas(5, 1.0, 5.0, rho=1.0)[:-1]
    torch.testing.assert_close(linear, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    low_rho, high_rho = edm_sigmas(50, rho=1.0), edm_sigmas(50, rho=7.0)
    assert int((high_rho[:-1] < 1.0).sum()) > int((low_rho[:-1] < 1.0).sum())
    # As rho grows the grid tends to geometric spacing.
    torch.testing.assert_close(edm_sigmas(10, 0.01, 10.0, rho=1e4)[:-1], geometric_sigmas(10, 10.0, 0.01), rtol=2e-3,
                               atol=0)
    with pytest.raises(ValueError, match="steps"):
        edm_sigmas(0)
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        edm_sigmas(10, sigma_min=1.0, sigma_max=0.5)


def test_geometric_and_ald_sigmas() -> None:
    levels = geometric_sigmas(2311, 232.0, 0.0066)
    assert levels.shape == (2311,) and bool((levels[1:] < levels[:-1]).all())
    assert math.isclose(float(levels[0]), 232.0, rel_tol=1e-6) and math.isclose(float(levels[-1]), 0.0066, rel_tol=1e-5)
    ratios = levels[1:] / levels[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])), rtol=1e-5, atol=0)

    per_step = ald_sigmas(levels)  # the paper's 1,300 steps, 3 per level, from the middle level
    assert per_step.shape == (1300,) and bool((per_step[1:] <= per_step[:-1]).all())
    assert math.isclose(float(per_step[-1]), 0.0066, rel_tol=1e-5)
    assert math.isclose(float(per_step[0]), float(levels[1155]), rel_tol=1e-5)  # sqrt(232 * 0.0066) ~ 1.24
    assert bool(torch.isin(per_step, levels).all())  # only levels the network was trained on
    assert ald_sigmas(levels, steps=7, steps_per_level=2).unique_consecutive(return_counts=True)[1].tolist() == [1, 2, 2, 2]


# ------------------------------------------------------------------------------ A-DPS, DPS with exact denoisers


def test_dps_with_exact_prior_beats_zero_filling_and_fits_the_data(problem: dict) -> None:
    model = GaussianDenoiser(problem["mean"], PRIOR_STD)
    steps, trace = 60, []
    recon = SAMPLERS["dps"](model, problem["y"], problem["operator"], edm_sigmas(steps),
                            generator=torch.Generator().manual_seed(0), callback=_trace(trace))
    assert recon.shape == (N, HEIGHT, WIDTH) and recon.dtype == torch.complex64
    zero_filled = problem["operator"].adjoint(problem["y"])
    error, baseline = nrmse(problem["truth"], recon), nrmse(problem["truth"], zero_filled)
    assert bool((error < 0.5 * baseline).all()), (error, baseline)  # measured: 0.07 vs 0.5
    # The measurements were used: better than the prior mean alone (measured: 0.07 vs 0.16).
    assert bool((error < 0.7 * nrmse(problem["truth"], problem["mean"])).all())
    _check_residual_falls(trace, steps)
    assert torch.equal(trace[-1]["x"], recon)  # the final iterate is returned


def test_a_dps_with_exact_ambient_denoiser_beats_zero_filling(problem: dict) -> None:
    model = AmbientGaussianDenoiser(problem["mean"], PRIOR_STD, problem["maps"])
    train_mask = train_masks(WIDTH, 2, N, seed=99, acs=ACS)  # R_train + 1 = 3: 4 of 12 columns
    assert train_mask.shape == (N, WIDTH) and train_mask.sum(1).tolist() == [4, 4]
    steps, trace = 40, []
    recon = smp.a_dps(model, problem["y"], problem["operator"], edm_sigmas(steps), train_mask=train_mask,
                      generator=torch.Generator().manual_seed(0), callback=_trace(trace))
    zero_filled = problem["operator"].adjoint(problem["y"])
    error, baseline = nrmse(problem["truth"], recon), nrmse(problem["truth"], zero_filled)
    assert bool((error < 0.5 * baseline).all()), (error, baseline)  # measured: 0.10-0.12 vs 0.5
    # Only A_tr's row space is informed by the (exact ambient) denoiser, yet the result beats
    # the prior mean alone (measured: 0.10-0.12 vs 0.16).
    assert bool((error < 0.9 * nrmse(problem["truth"], problem["mean"])).all())
    _check_residual_falls(trace, steps)
    assert torch.equal(trace[-1]["x"], recon)


def test_a_dps_feeds_the_network_a_tr_normal_of_x(problem: dict) -> None:
    """Step 0 hands the network ``[A_tr^H A_tr x, mask_tr, ones]`` with ``x = sigma_max n``."""
    calls: list[tuple[Tensor, Tensor, Tensor]] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
            calls.append((x.detach().clone(), torch.as_tensor(sigma).clone(), cond.clone()))
            return x * 0.5 + self.anchor

    train_mask = train_masks(WIDTH, 2, N, seed=99, acs=ACS)
    smp.a_dps(Recorder(), problem["y"], problem["operator"], edm_sigmas(2), train_mask=train_mask,
              generator=torch.Generator().manual_seed(5))
    start = 10.0 * sample_noise(torch.empty(N, HEIGHT, WIDTH, dtype=torch.complex64),
                                    torch.Generator().manual_seed(5))
    expected_x, expected_cond = ambient_network_input(problem["operator"].with_mask(train_mask).normal(start),
                                                      train_mask)
    torch.testing.assert_close(calls[0][0], expected_x)
    assert torch.equal(calls[0][2], expected_cond)
    torch.testing.assert_close(calls[0][1], torch.full((N,), 10.0))
    assert len(calls) == 2


def test_same_seed_same_result_other_seed_differs(problem: dict) -> None:
    model = GaussianDenoiser(problem["mean"], PRIOR_STD)
    run = [
        smp.dps(model, problem["y"], problem["operator"], edm_sigmas(5), generator=torch.Generator().manual_seed(s))
        for s in (3, 3, 4)
    ]
    assert torch.equal(run[0], run[1])
    assert not torch.equal(run[0], run[2])


def test_guided_samplers_reject_bad_inputs(problem: dict) -> None:
    model, op, y = GaussianDenoiser(problem["mean"], PRIOR_STD), problem["operator"], problem["y"]
    with pytest.raises(ValueError, match="train_mask is required"):
        smp.a_dps(model, y, op, edm_sigmas(3))
    with pytest.raises(ValueError, match=r"train_mask must be a column mask of shape \(2, 12\)"):
        smp.a_dps(model, y, op, edm_sigmas(3), train_mask=torch.ones(N, WIDTH + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"y must be complex k-space of shape \(2, 2, 16, 12\)"):
        smp.dps(model, y[:, :1], op, edm_sigmas(3))
    with pytest.raises(ValueError, match="strictly descending"):
        smp.dps(model, y, op, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="SenseOperator"):
        smp.dps(model, y, problem["maps"], edm_sigmas(3))
    with pytest.raises(ValueError, match="ambient EDMPrecond"):
        smp.a_dps(build_model("edm", "tiny"), y, op, edm_sigmas(3), train_mask=op.mask[:, 0, 0] > 0)
    with pytest.raises(ValueError, match=r"prior on \[Re, Im\].*4 channels"):
        smp.dps(build_model("ambient", "tiny"), y, op, edm_sigmas(3))
    with pytest.raises(ValueError, match="expected an NCSNv2"):
        smp.ald(build_model("edm", "tiny"), y, op, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="expected a MoDL"):
        smp.unrolled(build_model("ncsnv2", "tiny"), y, op)


class GaussianScore(nn.Module):
    """The exact score of the noisy Gaussian prior, ``(E[x0 | x] - x) / sigma^2``, called as
    NCSNv2 (``s(x, sigma)``), with the paper's NCSNv2 levels as its ``sigmas()``."""

    def __init__(self, mean: Tensor, std: float) -> None:
        super().__init__()
        self.denoiser = GaussianDenoiser(mean, std)

    def sigmas(self) -> Tensor:
        return geometric_sigmas(2311, 232.0, 0.0066)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return (self.denoiser(x, sigma) - x) / sigma**2


def test_ald_with_exact_score_beats_zero_filling_and_stays_stable(problem: dict) -> None:
    model = GaussianScore(problem["mean"], PRIOR_STD)
    sigmas = default_sigmas("ald", model, steps=300)  # 100 of the paper levels, 1.24 -> 0.0066
    trace: list[dict] = []
    recon = smp.ald(model, problem["y"], problem["operator"], sigmas, generator=torch.Generator().manual_seed(0),
                    callback=_trace(trace))
    error = nrmse(problem["truth"], recon)
    assert bool((error < 0.5 * nrmse(problem["truth"], problem["operator"].adjoint(problem["y"]))).all()), error
    assert bool((error < 0.7 * nrmse(problem["truth"], problem["mean"])).all()), error
    _check_residual_falls(trace, 300)
    # The default step is inside the stability bound: no transient blow-up of the iterates.
    residual = torch.stack([t["residual"] for t in trace])
    assert float(residual.max()) < 2 * float(residual[0].max())


# ------------------------------------------------------------------------------ prior sampling


def test_prior_heun_with_exact_denoiser_matches_the_prior(generator: torch.Generator) -> None:
    mean = torch.tensor([[0.5 - 0.25j, -1.0 + 0.0j], [0.0 + 1.0j, 2.0 + 0.5j]], dtype=torch.complex64)[None]
    model = GaussianDenoiser(mean, 0.4)
    samples = smp.prior_heun(model, None, None, None, shape=(2, 2), batch=4000,
                             generator=torch.Generator().manual_seed(1))
    assert samples.shape == (4000, 2, 2)
    channels = torch.view_as_real(samples)
    torch.testing.assert_close(channels.mean(0), torch.view_as_real(mean[0]), atol=0.04, rtol=0)
    torch.testing.assert_close(channels.std(0), torch.full((2, 2, 2), 0.4), atol=0.04, rtol=0)
    assert DEFAULT_STEPS["prior_heun"] == 18 and len(default_sigmas("prior_heun")) == 19


# ------------------------------------------------------------------------------ real networks


@pytest.fixture
def net_problem(generator: torch.Generator) -> dict:
    """16 x 16 (the tiny U-Net's four levels need sizes divisible by 8), R = 2."""
    maps = _normalised_maps(generator, height=16, width=16)
    operator = SenseOperator(maps, _acquisition_masks(16, 2))
    truth = random_complex(N, 16, 16, generator=generator)
    return {"operator": operator, "y": operator.forward(truth), "maps": maps}


def test_a_os_is_one_network_call(net_problem: dict) -> None:
    torch.manual_seed(0)
    model = build_model("ambient", "tiny").eval()
    op, y = net_problem["operator"], net_problem["y"]
    trace: list[dict] = []
    recon = SAMPLERS["a_os"](model, y, op, None, callback=_trace(trace))
    mask = op.mask[:, 0, 0, :] > 0
    net_x, net_cond = ambient_network_input(op.adjoint(y), mask)
    with torch.no_grad():
        expected = channels_to_complex(model(net_x, torch.full((N,), 0.003), cond=net_cond))
    torch.testing.assert_close(recon, expected)
    assert len(trace) == 1 and trace[0]["total"] == 1


def test_a_dps_and_dps_run_tiny_networks(net_problem: dict) -> None:
    torch.manual_seed(0)
    ambient, edm = build_model("ambient", "tiny").train(), build_model("edm", "tiny")
    op, y = net_problem["operator"], net_problem["y"]
    mask_tr = train_masks(16, 2, N, seed=1, acs=ACS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = smp.a_dps(ambient, y, op, edm_sigmas(3), train_mask=mask_tr, amp="bf16",
                      generator=torch.Generator().manual_seed(0))
    assert any("ignored on cpu" in str(w.message) for w in caught)
    assert all(m.training for m in ambient.modules())  # train/eval flags restored
    d = smp.dps(edm, y, op, edm_sigmas(3), generator=torch.Generator().manual_seed(0))
    for out in (a, d):
        assert out.shape == (N, 16, 16) and out.dtype == torch.complex64
        assert torch.isfinite(torch.view_as_real(out)).all()
    assert all(p.grad is None for p in ambient.parameters())  # only x is differentiated


def test_guided_samplers_freeze_the_weights_while_sampling_and_restore_them(net_problem: dict) -> None:
    """Inside the loop no weight requires a gradient (a compiled network's backward would
    otherwise compute every weight's gradient as well as x's); after it, each parameter's flag
    is what it was, a frozen one included."""
    torch.manual_seed(0)
    model = build_model("ambient", "tiny")
    frozen = model.net.enc["l0_conv"].weight
    frozen.requires_grad_(False)
    op, y = net_problem["operator"], net_problem["y"]
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    smp.a_dps(model, y, op, edm_sigmas(2), train_mask=train_masks(16, 2, N, seed=1, acs=ACS),
              generator=torch.Generator().manual_seed(0))
    assert seen == [False, False]
    assert not frozen.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "net.enc.l0_conv.weight")


def test_ald_runs_through_the_shared_signature(net_problem: dict) -> None:
    torch.manual_seed(0)
    model = build_model("ncsnv2", "tiny")
    op, y = net_problem["operator"], net_problem["y"]
    sigmas = default_sigmas("ald", model, steps=8, steps_per_level=2)
    trace: list[dict] = []
    out = SAMPLERS["ald"](model, y, op, sigmas, generator=torch.Generator().manual_seed(0), callback=_trace(trace))
    again = SAMPLERS["ald"](model, y, op, sigmas, generator=torch.Generator().manual_seed(0))
    assert out.shape == (N, 16, 16) and torch.isfinite(torch.view_as_real(out)).all()
    assert torch.equal(out, again)
    assert len(trace) == 8 and [t["sigma"] for t in trace] == pytest.approx(sigmas.tolist())
    assert DEFAULT_STEPS["ald"] == 1300


def test_unrolled_and_l1_wavelet_run_through_the_shared_signature(net_problem: dict) -> None:
    torch.manual_seed(0)
    op, y = net_problem["operator"], net_problem["y"]
    modl = build_model("modl", "tiny")
    for name, model, options in (("unrolled", modl, {}), ("l1_wavelet", None, {"iterations": 5})):
        trace: list[dict] = []
        out = SAMPLERS[name](model, y, op, None, callback=_trace(trace), **options)
        assert out.shape == (N, 16, 16) and out.dtype == torch.complex64, name
        assert torch.isfinite(torch.view_as_real(out)).all() and len(trace) == 1, name


def test_zero_filled_and_cg_sense_are_the_adjoint_and_its_least_squares_refinement(problem: dict) -> None:
    """The two reconstructions every table shows for scale: ``A^H y``, and CG-SENSE from it,
    which fits the measurements far better (the residual of ``y`` falls) without a network."""
    op, y = problem["operator"], problem["y"]
    zero = SAMPLERS["zero_filled"](None, y, op)
    torch.testing.assert_close(zero, op.adjoint(y))
    trace: list[dict] = []
    cg = smp.run_sampler("cg_sense", None, y, op, steps=8, callback=_trace(trace))
    assert cg.shape == (N, HEIGHT, WIDTH) and len(trace) == 1
    fit = torch.linalg.vector_norm(op.forward(cg) - y) / torch.linalg.vector_norm(op.forward(zero) - y)
    assert float(fit) < 0.3  # measured: 0.10 after 8 iterations
    with pytest.raises(ValueError, match="iterations"):
        smp.run_sampler("cg_sense", None, y, op, steps=0)


def test_posterior_samples_of_dps_with_an_exact_prior_are_the_true_posterior(generator: torch.Generator) -> None:
    """K samples per slice (batched, one start noise each) from DPS with the exact Gaussian
    denoiser: with noiseless measurements the true posterior is Gaussian, with mean ``mu + P (x
    - mu)`` and per-pixel standard deviation ``s sqrt(1 - P_rr)`` per component (``P`` the
    projection on ``A``'s row space). The guidance acts in the row space only, so the null space
    follows the exact prior flow: the samples' spread is the posterior's (measured: median ratio
    0.98), and the calibration of 2 standard deviations is near 95 % (measured: 0.93, 0.95)."""
    from adps.metrics import posterior_summary

    maps = _normalised_maps(generator)
    mean = 3.0 + 0.5 * random_complex(N, HEIGHT, WIDTH, generator=generator)  # far from 0: |x| nearly Gaussian
    truth = mean + PRIOR_STD * random_complex(N, HEIGHT, WIDTH, generator=generator)
    masks = _acquisition_masks(WIDTH, 4)  # 3 of 12 columns, 2 coils: half the image is unmeasured
    operator = SenseOperator(maps, masks)
    y = operator.forward(truth)
    k = 32
    batched = SenseOperator(maps.repeat(k, 1, 1, 1), masks.repeat(k, 1))
    samples = smp.dps(GaussianDenoiser(mean.repeat(k, 1, 1), PRIOR_STD), y.repeat(k, 1, 1, 1), batched,
                      edm_sigmas(100), generator=torch.Generator().manual_seed(1))
    summary = posterior_summary(samples.reshape(k, N, HEIGHT, WIDTH), truth)
    h, w = HEIGHT, WIDTH
    for i in range(N):
        eye = torch.eye(h * w, dtype=torch.complex128).reshape(h * w, h, w)
        single = SenseOperator(maps[i : i + 1].to(torch.complex128).expand(h * w, -1, -1, -1), masks[i])
        normal = single.normal(eye).reshape(h * w, h * w).T
        projection = torch.linalg.pinv(normal, hermitian=True, rtol=1e-8) @ normal
        prior_mean = mean[i].to(torch.complex128).reshape(-1)
        posterior_mean = (prior_mean + projection @ (truth[i].to(torch.complex128).reshape(-1) - prior_mean)).reshape(h, w)
        posterior_std = (PRIOR_STD * (1 - projection.diagonal().real).clamp_min(0).sqrt()).reshape(h, w)
        # Monte Carlo error of 32 samples: about 0.04 per pixel; the prior's spread is 0.3.
        assert float((summary["mean"][i] - posterior_mean).abs().mean()) < 0.12
        assert 0.85 < float((summary["std"][i] / posterior_std).median()) < 1.15
        assert 0.85 < float(summary["calibration"][i]) < 0.99
    # A point estimate repeated K times has no spread and calls every error a surprise.
    collapsed = posterior_summary(samples[:N].repeat(k, 1, 1).reshape(k, N, h, w), truth)
    assert float(collapsed["calibration"].max()) < 0.05


def test_registry_and_method_mapping() -> None:
    assert set(SAMPLERS) == {"a_dps", "dps", "a_os", "ald", "prior_heun", "l1_wavelet", "unrolled", "zero_filled",
                             "cg_sense"}
    assert set(MRI_METHODS) <= set(METHOD_SAMPLERS)
    assert sampler_for("ambient") is smp.a_dps and sampler_for("edm_l1") is smp.dps
    assert sampler_for("ncsnv2") is smp.ald and sampler_for("ssdu") is smp.unrolled
    assert sampler_for("l1") is smp.l1_wavelet
    assert DEFAULT_STEPS["a_dps"] == DEFAULT_STEPS["dps"] == 500
    grid = default_sigmas("a_dps")
    assert len(grid) == 501 and math.isclose(float(grid[0]), 10.0, rel_tol=1e-6)
    assert default_sigmas("a_os") is None
    with pytest.raises(ValueError, match="unknown method"):
        sampler_for("gan")


def test_run_sampler_builds_schedule_and_train_masks(problem: dict) -> None:
    """The driver entry point: steps -> the default grid, R_train -> A_tr drawn per slice."""
    model = AmbientGaussianDenoiser(problem["mean"], PRIOR_STD, problem["maps"])
    trace: list[dict] = []
    out = smp.run_sampler("a_dps", model, problem["y"], problem["operator"], steps=4, guidance=0.5,
                          r_train=2, seed=99, slice_ids=[0, 1], acs=ACS, amp="",
                          generator=torch.Generator().manual_seed(0), callback=_trace(trace))
    direct = smp.a_dps(model, problem["y"], problem["operator"], edm_sigmas(4), guidance=0.5,
                       train_mask=train_masks(WIDTH, 2, N, seed=99, acs=ACS), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, direct) and len(trace) == 4
    with pytest.raises(ValueError, match="r_train"):
        smp.run_sampler("a_dps", model, problem["y"], problem["operator"], steps=2)


def test_churn_adds_seeded_noise_and_keeps_the_fit(problem: dict) -> None:
    """churn 0 is METHOD.md's loop exactly; churn > 0 (EDM S_churn) raises each level by
    gamma = min(churn / steps, sqrt 2 - 1), is reproducible per seed and still fits the data."""
    model = GaussianDenoiser(problem["mean"], PRIOR_STD)
    steps = 30

    def run(churn: float, seed: int = 0, trace: list | None = None) -> Tensor:
        return smp.dps(model, problem["y"], problem["operator"], edm_sigmas(steps), churn=churn,
                       generator=torch.Generator().manual_seed(seed), callback=None if trace is None else _trace(trace))

    assert torch.equal(run(0.0), smp.dps(model, problem["y"], problem["operator"], edm_sigmas(steps),
                                         generator=torch.Generator().manual_seed(0)))
    trace: list[dict] = []
    churned = run(6.0, trace=trace)
    assert torch.equal(churned, run(6.0)) and not torch.equal(churned, run(0.0))
    gamma = 6.0 / steps
    assert trace[0]["sigma"] == pytest.approx(10.0 * (1 + gamma))
    capped: list[dict] = []
    run(1000.0, trace=capped)
    assert capped[0]["sigma"] == pytest.approx(10.0 * math.sqrt(2.0))
    zero_filled = problem["operator"].adjoint(problem["y"])
    assert bool((nrmse(problem["truth"], churned) < 0.5 * nrmse(problem["truth"], zero_filled)).all())


def test_run_sampler_passes_schedule_and_sampler_options(problem: dict) -> None:
    """A tuned setting reaches its place: sigma_max / rho to the schedule, churn to the loop."""
    model = GaussianDenoiser(problem["mean"], PRIOR_STD)
    out = smp.run_sampler("dps", model, problem["y"], problem["operator"], steps=5, sigma_max=4.0, rho=5.0,
                          churn=2.0, generator=torch.Generator().manual_seed(1))
    direct = smp.dps(model, problem["y"], problem["operator"], edm_sigmas(5, sigma_max=4.0, rho=5.0), churn=2.0,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, direct)
    with pytest.raises(TypeError, match="step_scale"):
        smp.run_sampler("dps", model, problem["y"], problem["operator"], steps=5, step_scale=0.5)


def test_every_edm_preconditioned_model_samples_its_prior_with_edm_heun(net_problem: dict) -> None:
    """Table 1's FIDs compare models, not samplers (METHOD.md "prior"): EDM, L1-EDM and ambient
    models all call their network at Heun's levels (18 steps from sigma 80 to 0.002, rho 7: 35
    calls), the ambient one fed [A_tr^H A_tr x, mask_tr]; NCSNv2 anneals from its largest level."""
    from adps.orchestration.fid import fid_sampler, unconditional_samples

    heun = default_sigmas("prior_heun").tolist()
    # Each level once, and once more for the correction at it (all but the first and the final 0).
    expected = [heun[0]] + [s for s in heun[1:-1] for _ in range(2)]
    for method in ("edm", "edm_l1", "ambient"):
        torch.manual_seed(0)
        model = build_model(method, "tiny")
        seen: list[float] = []
        model.register_forward_hook(lambda module, args, out, seen=seen: seen.append(float(args[1][0])))
        samples = unconditional_samples(method, model, 2, (16, 16), batch=2, maps=net_problem["maps"],
                                        r_train=2, acs=ACS)
        assert samples.shape == (2, 16, 16) and torch.isfinite(torch.view_as_real(samples)).all()
        assert len(seen) == 35 and sorted(seen, reverse=True) == pytest.approx(expected, rel=1e-5), method
        assert fid_sampler(method) == {"sampler": "prior_heun", "steps": 18, "sigma_max": 80.0, "sigma_min": 0.002,
                                       "rho": 7.0}
    # Every setting is a key, applied to every model alike (FidConfig sigma_max / sigma_min / rho).
    assert fid_sampler("ambient", sigma_max=40.0, rho=5.0)["sigma_max"] == 40.0
    ncsnv2 = build_model("ncsnv2", "tiny")
    settings = fid_sampler("ncsnv2", ncsnv2, steps=30)
    assert settings["sampler"] == "ald" and settings["sigma_start"] == pytest.approx(float(ncsnv2.sigmas()[0]))
    levels: list[float] = []
    ncsnv2.register_forward_hook(lambda module, args, out: levels.append(float(torch.as_tensor(args[1]).max())))
    unconditional_samples("ncsnv2", ncsnv2, 1, (16, 16), steps=30)
    assert max(levels) == pytest.approx(float(ncsnv2.sigmas()[0]), rel=1e-5)

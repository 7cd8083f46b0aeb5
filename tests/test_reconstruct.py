"""Tests of adps.nn.reconstruct: A-OS, the unrolled networks, the priors' denoising proxy and
the validation metric, on tiny models and synthetic batches (CPU, a few seconds)."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from adps.data.phantom import synthetic_batch
from adps.metrics import nrmse
from adps.mri import SenseOperator
from adps.nn import (
    METHODS,
    MRI_METHODS,
    NCSNv2,
    a_os,
    ambient_loss,
    build_model,
    denoise_once,
    mask_channels,
    reconstruct,
    train_step,
    unrolled,
    validation_metric,
)
from adps.nn.ncsnv2 import NCSNV2_PRESETS

# Small tensors: one intra-op thread is faster and immune to busy neighbours (see conftest).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Large enough for METHOD.md's 20 ACS columns at R + 1 = 3, small enough for 2 CPU cores.
SMALL = dict(n=2, coils=2, height=32, width=64, acceleration=2, seed=0)


@pytest.fixture(scope="module")
def batch() -> dict[str, Tensor]:
    return synthetic_batch(**SMALL)


def _model(method: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(method, "tiny")


def _masked(batch: dict[str, Tensor]) -> Tensor:
    return batch["kspace"] * batch["mask"][:, None, None, :]


class _Recorder(nn.Module):
    """An identity denoiser ``D(x, sigma, cond) = x`` that records what it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        self.calls.append((x.clone(), torch.as_tensor(sigma).clone(), None if cond is None else cond.clone()))
        return x


class _OracleNCSN(NCSNv2):
    """NCSNv2 whose score is exact for Gaussian noise around known clean images:
    ``s(x, sigma) = (x0 - x) / sigma^2``; Tweedie with the right level returns ``x0``."""

    def __init__(self, clean: Tensor) -> None:
        super().__init__(NCSNV2_PRESETS["tiny"])
        self.clean = torch.stack([clean.real, clean.imag], dim=1)
        self.seen_sigma: Tensor | None = None

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        self.seen_sigma = torch.as_tensor(sigma).clone()
        return (self.clean - x) / torch.as_tensor(sigma).view(-1, 1, 1, 1) ** 2


# ------------------------------------------------------------------------------ A-OS


def test_a_os_shape_dtype_and_finite(batch: dict[str, Tensor]) -> None:
    recon = a_os(_model("ambient"), batch["kspace"], batch["maps"], batch["mask"])
    assert recon.shape == batch["reference"].shape
    assert recon.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(recon)).all()


def test_a_os_uses_only_the_measured_columns(batch: dict[str, Tensor]) -> None:
    model = _model("ambient")
    full = a_os(model, batch["kspace"], batch["maps"], batch["mask"])
    premasked = a_os(model, _masked(batch), batch["maps"], batch["mask"])
    garbage = torch.where(batch["mask"][:, None, None, :], batch["kspace"], torch.full_like(batch["kspace"], math.nan))
    poisoned = a_os(model, garbage, batch["maps"], batch["mask"])
    assert torch.equal(full, premasked)
    assert torch.equal(full, poisoned)  # not even a NaN outside the mask reaches the network


def test_a_os_is_deterministic_and_restores_train_mode(batch: dict[str, Tensor]) -> None:
    model = _model("ambient").train()  # the tiny UNet has dropout 0.1: eval mode must be forced
    first = a_os(model, batch["kspace"], batch["maps"], batch["mask"])
    second = a_os(model, batch["kspace"], batch["maps"], batch["mask"])
    assert torch.equal(first, second)
    assert all(m.training for m in model.modules())


def test_a_os_feeds_the_ambient_loss_input(batch: dict[str, Tensor]) -> None:
    # With no noise and A~ = A, the training loss builds A^H P z with [mask, ones]: A-OS must
    # feed exactly that, and the sigma it announces.
    n, _, height, _ = batch["maps"].shape
    in_training, in_aos = _Recorder(), _Recorder()
    ambient_loss(
        in_training,
        batch["kspace"],
        batch["maps"],
        batch["mask"],
        batch["mask"],
        torch.full((n,), 0.003),
        torch.zeros_like(batch["reference"]),
    )
    a_os(in_aos, batch["kspace"], batch["maps"], batch["mask"])
    (x_train, _, cond_train), (x_aos, sigma_aos, cond_aos) = in_training.calls[0], in_aos.calls[0]
    torch.testing.assert_close(x_aos, x_train)
    assert torch.equal(cond_aos, cond_train)
    assert torch.equal(cond_aos, mask_channels(batch["mask"], height))
    assert torch.equal(sigma_aos, torch.full((n,), 0.003))


def test_a_os_of_identity_denoiser_is_the_adjoint(batch: dict[str, Tensor]) -> None:
    # D = identity gives A^H y; fully sampled with normalised maps (sum |S|^2 = 1) that is x.
    recon = a_os(_Recorder(), batch["kspace"], batch["maps"], batch["mask"])
    adjoint = SenseOperator(batch["maps"], batch["mask"]).adjoint(batch["kspace"])
    torch.testing.assert_close(recon, adjoint)
    full = torch.ones_like(batch["mask"])
    torch.testing.assert_close(
        a_os(_Recorder(), batch["kspace"], batch["maps"], full), batch["reference"], atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------ MoDL / SSDU


def test_unrolled_modl(batch: dict[str, Tensor]) -> None:
    model = _model("modl").train()
    recon = unrolled(model, batch["kspace"], batch["maps"], batch["mask"])
    assert recon.shape == batch["reference"].shape and recon.dtype == torch.complex64
    with torch.no_grad():
        direct = model(_masked(batch), batch["maps"], batch["mask"])  # train_step's modl call
    torch.testing.assert_close(recon, direct)
    assert torch.equal(recon, unrolled(model, _masked(batch), batch["maps"], batch["mask"]))
    assert model.training and not recon.requires_grad


def test_unrolled_rejects_other_models(batch: dict[str, Tensor]) -> None:
    with pytest.raises(TypeError, match="MoDL"):
        unrolled(_model("edm"), batch["kspace"], batch["maps"], batch["mask"])


# ------------------------------------------------------------------------------ dispatch


def test_reconstruct_dispatches(batch: dict[str, Tensor]) -> None:
    args = (batch["kspace"], batch["maps"], batch["mask"])
    ambient, modl = _model("ambient"), _model("modl")
    assert torch.equal(reconstruct("ambient", ambient, *args), a_os(ambient, *args))
    assert torch.equal(reconstruct("ambient", ambient, *args, sigma=0.01), a_os(ambient, *args, sigma=0.01))
    assert torch.equal(reconstruct("ssdu", modl, *args), unrolled(modl, *args))


@pytest.mark.parametrize("method", ["edm", "edm_l1", "ncsnv2"])
def test_reconstruct_refuses_priors(method: str, batch: dict[str, Tensor]) -> None:
    with pytest.raises(ValueError, match=f"'{method}' is a prior.*posterior sampling"):
        reconstruct(method, _model(method), batch["kspace"], batch["maps"], batch["mask"])


def test_reconstruct_unknown_method_lists_methods(batch: dict[str, Tensor]) -> None:
    with pytest.raises(ValueError, match="unknown method 'vae'") as info:
        reconstruct("vae", _model("modl"), batch["kspace"], batch["maps"], batch["mask"])
    assert all(m in str(info.value) for m in METHODS)


# ------------------------------------------------------------------------------ denoising proxy


@pytest.mark.parametrize("method", ["edm", "ncsnv2"])
def test_denoise_once_shape_and_seeding(method: str, batch: dict[str, Tensor]) -> None:
    model = _model(method).train()
    ref = batch["reference"]

    def run(seed: int) -> Tensor:
        return denoise_once(model, ref, 0.1, generator=torch.Generator().manual_seed(seed))

    out = run(0)
    assert out.shape == ref.shape and out.dtype == torch.complex64
    assert torch.equal(out, run(0))
    assert not torch.equal(out, run(1))
    assert all(m.training for m in model.modules())


def test_denoise_once_ncsnv2_tweedie_at_the_nearest_level(batch: dict[str, Tensor]) -> None:
    # The tiny levels are 5 ... 0.01, a factor ~2 apart: 0.1 snaps to ~0.08. An exact score
    # gives back the clean image only if noise and Tweedie's formula use the same level.
    ref = batch["reference"]
    oracle = _OracleNCSN(ref)
    out = denoise_once(oracle, ref, 0.1, generator=torch.Generator().manual_seed(0))
    levels = oracle.sigmas()
    nearest = levels[(levels.log() - math.log(0.1)).abs().argmin()]
    torch.testing.assert_close(oracle.seen_sigma, nearest.expand(ref.shape[0]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_denoise_once_rejects_bad_input(batch: dict[str, Tensor]) -> None:
    with pytest.raises(ValueError, match="sigma must be > 0"):
        denoise_once(_model("edm"), batch["reference"], 0.0)
    with pytest.raises(TypeError, match="EDMPrecond or NCSNv2"):
        denoise_once(_model("modl"), batch["reference"], 0.1)


# ------------------------------------------------------------------------------ validation


def val_nrmse(method: str, model: nn.Module, batch: dict[str, Tensor], **options) -> float:
    return validation_metric(method, model, batch, **options)["val_nrmse"]


@pytest.mark.parametrize("method", MRI_METHODS)
def test_validation_nrmse_every_method(method: str, batch: dict[str, Tensor]) -> None:
    model = _model(method).train()
    value = val_nrmse(method, model, batch, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(value) and value >= 0
    assert all(m.training for m in model.modules())
    model.eval()
    val_nrmse(method, model, batch, generator=torch.Generator().manual_seed(0))
    assert not any(m.training for m in model.modules())


def test_validation_nrmse_is_the_mean_slice_nrmse(batch: dict[str, Tensor]) -> None:
    model = _model("ambient")
    expected = nrmse(batch["reference"], a_os(model, batch["kspace"], batch["maps"], batch["mask"])).mean()
    assert val_nrmse("ambient", model, batch) == pytest.approx(float(expected), rel=1e-12)
    edm = _model("edm")
    seeded = denoise_once(edm, batch["reference"], 0.1, generator=torch.Generator().manual_seed(3))
    expected = nrmse(batch["reference"], seeded).mean()
    got = val_nrmse("edm", edm, batch, generator=torch.Generator().manual_seed(3))
    assert got == pytest.approx(float(expected), rel=1e-12)


def test_validation_nrmse_drops_as_modl_trains(batch: dict[str, Tensor]) -> None:
    model = _model("modl").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = val_nrmse("modl", model, batch)
    for _ in range(30):
        train_step("modl", model, batch, optimizer)
    after = val_nrmse("modl", model, batch)
    assert after < 0.8 * before  # measured: 0.167 -> about 0.10 (seeds 0-2)


def test_validation_nrmse_on_a_ddp_model(batch: dict[str, Tensor], tmp_path: Path) -> None:
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        plain = _model("ambient").train()
        wrapped = nn.parallel.DistributedDataParallel(_model("ambient")).train()
        value = val_nrmse("ambient", wrapped, batch)
        assert value == val_nrmse("ambient", plain, batch)
        assert all(m.training for m in wrapped.modules())
    finally:
        torch.distributed.destroy_process_group()

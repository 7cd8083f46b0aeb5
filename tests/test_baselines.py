"""Tests of the baseline networks (NCSNv2, MoDL) and of checkpoints of every network type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adps.mri import SenseOperator, conjugate_gradient, slice_masks
from adps.nn import (
    MODL_PRESETS,
    NCSNV2_PRESETS,
    EDMPrecond,
    MoDL,
    MoDLConfig,
    NCSNv2,
    NCSNv2Config,
    build_model,
    build_modl,
    build_ncsnv2,
    build_unet,
    count_parameters,
    load_model,
    modl_loss,
    ncsn_sigmas,
    save_model,
)
from conftest import random_complex

# Small tensors: one intra-op thread is faster and immune to busy neighbours (see conftest).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _randomise(module: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Perturb every parameter, so that no round trip passes thanks to default values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


# ------------------------------------------------------------------------------ NCSNv2


@pytest.fixture(scope="module")
def ncsnv2_paper() -> NCSNv2:
    """The paper-scale NCSNv2 (93M parameters), built once for the module."""
    torch.manual_seed(0)
    return build_ncsnv2("ncsnv2")


@pytest.mark.parametrize(("preset", "batch", "size"), [("tiny", 2, (384, 320)), ("ncsnv2", 1, (16, 24))])
def test_ncsnv2_forward_backward(preset: str, batch: int, size: tuple[int, int], ncsnv2_paper: NCSNv2) -> None:
    torch.manual_seed(0)
    net = ncsnv2_paper if preset == "ncsnv2" else build_ncsnv2(preset)
    x = torch.randn(batch, 2, *size, requires_grad=True)
    sigma = torch.tensor([0.5, 3.0][:batch])
    score = net(x, sigma)
    assert score.shape == x.shape and score.dtype == torch.float32
    score.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())
    # Every stage and refine block is reached by the gradient.
    for name, module in [("begin", net.begin_conv), ("deepest", net.stages[-1]), ("top refine", net.refine[0])]:
        assert all(float(p.grad.abs().sum()) > 0 for p in module.parameters()), name
    net.zero_grad(set_to_none=True)


def test_ncsnv2_conditions_on_sigma_by_output_scaling_only() -> None:
    torch.manual_seed(1)
    net = build_ncsnv2("tiny").eval()
    x = torch.randn(2, 2, 16, 24)
    with torch.no_grad():
        a = net(x, torch.tensor([0.2, 0.2]))
        b = net(x, torch.tensor([5.0, 5.0]))
        single = net(x[:1], 0.2)
    torch.testing.assert_close(a * 0.2, b * 5.0, rtol=1e-5, atol=1e-6)  # s(x, sigma) = F(x) / sigma
    torch.testing.assert_close(single, a[:1], rtol=1e-4, atol=1e-5)  # no batch mixing (instance norm)
    assert torch.equal(net.sigmas(), ncsn_sigmas(5.0, 0.01, 10))


def test_ncsnv2_activation_checkpointing_keeps_less_for_the_same_gradients() -> None:
    """NCSNv2's memory-lean mode (TrainConfig ``activation_checkpointing``): the forward pass
    keeps fewer tensors for the backward (each residual and RefineNet block keeps its input
    only), and the loss and every gradient equal the plain network's."""
    from adps.nn.unet import set_activation_checkpointing

    def run(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        torch.manual_seed(0)
        net = build_ncsnv2("tiny").train()
        assert set_activation_checkpointing(net, checkpointing) == 1 and net.activation_checkpointing == checkpointing
        x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = net(x, torch.tensor([0.5, 2.0])).square().sum()
        loss.backward()
        weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
        return loss.detach(), [p.grad.clone() for p in net.parameters()], sum(
            n for ptr, n in kept.items() if ptr not in weights)

    plain_loss, plain_grads, plain_kept = run(False)
    lean_loss, lean_grads, lean_kept = run(True)
    assert torch.equal(plain_loss, lean_loss)
    for a, b in zip(plain_grads, lean_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert lean_kept < 0.5 * plain_kept, (lean_kept, plain_kept)


def test_ncsnv2_preset_layout_and_errors() -> None:
    cfg = NCSNV2_PRESETS["ncsnv2"]
    assert (cfg.ngf, cfg.channel_mult, cfg.dilation) == (128, (1, 2, 2, 2, 4, 4), (1, 1, 1, 1, 2, 4))
    assert (cfg.sigma_begin, cfg.sigma_end, cfg.num_scales) == (232.0, 0.0066, 2311)
    assert cfg.size_multiple == 8
    assert NCSNv2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="divisible by 2"):
        build_ncsnv2("tiny")(torch.randn(1, 2, 15, 16), 1.0)
    with pytest.raises(ValueError, match="one entry per stage"):
        NCSNv2Config(channel_mult=(1, 2), downsample=(False,), dilation=(1, 1))
    with pytest.raises(ValueError, match="unknown NCSNv2 preset"):
        build_ncsnv2("huge")


# ------------------------------------------------------------------------------ MoDL


def _small_problem(seed: int, dtype: torch.dtype = torch.complex128) -> tuple[SenseOperator, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maps = random_complex(2, 3, 6, 8, generator=gen, dtype=dtype)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    return SenseOperator(maps, mask), random_complex(2, 6, 8, generator=gen, dtype=dtype)


def _dense_normal(op: SenseOperator, lam: float) -> list[torch.Tensor]:
    """The matrix of A^H A + lambda I of each slice, column by column."""
    n, h, w = op.image_shape
    eye = torch.eye(h * w, dtype=op.maps.dtype).reshape(h * w, h, w)
    mats = []
    for i in range(n):
        single = SenseOperator(op.maps[i : i + 1].expand(h * w, -1, -1, -1), op.mask[i].flatten())
        columns = single.normal(eye) + lam * eye
        mats.append(columns.reshape(h * w, h * w).T)
    return mats


def test_modl_cg_reaches_the_exact_solution() -> None:
    op, prior = _small_problem(0)
    model = MoDL(MoDLConfig(lambda_init=0.3)).double()
    gen = torch.Generator().manual_seed(1)
    rhs_data = random_complex(2, 6, 8, generator=gen, dtype=torch.complex128)
    # 48 unknowns per slice: exact arithmetic would need at most 48 CG steps.
    with torch.no_grad():
        x = model.data_consistency(op, rhs_data, prior, iterations=150)
    lam = float(model.lam.detach())
    assert lam == pytest.approx(0.3)
    for i, mat in enumerate(_dense_normal(op, lam)):
        exact = torch.linalg.solve(mat, (rhs_data[i] + lam * prior[i]).flatten())
        torch.testing.assert_close(x[i].flatten(), exact, rtol=1e-9, atol=1e-9)
    # The default 6 steps are an approximation, and a better one than 2 steps.
    with torch.no_grad():
        exact_all = model.data_consistency(op, rhs_data, prior, iterations=150)
        err6 = (model.data_consistency(op, rhs_data, prior) - exact_all).norm()
        err2 = (model.data_consistency(op, rhs_data, prior, iterations=2) - exact_all).norm()
    assert 0 < err6 < err2


def test_modl_data_consistency_uses_the_shared_cg() -> None:
    op, prior = _small_problem(2, torch.complex64)
    model = build_modl("tiny")
    rhs = op.adjoint(op.forward(prior))
    lam = model.lam.detach()
    with torch.no_grad():
        ours = model.data_consistency(op, rhs, prior)
    expected = conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs + lam * prior, iterations=3)
    torch.testing.assert_close(ours, expected)


def test_modl_gradients_reach_lambda_and_every_denoiser_weight() -> None:
    torch.manual_seed(3)
    model = build_modl("tiny")
    gen = torch.Generator().manual_seed(3)
    maps = random_complex(2, 2, 16, 24, generator=gen) * 0.5
    image = random_complex(2, 16, 24, generator=gen)
    mask = torch.stack([slice_masks(24, 2, seed=0, slice_id=i, acs=4)[0] for i in range(2)])
    kspace = SenseOperator(maps, mask).forward(image)
    loss = modl_loss(model(kspace, maps, mask), image)
    loss.backward()
    assert model.log_lambda.grad is not None and float(model.log_lambda.grad.abs()) > 0
    for name, p in model.denoiser.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize(("preset", "size"), [("tiny", (384, 320)), ("modl", (32, 24))])
def test_modl_forward_backward(preset: str, size: tuple[int, int]) -> None:
    torch.manual_seed(4)
    model = build_modl(preset)
    h, w = size
    gen = torch.Generator().manual_seed(4)
    maps = random_complex(1, 4, h, w, generator=gen) * 0.5
    image = random_complex(1, h, w, generator=gen)
    mask = slice_masks(w, 4 if w >= 100 else 2, seed=0, slice_id=0, acs=min(20, w // 4))[0]
    recon = model(SenseOperator(maps, mask).forward(image), maps, mask)
    assert recon.shape == (1, h, w) and recon.dtype == torch.complex64
    modl_loss(recon, image).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_modl_presets() -> None:
    cfg = MODL_PRESETS["modl"]
    assert (cfg.unrolls, cfg.cg_iterations, cfg.lambda_init) == (6, 6, 0.05)
    assert float(build_modl("modl").lam.detach()) == pytest.approx(0.05)
    assert MoDLConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="lambda_init"):
        MoDLConfig(lambda_init=0.0)
    with pytest.raises(ValueError, match="unknown MoDLConfig"):
        build_modl("tiny", lam=1.0)


# ------------------------------------------------------------------------------ checkpoints


def _networks() -> dict[str, nn.Module]:
    torch.manual_seed(5)
    return {
        "ncsnv2": build_ncsnv2("tiny"),
        "modl": build_modl("tiny"),
        "edm_precond": build_model("edm", "tiny"),
        "ambient_precond": build_model("ambient", "tiny"),
    }


@pytest.mark.parametrize("kind", ["ncsnv2", "modl", "edm_precond", "ambient_precond"])
def test_checkpoints_of_every_network_round_trip_bit_exactly(tmp_path: Path, kind: str) -> None:
    model = _networks()[kind]
    _randomise(model)
    folder = save_model(tmp_path / kind, model, {"preset": "tiny", "method": kind, "R": 4})
    loaded, config = load_model(folder)
    assert type(loaded) is type(model) and not loaded.training
    expected_arch = {"ncsnv2": "ncsnv2", "modl": "modl"}.get(kind, "songunet")
    assert config["architecture"] == expected_arch
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    if isinstance(model, EDMPrecond):
        assert loaded.sigma_data == model.sigma_data
        assert loaded.net.config == model.net.config
    else:
        assert loaded.config == model.config


def test_checkpoint_of_a_baseline_rebuilds_from_its_preset(tmp_path: Path) -> None:
    model = build_modl("tiny")
    _randomise(model)
    folder = save_model(tmp_path / "m", model, {"preset": "tiny", "method": "modl"})
    config = json.loads((folder / "config.json").read_text())
    assert config["modl"] == MODL_PRESETS["tiny"].to_dict()
    del config["modl"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(folder)
    assert isinstance(loaded, MoDL)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_checkpoint_refuses_weights_of_another_architecture_or_config(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "n", build_ncsnv2("tiny"), {"preset": "tiny"})
    config = json.loads((folder / "config.json").read_text())
    config["ncsnv2"]["ngf"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(folder)
    config["architecture"] = "modl"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="neither 'modl' nor 'preset'|missing tensor"):
        load_model(folder)
    config["architecture"] = "transformer"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture 'transformer'"):
        load_model(folder)


def test_checkpoint_without_architecture_is_a_songunet(tmp_path: Path) -> None:
    # Checkpoints written before the baselines existed carry no "architecture" key.
    net = build_unet("tiny")
    _randomise(net)
    folder = save_model(tmp_path / "u", net, {"preset": "tiny"})
    config = json.loads((folder / "config.json").read_text())
    del config["architecture"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_save_model_reserves_the_network_keys(tmp_path: Path) -> None:
    for key in ("architecture", "modl", "ncsnv2"):
        with pytest.raises(ValueError, match="reserved"):
            save_model(tmp_path / key, build_modl("tiny"), {key: 1})
    with pytest.raises(TypeError, match="SongUNet, NCSNv2, MoDL"):
        save_model(tmp_path / "x", nn.Linear(2, 2), {})


def test_paper_scale_parameter_counts(ncsnv2_paper: NCSNv2) -> None:
    # Recorded so that a change of either architecture is a visible decision.
    assert count_parameters(build_modl("modl")) == 113_155
    assert count_parameters(ncsnv2_paper) == 92_935_298

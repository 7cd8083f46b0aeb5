"""Tests of adps.nn: the gated DDPM++ U-Net, EDM preconditioning, EMA and checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adps.nn import (
    EMA,
    PRESETS,
    EDMPrecond,
    GatedConv2d,
    SongUNet,
    UNetConfig,
    build_unet,
    count_parameters,
    edm_coefficients,
    ema_beta,
    load_model,
    save_model,
)
from adps.nn.unet import spatial_attention

# The published count: reference code, 4 input channels, resolution 384 (METHOD.md).
AMBIENT_PARAMS = 36_768_644


@pytest.fixture(scope="module")
def ambient_net() -> SongUNet:
    """One ambient network for the whole module: building it takes about a second."""
    torch.manual_seed(0)
    return build_unet("ambient")


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Replace every parameter by noise, so no test passes thanks to zero biases or 1e-5 gains."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# ------------------------------------------------------------------------------ network


def test_ambient_parameter_count_matches_reference(ambient_net: SongUNet) -> None:
    assert count_parameters(ambient_net) == AMBIENT_PARAMS


def test_parameter_counts_of_the_other_configurations() -> None:
    # edm: 2 fewer input channels (2 * 128 * 9 gated 3x3 weights, i.e. x2) and 2 fewer
    # output channels (the same, plus 2 biases = 4610) than the ambient net.
    assert count_parameters(build_unet("edm")) == AMBIENT_PARAMS - 2 * 128 * 9 * 2 - 4610
    # The reference net's two spare output channels are one gated 3x3 conv slice + bias.
    assert count_parameters(build_unet("ambient", out_channels=2)) == AMBIENT_PARAMS - (2 * 128 * 9 * 2 + 2)
    # Without gates every conv loses its second weight (and nothing else changes).
    assert count_parameters(build_unet("ambient", gated=False)) == 20_014_980


def test_ambient_layout_gates_and_single_attention(ambient_net: SongUNet) -> None:
    convs = [m for m in ambient_net.modules() if isinstance(m, GatedConv2d)]
    # Every conv (incl. resampling and 1x1 skip/attention convs) has one bias-free gate.
    assert convs and all(c.gate_weight is not None and c.gate_weight.shape == c.weight.shape for c in convs)
    gate_params = sum(c.gate_weight.numel() for c in convs)
    assert AMBIENT_PARAMS - gate_params == 20_014_980  # = the ungated network
    attention_blocks = [name for name, m in ambient_net.named_modules() if getattr(m, "num_heads", 0)]
    assert attention_blocks == ["dec.l3_in0"]
    assert ambient_net.dec["l3_in0"].num_heads == 1


@pytest.mark.parametrize(
    ("preset", "batch", "height", "width"),
    [("tiny", 1, 384, 320), ("ambient", 1, 64, 48), ("edm", 2, 32, 24)],
)
def test_forward_backward_shapes(preset: str, batch: int, height: int, width: int, ambient_net: SongUNet) -> None:
    torch.manual_seed(1)
    net = ambient_net if preset == "ambient" else build_unet(preset)
    cfg = net.config
    x = torch.randn(batch, cfg.in_channels, height, width, requires_grad=True)
    noise_labels = torch.randn(batch)
    out = net(x, noise_labels)
    assert out.shape == (batch, cfg.out_channels, height, width)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad(set_to_none=True)


def test_rejects_sizes_not_divisible_by_the_level_count() -> None:
    net = build_unet("tiny")
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.randn(1, 4, 36, 32), torch.zeros(1))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(1, 3, 32, 32), torch.zeros(1))


def test_eval_mode_is_deterministic_and_per_sample() -> None:
    torch.manual_seed(2)
    net = build_unet("tiny").eval()
    _randomise(net)
    x = torch.randn(2, 4, 32, 24)
    labels = torch.tensor([-1.0, 0.5])
    both = net(x, labels)
    assert torch.equal(both, net(x, labels))
    # Each sample depends on its own noise label only (no batch mixing).
    first = net(x[:1], labels[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(net(x[:1], labels[1:]), first)


def test_config_round_trip_and_bad_overrides() -> None:
    cfg = PRESETS["ambient"]
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown network preset"):
        build_unet("huge")
    with pytest.raises(ValueError, match="model_chanels"):
        build_unet("tiny", model_chanels=8)
    with pytest.raises(ValueError, match="unknown config key .extra."):
        UNetConfig.from_dict({**cfg.to_dict(), "extra": 1})


# ------------------------------------------------------------------------------ layers


def test_gated_conv_equals_hand_computation() -> None:
    torch.manual_seed(3)
    conv = GatedConv2d(3, 5, kernel_size=3)
    _randomise(conv)
    x = torch.randn(2, 3, 10, 8)
    value = F.conv2d(x, conv.weight, padding=1)
    gate = F.conv2d(x, conv.gate_weight, padding=1)
    # Sigmoid twice, as in the reference; bias added after gating.
    expected = value * torch.sigmoid(torch.sigmoid(gate)) + conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6)


def test_autocast_keeps_the_residual_stream_in_bf16() -> None:
    """Under bf16 autocast every convolution's output, gated or not, is bf16 even where its input
    is float32 (CUDA's autocast runs GroupNorm in float32; EDMPrecond feeds the network float32).
    A bias cast to the input's dtype once promoted each gated output to float32, and with it every
    residual sum, skip connection and saved activation after it: a fifth more memory traffic per
    A-DPS step and 8 GiB more activations per training step, as planned before the fix."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, 8)
    for gated in (True, False):
        conv = GatedConv2d(3, 4, kernel_size=3, gated=gated)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16
        assert conv(x).dtype == torch.float32

    net = build_unet("tiny").eval()
    outputs: dict[str, torch.dtype] = {}
    for name, module in net.named_modules():
        if isinstance(module, GatedConv2d) or type(module).__name__ == "UNetBlock":
            module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 4, 32, 32), torch.ones(2))
    assert len(outputs) > 20 and set(outputs.values()) == {torch.bfloat16}, \
        {name: dtype for name, dtype in outputs.items() if dtype != torch.bfloat16}


def test_ungated_conv_is_a_plain_conv() -> None:
    torch.manual_seed(4)
    conv = GatedConv2d(3, 5, kernel_size=1, gated=False)
    _randomise(conv)
    x = torch.randn(1, 3, 6, 4)
    assert conv.gate_weight is None
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias))


@pytest.mark.parametrize("resample_filter", [(1, 1), (1, 3, 3, 1)])
def test_resampling_convs_match_upstream_filtering(resample_filter: tuple[int, ...]) -> None:
    torch.manual_seed(5)
    x = torch.randn(1, 3, 8, 12)
    f = torch.tensor(resample_filter, dtype=torch.float32)
    f = (torch.outer(f, f) / f.sum() ** 2)[None, None].repeat(3, 1, 1, 1)
    pad = (len(resample_filter) - 1) // 2
    down = GatedConv2d(3, 4, 1, resample="down", resample_filter=resample_filter)
    up = GatedConv2d(3, 4, 1, resample="up", resample_filter=resample_filter)
    _randomise(down)
    _randomise(up)
    x_down = F.conv2d(x, f, groups=3, stride=2, padding=pad)
    x_up = F.conv_transpose2d(x, f * 4, groups=3, stride=2, padding=pad)

    def gated(conv: GatedConv2d, z: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(torch.sigmoid(F.conv2d(z, conv.gate_weight)))
        return F.conv2d(z, conv.weight) * g + conv.bias.view(1, -1, 1, 1)

    torch.testing.assert_close(down(x), gated(down, x_down), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up(x), gated(up, x_up), rtol=1e-5, atol=1e-6)
    assert down(x).shape[-2:] == (4, 6) and up(x).shape[-2:] == (16, 24)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_matches_upstream_formula(heads: int) -> None:
    torch.manual_seed(6)
    n, c, h, w = 2, 8, 3, 5
    qkv = torch.randn(n, 3 * c, h, w)
    # Upstream: q, k, v = qkv.reshape(n*heads, c/heads, 3, hw).unbind(2);
    # weights = softmax_k(sum_c q[c, q] k[c, k] / sqrt(c/heads)); out[c, q] = sum_k w v[c, k].
    q, k, v = qkv.reshape(n * heads, c // heads, 3, h * w).unbind(2)
    weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c // heads)).softmax(dim=2)
    expected = torch.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w)
    torch.testing.assert_close(spatial_attention(qkv, heads), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ preconditioning


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_coefficient_identities(sigma: float, sigma_data: float) -> None:
    c = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), sigma_data)
    var = sigma**2 + sigma_data**2
    # The skip and output scalings split the unit: c_skip + (c_out / sigma_data)^2 = 1.
    assert float(c.c_skip + (c.c_out / sigma_data) ** 2) == pytest.approx(1.0, rel=1e-12)
    # Unit input variance: c_in^2 (sigma^2 + sigma_data^2) = 1.
    assert float(c.c_in**2 * var) == pytest.approx(1.0, rel=1e-12)
    # Unit variance of the network's effective target (y - c_skip (y + n)) / c_out, with
    # Var y = sigma_data^2 and Var n = sigma^2 (Karras et al. 2022, appendix B.6).
    target_var = (1 - c.c_skip) ** 2 * sigma_data**2 + c.c_skip**2 * sigma**2
    assert float(target_var / c.c_out**2) == pytest.approx(1.0, rel=1e-12)
    assert float(c.c_noise) == pytest.approx(math.log(sigma) / 4, rel=1e-12)


def test_edm_coefficients_known_values_and_errors() -> None:
    c = edm_coefficients(0.5, 0.5)  # sigma = sigma_data: everything splits evenly
    assert float(c.c_skip) == pytest.approx(0.5)
    assert float(c.c_out) == pytest.approx(0.5 / math.sqrt(2))
    assert float(c.c_in) == pytest.approx(math.sqrt(2))
    assert float(c.c_noise) == pytest.approx(math.log(0.5) / 4)
    assert edm_coefficients(torch.tensor([0.1, 1.0])).c_skip.shape == (2,)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        edm_coefficients(torch.tensor([0.1, 0.0]))


def _tiny_ambient_precond(scale_cond: bool = False) -> EDMPrecond:
    torch.manual_seed(7)
    net = build_unet("tiny", out_channels=4)  # spare output channels, as the reference net
    _randomise(net)
    return EDMPrecond(net, sigma_data=0.5, scale_cond=scale_cond).eval()


def test_precond_at_tiny_sigma_returns_input() -> None:
    precond = _tiny_ambient_precond()
    x = torch.randn(2, 2, 32, 24)
    mask = torch.ones(2, 2, 32, 24)
    with torch.no_grad():
        out = precond(x, 1e-6, cond=mask)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scale_cond", [False, True])
def test_precond_composition(scale_cond: bool) -> None:
    precond = _tiny_ambient_precond(scale_cond)
    x = torch.randn(2, 2, 32, 24)
    mask = (torch.rand(2, 1, 1, 24) > 0.5).float().expand(2, 1, 32, 24)
    cond = torch.cat([mask, torch.ones_like(mask)], dim=1)
    sigma = torch.tensor([0.3, 7.0])
    c = edm_coefficients(sigma.view(-1, 1, 1, 1), 0.5)
    with torch.no_grad():
        net_in = torch.cat([c.c_in * x, c.c_in * cond if scale_cond else cond], dim=1)
        f_x = precond.net(net_in, c.c_noise.flatten())
        expected = c.c_skip * x + c.c_out * f_x[:, :2]
        out = precond(x, sigma, cond=cond)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # The spare output channels must not leak into D.
    assert out.shape == (2, 2, 32, 24)


# ------------------------------------------------------------------------------ EMA


def test_ema_beta_half_life_and_rampup() -> None:
    # Without ramp-up: one half-life's worth of images halves the old weight.
    beta = ema_beta(8, half_life_images=500_000, rampup_ratio=None)
    assert beta == pytest.approx(0.5 ** (8 / 500_000))
    assert beta ** (500_000 / 8) == pytest.approx(0.5)
    # Ramp-up: half-life = images_seen * ratio while that is shorter.
    assert ema_beta(8, 500_000, 0.05, images_seen=0) == 0.0
    assert ema_beta(8, 500_000, 0.05, images_seen=1_000) == pytest.approx(0.5 ** (8 / 50))
    assert ema_beta(8, 500_000, 0.05, images_seen=10**9) == pytest.approx(0.5 ** (8 / 500_000))
    assert ema_beta(16, 500_000, 0.05, images_seen=1_000) < ema_beta(8, 500_000, 0.05, images_seen=1_000)
    with pytest.raises(ValueError):
        ema_beta(0)


def test_ema_updates_follow_the_formula() -> None:
    torch.manual_seed(8)
    model = build_unet("tiny")
    ema = EMA(model, half_life_images=100, rampup_ratio=0.05)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # First update: images_seen = 0 -> beta = 0 -> exact copy.
    assert ema.update(model, batch_size=4) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), model.parameters(), strict=True))
    assert ema.images_seen == 4
    old = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    beta = ema.update(model, batch_size=4)
    assert beta == pytest.approx(0.5 ** (4 / (4 * 0.05)))
    for avg, before, new in zip(ema.model.parameters(), old, model.parameters(), strict=True):
        torch.testing.assert_close(avg, beta * before + (1 - beta) * new)
    assert not any(p.requires_grad for p in ema.model.parameters())
    state = ema.state_dict()
    assert state.keys() == model.state_dict().keys()
    fresh = EMA(build_unet("tiny"))
    fresh.load_state_dict(state, images_seen=ema.images_seen)
    assert fresh.images_seen == 8
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


# ------------------------------------------------------------------------------ checkpoints


def _tiny_checkpoint(tmp_path: Path, precond: bool = False) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(9)
    net = build_unet("tiny")
    _randomise(net)
    model = EDMPrecond(net, sigma_data=0.5) if precond else net
    folder = save_model(tmp_path / "ckpt", model, {"preset": "tiny", "method": "ambient", "R": 4})
    return model, folder


@pytest.mark.parametrize("precond", [False, True])
def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path, precond: bool) -> None:
    model, folder = _tiny_checkpoint(tmp_path, precond)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
    loaded, config = load_model(folder)
    assert type(loaded) is type(model)
    # A config written before the rename: its "R" reads as r_train.
    assert config["preset"] == "tiny" and config["method"] == "ambient" and config["r_train"] == 4
    assert config["unet"] == PRESETS["tiny"].to_dict()
    assert set(config["versions"]) >= {"adps", "torch", "safetensors"}
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    if precond:
        assert loaded.sigma_data == 0.5 and loaded.image_channels == 2


def test_checkpoint_rebuilds_from_preset_and_overrides(tmp_path: Path) -> None:
    model, folder = _tiny_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["unet"]
    config["overrides"] = {}
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(folder)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_checkpoint_refuses_weights_of_another_preset(tmp_path: Path) -> None:
    _, folder = _tiny_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["unet"]["in_channels"] = 2  # e.g. an "edm"-style config over ambient weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights.safetensors") as err:
        load_model(folder)
    assert "enc.l0_conv.weight" in str(err.value) and "shape mismatch" in str(err.value)


def test_checkpoint_refuses_missing_extra_or_retyped_tensors(tmp_path: Path) -> None:
    _, folder = _tiny_checkpoint(tmp_path)
    weights = folder / "weights.safetensors"
    tensors = load_file(weights)

    save_file({k: v for k, v in tensors.items() if k != "out_conv.bias"}, weights)
    with pytest.raises(ValueError, match=r"weights\.safetensors.*missing tensor\(s\) out_conv\.bias"):
        load_model(folder)

    save_file({**tensors, "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) extra\.weight"):
        load_model(folder)

    save_file({**tensors, "out_conv.bias": tensors["out_conv.bias"].double()}, weights)
    with pytest.raises(ValueError, match=r"dtype mismatch .* out_conv\.bias"):
        load_model(folder)


def test_checkpoint_reports_unreadable_files(tmp_path: Path) -> None:
    _, folder = _tiny_checkpoint(tmp_path)
    (folder / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_model(folder)
    (folder / "config.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="config.json"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(folder)


def test_save_model_rejects_reserved_keys_and_leaves_no_temporaries(tmp_path: Path) -> None:
    net = build_unet("tiny")
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path / "a", net, {"preset": "tiny", "unet": {}})
    with pytest.raises(ValueError, match="JSON"):
        save_model(tmp_path / "b", net, {"preset": "tiny", "bad": object()})
    folder = save_model(tmp_path / "c", net, {"preset": "tiny"})
    save_model(folder, net, {"preset": "tiny"})  # overwrite in place
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]


def test_activation_checkpointing_gives_the_same_loss_and_gradients() -> None:
    """The memory-lean mode recomputes each block in the backward pass: with dropout on, the
    RNG state is replayed, so the loss and every gradient equal those of the plain network."""
    from adps.nn.precond import EDMPrecond
    from adps.nn.unet import set_activation_checkpointing

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = EDMPrecond(build_unet("tiny", dropout=0.2)).train()
        assert set_activation_checkpointing(model, checkpointing) == 1
        x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
        cond = torch.ones(2, 2, 32, 32)
        torch.manual_seed(2)  # the dropout masks
        loss = model(x, torch.tensor([0.5, 2.0]), cond=cond).square().sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads(False)
    lean_loss, lean_grads = loss_and_grads(True)
    assert torch.equal(plain_loss, lean_loss)
    assert len(plain_grads) == len(lean_grads)
    for a, b in zip(plain_grads, lean_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_in_a_samplers_gradient_to_x() -> None:
    """In eval mode with gradients on (DPS / A-DPS take the gradient of the data term to x),
    the blocks are recomputed in the backward pass (each block runs twice) and the gradient to
    x is the plain network's; without gradients (a plain denoiser call) nothing is recomputed."""
    from adps.nn.precond import EDMPrecond
    from adps.nn.unet import SongUNet, UNetBlock, set_activation_checkpointing

    torch.manual_seed(0)
    model = EDMPrecond(build_unet("tiny")).eval().requires_grad_(False)
    block = next(m for m in model.modules() if isinstance(m, UNetBlock))
    calls = []
    # A pre-hook: the recomputation stops as soon as it has what the backward pass needs
    # (torch.utils.checkpoint's early stop), before a forward hook would run.
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    cond = torch.ones(2, 2, 32, 32)

    def grad_to_x(checkpointing: bool) -> torch.Tensor:
        set_activation_checkpointing(model, checkpointing)
        x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        calls.clear()
        model(x, torch.tensor([0.5, 2.0]), cond=cond).square().sum().backward()
        return x.grad

    plain = grad_to_x(False)
    assert len(calls) == 1
    lean = grad_to_x(True)
    assert len(calls) == 2, "the checkpointed block runs again in the backward pass"
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-6)
    calls.clear()
    with torch.no_grad():
        model(torch.zeros(2, 2, 32, 32), torch.tensor([0.5, 2.0]), cond=cond)
    assert len(calls) == 1 and all(m.activation_checkpointing for m in model.modules() if isinstance(m, SongUNet))


def test_activation_checkpointing_is_refused_for_methods_without_the_switch() -> None:
    from adps.orchestration.train_config import TrainConfig

    with pytest.raises(ValueError, match="'activation_checkpointing': only the methods ambient, edm, edm_l1, image, "
                                         "ncsnv2 have it, not modl"):
        TrainConfig(method="modl", r_train=4, dataset="x", activation_checkpointing=True).validate(
            check_dataset=False)


def test_ambient_models_scale_their_mask_channels_as_the_reference_and_checkpoints_keep_theirs(
    tmp_path: Path,
) -> None:
    """The reference code multiplies all four input channels of the ambient network by c_in; so
    does a new ambient model (``scale_cond``), and its outputs differ from the unscaled one's at
    large sigma. A checkpoint records the setting; one written before the key existed (no
    ``scale_cond`` in its config) was trained unscaled and loads unscaled."""
    from adps.nn import build_model

    torch.manual_seed(0)
    model = build_model("ambient", "tiny")
    assert model.scale_cond is True and build_model("ambient", "tiny", scale_cond=False).scale_cond is False
    x, cond = torch.randn(1, 2, 16, 16), torch.cat([torch.ones(1, 1, 16, 16), torch.ones(1, 1, 16, 16)], dim=1)
    with torch.no_grad():
        scaled = model(x, torch.tensor([2.5]), cond=cond)
        model.scale_cond = False
        unscaled = model(x, torch.tensor([2.5]), cond=cond)
        model.scale_cond = True
    assert not torch.allclose(scaled, unscaled)
    folder = save_model(tmp_path / "ckpt", model, {"preset": "tiny", "method": "ambient", "R": 4})
    assert load_model(folder)[0].scale_cond is True
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    del config["precond"]["scale_cond"]
    config_path.write_text(json.dumps(config))
    assert load_model(folder)[0].scale_cond is False

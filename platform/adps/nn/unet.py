"""The EDM "DDPM++" U-Net (``SongUNet``) with the gated convolutions of Ambient Diffusion.

The raw network ``F`` of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models",
EDM) in its DDPM++ configuration (Song et al. 2021), with the gated convolutions that the Ambient Diffusion reference
code adds to every convolution. Preconditioning (``c_in``, ``c_skip``, ...) lives in :mod:`adps.nn.precond`.

Structure (``L`` = ``len(channel_mult)`` levels, ``B`` = ``num_blocks``)::

    embedding:  positional(noise_label) -> swap sin/cos -> Linear -> SiLU -> Linear -> SiLU
    encoder:    level 0: 3x3 conv in_channels -> model_channels, then B residual blocks;
                level l > 0: one down-sampling residual block, then B residual blocks.
                Every encoder output is kept as a skip connection.
    decoder:    lowest level: two residual blocks (the first with self-attention),
                other levels: one up-sampling residual block; then at every level B + 1
                residual blocks, each consuming one skip connection (concatenated).
    output:     GroupNorm -> SiLU -> 3x3 conv model_channels*channel_mult[0] -> out_channels.

The network is fully convolutional apart from attention, so it runs on any ``H x W`` divisible by ``2 ** (L - 1)``
(e.g. 384 x 320 with four levels), square or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adps.config import ConfigFile, from_preset

from .activation_checkpointing import ActivationCheckpointing, set_activation_checkpointing

__all__ = [
    "PRESETS", "GatedConv2d", "SongUNet", "UNetConfig", "build_unet", "count_parameters",
    "set_activation_checkpointing", "spatial_attention"
]


@dataclass(frozen=True)
class UNetConfig(ConfigFile):
    """Every hyper-parameter of :class:`SongUNet`, with the defaults of the Ambient Diffusion MRI reference
    (``--arch=ddpmpp --cres=1,1,1,1 --dropout=0.1 --augment=0``); the channel counts depend on the method
    (:data:`PRESETS`)."""

    in_channels: int
    """Channels of the network input, e.g. 2 ([Re, Im]) or 4 ([Re, Im, mask, ones])."""
    out_channels: int
    """Channels of the network output; the first two are the image estimate [Re, Im]."""
    model_channels: int = 128
    """Base channel count; level ``l`` has ``model_channels * channel_mult[l]`` channels."""
    channel_mult: tuple[int, ...] = (1, 1, 1, 1)
    """Per-level channel multipliers; its length is the number of resolution levels."""
    channel_mult_emb: int = 4
    """Embedding vector width as a multiple of ``model_channels`` (512 by default)."""
    channel_mult_noise: int = 1
    """Width of the positional noise embedding as a multiple of ``model_channels``."""
    num_blocks: int = 4
    """Residual blocks per level in the encoder (the decoder has ``num_blocks + 1``)."""
    attn_levels: tuple[int, ...] = ()
    """Levels (0 = full resolution) whose encoder blocks and last decoder block carry self-attention. Upstream selects
    them by resolution (``attn_resolutions = [16]``); at 384 x 320 no level is 16 pixels wide: none."""
    mid_attention: bool = True
    """Self-attention in the decoder's first block at the lowest level (always on upstream): with the defaults the
    network's only attention block."""
    num_heads: int = 1
    """Attention heads (DDPM++ uses a single head)."""
    dropout: float = 0.1
    """Dropout probability before each block's second convolution (training only)."""
    embedding_type: str = "positional"
    """Noise-level embedding; only DDPM++'s ``"positional"`` is implemented."""
    max_positions: int = 10000
    """Longest period of the positional embedding's sinusoids."""
    resample_filter: tuple[int, ...] = (1, 1)
    """Separable FIR filter used to down/up-sample; (1, 1) = 2x2 box / nearest neighbour."""
    gated: bool = True
    """Gated convolutions (Ambient Diffusion): every conv gets a second bias-free weight."""
    label_dim: int = 0
    """Number of class labels for class-conditional models; 0 = unconditional."""
    eps: float = 1e-6
    """GroupNorm epsilon (DDPM++ uses 1e-6)."""

    def __post_init__(self) -> None:
        # Lists sneak in from JSON/YAML; keep the dataclass hashable and comparable.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))
        object.__setattr__(self, "resample_filter", tuple(self.resample_filter))
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("UNetConfig: in_channels and out_channels must be >= 1")
        if not self.channel_mult:
            raise ValueError("UNetConfig: channel_mult must name at least one level")
        if self.embedding_type != "positional":
            raise ValueError(f"UNetConfig: embedding_type {self.embedding_type!r} is not supported "
                             "(only 'positional', the DDPM++ embedding)")
        bad_levels = [a for a in self.attn_levels if not 0 <= a < len(self.channel_mult)]
        if bad_levels:
            raise ValueError(f"UNetConfig: attn_levels {bad_levels} outside 0..{len(self.channel_mult) - 1}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig: dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_levels(self) -> int:
        """Number of resolution levels."""
        return len(self.channel_mult)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per level below the top)."""
        return 2 ** (self.num_levels - 1)


PRESETS: dict[str, UNetConfig] = {
    # The reference ambient model: [Re, Im, mask, ones] in, 4 out as upstream (img_channels = 4), whose loss keeps
    # only the first two (EDMPrecond too). The spare outputs keep the published parameter count, 36,768,644, and
    # weights interchangeable.
    "ambient": UNetConfig(in_channels=4, out_channels=4),
    # The R = 1 EDM model and the L1-EDM baselines: plain [Re, Im] in and out.
    "edm": UNetConfig(in_channels=2, out_channels=2),
    # Tests and the CPU demo: the same code paths, and four levels like the real one (with two, the attention at the
    # lowest level would attend over 30,720 positions at 384 x 320); 8 channels at the costly full resolution.
    "tiny": UNetConfig(in_channels=4, out_channels=2, model_channels=8, channel_mult=(1, 2, 2, 2), num_blocks=1),
}


def build_unet(preset: str, **overrides: Any) -> SongUNet:
    """A :class:`SongUNet` from a named preset, with any field overridden (``build_unet("tiny", in_channels=2)``)."""
    return SongUNet(from_preset(PRESETS, preset, "network", **overrides))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# -------------------------------------------------------------------------------------- initialisation
# As upstream: every conv/linear weight Xavier-uniform (fans include the kernel area) times a per-layer gain, biases 0.


def _xavier_uniform_(weight: Tensor, gain: float) -> None:
    receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out)) * gain
    with torch.no_grad():
        weight.uniform_(-bound, bound)


_GAIN_DEFAULT = 1.0
_GAIN_ZERO = 1e-5  # "init_zero": residual branches start close to the identity
_GAIN_ATTN = math.sqrt(0.2)  # attention qkv projection


class Linear(nn.Module):
    """Fully connected layer with EDM's Xavier-uniform initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = _GAIN_DEFAULT):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        _xavier_uniform_(self.weight, gain)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class GroupNorm(nn.Module):
    """Group normalisation with EDM's group rule: 32 groups, but at least 4 channels each."""

    def __init__(self, num_channels: int, eps: float, num_groups: int = 32, min_channels_per_group: int = 4):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Resample(nn.Module):
    """Parameter-free 2x down- or up-sampling with a separable FIR filter.

    Upstream's depthwise (transposed) convolution with the outer product of ``resample_filter`` (unit DC gain; times 4
    for up-sampling). For DDPM++'s (1, 1) that is exactly 2x2 average pooling and nearest-neighbour up-sampling,
    which have faster dedicated kernels, so those are used for it.
    """

    def __init__(self, mode: str, resample_filter: tuple[int, ...]):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"Resample mode must be 'up' or 'down', got {mode!r}")
        self.mode = mode
        self.is_box = tuple(resample_filter) == (1, 1)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f) / f.sum().square()
        # Not persistent: it is fixed by the config, so it has no place in a checkpoint.
        self.register_buffer("filter", f[None, None], persistent=False)
        self.pad = (f.shape[-1] - 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        if self.mode == "down":
            if self.is_box:
                return F.avg_pool2d(x, kernel_size=2, stride=2)
            f = self.filter.to(x.dtype).tile(channels, 1, 1, 1)
            return F.conv2d(x, f, groups=channels, stride=2, padding=self.pad)
        if self.is_box:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        f = (self.filter * 4).to(x.dtype).tile(channels, 1, 1, 1)
        return F.conv_transpose2d(x, f, groups=channels, stride=2, padding=self.pad)


class GatedConv2d(nn.Module):
    """2-D convolution (same padding) with an optional multiplicative gate and resampling.

    With ``gated=True`` the layer holds a second, bias-free weight ``gate_weight`` shaped like ``weight`` (the Ambient
    Diffusion reference adds one to every conv) and computes::

        y = conv(x, weight) * sigmoid(sigmoid(conv(x, gate_weight))) + bias

    The double sigmoid is on purpose: the reference code does exactly that, and its trained weights assume it. As
    upstream, the bias is added after gating. Both convolutions run as one ``conv2d`` with the two weights
    concatenated along the output channels, then split: one large GEMM instead of two smaller ones.

    ``resample`` ("up"/"down") resamples the input before the convolution, as upstream's non-fused path does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, gated: bool = True,
                 resample: str | None = None, resample_filter: tuple[int, ...] = (1, 1), gain: float = _GAIN_DEFAULT):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for same padding, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.padding = kernel_size // 2
        self.gated = gated
        self.resample = Resample(resample, resample_filter) if resample is not None else None
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        _xavier_uniform_(self.weight, gain)
        # The gate weight gets the same initialisation as the main weight, as upstream.
        self.gate_weight = nn.Parameter(torch.empty(shape)) if gated else None
        if self.gate_weight is not None:
            _xavier_uniform_(self.gate_weight, gain)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.resample is not None:
            x = self.resample(x)
        if self.gate_weight is None:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.conv2d(x, self.weight.to(x.dtype), bias, padding=self.padding)
        both = torch.cat([self.weight, self.gate_weight], dim=0).to(x.dtype)
        value, gate = F.conv2d(x, both, padding=self.padding).split(self.out_channels, dim=1)
        # Double sigmoid: kept from the reference implementation (see class docstring).
        out = value * torch.sigmoid(torch.sigmoid(gate))
        if self.bias is not None:
            # In the output's dtype, not the input's: under autocast a float32 input gives a bf16 output, and a float32
            # bias would promote the whole residual stream to float32 (twice the memory traffic after it).
            out = out + self.bias.to(out.dtype).view(1, -1, 1, 1)
        return out


class UNetBlock(nn.Module):
    """DDPM++ residual block with optional 2x resampling and single-/multi-head attention.

    ``x -> GN -> SiLU -> conv0(resample) -> + emb -> GN -> SiLU -> dropout -> conv1``, added to the (projected)
    shortcut and scaled by sqrt(1/2); then optionally ``x -> x + proj(attention(qkv(GN(x))))``, again scaled.
    """

    # sqrt(1/2) keeps the variance of "residual + shortcut" at that of one branch.
    skip_scale = math.sqrt(0.5)

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, cfg: UNetConfig,
                 resample: str | None = None, attention: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = cfg.dropout
        self.num_heads = cfg.num_heads if attention else 0
        conv_kw = dict(gated=cfg.gated, resample_filter=cfg.resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=cfg.eps)
        self.conv0 = GatedConv2d(in_channels, out_channels, 3, resample=resample, **conv_kw)
        # DDPM++ adds the embedding as a per-channel shift (no adaptive scale).
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps=cfg.eps)
        self.conv1 = GatedConv2d(out_channels, out_channels, 3, gain=_GAIN_ZERO, **conv_kw)

        # Shortcut: identity when shapes agree, else a gated 1x1 projection (also when only resampling, as DDPM++).
        self.skip = None
        if in_channels != out_channels or resample is not None:
            self.skip = GatedConv2d(in_channels, out_channels, 1, resample=resample, **conv_kw)

        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"{out_channels} channels cannot be split into {self.num_heads} heads")
            self.norm2 = GroupNorm(out_channels, eps=cfg.eps)
            self.qkv = GatedConv2d(out_channels, 3 * out_channels, 1, gain=_GAIN_ATTN, **conv_kw)
            self.proj = GatedConv2d(out_channels, out_channels, 1, gain=_GAIN_ZERO, **conv_kw)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shortcut = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb).to(x.dtype)[:, :, None, None]))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(shortcut) if self.skip is not None else shortcut)) * self.skip_scale

        if self.num_heads:
            a = spatial_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


def spatial_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention over the pixels of a ``(N, 3C, H, W)`` qkv tensor.

    The channel layout is upstream's, ``qkv.reshape(N * heads, C // heads, 3, H * W)``, so that weights stay
    interchangeable with the reference. Returns ``(N, C, H, W)``.
    """
    n, c3, h, w = qkv.shape
    c = c3 // 3
    qkv = qkv.reshape(n, num_heads, c // num_heads, 3, h * w)
    q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))  # each (N, heads, HW, C/heads)
    # softmax(q k^T / sqrt(d)) v, as upstream's AttentionOp; the fused kernel keeps the softmax statistics in fp32.
    a = F.scaled_dot_product_attention(q, k, v)
    return a.transpose(-1, -2).reshape(n, c, h, w)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the (scalar) noise label: frequencies ``(1 / max_positions) ** (i /
    (n/2 - 1))``, i = 0..n/2-1 (``endpoint=True`` upstream), output ``[cos(x f), sin(x f)]``."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        if num_channels % 2 or num_channels < 4:
            raise ValueError(f"positional embedding needs an even width >= 4, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1)
        freqs = (1.0 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(ActivationCheckpointing, nn.Module):
    """EDM's ``SongUNet`` (DDPM++ encoder/decoder, "standard" types) with gated convs: the raw network ``F`` (no
    preconditioning; ``noise_labels`` is ``c_noise``)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_channels = cfg.model_channels * cfg.channel_mult_emb
        noise_channels = cfg.model_channels * cfg.channel_mult_noise
        conv_kw = dict(gated=cfg.gated, resample_filter=cfg.resample_filter)

        # Mapping network: noise label (and class label) -> embedding vector.
        self.map_noise = PositionalEmbedding(noise_channels, max_positions=cfg.max_positions)
        self.map_label = Linear(cfg.label_dim, noise_channels) if cfg.label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        def block(cin: int, cout: int, resample: str | None = None, attention: bool = False) -> UNetBlock:
            return UNetBlock(cin, cout, emb_channels, cfg, resample=resample, attention=attention)

        # Encoder. Names are "l<level>_<role>" (upstream's "<res>x<res>" means nothing for non-square images).
        self.enc = nn.ModuleDict()
        skip_channels: list[int] = []
        cout = cfg.in_channels
        for level, mult in enumerate(cfg.channel_mult):
            if level == 0:
                cin, cout = cout, cfg.model_channels
                self.enc[f"l{level}_conv"] = GatedConv2d(cin, cout, 3, **conv_kw)
            else:
                self.enc[f"l{level}_down"] = block(cout, cout, resample="down")
            skip_channels.append(cout)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, cfg.model_channels * mult
                self.enc[f"l{level}_block{idx}"] = block(cin, cout, attention=level in cfg.attn_levels)
                skip_channels.append(cout)

        # Decoder: mirror image; each block after the first one(s) eats one skip.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            if level == cfg.num_levels - 1:
                self.dec[f"l{level}_in0"] = block(cout, cout, attention=cfg.mid_attention)
                self.dec[f"l{level}_in1"] = block(cout, cout)
            else:
                self.dec[f"l{level}_up"] = block(cout, cout, resample="up")
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), cfg.model_channels * mult
                attention = idx == cfg.num_blocks and level in cfg.attn_levels
                self.dec[f"l{level}_block{idx}"] = block(cin, cout, attention=attention)
        assert not skip_channels, "every skip connection must be consumed"

        self.out_norm = GroupNorm(cout, eps=cfg.eps)
        self.out_conv = GatedConv2d(cout, cfg.out_channels, 3, gain=_GAIN_ZERO, **conv_kw)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Apply the network.

        Args:
            x: ``(N, in_channels, H, W)``; H and W multiples of ``config.size_multiple``.
            noise_labels: ``(N,)`` (or a scalar, broadcast to N) conditioning values.
            class_labels: ``(N, label_dim)`` one-hot/soft labels; only if ``label_dim > 0``.

        Returns:
            ``(N, out_channels, H, W)``.
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected input (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        m = cfg.size_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"input size {x.shape[2]}x{x.shape[3]} is not divisible by {m} "
                             f"(required by {cfg.num_levels} resolution levels)")
        noise_labels = noise_labels.reshape(-1).to(x.dtype)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(x.shape[0])

        emb = self.map_noise(noise_labels)
        # Upstream swaps the halves to [sin, cos]; kept for weight compatibility.
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: class_labels is required")
            # Scaling by sqrt(label_dim) gives the one-hot input unit norm per feature, as upstream.
            emb = emb + self.map_label(class_labels.to(x.dtype) * math.sqrt(cfg.label_dim))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips: list[Tensor] = []
        for layer in self.enc.values():
            x = self.checkpointed(layer, x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)

        for name, layer in self.dec.items():
            if "_block" in name:  # "in0", "in1" and "up" blocks take no skip connection
                x = torch.cat([x, skips.pop()], dim=1)
            x = self.checkpointed(layer, x, emb)

        return self.out_conv(F.silu(self.out_norm(x)))

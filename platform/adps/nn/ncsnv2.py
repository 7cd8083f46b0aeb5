"""A compact NCSNv2 score network (Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative
Models"), the R = 1 ALD baseline of the study.

NCSNv2 is a RefineNet (Lin et al. 2017) of pre-activation residual blocks with instance normalisation "++",
conditioned on the noise level only through its output: ``s(x, sigma) = F(x) / sigma`` (technique 3 of the paper:
the optimal score scales like ``1 / sigma``). Structure::

    begin conv -> stages (each: first block changes channels and down-samples or dilates,
    then residual blocks) -> RefineNet decoder from the coarsest stage up (residual conv
    units, multi-resolution fusion, chained residual pooling) -> norm -> act -> end conv
    -> divide by sigma

Preset ``ncsnv2`` is the "NCSNv2Deepest" layout (6 stages, ngf 128) that Jalal et al. 2021 trained on FastMRI brain
MVUE images, with their noise schedule; ``tiny`` keeps every code path at a CPU-test size. Differences from the
reference implementation, on purpose: no ``2x - 1`` input rescaling (it is for [0, 1] natural images, not complex
MRI), and the first block of a dilated stage is a plain dilated block (upstream's "down" variant with dilation changes
channels one conv later; the receptive field is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adps.config import ConfigFile, from_preset

from .activation_checkpointing import ActivationCheckpointing
from .objectives import ncsn_sigmas

__all__ = ["NCSNV2_PRESETS", "NCSNv2", "NCSNv2Config", "build_ncsnv2"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"elu": nn.ELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class NCSNv2Config(ConfigFile):
    """Every hyper-parameter of :class:`NCSNv2` (defaults: the ``ncsnv2`` preset)."""

    in_channels: int = 2
    """Image channels in and out ([Re, Im])."""
    ngf: int = 128
    """Base feature count; stage ``i`` has ``ngf * channel_mult[i]`` channels."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 2, 4, 4)
    """Per-stage channel multipliers (NCSNv2Deepest: res1, res2, res3, res31, res4, res5)."""
    downsample: tuple[bool, ...] = (False, True, True, True, False, False)
    """Whether a stage halves the resolution (its first block: conv then 2x2 mean pool)."""
    dilation: tuple[int, ...] = (1, 1, 1, 1, 2, 4)
    """Dilation of the stage's 3x3 convs (the deepest stages grow the receptive field this way)."""
    blocks_per_stage: int = 2
    """Residual blocks per stage (the first one changes channels / resolution)."""
    activation: str = "elu"
    """Nonlinearity: "elu" (NCSNv2), "relu" or "silu"."""
    sigma_begin: float = 232.0
    """Largest training noise level (recorded with the weights; used by training and ALD)."""
    sigma_end: float = 0.0066
    """Smallest training noise level."""
    num_scales: int = 2311
    """Number of geometric noise levels."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "downsample", tuple(bool(d) for d in self.downsample))
        object.__setattr__(self, "dilation", tuple(int(d) for d in self.dilation))
        stages = len(self.channel_mult)
        if stages < 1 or len(self.downsample) != stages or len(self.dilation) != stages:
            raise ValueError("NCSNv2Config: channel_mult, downsample and dilation need one entry per stage, got "
                             f"{len(self.channel_mult)}, {len(self.downsample)}, {len(self.dilation)}")
        if self.downsample[0]:
            raise ValueError("NCSNv2Config: the first stage works at full resolution (downsample[0] = False)")
        if self.ngf < 2 or self.blocks_per_stage < 1:
            raise ValueError("NCSNv2Config: ngf must be >= 2 and blocks_per_stage >= 1")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"NCSNv2Config: activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        ncsn_sigmas(self.sigma_begin, self.sigma_end, self.num_scales)  # validates the schedule

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** sum(self.downsample)


NCSNV2_PRESETS: dict[str, NCSNv2Config] = {
    # NCSNv2Deepest, ngf 128, and the brain-T2 noise schedule of Jalal et al. 2021.
    "ncsnv2": NCSNv2Config(),
    # Every code path (down-sampling, dilation, fusion of several inputs) at a CPU-test size.
    "tiny": NCSNv2Config(ngf=8, channel_mult=(1, 2, 2), downsample=(False, True, False), dilation=(1, 1, 2),
                         blocks_per_stage=1, sigma_begin=5.0, sigma_end=0.01, num_scales=10),
}


def build_ncsnv2(preset: str, **overrides: Any) -> NCSNv2:
    """Build an :class:`NCSNv2` from a named preset with any field overridden."""
    return NCSNv2(from_preset(NCSNV2_PRESETS, preset, "NCSNv2", **overrides))


class InstanceNormPlusPlus2d(nn.Module):
    """Instance normalisation "++" (NCSNv2, unconditional form).

    Plain instance norm removes each channel's mean (for images the balance between channels); "++" adds the
    normalised channel means back with a learned weight: ``y = gamma * (IN(x) + alpha * (mu - mean(mu)) / std(mu)) +
    beta``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        means = x.mean(dim=(2, 3))
        centred = means - means.mean(dim=1, keepdim=True)
        means = centred / (means.var(dim=1, keepdim=True) + self.eps).sqrt()
        h = F.instance_norm(x, eps=self.eps) + means[..., None, None] * self.alpha[None, :, None, None]
        return self.gamma[None, :, None, None] * h + self.beta[None, :, None, None]


def _conv3x3(cin: int, cout: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    """Convolution followed by 2x2 mean pooling (NCSNv2's down-sampling)."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(act(norm(conv(act(norm(x))))))``."""

    def __init__(self, cin: int, cout: int, act: type[nn.Module], downsample: bool = False, dilation: int = 1):
        super().__init__()
        self.norm1 = InstanceNormPlusPlus2d(cin)
        self.conv1 = _conv3x3(cin, cout, dilation)
        self.norm2 = InstanceNormPlusPlus2d(cout)
        self.conv2: nn.Module = ConvMeanPool(cout, cout, 3) if downsample else _conv3x3(cout, cout, dilation)
        self.act = act()
        self.shortcut: nn.Module | None = None
        if downsample:
            self.shortcut = ConvMeanPool(cin, cout, 1)
        elif cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return h + (self.shortcut(x) if self.shortcut is not None else x)


class ResidualConvUnit(nn.Module):
    """RefineNet's RCU: ``n_blocks`` times ``x + conv(act(conv(act(x))))`` (bias-free convs)."""

    def __init__(self, features: int, act: type[nn.Module], n_blocks: int, n_stages: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(_conv3x3(features, features, bias=False) for _ in range(n_stages)) for _ in range(n_blocks)
        )
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        for convs in self.blocks:
            residual = x
            for conv in convs:
                x = conv(self.act(x))
            x = x + residual
        return x


class ChainedResidualPooling(nn.Module):
    """RefineNet's CRP, cheap large-context aggregation: ``x <- x + conv(maxpool5(...))`` chained ``n_stages`` times."""

    def __init__(self, features: int, act: type[nn.Module], n_stages: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(features, features, bias=False) for _ in range(n_stages))
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(F.max_pool2d(path, kernel_size=5, stride=1, padding=2))
            x = x + path
        return x


class RefineBlock(nn.Module):
    """RefineNet block: adapt each input (RCU), fuse at the finest resolution, pool, output RCU."""

    def __init__(self, in_channels: list[int], features: int, act: type[nn.Module], end: bool = False):
        super().__init__()
        self.adapt = nn.ModuleList(ResidualConvUnit(c, act, n_blocks=2) for c in in_channels)
        # Multi-resolution fusion: project every input to `features` (only needed for >1 input).
        self.fuse = nn.ModuleList(_conv3x3(c, features) for c in in_channels) if len(in_channels) > 1 else None
        self.pool = ChainedResidualPooling(features, act)
        self.output = ResidualConvUnit(features, act, n_blocks=3 if end else 1)

    def forward(self, inputs: list[Tensor], size: torch.Size) -> Tensor:
        adapted = [unit(x) for unit, x in zip(self.adapt, inputs, strict=True)]
        if self.fuse is None:
            fused = adapted[0]
        else:
            fused = sum(
                F.interpolate(conv(x), size=size, mode="bilinear", align_corners=True) if x.shape[-2:] != size else conv(x)
                for conv, x in zip(self.fuse, adapted, strict=True)
            )
        return self.output(self.pool(fused))


class NCSNv2(ActivationCheckpointing, nn.Module):
    """NCSNv2 score network ``s(x, sigma) = F(x) / sigma``.

    ``forward(x, sigma)``: ``x`` ``(N, in_channels, H, W)`` (H, W multiples of ``config.size_multiple``), ``sigma``
    ``(N,)`` or a scalar; returns the score estimate ``(N, in_channels, H, W)`` in float32.
    """

    def __init__(self, config: NCSNv2Config):
        super().__init__()
        self.config = cfg = config
        act = _ACTIVATIONS[cfg.activation]
        channels = [cfg.ngf * m for m in cfg.channel_mult]
        self.begin_conv = _conv3x3(cfg.in_channels, cfg.ngf)
        self.stages = nn.ModuleList()
        cin = cfg.ngf
        for cout, down, dil in zip(channels, cfg.downsample, cfg.dilation, strict=True):
            blocks = [ResidualBlock(cin, cout, act, downsample=down, dilation=dil)]
            blocks += [ResidualBlock(cout, cout, act, dilation=dil) for _ in range(cfg.blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))
            cin = cout
        # Decoder, coarsest stage first: refine[i] fuses stage i with refine[i + 1]'s output
        # and emits the channel count of stage i - 1 (ngf at the top), as NCSNv2Deepest does.
        last = len(channels) - 1
        self.refine = nn.ModuleList()
        for i in range(len(channels)):
            inputs = [channels[i]] if i == last else [channels[i], _refine_out(channels, i + 1)]
            self.refine.append(RefineBlock(inputs, _refine_out(channels, i), act, end=i == 0))
        self.end_norm = InstanceNormPlusPlus2d(channels[0])
        self.end_act = act()
        self.end_conv = _conv3x3(channels[0], cfg.in_channels)

    def sigmas(self) -> Tensor:
        """The geometric noise levels this network is trained on (from its config)."""
        cfg = self.config
        return ncsn_sigmas(cfg.sigma_begin, cfg.sigma_end, cfg.num_scales)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected input (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        m = cfg.size_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"input size {x.shape[2]}x{x.shape[3]} is not divisible by {m}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {x.shape[0]}")

        features = []
        h = self.begin_conv(x)
        for stage in self.stages:
            for block in stage:
                h = self.checkpointed(block, h)
            features.append(h)
        h = None
        for i in reversed(range(len(features))):
            inputs = [features[i]] if h is None else [features[i], h]
            h = self.checkpointed(self.refine[i], inputs, features[i].shape[-2:])
        out = self.end_conv(self.end_act(self.end_norm(h))).float()
        # Technique 3 of NCSNv2: the noise level enters only as the 1/sigma output scaling.
        return out / sigma.view(-1, 1, 1, 1)


def _refine_out(channels: list[int], i: int) -> int:
    """Output channels of the refine block of stage ``i``: stage ``i - 1``'s, ngf at the top."""
    return channels[i - 1] if i > 0 else channels[0]

"""Networks and their wrappers (no Ray, no MLflow): the gated DDPM++ U-Net, EDM
preconditioning, the weight EMA and the safetensors checkpoint format."""

from .checkpoint import load_model, save_model
from .ema import EMA, ema_beta
from .precond import EDMCoefficients, EDMPrecond, edm_coefficients
from .unet import PRESETS, GatedConv2d, SongUNet, UNetConfig, build_unet, count_parameters

__all__ = [
    "EMA",
    "PRESETS",
    "EDMCoefficients",
    "EDMPrecond",
    "GatedConv2d",
    "SongUNet",
    "UNetConfig",
    "build_unet",
    "count_parameters",
    "edm_coefficients",
    "ema_beta",
    "load_model",
    "save_model",
]

"""Networks, objectives and the training step (no Ray, no MLflow): the gated DDPM++ U-Net,
EDM preconditioning, NCSNv2 and MoDL, the losses of every method, the weight EMA, the
safetensors checkpoint format and one training step per method."""

from .checkpoint import load_model, save_model
from .ema import EMA, ema_beta
from .modl import MODL_PRESETS, MoDL, MoDLConfig, build_modl
from .ncsnv2 import NCSNV2_PRESETS, NCSNv2, NCSNv2Config, build_ncsnv2
from .objectives import (
    ambient_loss,
    ambient_network_input,
    channels_to_complex,
    complex_to_channels,
    dsm_loss,
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
from .precond import EDMCoefficients, EDMPrecond, edm_coefficients
from .reconstruct import a_os, denoise_once, reconstruct, unrolled, validation_nrmse
from .train_step import BATCH_KEYS, METHODS, PAPER_PRESETS, build_model, make_synthetic_batch, method_loss, train_step
from .unet import PRESETS, GatedConv2d, SongUNet, UNetConfig, build_unet, count_parameters

__all__ = [
    "BATCH_KEYS",
    "EMA",
    "METHODS",
    "MODL_PRESETS",
    "NCSNV2_PRESETS",
    "PAPER_PRESETS",
    "PRESETS",
    "EDMCoefficients",
    "EDMPrecond",
    "GatedConv2d",
    "MoDL",
    "MoDLConfig",
    "NCSNv2",
    "NCSNv2Config",
    "SongUNet",
    "UNetConfig",
    "a_os",
    "ambient_loss",
    "ambient_network_input",
    "build_model",
    "build_modl",
    "build_ncsnv2",
    "build_unet",
    "channels_to_complex",
    "complex_to_channels",
    "count_parameters",
    "denoise_once",
    "dsm_loss",
    "edm_coefficients",
    "edm_loss",
    "edm_weight",
    "ema_beta",
    "load_model",
    "make_synthetic_batch",
    "mask_channels",
    "method_loss",
    "modl_loss",
    "ncsn_sigmas",
    "reconstruct",
    "sample_noise",
    "sample_sigma",
    "save_model",
    "ssdu_loss",
    "ssdu_split",
    "train_step",
    "unrolled",
    "validation_nrmse",
]

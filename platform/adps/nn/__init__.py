"""Networks, objectives and the training step (no Ray, no MLflow): the gated DDPM++ U-Net,
EDM preconditioning, NCSNv2 and MoDL, the losses of every method, the weight EMA, the
safetensors checkpoint format, one training step per method, and the samplers
(:mod:`adps.nn.samplers`; ``a_os`` / ``unrolled`` here are the one-pass reconstructions of
:mod:`adps.nn.reconstruct`, their shared-signature forms are ``samplers.a_os`` / ``samplers.unrolled``)."""

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
from .reconstruct import a_os, denoise_once, reconstruct, unrolled, validation_metric
from .samplers import (
    DEFAULT_STEPS,
    METHOD_SAMPLERS,
    SAMPLER_DEFAULTS,
    SAMPLERS,
    a_dps,
    ald,
    default_sigmas,
    dps,
    l1_wavelet,
    prior_heun,
    run_sampler,
    sampler_for,
    train_masks,
)
from .schedules import ald_sigmas, edm_sigmas, geometric_sigmas
from .train_step import (
    BATCH_KEYS,
    IMAGE_METHODS,
    METHODS,
    MRI_METHODS,
    PAPER_PRESETS,
    build_model,
    make_optimizer,
    method_loss,
    train_step,
)
from .unet import PRESETS, GatedConv2d, SongUNet, UNetConfig, build_unet, count_parameters

__all__ = [
    "BATCH_KEYS", "DEFAULT_STEPS", "EMA", "IMAGE_METHODS", "METHODS", "METHOD_SAMPLERS", "MODL_PRESETS", "MRI_METHODS",
    "NCSNV2_PRESETS", "PAPER_PRESETS", "PRESETS", "SAMPLERS", "SAMPLER_DEFAULTS", "EDMCoefficients", "EDMPrecond",
    "GatedConv2d", "MoDL", "MoDLConfig", "NCSNv2", "NCSNv2Config", "SongUNet", "UNetConfig", "a_dps", "a_os", "ald",
    "ald_sigmas", "ambient_loss", "ambient_network_input", "build_model", "build_modl", "build_ncsnv2", "build_unet",
    "channels_to_complex", "complex_to_channels", "count_parameters", "default_sigmas", "denoise_once", "dps",
    "dsm_loss", "edm_coefficients", "edm_loss", "edm_sigmas", "edm_weight", "ema_beta", "geometric_sigmas",
    "l1_wavelet", "load_model", "make_optimizer", "mask_channels", "method_loss", "modl_loss", "ncsn_sigmas",
    "prior_heun", "reconstruct", "run_sampler", "sample_noise", "sample_sigma", "sampler_for", "save_model",
    "ssdu_loss", "ssdu_split", "train_masks", "train_step", "unrolled", "validation_metric"
]

"""MRI physics core: FFT convention, SENSE operator, masks, coil tools, reconstructions.

Layer 1 of the platform (see ARCHITECTURE.md): pure torch / numpy, no Ray, no MLflow.
"""

from adps.mri.coils import (
    CoilCompression,
    align_map_phase,
    apply_coil_matrix,
    background_patch,
    coil_compress,
    espirit_maps,
    noise_covariance,
    normalization_constant,
    principal_coil,
    rss,
    whiten,
    whitening_matrix,
)
from adps.mri.fft import fft2c, ifft2c
from adps.mri.masks import acs_columns, column_mask, further_corrupted_mask, lines_at, slice_masks
from adps.mri.recon import L1_SCALINGS, bart_scale, cg_sense, conjugate_gradient, l1_wavelet_recon, mvue, zero_filled
from adps.mri.sense import SenseOperator, check_maps

__all__ = [
    "CoilCompression", "L1_SCALINGS", "SenseOperator", "acs_columns", "align_map_phase", "apply_coil_matrix",
    "background_patch", "bart_scale", "cg_sense", "check_maps", "coil_compress", "column_mask", "conjugate_gradient",
    "espirit_maps", "fft2c", "further_corrupted_mask", "ifft2c", "l1_wavelet_recon", "lines_at", "mvue",
    "noise_covariance", "normalization_constant", "principal_coil", "rss", "slice_masks", "whiten", "whitening_matrix",
    "zero_filled"
]

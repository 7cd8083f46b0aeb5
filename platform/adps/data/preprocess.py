"""Per-slice preparation of raw multi-coil k-space, as METHOD.md ("Data", "Masks") specifies.

:class:`PrepareConfig` holds every setting of ``adps prepare`` with METHOD.md's values as
defaults; :func:`preprocess_slice` turns one raw slice into the arrays of the prepared-dataset
contract (``docs/data_format.md``):

1. image-domain crop of the central ``384 x 320`` (removes the readout oversampling);
2. noise covariance from a ``30 x 30`` background patch in a corner of the cropped coil images,
   and pre-whitening with its inverse Cholesky factor;
3. normalisation: k-space divided by the 99th percentile of the RSS image of the central
   ``24 x 24`` k-space;
4. train: SVD coil compression to 4 virtual coils (validation and test keep every coil);
5. ESPIRiT maps (one set, no crop), rotated to the phase convention of every split (the
   image's phase is the phase of the scan's first virtual coil, whatever the coil basis:
   :func:`adps.mri.align_map_phase`), and the CG-SENSE reference (30 iterations, R = 1);
6. per acceleration ``R``: the slice's column mask and its further-corrupted ``R + 1`` mask,
   reproducible from ``(seed, slice id)``; optionally L1-wavelet reconstructions at each ``R``
   and the MVUE.

Layer 1 (see ARCHITECTURE.md): numpy / torch only, no Ray, no MLflow.
"""

from __future__ import annotations

import hashlib
import math
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adps.config import ConfigFile
from adps.mri import (
    SenseOperator,
    align_map_phase,
    background_patch,
    cg_sense,
    coil_compress,
    espirit_maps,
    fft2c,
    ifft2c,
    l1_wavelet_recon,
    lines_at,
    mvue,
    noise_covariance,
    normalization_constant,
    principal_coil,
    slice_masks,
    whiten,
)

SPLITS = ("train", "val", "test")
"""The splits of a prepared dataset, in the order they are processed and listed."""

COMPRESSED_SPLITS = ("train",)
"""The splits compressed to ``virtual_coils`` (METHOD.md: training). Validation keeps every coil
like test, so that a sampler search on it sees the test split's coil setting."""

METADATA_KEYS = ("normalization", "noise_std", "noise_covariance", "coil_energy_kept")
"""Keys of :func:`preprocess_slice`'s result that describe the slice (manifest, tests) rather
than being stored as shard datasets."""

# Settings that change how the work is executed, never the bytes it produces: a resumed job may
# change them (more CPUs per task on a bigger cluster) without being refused as "another config".
EXECUTION_ONLY_KEYS = ("cpus_per_task",)


@dataclass
class PrepareConfig(ConfigFile):
    """Settings of ``adps prepare``; every default is METHOD.md's value, visible here.

    Load with :meth:`from_yaml` or :meth:`from_dict` (unknown keys are refused by name);
    :meth:`to_dict` gives the JSON-ready form recorded in the manifest.
    """

    source: str = ""
    """Folder or ``s3://bucket/prefix`` holding FastMRI multi-coil ``.h5`` volumes."""
    output: str = ""
    """Folder or ``s3://bucket/prefix`` the prepared dataset is written to."""
    acquisition: str = "AXT2"
    """Only volumes whose ``acquisition`` attribute equals this are used (T2-weighted axial)."""
    n_volumes: int = 2000
    """Training volumes drawn at random (seeded) from those that match; all if fewer."""
    slices_per_volume: int = 5
    """Centre slices taken from each volume (2,000 x 5 = the paper's 10,000 training slices)."""
    test_volumes: int = 20
    """Volumes held out for testing (20 x 5 = METHOD.md's 100 test slices); all coils kept."""
    val_volumes: int = 20
    """Volumes held out for validation; all coils kept, like test (Ray Tune searches on them)."""
    held_out_within_draw: bool = False
    """False (the paper): test and validation volumes come from scans outside the ``n_volumes``
    training scans. True: they are taken out of them (fewer training scans; adps before schema 2)."""
    seed: int = 0
    """Seed of the volume draw, the split and every mask."""
    crop: tuple[int, int] = (384, 320)
    """Image-domain ``(rows, columns)`` kept around the centre (removes readout oversampling)."""
    noise_patch: int = 30
    """Side of the square background patch the noise covariance is estimated from."""
    noise_corner: str = "top-left"
    """Corner of the cropped coil images the noise patch is taken from (object-free)."""
    virtual_coils: int = 4
    """SVD-compressed coil count of the training split (validation and test: all coils)."""
    calib_width: int = 24
    """ESPIRiT calibration region width, and the side of the central k-space block whose RSS
    image gives the normalisation constant."""
    norm_percentile: float = 99.0
    """Percentile of that RSS image that k-space is divided by."""
    espirit_threshold: float = 0.02
    """ESPIRiT singular-value threshold (sigpy's default)."""
    espirit_kernel_width: int = 6
    """ESPIRiT kernel width (sigpy's default)."""
    reference_iterations: int = 30
    """CG-SENSE iterations of the fully sampled reference image."""
    accelerations: tuple[float, ...] = (2, 4, 6, 8)
    """Accelerations ``R`` whose masks (and optional L1 reconstructions) are stored."""
    acs: int = 20
    """Central phase-encode columns every mask keeps."""
    l1: bool = False
    """Also store L1-wavelet reconstructions at each ``R`` (the L1-EDM baseline's targets)."""
    l1_lam: float = 0.001
    """L1-wavelet regularisation weight (BART scale)."""
    l1_iterations: int = 100
    """L1-wavelet solver iterations."""
    l1_wavelet: str = "db2"
    """L1-wavelet's wavelet (PyWavelets name): BART's Daubechies-2, as the paper's baseline."""
    l1_scaling: str = "bart"
    """How ``l1_lam`` relates to the data: ``bart`` (BART's automatic data scale, ``pics``
    without ``-w``) or ``none`` (``pics -w 1``); :func:`adps.mri.recon.l1_wavelet_recon`."""
    mvue: bool = False
    """Also store the MVUE of the fully sampled k-space."""
    shard_size: int = 64
    """Slices per shard (at most 64, the format's limit); the last shard of a split may hold fewer."""
    cpus_per_task: float = 1
    """CPUs Ray reserves per volume task; execution only (tasks compute on one thread, so the output
    does not change): reserve more only to run fewer tasks at once, e.g. when memory is short."""

    MAX_SHARD_SIZE: typing.ClassVar[int] = 64

    def data_dict(self) -> dict[str, Any]:
        """The settings that determine the prepared bytes (everything but execution settings)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_ONLY_KEYS}

    # Checking ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse settings that cannot work, before any expensive stage starts."""
        if not self.source:
            raise ValueError("config key 'source' is required: a folder or s3:// prefix of FastMRI .h5 files")
        if not self.output:
            raise ValueError("config key 'output' is required: a folder or s3:// prefix for the prepared dataset")
        for key in ("n_volumes", "slices_per_volume", "noise_patch", "virtual_coils", "calib_width",
                    "espirit_kernel_width", "shard_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("test_volumes", "val_volumes", "reference_iterations", "l1_iterations", "acs"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        if self.held_out_within_draw and self.test_volumes + self.val_volumes > self.n_volumes:
            raise ValueError(f"config keys test_volumes + val_volumes ({self.test_volumes} + {self.val_volumes}) "
                             f"exceed n_volumes ({self.n_volumes})")
        if self.shard_size > self.MAX_SHARD_SIZE:
            raise ValueError(f"config key 'shard_size' must be <= {self.MAX_SHARD_SIZE}, got {self.shard_size}")
        rows, cols = self.crop
        if rows < 1 or cols < 1:
            raise ValueError(f"config key 'crop' must be two positive sizes, got {list(self.crop)}")
        for key in ("noise_patch", "calib_width"):
            if getattr(self, key) > min(rows, cols):
                raise ValueError(f"config key {key!r} ({getattr(self, key)}) exceeds the crop {rows} x {cols}")
        if self.noise_corner not in ("top-left", "top-right", "bottom-left", "bottom-right"):
            raise ValueError("config key 'noise_corner' must be top-left, top-right, bottom-left or bottom-right, "
                             f"got {self.noise_corner!r}")
        if not 0 < self.norm_percentile <= 100:
            raise ValueError(f"config key 'norm_percentile' must be in (0, 100], got {self.norm_percentile}")
        if not self.accelerations:
            raise ValueError("config key 'accelerations' must list at least one R")
        if len(set(mask_key(r) for r in self.accelerations)) != len(self.accelerations):
            raise ValueError(f"config key 'accelerations' repeats a value: {list(self.accelerations)}")
        for acceleration in self.accelerations:
            if acceleration < 1:
                raise ValueError(f"config key 'accelerations': R must be >= 1, got {acceleration}")
            further = lines_at(cols, acceleration + 1)
            if further < self.acs:
                raise ValueError(f"config key 'accelerations': at R+1 = {acceleration + 1:g} a mask keeps floor("
                                 f"{cols}/{acceleration + 1:g}) = {further} columns, fewer than the {self.acs} ACS "
                                 "columns (key 'acs')")
        if self.l1_scaling not in ("bart", "none"):
            raise ValueError(f"config key 'l1_scaling' must be bart or none, got {self.l1_scaling!r}")
        import pywt

        if self.l1_wavelet not in pywt.wavelist(kind="discrete"):
            raise ValueError(f"config key 'l1_wavelet': {self.l1_wavelet!r} is not a discrete PyWavelets wavelet "
                             "(BART's dau2 is db2)")
        if self.cpus_per_task <= 0:
            raise ValueError(f"config key 'cpus_per_task' must be > 0, got {self.cpus_per_task}")


# Identifiers -----------------------------------------------------------------------------------
def volume_id(source: str) -> str:
    """The volume's identifier: its file name without ``.h5`` (the same for local and S3 copies)."""
    return str(source).rstrip("/").rsplit("/", 1)[-1].removesuffix(".h5")


def slice_id(volume: str, slice_index: int) -> int:
    """A stable non-negative 63-bit integer per ``(volume id, slice index)``.

    Derived from ``sha256("volume:index")``, so a slice's id -- and with it its masks -- does
    not depend on which other volumes were drawn or in which order they were processed.
    """
    digest = hashlib.sha256(f"{volume}:{int(slice_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def mask_key(acceleration: float) -> str:
    """Dataset name suffix of acceleration ``R``: ``2 -> "r2"``, ``2.5 -> "r2.5"``."""
    return f"r{acceleration:g}"


# Per-slice preprocessing -----------------------------------------------------------------------
def center_crop_image(coil_images: torch.Tensor, rows: int, cols: int, *, label: str) -> torch.Tensor:
    """The central ``rows x cols`` of coil images ``(C, H, W)``, keeping the centre at ``(H//2, W//2)``."""
    _, height, width = coil_images.shape
    if height < rows or width < cols:
        raise ValueError(f"{label}: image is {height} x {width}, smaller than the crop {rows} x {cols}")
    r0, c0 = height // 2 - rows // 2, width // 2 - cols // 2
    return coil_images[:, r0 : r0 + rows, c0 : c0 + cols]


def check_kspace(kspace: torch.Tensor, *, label: str) -> None:
    """Refuse k-space that cannot be prepared: wrong shape, not complex, NaN/Inf or all zero."""
    if kspace.ndim != 3:
        raise ValueError(f"{label}: expected k-space of shape (coils, rows, columns), got {tuple(kspace.shape)}")
    if not kspace.is_complex():
        raise ValueError(f"{label}: expected complex k-space, got {kspace.dtype}")
    if not bool(torch.isfinite(kspace).all()):
        bad = int((~torch.isfinite(kspace)).sum())
        raise ValueError(f"{label}: k-space holds {bad} NaN or Inf values")
    if not bool((kspace != 0).any()):
        raise ValueError(f"{label}: k-space is all zero")


def check_espirit_maps(maps: torch.Tensor, *, label: str) -> None:
    """Refuse ESPIRiT maps that cannot be used: NaN/Inf, or all zero.

    sigpy gives NaN maps where its calibration is degenerate (it normalises by the first coil's
    map and a zero eigenvector's zero norm) and thresholded maps can be all zero; either would
    make the reference and every loss NaN or zero, so the volume is rejected instead.
    """
    if not bool(torch.isfinite(maps).all()):
        bad = int((~torch.isfinite(maps)).sum())
        raise ValueError(f"{label}: ESPIRiT coil maps hold {bad} NaN or Inf values (degenerate calibration region)")
    if not bool((maps != 0).any()):
        raise ValueError(f"{label}: ESPIRiT coil maps are all zero (degenerate calibration region)")


def preprocess_slice(kspace: np.ndarray | torch.Tensor, *, split: str, slice_id: int, config: PrepareConfig,
                     label: str | None = None, timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Prepare one raw slice as METHOD.md specifies (see the module docstring for the steps).

    Args:
        kspace: raw k-space ``(C, H_os, W)`` of one slice, complex (readout-oversampled rows).
        split: ``"train"``, ``"val"`` or ``"test"``; training slices are compressed to
            ``config.virtual_coils`` (:data:`COMPRESSED_SPLITS`), the others keep every coil.
        slice_id: the slice's stable identifier (:func:`slice_id`); seeds its masks.
        config: the preparation settings.
        label: how errors name the slice (default ``"slice <id>"``).
        timings: if given, seconds spent per stage are added to it (``whitening``, ``espirit``,
            ``reference``, ``l1``, ``mvue``), for the throughput benchmark.

    Returns:
        numpy arrays: the shard datasets ``kspace`` and ``maps`` ``(C', H, W)``, ``reference``
        ``(H, W)`` (complex64), ``mask/r{R}`` and ``mask_further/r{R}`` ``(W,)`` (bool), optional
        ``l1/r{R}`` and ``mvue`` ``(H, W)`` (complex64); and the metadata of :data:`METADATA_KEYS`:
        ``normalization`` (the constant k-space was divided by), ``noise_std`` (RMS per-coil noise
        standard deviation of the raw data; the prepared k-space's white noise has standard deviation
        ``1 / normalization``), the raw ``noise_covariance`` ``(C, C)`` (complex128) and
        ``coil_energy_kept`` (whitened k-space energy kept by coil compression; 1 for val and test).

    Raises:
        ValueError: naming the slice, for NaN/Inf or all-zero k-space, an image smaller than the
            crop, a noise covariance that is not positive definite, too few coils, or ESPIRiT
            maps that are NaN/Inf or all zero.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    label = label or f"slice {slice_id}"
    clock = _StageClock(timings)
    data = torch.as_tensor(kspace)
    check_kspace(data, label=label)
    data = data.to(torch.complex64)
    rows, cols = config.crop

    # 1-2. Crop in the image domain, estimate the noise covariance there, whiten.
    coil_images = center_crop_image(ifft2c(data), rows, cols, label=label)
    patch = background_patch(coil_images, size=config.noise_patch, corner=config.noise_corner)
    covariance = noise_covariance(patch, coil_dim=0)
    try:
        white_images = whiten(coil_images, covariance, coil_dim=0)
    except ValueError as err:
        raise ValueError(f"{label}: {err} (is the {config.noise_corner} noise patch free of signal?)") from None
    white = fft2c(white_images.contiguous())

    # 3. Normalise with the constant of all whitened coils, before compression, so a scan
    # gets the same scale whether it lands in a compressed split or in test.
    try:
        constant = normalization_constant(white, acs_size=config.calib_width, percentile=config.norm_percentile)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None
    white = white / constant

    # 4. Coil compression (training only); unitary, so the noise stays white. The phase
    # reference is the scan's first virtual coil, expressed in the split's coil basis.
    energy_kept = 1.0
    phase_reference = principal_coil(white_images, coil_dim=0)
    if split in COMPRESSED_SPLITS:
        if config.virtual_coils > white.shape[0]:
            raise ValueError(f"{label}: has {white.shape[0]} coils, fewer than the {config.virtual_coils} "
                             "virtual coils wanted")
        compressed = coil_compress(white, config.virtual_coils, coil_dim=0)
        white, energy_kept = compressed.data, compressed.energy_kept
        phase_reference = compressed.matrix.to(phase_reference.dtype) @ phase_reference
    clock.lap("whitening")

    # 5. ESPIRiT maps in the one phase convention of every split (docs/data_format.md), and the
    # fully sampled CG-SENSE reference.
    maps = espirit_maps(white, calib_width=config.calib_width, thresh=config.espirit_threshold,
                        kernel_width=config.espirit_kernel_width, crop=0.0)
    check_espirit_maps(maps, label=label)
    maps = align_map_phase(maps, phase_reference, coil_dim=0)
    clock.lap("espirit")
    full_op = SenseOperator(maps[None])
    reference = cg_sense(full_op, white[None], iterations=config.reference_iterations)[0]
    clock.lap("reference")

    out: dict[str, np.ndarray] = {"kspace": white.numpy().astype(np.complex64),
                                  "maps": maps.numpy().astype(np.complex64),
                                  "reference": reference.numpy().astype(np.complex64)}
    # 6. Masks, and the optional reconstructions at each R.
    for acceleration in config.accelerations:
        key = mask_key(acceleration)
        mask, further = slice_masks(cols, acceleration, seed=config.seed, slice_id=slice_id, acs=config.acs)
        out[f"mask/{key}"] = mask.numpy().astype(bool)
        out[f"mask_further/{key}"] = further.numpy().astype(bool)
        if config.l1:
            measured = white[None] * mask[None, None, None, :]
            recon = l1_wavelet_recon(measured, maps[None], mask, lam=config.l1_lam, iterations=config.l1_iterations,
                                     wavelet=config.l1_wavelet, scaling=config.l1_scaling)
            out[f"l1/{key}"] = recon[0].numpy().astype(np.complex64)
    clock.lap("l1")
    if config.mvue:
        out["mvue"] = mvue(white[None], maps[None])[0].numpy().astype(np.complex64)
        clock.lap("mvue")

    noise_std = math.sqrt(float(torch.diagonal(covariance).real.mean()))
    out["normalization"] = np.asarray(constant, dtype=np.float64)
    out["noise_std"] = np.asarray(noise_std, dtype=np.float64)
    out["noise_covariance"] = covariance.numpy().astype(np.complex128)
    out["coil_energy_kept"] = np.asarray(energy_kept, dtype=np.float64)
    return out


def shard_arrays(prepared: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of :func:`preprocess_slice`'s result that are stored in shards."""
    return {key: value for key, value in prepared.items() if key not in METADATA_KEYS}


class _StageClock:
    """Adds the seconds since the previous lap to ``timings[stage]`` (no-op without a dict)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now

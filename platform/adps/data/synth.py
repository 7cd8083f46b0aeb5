"""Synthetic FastMRI: multi-coil volumes written in the real FastMRI file schema (``adps synth``).

The embedded demo and the tests run the whole data path (reading, preparation, training) on
these files, so they imitate what matters about real FastMRI brain scans:

* readout oversampling: k-space covers a field of view ``oversampling`` times taller than the
  reconstruction, with the object in the central ``height`` rows and empty rows around it, so
  cropping the central rows in the image domain recovers the reconstruction FOV (as FastMRI does);
* birdcage coil sensitivities over the acquired FOV, normalised to ``sum_c |S_c|^2 = 1``;
* complex Gaussian noise with a known inter-coil covariance, added in k-space (with the
  orthonormal FFT, the same noise in the coil images: the empty rows are an exact background);
* a valid ISMRMRD header, ``reconstruction_rss`` and the file attributes the reader uses.

Every random draw is seeded: the same ``seed`` gives the same volume bit for bit.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from adps.data import storage
from adps.data.fastmri import ISMRMRD_NAMESPACE
from adps.data.phantom import birdcage_maps, brain_phantom, correlated_noise, random_covariance
from adps.mri.fft import fft2c, ifft2c

# Independent random streams of one volume: np.random.default_rng([seed, stream, index]).
_PHANTOM_STREAM = 0
_COVARIANCE_STREAM = 1
_NOISE_STREAM = 2

# Reconstructed pixel size of the synthetic scans (mm); only written into the header.
_PIXEL_MM = 0.6875
_SLICE_THICKNESS_MM = 5.0


@dataclass(frozen=True)
class SyntheticVolume:
    """One synthetic multi-coil volume, in memory (numpy)."""

    image: np.ndarray
    """Ground-truth images ``(S, height, width)`` complex64, at the reconstruction FOV."""
    maps: np.ndarray
    """Normalised birdcage maps ``(C, height * oversampling, width)`` complex64, acquired FOV."""
    kspace: np.ndarray
    """Fully sampled, readout-oversampled k-space ``(S, C, height * oversampling, width)`` complex64."""
    noise_covariance: np.ndarray
    """Inter-coil covariance ``(C, C)`` complex128 of the added noise (zero if noiseless)."""
    seed: int = 0
    """The seed the volume was drawn from."""

    @property
    def num_slices(self) -> int:
        return self.kspace.shape[0]

    @property
    def num_coils(self) -> int:
        return self.kspace.shape[1]

    @property
    def height(self) -> int:
        """Rows of the reconstruction FOV."""
        return self.image.shape[1]

    @property
    def width(self) -> int:
        return self.image.shape[2]

    @property
    def oversampling(self) -> int:
        return self.kspace.shape[2] // self.height


def central_rows(acquired_height: int, height: int) -> slice:
    """The rows of an oversampled image that hold the reconstruction FOV.

    Starts at ``(acquired_height - height) // 2``, FastMRI's centre-crop convention.
    """
    if not 1 <= height <= acquired_height:
        raise ValueError(f"cannot crop {height} rows out of {acquired_height}")
    start = (acquired_height - height) // 2
    return slice(start, start + height)


@functools.lru_cache(maxsize=8)
def _maps(n_coils: int, height: int, width: int) -> np.ndarray:
    # Deterministic and the same for every volume of a dataset: compute once.
    maps = birdcage_maps(n_coils, height, width)
    maps.flags.writeable = False
    return maps


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def synthetic_volume(seed: int, *, n_slices: int = 8, n_coils: int = 16, height: int = 384, width: int = 320,
                     oversampling: int = 2, noise_std: float = 0.02) -> SyntheticVolume:
    """A synthetic FastMRI-like multi-coil volume, in memory.

    Args:
        seed: non-negative seed of every draw (phantoms, noise covariance, noise).
        n_slices: slices, each a different brain-like phantom (drawn from ``(seed, slice)``).
        n_coils: birdcage receive coils.
        height, width: the reconstruction matrix (rows, columns).
        oversampling: readout oversampling factor; k-space has ``height * oversampling`` rows.
        noise_std: scale of the complex k-space noise per coil, before the random inter-coil
            coupling (``noise_covariance = noise_std^2 * random_covariance``); 0 for none.
    """
    _check_sizes(n_slices=n_slices, n_coils=n_coils, height=height, width=width, oversampling=oversampling)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    seed = int(seed)
    acquired_height = height * oversampling
    rows = central_rows(acquired_height, height)
    maps = _maps(n_coils, acquired_height, width)
    maps_t = torch.from_numpy(np.array(maps))

    covariance = np.zeros((n_coils, n_coils), dtype=np.complex128)
    if noise_std > 0:
        covariance = noise_std**2 * random_covariance(n_coils, np.random.default_rng([seed, _COVARIANCE_STREAM, 0]))

    images = np.empty((n_slices, height, width), dtype=np.complex64)
    kspace = np.empty((n_slices, n_coils, acquired_height, width), dtype=np.complex64)
    padded = torch.zeros((acquired_height, width), dtype=torch.complex64)
    # One slice at a time: a full-size volume is 250 MB of k-space, its float64 noise draw more.
    for s in range(n_slices):
        images[s] = brain_phantom(height, width, np.random.default_rng([seed, _PHANTOM_STREAM, s]))
        padded[rows] = torch.from_numpy(images[s])
        slice_kspace = fft2c(maps_t * padded).numpy()
        if noise_std > 0:
            noise_rng = np.random.default_rng([seed, _NOISE_STREAM, s])
            slice_kspace = slice_kspace + correlated_noise(slice_kspace.shape, covariance, noise_rng)
        kspace[s] = slice_kspace
    return SyntheticVolume(image=images, maps=np.array(maps), kspace=kspace, noise_covariance=covariance, seed=seed)


def rss_reconstruction(kspace: np.ndarray, height: int) -> np.ndarray:
    """FastMRI's ``reconstruction_rss``, ``(S, height, W)`` float32: the RSS of the coil images of
    ``kspace`` ``(S, C, H, W)`` (complex, readout-oversampled), cropped to ``height`` rows."""
    rows = central_rows(kspace.shape[2], height)
    out = np.empty((kspace.shape[0], height, kspace.shape[3]), dtype=np.float32)
    for s in range(kspace.shape[0]):  # per slice, to keep the memory of one slice's coil images
        coil_images = ifft2c(torch.from_numpy(np.ascontiguousarray(kspace[s])))[:, rows]
        out[s] = torch.sqrt(torch.sum(coil_images.abs() ** 2, dim=0)).numpy()
    return out


def ismrmrd_header_xml(*, encoded_size: tuple[int, int], recon_size: tuple[int, int], n_coils: int, n_slices: int,
                       protocol: str = "AXT2") -> bytes:
    """A minimal, valid ISMRMRD XML header for a Cartesian, fully sampled 2-D multi-slice scan.

    Sizes are ``(x, y)`` = (readout rows, phase-encode columns); the encoding limits say that
    every phase-encode line ``0 .. y - 1`` was acquired, with the centre line at ``y // 2``.
    """
    ET.register_namespace("", ISMRMRD_NAMESPACE)

    def element(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
        node = ET.SubElement(parent, f"{{{ISMRMRD_NAMESPACE}}}{tag}")
        if text is not None:
            node.text = str(text)
        return node

    def space(parent: ET.Element, tag: str, size: tuple[int, int]) -> None:
        node = element(parent, tag)
        matrix = element(node, "matrixSize")
        for axis, value in zip("xyz", (*size, 1), strict=True):
            element(matrix, axis, value)
        fov = element(node, "fieldOfView_mm")
        # The recon pixel size in both directions; the encoded FOV is taller by the oversampling.
        fov_x = recon_size[0] * _PIXEL_MM * size[0] / recon_size[0]
        for axis, value in zip("xyz", (fov_x, size[1] * _PIXEL_MM, _SLICE_THICKNESS_MM), strict=True):
            element(fov, axis, f"{value:g}")

    def limit(parent: ET.Element, tag: str, maximum: int) -> None:
        node = element(parent, tag)
        element(node, "minimum", 0)
        element(node, "maximum", maximum)
        element(node, "center", (maximum + 1) // 2)

    root = ET.Element(f"{{{ISMRMRD_NAMESPACE}}}ismrmrdHeader")
    measurement = element(root, "measurementInformation")
    element(measurement, "patientPosition", "HFS")
    element(measurement, "protocolName", protocol)
    system = element(root, "acquisitionSystemInformation")
    element(system, "systemVendor", "adps-synth")
    element(system, "systemFieldStrength_T", "2.89362")
    element(system, "receiverChannels", n_coils)
    conditions = element(root, "experimentalConditions")
    element(conditions, "H1resonanceFrequency_Hz", 123_251_815)
    encoding = element(root, "encoding")
    space(encoding, "encodedSpace", encoded_size)
    space(encoding, "reconSpace", recon_size)
    limits = element(encoding, "encodingLimits")
    limit(limits, "kspace_encoding_step_1", encoded_size[1] - 1)
    limit(limits, "kspace_encoding_step_2", 0)
    limit(limits, "slice", n_slices - 1)
    element(encoding, "trajectory", "cartesian")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_volume(path_or_uri: str | Path, volume: SyntheticVolume, *, acquisition: str = "AXT2",
                 patient_id: str | None = None) -> str:
    """Write ``volume`` as a FastMRI multi-coil HDF5 file, local or ``s3://``; returns where.

    The file appears only when complete (temporary name + rename, or one S3 upload).
    ``patient_id`` defaults to ``synth-<seed>``.
    """
    uri = str(path_or_uri)
    rss = rss_reconstruction(volume.kspace, volume.height)
    header = ismrmrd_header_xml(encoded_size=(volume.kspace.shape[2], volume.width),
                                recon_size=(volume.height, volume.width), n_coils=volume.num_coils,
                                n_slices=volume.num_slices, protocol=acquisition)
    with storage.atomic_write_path(uri) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=volume.kspace.astype(np.complex64, copy=False))
        # A scalar byte string, as in the published files (h5py returns it as bytes).
        f.create_dataset("ismrmrd_header", data=np.bytes_(header))
        f.create_dataset("reconstruction_rss", data=rss)
        f.attrs["acquisition"] = acquisition
        f.attrs["max"] = float(rss.max())
        f.attrs["norm"] = float(np.linalg.norm(rss))
        f.attrs["patient_id"] = patient_id if patient_id is not None else f"synth-{volume.seed}"
    return uri


def volume_name(index: int, acquisition: str) -> str:
    """``file_brain_<acquisition>_synth_<index>.h5``, after FastMRI's ``file_brain_AXT2_...``."""
    return f"file_brain_{acquisition}_synth_{index:04d}.h5"


def synthesize_dataset(root: str | Path, *, n_volumes: int = 4, n_slices: int = 8, n_coils: int = 16, height: int = 384,
                       width: int = 320, seed: int = 0, acquisitions: Sequence[str] = ("AXT2",),
                       noise_std: float = 0.02, oversampling: int = 2, progress: bool = True) -> list[str]:
    """Write ``n_volumes`` synthetic FastMRI volumes under a local folder or ``s3://`` prefix.

    Volume ``i`` has acquisition ``acquisitions[i % len(acquisitions)]`` (so with several, an
    acquisition filter has something to drop), its own seed drawn from ``(seed, i)`` and the
    patient id ``synth<seed>-<i>``, distinct across the dataset. Returns the written paths.
    """
    _check_sizes(n_volumes=n_volumes)
    acquisitions = tuple(acquisitions)
    if not acquisitions or not all(isinstance(a, str) and a for a in acquisitions):
        raise ValueError(f"acquisitions must be a non-empty list of names, got {list(acquisitions)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not storage.is_s3(root):
        Path(root).mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm  # deferred: only this function shows progress

    written = []
    for i in tqdm(range(n_volumes), desc="adps synth", unit="volume", disable=not progress):
        acquisition = acquisitions[i % len(acquisitions)]
        # A seed per volume from (seed, i): volumes of one dataset, and of datasets with other
        # seeds, do not share phantoms or noise.
        volume_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        volume = synthetic_volume(volume_seed, n_slices=n_slices, n_coils=n_coils, height=height, width=width,
                                  oversampling=oversampling, noise_std=noise_std)
        uri = storage.join(root, volume_name(i, acquisition))
        write_volume(uri, volume, acquisition=acquisition, patient_id=f"synth{seed}-{i:04d}")
        written.append(uri)
        del volume  # a full-size volume is 250 MB: do not hold it while drawing the next one
    return written

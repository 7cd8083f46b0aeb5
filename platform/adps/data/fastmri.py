"""Reading FastMRI multi-coil volumes (HDF5) in their real schema, from local disk or S3.

The schema of a FastMRI multi-coil file (brain or knee), as published:

* dataset ``kspace``: ``(slices, coils, H, W)`` complex64, fully sampled, readout-oversampled
  (``H`` is twice the reconstructed height; the oversampling is removed by cropping the central
  rows in the image domain). The k-space convention is that of :mod:`adps.mri.fft`.
* dataset ``ismrmrd_header``: the ISMRMRD XML header as bytes, from which the encoded matrix
  (``encoding/encodedSpace/matrixSize``) and the reconstruction matrix
  (``encoding/reconSpace/matrixSize``) are read.
* dataset ``reconstruction_rss`` (optional): ``(slices, h, w)`` float32 RSS reconstructions.
* file attributes ``acquisition`` (e.g. ``"AXT2"``), ``max``, ``norm``, ``patient_id``.

:func:`open_volume` checks this schema up front (:meth:`FastMRIVolume.validate`), so a bad file
fails with a :class:`FastMRIFormatError` naming it, not with an h5py error deep in a Ray task.
Slices are read on demand: preparing 5 centre slices of a 16-slice volume reads only those 5.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from adps.data import storage

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"


class FastMRIFormatError(ValueError):
    """A file that is not a valid FastMRI multi-coil volume; the message is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from (path, reason): the default reduce would pass only the message and fail,
        # and Ray pickles exceptions raised in tasks to hand them to the driver.
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class EncodingInfo:
    """The parts of an ISMRMRD header that reading and cropping need.

    Sizes are ``(x, y)`` = (readout rows ``H``, phase-encode columns ``W``) of the k-space array.
    """

    encoded_size: tuple[int, int]
    """``encodedSpace/matrixSize`` (x, y): the acquired matrix, readout oversampling included."""
    recon_size: tuple[int, int]
    """``reconSpace/matrixSize`` (x, y): the matrix after removing the oversampling."""
    encoded_fov_mm: tuple[float, float] | None = None
    recon_fov_mm: tuple[float, float] | None = None
    phase_encode_center: int | None = None
    """``encodingLimits/kspace_encoding_step_1/center``, if present."""
    phase_encode_maximum: int | None = None
    """``encodingLimits/kspace_encoding_step_1/maximum``, if present."""


def parse_ismrmrd_header(xml: bytes | str) -> EncodingInfo:
    """Parse the sizes out of an ISMRMRD XML header; raises ValueError saying what is missing.

    Real headers use the ISMRMRD default namespace; a header written without it is accepted too.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise ValueError(f"ismrmrd_header is not valid XML ({err})") from None
    ns = f"{{{ISMRMRD_NAMESPACE}}}" if root.tag.startswith(f"{{{ISMRMRD_NAMESPACE}}}") else ""

    def find(path: str) -> ET.Element | None:
        return root.find("/".join(f"{ns}{part}" for part in path.split("/")))

    def integer(path: str, required: bool = True) -> int | None:
        node = find(path)
        if node is None or node.text is None:
            if required:
                raise ValueError(f"ismrmrd_header has no {path}")
            return None
        try:
            return int(node.text.strip())
        except ValueError:
            raise ValueError(f"ismrmrd_header: {path} is not an integer ({node.text!r})") from None

    def number(path: str) -> float | None:
        node = find(path)
        try:
            return float(node.text.strip()) if node is not None and node.text else None
        except ValueError:
            return None  # field-of-view values are informational: an odd one is not fatal

    def pair(space: str) -> tuple[int, int]:
        x = integer(f"encoding/{space}/matrixSize/x")
        y = integer(f"encoding/{space}/matrixSize/y")
        assert x is not None and y is not None  # required=True raised otherwise
        if x < 1 or y < 1:
            raise ValueError(f"ismrmrd_header: {space} matrixSize must be positive, got x={x}, y={y}")
        return (x, y)

    def fov(space: str) -> tuple[float, float] | None:
        x, y = number(f"encoding/{space}/fieldOfView_mm/x"), number(f"encoding/{space}/fieldOfView_mm/y")
        return (x, y) if x is not None and y is not None else None

    limits = "encoding/encodingLimits/kspace_encoding_step_1"
    return EncodingInfo(encoded_size=pair("encodedSpace"), recon_size=pair("reconSpace"),
                        encoded_fov_mm=fov("encodedSpace"), recon_fov_mm=fov("reconSpace"),
                        phase_encode_center=integer(f"{limits}/center", required=False),
                        phase_encode_maximum=integer(f"{limits}/maximum", required=False))


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


class FastMRIVolume:
    """One open FastMRI multi-coil volume, from :func:`open_volume`. ``path`` is the location the
    caller gave (an ``s3://`` URI stays one, though the data is read from a temporary local copy),
    so every message names the file the user knows."""

    def __init__(self, file: h5py.File, path: str) -> None:
        self._file = file
        self._path = path
        self._encoding: EncodingInfo | None = None

    # Schema --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the FastMRI multi-coil schema; raise :class:`FastMRIFormatError` naming the file."""
        kspace = self._file.get("kspace")
        if kspace is None:
            raise self._error("no 'kspace' dataset (not a FastMRI file?)")
        if not isinstance(kspace, h5py.Dataset):
            raise self._error("'kspace' is not a dataset")
        if kspace.ndim != 4:
            hint = " (single-coil data is not supported: a multi-coil file is needed)" if kspace.ndim == 3 else ""
            raise self._error(f"'kspace' must be 4-D (slices, coils, H, W), got shape {kspace.shape}{hint}")
        if not np.issubdtype(kspace.dtype, np.complexfloating):
            raise self._error(f"'kspace' must be complex, got dtype {kspace.dtype}")
        if kspace.shape[0] == 0:
            raise self._error("'kspace' has zero slices")
        if min(kspace.shape[1:]) == 0:
            raise self._error(f"'kspace' has an empty axis: shape {kspace.shape}")
        self._encoding = self._read_header()

    def _read_header(self) -> EncodingInfo:
        header = self._file.get("ismrmrd_header")
        if header is None:
            raise self._error("no 'ismrmrd_header' dataset")
        if not isinstance(header, h5py.Dataset):
            raise self._error("'ismrmrd_header' is not a dataset")
        try:
            raw = header[()]
        except OSError as err:
            raise self._error(f"'ismrmrd_header' cannot be read ({err})") from None
        if isinstance(raw, np.ndarray):  # a byte array rather than a scalar string
            raw = raw.tobytes()
        if not isinstance(raw, (bytes, str)):
            raise self._error(f"'ismrmrd_header' must hold XML text, got {type(raw).__name__}")
        try:
            return parse_ismrmrd_header(raw)
        except ValueError as err:
            raise self._error(str(err)) from None

    def _error(self, reason: str) -> FastMRIFormatError:
        return FastMRIFormatError(self._path, reason)

    @property
    def _kspace(self) -> h5py.Dataset:
        return self._file["kspace"]

    # Properties ----------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The path or URI the volume was opened from."""
        return self._path

    @property
    def kspace_shape(self) -> tuple[int, int, int, int]:
        """``(slices, coils, H, W)``."""
        return tuple(int(n) for n in self._kspace.shape)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return self.kspace_shape[0]

    @property
    def num_coils(self) -> int:
        return self.kspace_shape[1]

    @property
    def encoding(self) -> EncodingInfo:
        """Sizes and limits from the ISMRMRD header."""
        if self._encoding is None:
            self._encoding = self._read_header()
        return self._encoding

    @property
    def encoded_size(self) -> tuple[int, int]:
        """``encodedSpace/matrixSize`` (x, y) = (H, W) of the acquired k-space."""
        return self.encoding.encoded_size

    @property
    def recon_size(self) -> tuple[int, int]:
        """``reconSpace/matrixSize`` (x, y): the image size after removing the oversampling."""
        return self.encoding.recon_size

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's attributes as plain Python values."""
        return {key: _plain(value) for key, value in self._file.attrs.items()}

    @property
    def acquisition(self) -> str | None:
        """The ``acquisition`` attribute (e.g. ``"AXT2"``), or None if the file has none."""
        value = self.attrs.get("acquisition")
        return None if value is None else str(value)

    @property
    def patient_id(self) -> str:
        """The ``patient_id`` attribute, or the file name without ``.h5`` if there is none (splits
        are made by patient, so every volume needs an id)."""
        value = self.attrs.get("patient_id")
        if value is not None and str(value):
            return str(value)
        return storage.basename(self._path).removesuffix(".h5")

    @property
    def has_reconstruction_rss(self) -> bool:
        return isinstance(self._file.get("reconstruction_rss"), h5py.Dataset)

    # Data ----------------------------------------------------------------------------------
    def _selection(self, indices: Iterable[int] | int) -> tuple[np.ndarray, np.ndarray]:
        """Validated indices; returns (sorted unique indices, positions to restore the order)."""
        scalar = isinstance(indices, (int, np.integer))
        wanted = np.atleast_1d(np.asarray(indices if scalar else list(indices)))
        if wanted.size and not np.issubdtype(wanted.dtype, np.integer):
            raise ValueError(f"{self._path}: slice indices must be integers, got {wanted.tolist()}")
        wanted = wanted.astype(np.int64)
        bad = wanted[(wanted < 0) | (wanted >= self.num_slices)]
        if bad.size:
            raise IndexError(f"{self._path}: slice {int(bad[0])} out of range (the volume has {self.num_slices} slices)")
        # h5py's fancy indexing wants increasing, unique indices.
        return np.unique(wanted, return_inverse=True)

    def _read_rows(self, name: str, indices: Iterable[int] | int, dtype: type) -> np.ndarray:
        """Slices ``indices`` of dataset ``name`` as ``dtype``, in the order asked; only they are read."""
        unique, inverse = self._selection(indices)
        dataset = self._file[name]
        if unique.size == 0:
            return np.empty((0, *dataset.shape[1:]), dtype=dtype)
        try:
            data = dataset[unique.tolist()]
        except OSError as err:  # a damaged or truncated data block
            raise self._error(f"cannot read {name} slices {unique.tolist()} ({err})") from None
        return np.ascontiguousarray(data[inverse], dtype=dtype)

    def read_slices(self, indices: Iterable[int] | int) -> np.ndarray:
        """k-space of the given slices, ``(n, coils, H, W)`` complex64, in the order asked."""
        return self._read_rows("kspace", indices, np.complex64)

    def read_reconstruction_rss(self, indices: Iterable[int] | int) -> np.ndarray:
        """``reconstruction_rss`` of the given slices ``(n, h, w)`` float32; raises if absent."""
        if not self.has_reconstruction_rss:
            raise self._error("no 'reconstruction_rss' dataset")
        return self._read_rows("reconstruction_rss", indices, np.float32)

    def centre_slices(self, n: int) -> list[int]:
        """The ``n`` central slice indices, from ``S // 2 - n // 2``: the middle slice ``S // 2`` (the
        FFT's DC-index convention) is always included; when ``S - n`` is odd the block leans one
        slice towards the end."""
        total = self.num_slices
        if n < 1:
            raise ValueError(f"{self._path}: the number of centre slices must be >= 1, got {n}")
        if n > total:
            raise ValueError(f"{self._path}: asked for {n} centre slices, the volume has only {total}")
        start = total // 2 - n // 2
        return list(range(start, start + n))

    # Lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"FastMRIVolume({self._path!r}, kspace={self.kspace_shape}, acquisition={self.acquisition!r})"


def _open_error_reason(err: OSError) -> str:
    message = str(err)
    if "signature" in message:
        return f"not an HDF5 file ({message})"
    if "truncated" in message or "eof" in message.lower():
        return f"truncated HDF5 file ({message})"
    return f"cannot be opened as an HDF5 file ({message})"


@contextlib.contextmanager
def open_volume(path_or_uri: str | Path) -> Iterator[FastMRIVolume]:
    """Open and validate a FastMRI multi-coil volume, local or ``s3://``.

    Use as ``with open_volume(uri) as volume: ...``. An S3 object is downloaded to a temporary
    file that is deleted on exit. Raises FileNotFoundError for a missing file and
    :class:`FastMRIFormatError` for a file that does not follow the schema.
    """
    uri = str(path_or_uri)
    with storage.local_copy(uri) as local:
        try:
            file = h5py.File(local, "r")
        except OSError as err:
            raise FastMRIFormatError(uri, _open_error_reason(err)) from None
        try:
            volume = FastMRIVolume(file, uri)
            volume.validate()
            yield volume
        finally:
            file.close()


def list_volumes(root: str | Path) -> list[str]:
    """The ``.h5`` files directly under a local folder or an ``s3://`` prefix, sorted."""
    return storage.list_files(root, ".h5")

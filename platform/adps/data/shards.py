"""The prepared-dataset format: HDF5 shards plus ``manifest.json`` (see ``docs/data_format.md``).

A prepared dataset is a folder, local or ``s3://``, holding

* ``{split}-{index:05d}.h5`` shards of at most 64 slices, one HDF5 dataset per array, each
  chunked one slice per chunk so that reading one slice reads one chunk;
* ``manifest.json``: schema version, the full config, per split its shards (with a sha256 of
  each file) and its slices (source file, slice index, volume id, slice id, normalisation
  constant, noise level, sha256 of the slice's arrays), and the ``rejected`` source files.

Shards are deterministic: the same slices give byte-identical files (no timestamps, fixed
object order and file-format version), which is what lets a resumed preparation skip shards
whose checksums verify. Every file is written under a temporary name and renamed (or uploaded
in one piece to S3), the manifest last.

Layer 1 (see ARCHITECTURE.md): h5py / numpy only, no Ray, no MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from adps.data import storage

SCHEMA_VERSION = 2
"""Version of the prepared-dataset contract; bumped on any incompatible change.

2: one phase convention for every split (the maps rotated so that the scan's first virtual coil
is real: :func:`adps.mri.align_map_phase`); version 1's test and training phases differed.
"""

SCHEMA_CHANGES = {
    1: "its test split's complex images have another phase than its training split's (version 2 gives "
       "every split one phase convention), so a model trained on one split fails on the other",
}
"""Why a dataset of an older schema version cannot be read: the message of :func:`read_manifest`."""

FORMAT_NAME = "adps-prepared-mri"
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".prepare-progress.json"
"""Internal resume state of an unfinished (or finished) preparation; not part of the contract."""

SHARD_SUFFIX = ".h5"
_HASH_BLOCK = 8 << 20

# h5py settings that make a file's bytes a function of its content only: no object times (h5py's
# default for datasets, set explicitly), links in name order, and a pinned file-format version
# range so a newer HDF5 cannot pick newer (and different) structures on its own.
_FILE_KWARGS: dict[str, Any] = {"track_order": False, "libver": ("earliest", "v110")}


class ShardError(ValueError):
    """A shard that is missing, fails its checksum or does not hold what the manifest says."""


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records of one written shard."""

    name: str
    sha256: str
    size: int
    n_slices: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "n_slices": self.n_slices}


def shard_name(split: str, index: int) -> str:
    """``train-00000.h5``: the name of shard ``index`` of ``split``."""
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


# Checksums -------------------------------------------------------------------------------------
def slice_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over a slice's arrays: each name, dtype, shape and bytes, in name order.

    Independent of how the arrays are stored, so it identifies a slice's content whether it is
    in memory, in a shard, or read back through the dataset.
    """
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file, read in blocks (shards are hundreds of MB at full size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def uri_sha256(uri: str) -> str:
    """sha256 of a local file or an S3 object (downloaded to a temporary file)."""
    with storage.local_copy(uri) as local:
        return file_sha256(local)


def verify_shard(uri: str, sha256: str) -> str | None:
    """``None`` if the shard at ``uri`` exists with checksum ``sha256``, else why not."""
    if not storage.exists(uri):
        return "missing"
    actual = uri_sha256(uri)
    if actual != sha256:
        return f"checksum mismatch (sha256 {actual[:12]}..., manifest says {sha256[:12]}...)"
    return None


# Writing ---------------------------------------------------------------------------------------
def stack_slices(slices: Sequence[Mapping[str, np.ndarray]], *, what: str) -> dict[str, np.ndarray]:
    """Stack per-slice arrays into ``(n, ...)`` arrays; every slice must have the same keys and shapes."""
    if not slices:
        raise ValueError(f"{what}: a shard needs at least one slice")
    keys = sorted(slices[0])
    stacked = {}
    for position, item in enumerate(slices):
        if sorted(item) != keys:
            raise ValueError(f"{what}: slice {position} has arrays {sorted(item)}, slice 0 has {keys}")
    for key in keys:
        shapes = {np.shape(item[key]) for item in slices}
        if len(shapes) != 1:
            raise ValueError(f"{what}: array {key!r} has different shapes across slices: {sorted(shapes)}")
        stacked[key] = np.stack([np.asarray(item[key]) for item in slices])
    return stacked


def write_shard(uri: str, slices: Sequence[Mapping[str, np.ndarray]], *, slice_ids: Sequence[int],
                attrs: Mapping[str, str | int] | None = None) -> ShardInfo:
    """Write one shard (atomically) and return its name, size and sha256.

    Args:
        uri: destination, local path or ``s3://`` URI, named ``{split}-{index:05d}.h5``.
        slices: per slice, the shard arrays (``kspace``, ``maps``, ``reference``, ``mask/r{R}``,
            ``mask_further/r{R}``, optionally ``l1/r{R}`` and ``mvue``); stacked along a new
            first axis in the order given.
        slice_ids: the slices' ids, stored as the ``slice_id`` dataset.
        attrs: file attributes (``schema_version`` is always set).
    """
    name = storage.basename(uri)
    if len(slice_ids) != len(slices):
        raise ValueError(f"{name}: {len(slices)} slices but {len(slice_ids)} slice ids")
    stacked = stack_slices(slices, what=name)
    stacked["slice_id"] = np.asarray(slice_ids, dtype=np.int64)
    with storage.atomic_write_path(uri) as tmp:
        with h5py.File(tmp, "w", **_FILE_KWARGS) as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["format"] = FORMAT_NAME
            for key, value in sorted((attrs or {}).items()):
                f.attrs[key] = value
            for key in sorted(stacked):
                array = stacked[key]
                # One slice per chunk: a DataLoader reads a slice as one contiguous chunk.
                chunks = (1, *array.shape[1:]) if array.ndim > 1 else None
                f.create_dataset(key, data=array, chunks=chunks, track_times=False)
        # Hash the finished local file before it is renamed or uploaded: the same bytes.
        info = ShardInfo(name=name, sha256=file_sha256(tmp), size=tmp.stat().st_size, n_slices=len(slices))
    return info


# Manifest --------------------------------------------------------------------------------------
def encode_json(document: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes (sorted keys, fixed indentation): equal documents, equal bytes."""
    return (json.dumps(document, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json_if_changed(uri: str, document: Mapping[str, Any]) -> bool:
    """Write ``document`` atomically unless the file already holds exactly these bytes; whether it wrote.

    Leaving an identical file alone keeps its modification time: a re-run with nothing to do changes nothing.
    """
    data = encode_json(document)
    if storage.exists(uri):
        try:
            if storage.read_bytes(uri) == data:
                return False
        except FileNotFoundError:
            pass
    storage.write_bytes_atomic(uri, data)
    return True


def read_json(uri: str) -> dict[str, Any]:
    """A JSON document from a local file or S3 object; errors name the file."""
    raw = storage.read_bytes(uri)
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{uri}: not valid JSON ({err})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{uri}: expected a JSON object, got {type(document).__name__}")
    return document


def is_plain_file_name(name: object) -> bool:
    """Whether ``name`` is a bare file name: no folder part, not ``.`` / ``..``, not absolute, no URI.

    Any ``/`` (or ``\\``) is refused, which covers ``../x.h5``, ``/etc/passwd`` and
    ``s3://bucket/x.h5`` alike: joined onto the dataset's folder or S3 prefix, such a name could
    reach outside it (``Path(root) / "/etc/passwd"`` is ``/etc/passwd``).
    """
    return isinstance(name, str) and name not in ("", ".", "..") and not any(char in name for char in ("/", "\\", "\0"))


def check_shard_names(document: Mapping[str, Any], uri: str) -> None:
    """Refuse a manifest (or progress document) at ``uri`` that names a shard outside its folder.

    Readers join shard names onto the dataset's root and open, hash or download what they find,
    so a hand-edited or hostile manifest must not point them elsewhere. Checks every split's
    ``shards[].name`` and ``slices[].shard`` (string tests only) before any shard is touched.

    Raises:
        ValueError: naming ``uri``, the split and the offending shard name.
    """
    splits = document.get("splits")
    if not isinstance(splits, Mapping):
        return  # not a manifest's layout at all: the reader's own key lookups say so
    for split, entry in splits.items():
        if not isinstance(entry, Mapping):
            continue
        names = [s.get("name") for s in entry.get("shards") or () if isinstance(s, Mapping)]
        names += [s.get("shard") for s in entry.get("slices") or () if isinstance(s, Mapping)]
        for name in names:
            if not is_plain_file_name(name):
                raise ValueError(f"{uri}: split {split!r} names the shard {name!r}; shard names must be plain "
                                 f"file names inside the dataset folder (like {shard_name(str(split), 0)!r}), not "
                                 "paths or URIs")


def schema_version_message(uri: str, version: Any) -> str:
    """Why the document at ``uri`` of schema ``version`` is refused, and what to do about it."""
    if isinstance(version, int) and version < SCHEMA_VERSION:
        why = SCHEMA_CHANGES.get(version, "the format has changed since")
        return (f"{uri}: prepared with schema version {version}, this adps reads version {SCHEMA_VERSION}: {why}. "
                "Re-prepare the dataset into a new folder (adps prepare --config <your prepare.yaml> --set "
                "output=<new folder>) and train on that; models trained on the old dataset should be retrained")
    return (f"{uri}: schema_version {version!r}, this adps reads version {SCHEMA_VERSION} "
            "(made by a newer adps? upgrade adps to read it)")


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of the prepared dataset at ``root``, checked for format, schema version and
    shard names (:func:`check_shard_names`).

    Raises:
        FileNotFoundError: no ``manifest.json`` under ``root`` (not prepared, or not finished).
        ValueError: not a manifest of this format, or of another schema version, or one that
            names a shard outside the dataset's folder.
    """
    uri = storage.join(root, MANIFEST_NAME)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no manifest; is {root} a prepared dataset (adps prepare), and did it finish?")
    manifest = read_json(uri)
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{uri}: not an adps prepared-dataset manifest (format {manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(schema_version_message(uri, version))
    check_shard_names(manifest, uri)
    return manifest

"""A PyTorch dataset over prepared shards (the format of ``docs/data_format.md``).

:class:`PreparedSliceDataset` yields one slice at a time as a dict of tensors, the input of
every training step and sampler::

    dataset = PreparedSliceDataset("s3://bucket/prepared", "train", acceleration=4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, num_workers=4)

Safe in DataLoader workers: HDF5 files are opened lazily in the reading process and reopened
after a fork (h5py handles must not cross processes), so the dataset pickles without them. A Ray
Train worker passes ``shards=`` to read only its own shards. Shards under an ``s3://`` root are
downloaded once to a local cache folder and read from there.

Layer 1 (see ARCHITECTURE.md): torch / h5py only, no Ray, no MLflow.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from adps.data import storage
from adps.data.preprocess import SPLITS, mask_key
from adps.data.shards import ShardError, file_sha256, read_manifest

# Reading a row as its chunk's raw bytes needs POSIX positional reads and a little-endian machine.
_PREAD = hasattr(os, "preadv") and sys.byteorder == "little"

DEFAULT_CACHE_ENV = "ADPS_SHARD_CACHE"
"""Environment variable naming the default cache folder for shards of ``s3://`` datasets."""


def default_cache_dir() -> Path:
    """``$ADPS_SHARD_CACHE``, else ``~/.cache/adps/shards``."""
    configured = os.environ.get(DEFAULT_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "adps" / "shards"


class PreparedSliceDataset(Dataset):
    """One split of a prepared dataset at one acceleration, slice by slice.

    Args:
        root: the prepared dataset's folder or ``s3://`` prefix (holding ``manifest.json``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        acceleration: the ``R`` whose masks are returned (one of the config's accelerations).
        shards: restrict to these shard names (e.g. one Ray Train worker's share); default all.
        load_l1: also return the L1-wavelet reconstruction at ``R`` (needs ``l1: true`` at preparation).
        cache_dir: where shards of an ``s3://`` root are downloaded (default
            :func:`default_cache_dir`; a sub-folder per dataset keeps datasets apart).
        verify: check each shard's sha256 against the manifest when first opened (once per
            process; for S3 roots, when downloaded).
        keys: read only these item keys (``slice_id`` is always there); default all. A training
            worker reads only what its method's step uses (:data:`adps.nn.train_step.BATCH_KEYS`):
            an ambient run never reads the clean ``reference``, and an EDM run reads its one image
            per slice instead of nine times that in k-space and coil maps.

    Items are dicts of tensors with these keys (all unless ``keys`` picks some): ``kspace``
    ``(C, H, W)`` complex64 (the fully sampled prepared k-space; a training step applies the masks
    itself), ``maps`` ``(C, H, W)`` complex64, ``reference`` ``(H, W)`` complex64, ``mask``
    ``(W,)`` bool (the ``R`` mask), ``mask_further`` ``(W,)`` bool (its ``R + 1`` mask), ``l1``
    ``(H, W)`` complex64 (only with ``load_l1``) and ``slice_id`` (int64 scalar); the default
    collate stacks them into ``(N, ...)`` batches.

    Raises:
        FileNotFoundError: no manifest under ``root``.
        ValueError: unknown split, acceleration, key or shard name, L1 asked but not prepared
            (or ``l1`` in ``keys`` without ``load_l1``), or a manifest that names a shard outside
            the dataset folder (nothing is read from there).
        ShardError: a shard that is missing or fails its checksum (naming it), on first use; a
            slice whose coil maps are all zero (naming its slice id), when read.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, acceleration: float, shards: Sequence[str] | None = None,
                 load_l1: bool = False, cache_dir: str | os.PathLike | None = None, verify: bool = True,
                 keys: Sequence[str] | None = None) -> None:
        self.root = str(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split
        self.manifest = read_manifest(self.root)
        config = self.manifest["config"]
        available = {mask_key(r): r for r in config["accelerations"]}
        key = mask_key(acceleration)
        if key not in available:
            raise ValueError(f"{self.root}: acceleration R={acceleration:g} was not prepared "
                             f"(available: {', '.join(f'{r:g}' for r in available.values())})")
        if load_l1 and not config.get("l1"):
            raise ValueError(f"{self.root}: load_l1=True but the dataset was prepared without L1 reconstructions (l1: false)")
        self.acceleration = acceleration
        self.load_l1 = load_l1
        self.verify = verify
        self._datasets = {"kspace": "kspace", "maps": "maps", "reference": "reference", "mask": f"mask/{key}",
                          "mask_further": f"mask_further/{key}", **({"l1": f"l1/{key}"} if load_l1 else {})}
        if keys is not None:
            wanted = [k for k in dict.fromkeys(keys) if k != "slice_id"]
            unknown = [k for k in wanted if k not in self._datasets]
            if unknown:
                hint = " (it needs load_l1=True)" if unknown[0] == "l1" else ""
                raise ValueError(f"{self.root}: unknown item key {unknown[0]!r}{hint}; the items have "
                                 f"{', '.join(self._datasets)} and slice_id")
            self._datasets = {k: self._datasets[k] for k in wanted}
        self.keys: tuple[str, ...] = (*self._datasets, "slice_id")
        """The keys of every item, in order."""

        entry = self.manifest["splits"][split]
        recorded = {s["name"]: s for s in entry["shards"]}
        if shards is None:
            selected = sorted(recorded)
        else:
            selected = list(dict.fromkeys(shards))
            unknown = [name for name in selected if name not in recorded]
            if unknown:
                raise ValueError(f"{self.root}: shard {unknown[0]!r} is not in split {split!r} "
                                 f"(its shards: {', '.join(sorted(recorded)) or 'none'})")
        self.shards: dict[str, dict[str, Any]] = {name: recorded[name] for name in selected}
        chosen = set(selected)
        self.slices: list[dict[str, Any]] = [s for s in entry["slices"] if s["shard"] in chosen]
        """Manifest entries of the slices, in item order (source, slice index, normalisation...)."""
        self._index: list[tuple[str, int, int]] = [(s["shard"], int(s["row"]), int(s["slice_id"])) for s in self.slices]

        self._local: dict[str, Path]
        if storage.is_s3(self.root):
            base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            # One folder per dataset URI, so equal shard names of different datasets do not clash.
            folder = base / hashlib.sha256(self.root.rstrip("/").encode()).hexdigest()[:16]
            self._local = {name: self._download(name, folder) for name in selected}
        else:
            self._local = {name: Path(self.root) / name for name in selected}

        self._files: dict[str, h5py.File] = {}
        self._sources: dict[tuple[str, str], h5py.Dataset] = {}  # (shard, dataset name): its open dataset
        self._verified: set[str] = set(self._local) if storage.is_s3(self.root) and verify else set()
        self._pid = os.getpid()

    # Shards ---------------------------------------------------------------------------------
    def _download(self, name: str, folder: Path) -> Path:
        """The local copy of shard ``name``: fetched once; a cached copy is reused if it verifies."""
        expected = self.shards[name]["sha256"]
        local = folder / name
        if local.is_file() and (not self.verify or file_sha256(local) == expected):
            return local
        uri = storage.join(self.root, name)
        if not storage.exists(uri):
            raise ShardError(f"{uri}: shard listed in the manifest is missing")
        folder.mkdir(parents=True, exist_ok=True)
        with storage.local_copy(uri) as downloaded:
            if self.verify and file_sha256(downloaded) != expected:
                raise ShardError(f"{uri}: checksum mismatch (the shard differs from the manifest's sha256)")
            # Publish atomically: concurrent workers of one node may download the same shard.
            storage.upload_file_atomic(downloaded, local)
        return local

    def _file(self, name: str) -> h5py.File:
        if os.getpid() != self._pid:
            # A forked DataLoader worker inherited the parent's handles: never use them.
            self._files, self._sources = {}, {}
            self._pid = os.getpid()
        handle = self._files.get(name)
        if handle is None:
            path = self._local[name]
            if not path.is_file():
                raise ShardError(f"{storage.join(self.root, name)}: shard listed in the manifest is missing")
            if self.verify and name not in self._verified:
                if file_sha256(path) != self.shards[name]["sha256"]:
                    raise ShardError(f"{storage.join(self.root, name)}: checksum mismatch (the shard differs from "
                                     "the manifest's sha256; re-run adps prepare to restore it)")
                self._verified.add(name)
            try:
                handle = h5py.File(path, "r")
            except OSError as err:
                raise ShardError(f"{storage.join(self.root, name)}: cannot be opened ({err})") from None
            self._files[name] = handle
        return handle

    def close(self) -> None:
        """Close the open shard files of this process."""
        for handle in self._files.values():
            handle.close()
        self._files, self._sources = {}, {}

    def __getstate__(self) -> dict[str, Any]:
        # h5py handles cannot be pickled (spawned DataLoader workers, Ray): drop them.
        state = dict(self.__dict__)
        state["_files"], state["_sources"] = {}, {}
        return state

    def __del__(self) -> None:
        try:
            if os.getpid() == self._pid:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing useful to do
            pass

    # Items ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        name, row, sid = self._locate(index)
        item: dict[str, torch.Tensor] = {}
        for key, dataset in self._datasets.items():
            array = self._array(name, dataset)[row]
            if key == "maps":
                self._check_maps(array, name, row, sid)
            item[key] = torch.from_numpy(np.ascontiguousarray(array))
        item["slice_id"] = torch.tensor(sid, dtype=torch.int64)
        return item

    def read_batch(self, indices: Sequence[int], *, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """The items ``indices``, stacked key by key into one batch, as the default collate does.

        Each slice is read straight into its row of the batch's tensors, in page-locked memory
        with ``pin_memory`` (ready for an asynchronous copy to the GPU): stacking the items of
        :meth:`__getitem__` copies every array twice more, about 70 MB per copy at the paper's
        size (batch 8, 4 coils, 384 x 320). A row stored as one unfiltered chunk (as
        ``adps prepare`` writes them) is fetched by one positional read, about 3x faster than
        HDF5's own (:func:`_read_chunk_row`); other layouts are read through HDF5.

        Raises:
            ValueError: no indices.
            IndexError: an index out of range.
            ShardError: as :meth:`__getitem__` (missing dataset, all-zero maps), naming the file
                and slice; or slices whose arrays differ in shape, which cannot share a batch.
        """
        if not indices:
            raise ValueError("read_batch: no indices")
        locations = [self._locate(index) for index in indices]
        first_name, _, first_sid = locations[0]
        batch: dict[str, torch.Tensor] = {}
        # (shard, dataset): the descriptor to read its rows' raw chunks from; None: through HDF5.
        raw: dict[tuple[str, str], int | None] = {}
        for key, dataset in self._datasets.items():
            source = self._array(first_name, dataset)
            shape = source.shape[1:]
            dtype = torch.from_numpy(np.empty(0, dtype=source.dtype)).dtype
            out = torch.empty((len(indices), *shape), dtype=dtype, pin_memory=pin_memory)
            rows = out.numpy()  # a view: HDF5 writes into the tensor's memory
            for position, (name, row, sid) in enumerate(locations):
                source = self._array(name, dataset)
                if source.shape[1:] != shape:
                    raise ShardError(f"{storage.join(self.root, name)}: slice id {sid} (row {row}): {dataset!r} has "
                                     f"shape {source.shape[1:]}, slice id {first_sid} of {first_name} {shape}: they "
                                     "cannot share a batch")
                if (name, dataset) not in raw:
                    raw[name, dataset] = _file_descriptor(source) if _rows_are_chunks(source) else None
                descriptor = raw[name, dataset]
                if descriptor is None or not _read_chunk_row(source, row, rows[position], descriptor):
                    source.read_direct(rows, np.s_[row], np.s_[position])
                if key == "maps":
                    self._check_maps(rows[position], name, row, sid)
            batch[key] = out
        batch["slice_id"] = torch.tensor([sid for _, _, sid in locations], dtype=torch.int64)
        return batch

    def _locate(self, index: int) -> tuple[str, int, int]:
        """(shard name, row in the shard, slice id) of item ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        return self._index[index]

    def _array(self, name: str, dataset: str) -> h5py.Dataset:
        """Dataset ``dataset`` of shard ``name``, looked up once per open file (a lookup by path
        costs h5py about 80 us, and a batch makes dozens)."""
        handle = self._file(name)  # first: after a fork it drops the inherited datasets too
        source = self._sources.get((name, dataset))
        if source is None:
            try:
                source = self._sources[name, dataset] = handle[dataset]
            except KeyError:
                raise ShardError(f"{storage.join(self.root, name)}: no dataset {dataset!r}") from None
        return source

    def _check_maps(self, maps: np.ndarray, name: str, row: int, sid: int) -> None:
        if not maps.any():
            # Zero maps make A = 0: every loss and reconstruction of the slice would be zero or NaN,
            # silently (a zero-padded test coil is fine; only a slice with no nonzero map is refused).
            raise ShardError(f"{storage.join(self.root, name)}: slice id {sid} (row {row}): coil maps are all "
                             "zero; the shard is corrupt or was edited (re-run adps prepare to restore it)")


def _rows_are_chunks(source: h5py.Dataset) -> bool:
    """Whether each row of ``source`` is stored as one chunk holding exactly that row's bytes as
    numpy lays them out: one row per chunk, no filter (compression, checksum), the same item
    size as the numpy dtype (complex64 as HDF5's {r, i} float32 pair, bool as an 8-bit enum)."""
    return (_PREAD and source.chunks == (1, *source.shape[1:])
            and source.id.get_create_plist().get_nfilters() == 0
            and source.id.get_type().get_size() == source.dtype.itemsize
            and source.dtype.byteorder in ("=", "<", "|"))


def _file_descriptor(source: h5py.Dataset) -> int | None:
    """The OS file descriptor of ``source``'s file; None for a file driver without one."""
    try:
        descriptor = source.file.id.get_vfd_handle()
    except (OSError, ValueError, TypeError):
        return None
    return descriptor if isinstance(descriptor, int) else None


def _read_chunk_row(source: h5py.Dataset, row: int, out: np.ndarray, descriptor: int) -> bool:
    """Read row ``row`` of a :func:`_rows_are_chunks` dataset into the C-contiguous ``out`` with
    one positional read of its chunk from the file's ``descriptor`` (the GIL released meanwhile).
    False where HDF5 must read it instead: a chunk never written (fill value), an unexpected
    size, or a short read."""
    info = source.id.get_chunk_info_by_coord((row,) + (0,) * (source.ndim - 1))
    if info.byte_offset is None or info.filter_mask or info.size != out.nbytes:
        return False
    return os.preadv(descriptor, [memoryview(out.reshape(-1).view(np.uint8))], info.byte_offset) == out.nbytes

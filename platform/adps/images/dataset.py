"""Natural-image datasets (CelebA / FFHQ / AFHQ style) for the section 3.1 experiments.

:class:`ImageDataset` reads a folder of image files or a ``.zip`` of them, on local disk or S3,
and serves square RGB tensors in ``[-1, 1]`` at one resolution: the format Ambient Diffusion
and EDM train on (their ``dataset_tool.py`` writes exactly such folders and zips).

Items are dicts of tensors indexed by an integer, like :class:`adps.data.dataset.PreparedSliceDataset`,
so the Ray Train path can deal them out with ``worker_share``: each worker opens the dataset (a
cheap listing of names) and decodes just the indices of its own share.

With ``erasure_p > 0`` the dataset is an ambient model's *corrupted* training set: each image
carries one random inpainting mask drawn from ``(seed, index)``, the same at every epoch, as in
Ambient Diffusion (a fresh mask per epoch would reveal the whole image over training).

Layer 1 of the platform (ARCHITECTURE.md): no Ray, no MLflow.
"""

from __future__ import annotations

import contextlib
import io
import operator
import os
import struct
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adps.data import storage
from adps.images.operators import erasure_mask
from adps.images.synth import check_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""File name endings read as images (case-insensitive); anything else in a folder or zip is skipped."""

# Random stream of the per-image erasure masks: np.random.SeedSequence([seed, stream, index]).
_MASK_STREAM = 1

# What PIL raises for undecodable bytes: unknown format or truncated data (OSError), broken headers
# (SyntaxError, ValueError, struct.error), a short read (EOFError); plus, where PIL is imported,
# DecompressionBombError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# What zipfile raises for a damaged member: a failed CRC check or bad header (BadZipFile), broken
# deflate data (zlib.error), a compression method Python lacks (NotImplementedError).
_ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError)


def _is_image_name(name: str) -> bool:
    """Whether a file (or zip member) name is an image to read.

    Hidden names (``.DS_Store``, macOS's ``._img.png`` resource forks) and macOS's
    ``__MACOSX/`` folder in zips are skipped: they end in an image suffix but are not images.
    """
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if not base or base.startswith(".") or name.startswith("__MACOSX/"):
        return False
    return base.lower().endswith(IMAGE_SUFFIXES)


def _check_probability(p: object, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")
    return float(p)


def fixed_erasure_mask(seed: int, index: int, resolution: int, p: float) -> torch.Tensor:
    """The erasure mask of image ``index`` in a dataset corrupted with ``(seed, p)``.

    Drawn with :func:`adps.images.operators.erasure_mask` from a CPU generator seeded by
    ``np.random.SeedSequence([seed, stream, index])``: the same on every machine, worker and
    epoch, independent between images and seeds. Evaluation code can call this to recover the
    mask a training image was seen through.

    Returns:
        Boolean ``(1, resolution, resolution)``, True where a pixel is kept (in all three channels).
    """
    seed = check_int(seed, "seed", 0)
    index = check_int(index, "index", 0)
    resolution = check_int(resolution, "resolution", 1)
    p = _check_probability(p, "p")
    state = np.random.SeedSequence([seed, _MASK_STREAM, index]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return erasure_mask((1, 3, resolution, resolution), p, generator=generator)[0]


def to_square_tensor(image: Any, resolution: int) -> torch.Tensor:
    """A PIL image as a float32 ``(3, R, R)`` tensor in ``[-1, 1]``: RGB, centre square, resized.

    Converted to RGB (alpha is dropped, not composited), cropped to the central ``min(W, H)``
    square (EDM / Ambient Diffusion's ``center-crop``: faces and animals are centred) and resized
    with PIL's **bicubic** filter, antialiased when shrinking, so downscaling a 1024-pixel FFHQ
    image does not alias. An image already ``R x R`` is passed through untouched.
    """
    from PIL import Image  # deferred: only decoding needs PIL

    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    if (width, height) != (side, side):
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # (R, R, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return tensor.to(torch.float32) / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """A folder or ``.zip`` of natural images, local or ``s3://``, as square RGB tensors.

    ``root`` is one of:

    * a local folder or an ``s3://bucket/prefix``: the image files directly inside it (not
      sub-folders), sorted by name; on S3 each file is fetched when its item is read;
    * a ``.zip`` file, local or on S3 (CelebA / FFHQ / AFHQ releases, EDM's ``dataset_tool.py``
      output): every image member at any depth, sorted by name. An S3 zip is downloaded once to
      a temporary file, deleted when the dataset is closed or garbage-collected.

    Image files are :data:`IMAGE_SUFFIXES` (any case); other files are ignored. Opening lists
    names only (``len()`` never decodes), so a worker reading a small share pays only for it. A
    file that cannot be decoded raises ``ValueError`` naming it when its item is read;
    :meth:`check` decodes everything up front, to refuse a bad dataset before training.

    Items (a dict of tensors, batched by the default collate):

    * ``"image"``: float32 ``(3, R, R)`` in ``[-1, 1]`` (see :func:`to_square_tensor`); with
      ``erasure_p > 0`` the corrupted image ``mask * clean`` (erased pixels are 0);
    * ``"index"``: int64 scalar, the item's index (the key of its mask);
    * ``"mask"`` (only with ``erasure_p > 0``): bool ``(1, R, R)``, True where a pixel is kept,
      :func:`fixed_erasure_mask` ``(seed, index, R, erasure_p)``;
    * ``"clean"`` (only with ``keep_clean=True``): the uncorrupted image, for tests and
      evaluation (an ambient model must never train on it).

    The mask is keyed on the index in the sorted listing (adding or removing files shifts the
    masks after them): a corrupted training set is fixed by ``(root's listing, seed, erasure_p)``.

    Args:
        root: folder, ``s3://`` prefix, or ``.zip`` file (local or ``s3://``).
        resolution: side of the square output in pixels, >= 1.
        erasure_p: probability in ``[0, 1)`` that a pixel is erased (0: clean images, no mask).
        seed: seed of the masks, >= 0.
        keep_clean: also return the uncorrupted image as ``"clean"``.

    Raises:
        FileNotFoundError: ``root`` (a folder, bucket or zip) does not exist.
        ValueError: ``root`` holds no image files, is not a valid zip, or an argument is bad.
    """

    def __init__(self, root: storage.PathLike, resolution: int = 64, *, erasure_p: float = 0.0, seed: int = 0,
                 keep_clean: bool = False) -> None:
        self.root = str(root) if storage.is_s3(root) else str(Path(root))
        self.resolution = check_int(resolution, "resolution", 1)
        self.erasure_p = _check_probability(erasure_p, "erasure_p")
        self.seed = check_int(seed, "seed", 0)
        self.keep_clean = bool(keep_clean)
        self.is_zip = self.root.lower().endswith(".zip")

        # Zip state; the handle is per process (shared over a fork, two processes would seek one descriptor).
        self._zip_path: Path | None = None
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self._zip_finalizer: weakref.finalize | None = None

        if self.is_zip:
            self._files = self._open_zip_listing()
        else:
            if not storage.is_s3(self.root) and Path(self.root).is_file():
                raise ValueError(f"{self.root}: expected a folder of images or a .zip file, got another file")
            listing = storage.list_files(self.root, suffix="")
            self._files = [path for path in listing if _is_image_name(storage.basename(path))]
        if not self._files:
            what = "zip" if self.is_zip else "folder" if not storage.is_s3(self.root) else "S3 prefix"
            raise ValueError(f"{self.root}: no image files in this {what} (looked for {', '.join(IMAGE_SUFFIXES)}"
                             f"{' at any depth' if self.is_zip else ', not in sub-folders'})")

    # Listing and reading ---------------------------------------------------------------------
    def _open_zip_listing(self) -> list[str]:
        members = self._archive().infolist()
        return sorted(info.filename for info in members if not info.is_dir() and _is_image_name(info.filename))

    def _archive(self) -> zipfile.ZipFile:
        """This process's handle on the zip, opened (and for S3, downloaded) on first use."""
        if self._zip is not None and self._zip_pid == os.getpid():
            return self._zip
        if self._zip_path is None or not self._zip_path.is_file():
            self._zip_path = self._fetch_zip()
        try:
            archive = zipfile.ZipFile(self._zip_path)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{self.root}: not a valid zip file ({err})") from None
        self._zip, self._zip_pid = archive, os.getpid()
        return archive

    def _fetch_zip(self) -> Path:
        """The local path of the zip: itself, or a temporary download owned by this object."""
        stack = contextlib.ExitStack()
        path = stack.enter_context(storage.local_copy(self.root))
        if storage.is_s3(self.root):
            # Delete the download when this dataset goes away (or is closed): items are read from it till then.
            self._zip_finalizer = weakref.finalize(self, stack.close)
        return path

    def _read(self, name: str) -> bytes:
        if self.is_zip:
            return self._archive().read(name)
        return storage.read_bytes(name)

    def describe(self, index: int) -> str:
        """Where item ``index`` comes from, as errors name it: a path, URI or ``zip: member``."""
        name = self._files[index]
        return f"{self.root}: member {name}" if self.is_zip else name

    @property
    def files(self) -> list[str]:
        """The image files (paths, S3 URIs, or member names of the zip), in index order."""
        return list(self._files)

    def decode(self, index: int) -> torch.Tensor:
        """The clean image of item ``index``, float32 ``(3, R, R)`` in ``[-1, 1]``.

        Raises ``ValueError`` naming the file (and the zip) if it cannot be decoded.
        """
        from PIL import Image  # deferred: only decoding needs PIL

        index = self._check_index(index)
        where = self.describe(index)
        try:
            data = self._read(self._files[index])
        except _ZIP_READ_ERRORS as err:  # a damaged member; a missing file names itself
            raise ValueError(f"{where}: cannot read the zip member ({type(err).__name__}: {err})") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decode now: open() reads the header only
                return to_square_tensor(image, self.resolution)
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
            raise ValueError(f"{where}: cannot decode the image ({type(err).__name__}: {err})") from None

    def check(self) -> list[tuple[str, str]]:
        """Decode every image; the ``(file, reason)`` of each one that fails, empty if all read.

        Refuses a bad dataset before training rather than mid-epoch, at the cost of one epoch of decoding.
        """
        bad = []
        for index in range(len(self)):
            try:
                self.decode(index)
            except (ValueError, FileNotFoundError) as err:
                bad.append((self.describe(index), str(err)))
        return bad

    def close(self) -> None:
        """Close the zip and delete a downloaded S3 zip; a later read reopens (and re-downloads)."""
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip, self._zip_pid = None, None
        if self._zip_finalizer is not None:
            self._zip_finalizer()
            self._zip_finalizer, self._zip_path = None, None

    def __enter__(self) -> ImageDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for DataLoader workers or Ray: the copy reopens the zip in its own process. It keeps the
        # download's path (usable on this machine while this object lives), not its ownership; elsewhere
        # it downloads its own copy.
        state = self.__dict__.copy()
        state.update(_zip=None, _zip_pid=None, _zip_finalizer=None)
        return state

    # Items -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._files)

    def _check_index(self, index: int) -> int:
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"index: expected an integer, got {type(index).__name__}") from None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.root}")
        return index % len(self)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._check_index(index)
        clean = self.decode(index)
        item: dict[str, torch.Tensor] = {"image": clean}
        if self.erasure_p > 0:
            mask = fixed_erasure_mask(self.seed, index, self.resolution, self.erasure_p)
            item.update(image=clean * mask, mask=mask)
        if self.keep_clean:
            item["clean"] = clean
        item["index"] = torch.tensor(index, dtype=torch.int64)
        return item

    def __repr__(self) -> str:
        corruption = f", erasure_p={self.erasure_p}, seed={self.seed}" if self.erasure_p > 0 else ""
        return f"ImageDataset({self.root!r}, resolution={self.resolution}, {len(self)} images{corruption})"

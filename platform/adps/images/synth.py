"""Synthetic natural images (``adps synth-images``): a stand-in for CelebA / FFHQ / AFHQ.

The natural-image path (dataset reading, erasure corruption, training, A-DPS on Gaussian CS or
super-resolution) must run end to end on a laptop and in CI without downloading a face or animal
dataset. These images imitate what matters to it: smooth colour gradients and low-frequency
texture (a prior worth learning), and ellipses, rectangles and blobs with soft, anti-aliased
edges (structure an inpainting mask hides and a sampler must restore), over the full 8-bit range.

Every image is a pure function of ``(seed, index)``, placed in normalised coordinates (the same
picture at any resolution), and written files are byte-for-byte reproducible (fixed zip
timestamps; PNG encoding is deterministic).
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np

from adps.data import storage

# Random stream of the image picture: np.random.default_rng([seed, stream, index]).
_IMAGE_STREAM = 0

# File formats that write_image_folder / write_image_zip can write, with PIL's name and options.
# JPEG and WebP are lossy (quality 95): only PNG reads back exactly what synthetic_image drew.
IMAGE_FORMATS: dict[str, tuple[str, dict[str, object]]] = {
    "png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95}), "jpeg": ("JPEG", {"quality": 95}),
    "webp": ("WEBP", {"quality": 95})
}

# Zip members get a fixed timestamp (the zip epoch), so the same arguments give the same bytes.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _soft_step(z: np.ndarray) -> np.ndarray:
    """The logistic function, written with tanh so that it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def synthetic_image(index: int, resolution: int = 64, seed: int = 0) -> np.ndarray:
    """One procedurally drawn RGB image, a pure function of ``(seed, index)``.

    A bilinear blend of four corner colours with a few low-frequency colour waves, under three
    to seven shapes (ellipses, rotated rectangles, wobbly blobs) alpha-blended with soft edges
    and a linear shading across each. The picture does not depend on ``resolution``, only its sampling.

    Args:
        index: the image's number, >= 0.
        resolution: side of the square image in pixels, >= 1.
        seed: the dataset's seed, >= 0.

    Returns:
        ``uint8`` array ``(resolution, resolution, 3)`` (height, width, RGB), the layout PIL writes.
    """
    index = check_int(index, "index", 0)
    resolution = check_int(resolution, "resolution", 1)
    seed = check_int(seed, "seed", 0)
    rng = np.random.default_rng([seed, _IMAGE_STREAM, index])

    centres = (np.arange(resolution) + 0.5) / resolution  # pixel centres in (0, 1)
    y, x = np.meshgrid(centres, centres, indexing="ij")

    corners = rng.uniform(0.05, 0.95, size=(4, 3))
    image = (((1 - y) * (1 - x))[..., None] * corners[0] + ((1 - y) * x)[..., None] * corners[1]
             + (y * (1 - x))[..., None] * corners[2] + (y * x)[..., None] * corners[3])
    for _ in range(3):  # low-frequency texture: plane waves of a few cycles per image
        frequency, angle, phase = rng.uniform(1.0, 4.0), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(0.02, 0.08, size=3)
        wave = np.sin(2 * math.pi * frequency * (x * math.cos(angle) + y * math.sin(angle)) + phase)
        image = image + wave[..., None] * amplitude

    for _ in range(int(rng.integers(3, 8))):
        kind = int(rng.integers(3))  # 0 ellipse, 1 rectangle, 2 blob
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        a, b = rng.uniform(0.06, 0.3, size=2)  # half-axes, normalised
        theta = rng.uniform(0, math.pi)
        softness = rng.uniform(0.004, 0.03)  # edge width, normalised: from crisp to blurred
        opacity = rng.uniform(0.6, 1.0)
        colour = rng.uniform(0.0, 1.0, size=3)
        shading = rng.uniform(-0.25, 0.25, size=3)
        wobble = rng.uniform(-0.15, 0.15, size=3)
        wobble_phase = rng.uniform(0, 2 * math.pi, size=3)

        dx, dy = x - cx, y - cy
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        radius = np.hypot(u / a, v / b)
        if kind == 0:
            level = radius - 1
        elif kind == 1:
            level = np.maximum(np.abs(u) / a, np.abs(v) / b) - 1
        else:
            phi = np.arctan2(v / b, u / a)
            outline = 1 + sum(wobble[k] * np.cos((k + 2) * phi + wobble_phase[k]) for k in range(3))
            level = radius / outline - 1
        # level * min(a, b) approximates the signed distance to the edge in normalised units.
        alpha = opacity * _soft_step(-level * min(a, b) / softness)
        fill = colour + (u / a)[..., None] * shading
        image = image * (1 - alpha[..., None]) + fill * alpha[..., None]

    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _format(fmt: str) -> tuple[str, str, dict[str, object]]:
    """``(extension, PIL format name, save options)`` of ``fmt``, or a ValueError naming it."""
    ext = fmt.lower().lstrip(".") if isinstance(fmt, str) else fmt
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"fmt: expected one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    pil_format, options = IMAGE_FORMATS[ext]
    return ext, pil_format, options


def encode_image(array: np.ndarray, fmt: str = "png") -> bytes:
    """The file bytes of a ``uint8`` ``(H, W, 3)`` image in ``fmt`` (png, jpg, jpeg or webp)."""
    from PIL import Image  # deferred: PIL is only needed when images are written

    _, pil_format, options = _format(fmt)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def image_name(index: int, fmt: str = "png") -> str:
    """``img-00042.png``: zero-padded, so that sorted names are in index order."""
    return f"img-{index:05d}.{_format(fmt)[0]}"


def _check_counts(n: int, resolution: int, seed: int) -> tuple[int, int, int]:
    return check_int(n, "n", 1), check_int(resolution, "resolution", 1), check_int(seed, "seed", 0)


def write_image_folder(out: storage.PathLike, n: int, resolution: int = 64, seed: int = 0,
                       fmt: str = "png") -> list[str]:
    """Write ``n`` synthetic images ``img-00000.png`` ... to a local folder or ``s3://`` prefix.

    Each file is written atomically; a local folder is created if missing. Image ``i`` is
    :func:`synthetic_image` ``(i, resolution, seed)``. Returns the written paths (local paths or
    S3 URIs), in index order.
    """
    n, resolution, seed = _check_counts(n, resolution, seed)
    _format(fmt)  # refuse a bad format before writing anything
    written = []
    for index in range(n):
        path = storage.join(out, image_name(index, fmt))
        storage.write_bytes_atomic(path, encode_image(synthetic_image(index, resolution, seed), fmt))
        written.append(path)
    return written


def write_image_zip(out_zip: storage.PathLike, n: int, resolution: int = 64, seed: int = 0, fmt: str = "png") -> str:
    """Write ``n`` synthetic images into one ``.zip`` (local or ``s3://``), the CelebA / FFHQ style.

    Members ``img-00000.png`` ... sit at the top level, stored uncompressed (the images are already
    compressed, and stored members read fastest), with a fixed timestamp so that the same arguments
    give the same bytes. The zip is published in one step: a reader never sees a partial archive.
    Returns ``out_zip`` as a string.
    """
    n, resolution, seed = _check_counts(n, resolution, seed)
    _format(fmt)
    if not str(out_zip).lower().endswith(".zip"):
        raise ValueError(f"out_zip: {out_zip}: expected a file name ending in .zip (ImageDataset reads zips by suffix)")
    with storage.atomic_write_path(out_zip) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for index in range(n):
                info = zipfile.ZipInfo(image_name(index, fmt), date_time=_ZIP_DATE_TIME)
                archive.writestr(info, encode_image(synthetic_image(index, resolution, seed), fmt))
    return str(out_zip) if storage.is_s3(out_zip) else str(Path(out_zip))

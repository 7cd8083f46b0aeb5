"""Natural-image inverse problems (section 3.1 of the A-DPS paper): the forward operators.

Ambient Diffusion's natural-image models are trained on randomly inpainted images
(:func:`erasure_mask`, :func:`further_corrupt`, :class:`RandomInpainting`) and A-DPS is then
tested on *other* tasks: Gaussian compressed sensing and super-resolution (also blur and box
inpainting here), with :func:`pseudo_inverse` as the classical baseline. Images are real
``(N, C, H, W)`` tensors in ``[-1, 1]``.

The data: :class:`ImageDataset` reads a folder or ``.zip`` of images (CelebA / FFHQ / AFHQ
style, local or ``s3://``), optionally corrupted by a fixed per-image erasure mask
(:func:`fixed_erasure_mask`); :func:`synthetic_image`, :func:`write_image_folder` and
:func:`write_image_zip` (``adps synth-images``) make a stand-in dataset that runs anywhere.

Layer 1 of the platform (see ARCHITECTURE.md): pure torch, no Ray, no MLflow.
"""

from adps.images.dataset import IMAGE_SUFFIXES, ImageDataset, fixed_erasure_mask, to_square_tensor
from adps.images.operators import (
    BoxInpainting,
    GaussianBlur,
    GaussianCompressedSensing,
    ImageOperator,
    RandomInpainting,
    SuperResolution,
    add_noise,
    erasure_mask,
    further_corrupt,
    pseudo_inverse,
)
from adps.images.synth import synthetic_image, write_image_folder, write_image_zip

__all__ = [
    "IMAGE_SUFFIXES", "BoxInpainting", "GaussianBlur", "GaussianCompressedSensing", "ImageDataset", "ImageOperator",
    "RandomInpainting", "SuperResolution", "add_noise", "erasure_mask", "fixed_erasure_mask", "further_corrupt",
    "pseudo_inverse", "synthetic_image", "to_square_tensor", "write_image_folder", "write_image_zip"
]

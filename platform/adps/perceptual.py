"""Perceptual metrics (LPIPS and FID) on magnitude images, and LPIPS of RGB images (the
natural-image study, :func:`lpips_rgb`), with no download at run time.

METHOD.md asks for LPIPS (AlexNet) on magnitude images scaled to ``[-1, 1]`` and repeated to
three channels, and for the FID of unconditional samples with VGG16 (``features`` + global
average pool, 512-d: the paper's text) or Inception-v3 (pool3, 2048-d: the reference code).
The backbones' state dicts are only ever read from disk (:func:`find_weights`). How each
metric scales its images (choices that change the numbers): docs/evaluation.md, "Metrics".
"""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from adps.metrics import magnitude

Backbone = Literal["vgg16", "inception_v3"]

# torchvision's file names (with the hash prefix torchvision checks on download; a file placed by hand skips it).
WEIGHT_FILES: dict[str, str] = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth",
                                "inception_v3": "inception_v3_google-0cc3c7bd.pth"}
WEIGHT_URL_BASE = "https://download.pytorch.org/models/"
WEIGHTS_DIR_ENV = "ADPS_WEIGHTS_DIR"

# Square input side of each FID backbone (what it was trained at).
INPUT_SIZES: dict[str, int] = {"vgg16": 224, "inception_v3": 299}
FEATURE_DIMS: dict[str, int] = {"vgg16": 512, "inception_v3": 2048}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# Weights lookup -------------------------------------------------------------------------------
def find_weights(arch: str, weights: str | os.PathLike[str] | None = None) -> Path:
    """Path of the local torchvision state dict for ``arch`` (``alexnet``, ``vgg16``, ``inception_v3``);
    never downloads.

    Looks in ``weights`` (a file, or a folder holding :data:`WEIGHT_FILES` ``[arch]``) when given and only
    there; otherwise in ``$ADPS_WEIGHTS_DIR``, then in ``torch.hub.get_dir()/checkpoints``. Raises
    :class:`FileNotFoundError` naming the file, every place looked in and the URL to fetch it from.
    """
    if arch not in WEIGHT_FILES:
        raise ValueError(f"unknown backbone {arch!r}; expected one of {sorted(WEIGHT_FILES)}")
    file_name = WEIGHT_FILES[arch]
    if weights is not None:
        given = Path(weights).expanduser()
        looked = [("weights= argument", given / file_name if given.is_dir() else given)]
    else:
        env_dir = os.environ.get(WEIGHTS_DIR_ENV)
        # torch.hub.get_dir() is read at call time (it honours $TORCH_HOME), so tests can redirect it.
        looked = [(f"${WEIGHTS_DIR_ENV}", Path(env_dir).expanduser() / file_name if env_dir else None),
                  ("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / file_name)]
    for _, candidate in looked:
        if candidate is not None and candidate.is_file():
            return candidate
    places = "\n".join(f"  - {place}: {candidate or 'not set'}" for place, candidate in looked)
    raise FileNotFoundError(f"{arch} weights file {file_name!r} not found. Looked in:\n{places}\nNothing is "
                            f"downloaded at run time: fetch {WEIGHT_URL_BASE}{file_name} on a machine with network "
                            f"access and put it in ${WEIGHTS_DIR_ENV}, in torch.hub.get_dir()/checkpoints, or pass "
                            "weights=PATH.")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a weights file is data, never code to unpickle (what it refuses, objects other than tensors
    # and containers, is not loaded at all). No mmap: torchvision's older files use the legacy (non-zip) format.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: refused: not a plain weights file (it holds objects that could run code "
                         f"when loaded; {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _subset(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix`` with the prefix removed (e.g. ``features.`` of a VGG)."""
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def _resolve_device(device: str | torch.device | None, images: torch.Tensor) -> torch.device:
    # Default to where the images already are, so metrics run next to the sampler.
    return torch.device(device) if device is not None else images.device


def clear_model_cache() -> None:
    """Forget the cached networks (e.g. after replacing a weights file at the same path)."""
    _lpips_model.cache_clear()
    _feature_model.cache_clear()


# LPIPS ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _lpips_model(weights_path: str, device: str) -> nn.Module:
    """LPIPS(AlexNet) with the shipped v0.1 linear heads and the local backbone weights; cached by
    (weights path, device): building it reads a 230 MB file."""
    import lpips  # imported here so importing adps.perceptual stays cheap

    with warnings.catch_warnings():
        # pnet_rand=True builds a randomly initialised AlexNet (no download); lpips still calls
        # torchvision with the deprecated `pretrained=` keyword, which only warns.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
        model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    features = _subset(_load_state_dict(Path(weights_path)), "features.")
    # lpips splits torchvision's `features` into slices whose children keep the original
    # indices as names (slice2 holds "2", "3", "4"), so features.<i>.<p> -> slice<k>.<i>.<p>.
    remapped: dict[str, torch.Tensor] = {}
    for slice_name, slice_module in model.net.named_children():
        for index, layer in slice_module.named_children():
            for param_name, _ in layer.named_parameters(recurse=False):
                key = f"{index}.{param_name}"
                if key not in features:
                    raise ValueError(f"{weights_path} has no features.{key}: not an AlexNet state dict?")
                remapped[f"{slice_name}.{key}"] = features[key]
    model.net.load_state_dict(remapped, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


def _lpips_batched(gt: torch.Tensor, estimate: torch.Tensor,
                   to_network: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], *,
                   weights: str | os.PathLike[str] | None, batch_size: int,
                   device: str | torch.device | None) -> torch.Tensor:
    """LPIPS of ``gt[i]`` against ``estimate[i]``, ``(N,)`` float32 on ``gt``'s device, ``batch_size`` pairs per
    forward pass: the one loop behind :func:`lpips_distance` and :func:`lpips_rgb`. ``to_network(g, x)`` turns a
    chunk of pairs (on the run device) into the network's input, two ``(n, 3, H, W)`` float tensors in ``[-1, 1]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    run_device = _resolve_device(device, gt)
    model = _lpips_model(str(find_weights("alexnet", weights).resolve()), str(run_device))
    values = []
    with torch.no_grad():
        for start in range(0, gt.shape[0], batch_size):
            g, x = to_network(gt[start : start + batch_size].to(run_device), estimate[start : start + batch_size].to(run_device))
            values.append(model(g, x).flatten())
    if not values:
        return torch.empty(0, dtype=torch.float32, device=gt.device)
    return torch.cat(values).to(gt.device)


def _check_pair(gt: torch.Tensor, estimate: torch.Tensor) -> None:
    if gt.shape != estimate.shape:
        raise ValueError(f"ground truth shape {tuple(gt.shape)} does not match estimate shape {tuple(estimate.shape)}")


def lpips_distance(gt: torch.Tensor, estimate: torch.Tensor, *, weights: str | os.PathLike[str] | None = None,
                   batch_size: int = 32, device: str | torch.device | None = None, clip: bool = False) -> torch.Tensor:
    """LPIPS (AlexNet, v0.1 linear heads) per slice, shape ``(N,)``, float32 on ``gt``'s device.

    ``gt`` and ``estimate`` are ``(N, H, W)`` (complex or real; magnitudes are used). Each pair
    is scaled by the ground truth's maximum magnitude to ``2 |x| / max|gt| - 1`` (zero maps to
    -1, ``max|gt|`` to 1) and repeated to three channels.

    Keywords:
        weights: AlexNet state dict (file or folder); default lookup as :func:`find_weights`.
        batch_size: slices per forward pass (32).
        device: where the network runs (default: ``gt``'s device).
        clip: clamp the scaled estimate to ``[-1, 1]`` (False: overshoot counts as error).
    """
    _check_pair(gt, estimate)
    if gt.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), got {tuple(gt.shape)}")

    def to_network(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, x = magnitude(g).float(), magnitude(x).float()
        # Guard an all-zero slice (it would divide by zero); it then maps to -1 everywhere.
        peak = g.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        g = 2 * g / peak - 1
        x = 2 * x / peak - 1
        if clip:
            x = x.clamp(-1, 1)
        return g.unsqueeze(1).expand(-1, 3, -1, -1), x.unsqueeze(1).expand(-1, 3, -1, -1)

    return _lpips_batched(gt, estimate, to_network, weights=weights, batch_size=batch_size, device=device)


LPIPS_MIN_SIDE = 32
"""Smallest image side LPIPS's AlexNet takes: its two 3 x 3 / 2 max-pools after the 11 x 11 / 4
first convolution leave nothing of a side below 31 (:func:`lpips_rgb`'s ``resize`` upsamples)."""


def lpips_rgb(gt: torch.Tensor, estimate: torch.Tensor, *, weights: str | os.PathLike[str] | None = None,
              batch_size: int = 32, device: str | torch.device | None = None, clip: bool = False,
              resize: int | None = None) -> torch.Tensor:
    """LPIPS (AlexNet, v0.1 linear heads) of RGB images, shape ``(N,)``, float32 on ``gt``'s device.

    ``gt`` and ``estimate`` are real ``(N, 3, H, W)`` already in ``[-1, 1]`` (the convention of :mod:`adps.images` and
    of the ``lpips`` package): no scaling is applied, unlike :func:`lpips_distance`'s magnitude images.

    Keywords: ``weights``, ``batch_size`` and ``device`` as :func:`lpips_distance`, and
        clip: clamp the estimate to ``[-1, 1]`` first (False: values outside count as error).
        resize: resize both images (bilinear, anti-aliased) to ``resize x resize`` before the network. Images with
            a side below :data:`LPIPS_MIN_SIDE` need it (AlexNet has nothing left of them); None: as they are.
    """
    _check_pair(gt, estimate)
    if gt.ndim != 4 or gt.shape[1] != 3 or gt.is_complex():
        raise ValueError(f"expected real RGB images of shape (N, 3, H, W), got {tuple(gt.shape)} {gt.dtype}")
    side = min(gt.shape[-2:]) if resize is None else int(resize)
    if side < LPIPS_MIN_SIDE:
        what = f"resize={resize}" if resize is not None else f"images of {gt.shape[-2]} x {gt.shape[-1]}"
        raise ValueError(f"{what}: LPIPS's AlexNet needs a side of at least {LPIPS_MIN_SIDE} pixels; "
                         f"pass resize={max(64, LPIPS_MIN_SIDE)} (or larger) to upsample smaller images")

    def to_network(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, x = g.float(), x.float()
        if clip:
            x = x.clamp(-1, 1)
        if resize is not None:
            g, x = (F.interpolate(t, size=(int(resize), int(resize)), mode="bilinear", align_corners=False,
                                  antialias=True) for t in (g, x))
        return g, x

    return _lpips_batched(gt, estimate, to_network, weights=weights, batch_size=batch_size, device=device)


# FID ------------------------------------------------------------------------------------------
def _build_vgg16(state: dict[str, torch.Tensor]) -> nn.Module:
    """VGG16 ``features`` followed by global average pooling: a 512-d descriptor."""
    import torchvision

    # Only `features` is used, so only its entries are loaded (strictly); the classifier's
    # 120 M parameters are dropped and a features-only state dict is accepted as well.
    features = torchvision.models.vgg16(weights=None).features
    features.load_state_dict(_subset(state, "features."), strict=True)
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _build_inception_v3(state: dict[str, torch.Tensor]) -> nn.Module:
    import torchvision

    # transform_input=True as torchvision sets it for its pretrained weights: those expect the ImageNet-normalised
    # input re-mapped to Google's (x - 0.5) / 0.5 convention. init_weights=False: the random init is slow and replaced.
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=False)
    # pool3 (2048-d) is what the classifier sees after average pooling and (eval: no-op) dropout.
    model.fc = nn.Identity()
    kept = {key: value for key, value in state.items() if not key.startswith(("AuxLogits.", "fc."))}
    model.load_state_dict(kept, strict=True)
    return model


_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor]], nn.Module]] = {"vgg16": _build_vgg16,
                                                                        "inception_v3": _build_inception_v3}


@functools.lru_cache(maxsize=4)
def _feature_model(backbone: str, weights_path: str, device: str) -> nn.Module:
    """The FID feature extractor, cached by (backbone, weights path, device)."""
    model = _BUILDERS[backbone](_load_state_dict(Path(weights_path)))
    model.eval().requires_grad_(False)
    return model.to(device)


def fid_features(images: torch.Tensor, backbone: Backbone = "vgg16", *, weights: str | os.PathLike[str] | None = None,
                 batch_size: int = 32, device: str | torch.device | None = None, input_size: int | None = None,
                 scale: Literal["max", "none"] = "max", antialias: bool = True) -> torch.Tensor:
    """Backbone features of magnitude images, ``(N, D)`` float64 on the CPU.

    ``images`` is ``(N, H, W)`` (complex or real; magnitudes are used). ``backbone`` is ``"vgg16"`` (``features`` +
    global average pool, D = 512) or ``"inception_v3"`` (torchvision's, pool3, D = 2048).

    Keywords: ``weights`` (the backbone's), ``batch_size`` and ``device`` as :func:`lpips_distance`, and
        input_size: square side images are resized to (default: 224 for VGG16, 299 for
            Inception, what they were trained at; smaller only for quick tests).
        scale: ``"max"`` divides each image by its own maximum magnitude into ``[0, 1]``;
            ``"none"`` takes images already in ``[0, 1]``.
        antialias: anti-aliased bilinear resizing (True), as torchvision's transforms do.
    """
    if backbone not in _BUILDERS:
        raise ValueError(f"unknown FID backbone {backbone!r}; expected one of {sorted(_BUILDERS)}")
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if scale not in ("max", "none"):
        raise ValueError(f"scale must be 'max' or 'none', got {scale!r}")
    size = INPUT_SIZES[backbone] if input_size is None else int(input_size)
    run_device = _resolve_device(device, images)
    model = _feature_model(backbone, str(find_weights(backbone, weights).resolve()), str(run_device))
    mean = torch.tensor(_IMAGENET_MEAN, device=run_device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=run_device).view(1, 3, 1, 1)
    chunks = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = magnitude(images[start : start + batch_size]).float().to(run_device)
            if scale == "max":
                x = x / x.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            x = F.interpolate(x.unsqueeze(1), (size, size), mode="bilinear", align_corners=False, antialias=antialias)
            x = (x.expand(-1, 3, -1, -1) - mean) / std
            chunks.append(model(x).double().cpu())
    if not chunks:
        return torch.empty(0, FEATURE_DIMS[backbone], dtype=torch.float64)
    return torch.cat(chunks)


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample covariance (rows are samples) of ``(N, D)`` features, in float64."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2 for a covariance, got shape {array.shape}")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrtm(sigma1 sigma2)`` through symmetric eigendecompositions: ``sigma1 sigma2`` is similar
    to ``S sigma2 S`` with ``S = sqrtm(sigma1)`` (symmetric PSD), so the trace of its square root is
    ``sum sqrt(eigvalsh(S sigma2 S))``. Singular covariances need no offset (see ``clip_rounding``)."""

    def clip_rounding(eigenvalues: np.ndarray) -> np.ndarray:
        # Eigenvalues below the rounding level (D * machine eps * largest) are zeros of a singular
        # matrix; left as they are, their square roots (~1e-8 of the scale each) add up.
        floor = eigenvalues.size * np.finfo(np.float64).eps * max(float(np.max(np.abs(eigenvalues))), 0.0)
        return np.where(eigenvalues > floor, eigenvalues, 0.0)

    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(clip_rounding(w))) @ v.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrise away rounding
    return float(np.sqrt(clip_rounding(eigenvalues)).sum())


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor, *,
                     method: Literal["sqrtm", "eigh"] = "sqrtm", eps: float = 1e-6, residual_tol: float = 1e-3,
                     imag_tol: float = 1e-3) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``.

    Keywords:
        method: ``"sqrtm"`` (default) takes ``scipy.linalg.sqrtm(sigma1 @ sigma2)``, the computation of pytorch-fid
            and most published FIDs. ``"eigh"`` computes the same trace from two symmetric eigendecompositions
            (:func:`_trace_sqrt_product_eigh`): equal up to rounding, needs no ``eps``, and is much faster for
            2048-d features (sqrtm of a singular 2048 x 2048 product takes about a minute on one CPU core).
        eps: for ``"sqrtm"``: when the square root is not finite or inaccurate (relative residual
            ``||X X - A||_F / ||A||_F`` above ``residual_tol``, 1e-3), as happens for the singular covariances of
            fewer samples than feature dimensions, it is recomputed with ``eps * I`` added to both covariances
            (1e-6; a bias of order ``eps * D``).
        imag_tol: the product of two covariances has real non-negative eigenvalues, so an imaginary part of
            ``sqrtm`` is rounding noise and is dropped; one larger than ``imag_tol`` times the largest real entry
            raises ``ValueError`` (1e-3).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"inconsistent shapes: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    base = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2))
    if method == "eigh":
        return base - 2 * _trace_sqrt_product_eigh(sigma1, sigma2)
    if method != "sqrtm":
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")

    def sqrt_product(s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, float]:
        product = s1 @ s2
        with warnings.catch_warnings():
            # scipy warns about singular input; the residual below measures what matters.
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(product)
        if not np.all(np.isfinite(root)):
            return root, np.inf
        scale = np.linalg.norm(product) or 1.0
        return root, float(np.linalg.norm(root @ root - product) / scale)

    covmean, residual = sqrt_product(sigma1, sigma2)
    if residual > residual_tol:
        offset = eps * np.eye(sigma1.shape[0])
        covmean, residual = sqrt_product(sigma1 + offset, sigma2 + offset)
        if not np.all(np.isfinite(covmean)):
            raise ValueError("sqrtm of the covariance product is not finite even with the eps offset")
    if np.iscomplexobj(covmean):
        largest_imag = np.max(np.abs(covmean.imag))
        if largest_imag > imag_tol * max(1.0, float(np.max(np.abs(covmean.real)))):
            raise ValueError(f"sqrtm of the covariance product has an imaginary part of {largest_imag:.3g}")
        covmean = covmean.real
    return base - 2 * float(np.trace(covmean))


def fid(real: torch.Tensor, fake: torch.Tensor, backbone: Backbone = "vgg16", *,
        weights: str | os.PathLike[str] | None = None, batch_size: int = 32, device: str | torch.device | None = None,
        input_size: int | None = None, scale: Literal["max", "none"] = "max",
        method: Literal["sqrtm", "eigh"] = "sqrtm", eps: float = 1e-6) -> float:
    """FID between two sets of magnitude images ``(N, H, W)`` and ``(M, H', W')``.

    Features as :func:`fid_features` (same keywords and defaults), the distance as :func:`frechet_distance`
    (``method`` "sqrtm", ``eps`` 1e-6). Both sets need at least two images.
    """
    (mu1, sigma1), (mu2, sigma2) = (
        feature_statistics(fid_features(images, backbone, weights=weights, batch_size=batch_size, device=device,
                                        input_size=input_size, scale=scale)) for images in (real, fake))
    return frechet_distance(mu1, sigma1, mu2, sigma2, method=method, eps=eps)

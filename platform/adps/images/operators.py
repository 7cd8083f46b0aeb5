"""Linear inverse-problem operators for natural images (section 3.1 of the A-DPS paper).

Images are real ``(N, C, H, W)`` tensors (``C = 3`` for RGB, values in ``[-1, 1]``); each operator
defines its measurement shape (:meth:`ImageOperator.measurement_shape`) and offers
``forward(x) = A x``, ``adjoint(y) = A^T y``, ``normal(x) = A^T A x`` and ``pseudo_inverse(y)``
(the least-squares baseline a posterior sampler has to beat), all differentiable (DPS guidance is
the gradient of ``||A x - y||^2``) and on the device and in the dtype of their input.

The operators are noiseless: the caller, who knows the noise level, adds it (:func:`add_noise`).
Every random choice takes an explicit ``torch.Generator`` or seed (ARCHITECTURE.md: masks and
matrices are reproducible). Training corruption (Ambient Diffusion): :func:`erasure_mask` and
:func:`further_corrupt` (the paper's ``A~ = B A``). Test-time tasks:
:class:`GaussianCompressedSensing`, :class:`SuperResolution`, :class:`GaussianBlur`, :class:`BoxInpainting`.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F

from adps.linear_operator import LinearOperator
from adps.mri.recon import conjugate_gradient

# Default CG iterations of the blur pseudo-inverse: enough to converge for a mild blur, while for a
# strong one the early stop acts as the regulariser (the exact inverse amplifies noise without bound).
BLUR_CG_ITERATIONS = 50


class ImageOperator(LinearOperator):
    """A linear operator ``A`` on real image batches ``(N, C, H, W)``; subclasses define the physics.

    The natural-image :class:`~adps.linear_operator.LinearOperator`: a network sees the images as
    they are, and an ambient model's training corruption is random inpainting (:meth:`corruption`).
    ``normal`` defaults to ``adjoint(forward(x))``; operators with a cheaper fused form override it.
    """

    @abstractmethod
    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The least-squares image ``argmin_x ||A x - y||`` of smallest norm, ``A^+ y``."""

    def corruption(self, mask: torch.Tensor) -> RandomInpainting:
        """``A_tr``: random inpainting with ``mask``, boolean ``(N, 1, H, W)`` (True = kept)."""
        if not isinstance(mask, torch.Tensor) or mask.is_complex() or mask.ndim != 4 or mask.shape[1] != 1:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"must be a boolean pixel mask of shape (N, 1, H, W), got {got}")
        return RandomInpainting(mask.to(torch.bool))

    def prepare(self, y: torch.Tensor, device: torch.device, caller: str) -> tuple[torch.Tensor, ImageOperator]:
        """``y`` checked (real, finite, of the shape this operator gives its images) and moved to
        ``device`` as float32; the operator casts itself to each input."""
        if not isinstance(y, torch.Tensor) or y.is_complex() or not y.is_floating_point():
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{caller}: y must be real floating-point measurements, got {got}")
        if y.ndim < 1 or y.shape[0] < 1:
            raise ValueError(f"{caller}: y must hold at least one measurement vector (N >= 1), got shape {tuple(y.shape)}")
        y = y.detach().to(device, torch.float32)
        try:
            shape = self.image_shape_of(y)
            expected = tuple(self.measurement_shape(shape))
        except ValueError as err:
            raise ValueError(f"{caller}: y of shape {tuple(y.shape)} does not fit the operator "
                             f"{type(self).__name__}: {err}") from None
        if expected != tuple(y.shape):
            raise ValueError(f"{caller}: y has shape {tuple(y.shape)}, but {type(self).__name__} measures images "
                             f"{shape} as {expected}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{caller}: y holds NaN or Inf values")
        return y, self


# Masks ------------------------------------------------------------------------------------------
class _DiagonalMask(ImageOperator):
    """``A = diag(mask)`` with a 0/1 mask: a projection, so ``A^T = A = A^T A = A^+``.

    Measurements keep the image shape with erased pixels set to zero, so that ``y`` is itself an
    image (the convention of Ambient Diffusion's inpainting and of DPS).
    """

    @abstractmethod
    def _mask_like(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The 0/1 mask in ``x``'s device and dtype, broadcastable to ``x`` (checked, naming ``name``)."""

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _image_shape(image_shape, "image_shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = mask * x`` (erased pixels are zero)."""
        _check_image(x, "x")
        return x * self._mask_like(x, "x")

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``mask * y``: the mask is diagonal and real, hence self-adjoint."""
        _check_image(y, "y")
        return y * self._mask_like(y, "y")

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``mask * x`` (``mask^2 = mask``): one product instead of two."""
        return self.forward(x)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``mask * y``: ``y`` itself for measurements in the range; erased pixels stay zero."""
        return self.adjoint(y)


class RandomInpainting(_DiagonalMask):
    """Random inpainting, Ambient Diffusion's training corruption: erased pixels are zero.

    Args:
        mask: boolean or 0/1 tensor, True (1) where a pixel is kept. Shape ``(N|1, C|1, H, W)``
            (a channel axis of 1 erases a pixel in every channel, as :func:`erasure_mask` draws)
            or ``(H, W)`` for one mask shared by the batch and the channels. Stored as given; it
            is cast to the device and dtype of each input.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = _check_mask(mask, "mask")

    def _mask_like(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mask = self.mask if self.mask.ndim == 4 else self.mask.reshape(1, 1, *self.mask.shape)
        n, c, h, w = x.shape
        mn, mc, mh, mw = mask.shape
        if (mh, mw) != (h, w) or mn not in (1, n) or mc not in (1, c):
            raise ValueError(f"{name}: shape {tuple(x.shape)} does not match the mask's shape "
                             f"{tuple(self.mask.shape)} (expected the mask's H, W, and a mask batch and channel "
                             "size of 1 or equal to the input's)")
        return mask.to(device=x.device, dtype=x.dtype)

    def condition(self) -> torch.Tensor:
        """The mask as an ambient image model's conditioning channel, float32 ``(N, 1, H, W)``."""
        mask = self.mask if self.mask.ndim == 4 else self.mask.reshape(1, 1, *self.mask.shape)
        if mask.shape[1] != 1:
            raise ValueError(f"condition: the mask must be shared by the channels, got shape {tuple(self.mask.shape)}")
        return mask.to(torch.float32)

    def further_corrupt(self, delta: float = 0.1, *, generator: torch.Generator) -> RandomInpainting:
        """The further-corrupted operator ``A~ = B A`` (see :func:`further_corrupt`)."""
        return RandomInpainting(further_corrupt(self.mask, delta, generator=generator))


class BoxInpainting(_DiagonalMask):
    """Box inpainting: a fixed rectangle of every image and channel is erased (set to zero).

    Args:
        box: ``(top, left, height, width)`` in pixels; it must lie inside the images it is
            applied to (checked on each call, since the operator is size-agnostic).
    """

    def __init__(self, box: tuple[int, int, int, int]) -> None:
        if not (isinstance(box, (tuple, list)) and len(box) == 4 and all(_is_int(v) for v in box)):
            raise ValueError(f"box: expected four integers (top, left, height, width), got {box!r}")
        top, left, height, width = (int(v) for v in box)
        if top < 0 or left < 0 or height < 1 or width < 1:
            raise ValueError("box: expected top, left >= 0 and height, width >= 1, got (top, left, height, width) = "
                             f"{tuple(box)}")
        self.box = (top, left, height, width)

    def _mask_like(self, x: torch.Tensor, name: str) -> torch.Tensor:
        top, left, height, width = self.box
        h, w = x.shape[-2:]
        if top + height > h or left + width > w:
            raise ValueError(f"box: (top, left, height, width) = {self.box} reaches row {top + height} and column "
                             f"{left + width}, outside the {name} images of size H={h}, W={w}")
        mask = torch.ones(h, w, device=x.device, dtype=x.dtype)
        mask[top : top + height, left : left + width] = 0
        return mask


def erasure_mask(shape: tuple[int, ...], p: float, *, generator: torch.Generator) -> torch.Tensor:
    """Ambient Diffusion's random inpainting mask: each pixel erased with probability ``p``.

    A pixel is erased in all channels at once (Ambient Diffusion corrupts pixels, not colour
    samples), so the mask has a channel axis of 1 that broadcasts over ``C``.

    Args:
        shape: the image batch shape ``(N, C, H, W)``.
        p: erasure probability in ``[0, 1)`` (1 would erase every pixel; the paper uses 0.2 to 0.9).
        generator: the source of randomness; the mask is drawn on its device (the same seed gives
            the same mask whichever device the images live on: move it there with ``.to``).

    Returns:
        Boolean ``(N, 1, H, W)``, True where a pixel is kept.
    """
    n, _, h, w = _image_shape(shape, "shape")
    p = _probability(p, "p", low_open=False)
    _check_generator(generator)
    return torch.rand((n, 1, h, w), generator=generator, device=generator.device) >= p


def further_corrupt(mask: torch.Tensor, delta: float = 0.1, *, generator: torch.Generator) -> torch.Tensor:
    """Erase a further fraction ``delta`` of the kept pixels: the paper's ``A~ = B A``.

    Each kept pixel is erased independently with probability ``delta``; erased pixels stay
    erased, so the result is a subset of ``mask``. Ambient Diffusion needs ``delta > 0`` (then
    ``E[A^T A | A~]`` is full rank and the ambient loss identifies ``E[x0 | A~, y~]``); the
    paper uses 0.1.

    Args:
        mask: boolean or 0/1 mask of any shape (e.g. ``(N, 1, H, W)`` from :func:`erasure_mask`).
        delta: probability in ``(0, 1)`` of erasing each kept pixel.
        generator: the source of randomness (drawn on its device, then moved to ``mask``'s).

    Returns:
        Boolean tensor of ``mask``'s shape and device.
    """
    mask = _check_mask(mask, "mask", any_shape=True).bool()
    delta = _probability(delta, "delta", low_open=True)
    _check_generator(generator)
    keep = torch.rand(mask.shape, generator=generator, device=generator.device) >= delta
    return mask & keep.to(mask.device)


# Gaussian compressed sensing -------------------------------------------------------------------
class GaussianCompressedSensing(ImageOperator):
    """Gaussian compressed sensing: ``y = A vec(x)`` with one dense Gaussian ``A`` for every image.

    ``A`` is ``m x (C H W)`` with i.i.d. entries ``N(0, 1/m)`` (so ``E[A^T A] = I``), drawn from
    ``torch.Generator().manual_seed(seed)`` on the CPU: the same seed gives the same matrix on
    every machine and device. Measurements are ``(N, m)``.

    Memory: ``m * C * H * W`` float32 numbers: at 64x64 RGB, 47 MiB per 1000 measurements (188 MiB
    at m = 4000, the paper's step-count figure). A copy in another dtype or on another device is
    made on first use and kept (one at a time). The pseudo-inverse adds the ``min(m, CHW)^2``
    float64 Gram factor (122 MiB at m = 4000).

    Args:
        m: the number of measurements, >= 1.
        image_shape: ``(C, H, W)`` of the images.
        seed: integer seed of the matrix.
        device, dtype: where and how ``A`` is stored (default CPU float32).
    """

    def __init__(self, m: int, image_shape: tuple[int, int, int], seed: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if not _is_int(m) or m < 1:
            raise ValueError(f"m: expected the number of measurements as an integer >= 1, got {m!r}")
        shape_ok = isinstance(image_shape, (tuple, list)) and len(image_shape) == 3
        if not (shape_ok and all(_is_int(v) and v >= 1 for v in image_shape)):
            raise ValueError(f"image_shape: expected (C, H, W) as three positive integers, got {image_shape!r}")
        if not _is_int(seed):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        if not dtype.is_floating_point or dtype.is_complex:
            raise ValueError(f"dtype: expected a real floating dtype, got {dtype}")
        self.m = int(m)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.seed = int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        matrix = torch.randn((self.m, self.pixels), generator=generator, dtype=torch.float32)
        self.matrix = (matrix / math.sqrt(self.m)).to(device=device, dtype=dtype)
        self._cast: torch.Tensor | None = None
        self._gram_factor: torch.Tensor | None = None

    @property
    def pixels(self) -> int:
        """``C * H * W``, the number of columns of ``A``."""
        return math.prod(self.image_shape)

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        n, c, h, w = _image_shape(image_shape, "image_shape")
        if (c, h, w) != self.image_shape:
            raise ValueError(f"image_shape: expected (N, {', '.join(map(str, self.image_shape))}), got {image_shape}")
        return (n, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = vec(x) A^T``: images ``(N, C, H, W)`` -> measurements ``(N, m)``."""
        _check_image(x, "x")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x: expected shape (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        return x.flatten(1) @ self._matrix_like(x).T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``: measurements ``(N, m)`` -> images ``(N, C, H, W)``."""
        self._check_measurements(y)
        return (y @ self._matrix_like(y)).view(y.shape[0], *self.image_shape)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T (A A^T)^-1 y`` for ``m <= CHW`` (the minimum-norm solution, ``A A^+ y = y``);
        ``(A^T A)^-1 A^T y`` for ``m > CHW`` (least squares, ``A^+ A x = x``).

        The Gram matrix of the smaller side is formed and Cholesky-factored once, in float64
        (its conditioning worsens as ``m`` nears ``CHW``), and kept for later calls.
        """
        self._check_measurements(y)
        factor = self._factor(y.device)
        if self.m <= self.pixels:
            z = torch.cholesky_solve(y.to(torch.float64).T, factor).T
            return self.adjoint(z.to(y.dtype))
        rhs = self.adjoint(y).flatten(1).to(torch.float64)
        x = torch.cholesky_solve(rhs.T, factor).T
        return x.to(y.dtype).view(y.shape[0], *self.image_shape)

    def _matrix_like(self, t: torch.Tensor) -> torch.Tensor:
        if self.matrix.device == t.device and self.matrix.dtype == t.dtype:
            return self.matrix
        if self._cast is None or self._cast.device != t.device or self._cast.dtype != t.dtype:
            self._cast = self.matrix.to(device=t.device, dtype=t.dtype)
        return self._cast

    def _factor(self, device: torch.device) -> torch.Tensor:
        if self._gram_factor is None or self._gram_factor.device != device:
            a = self.matrix.to(device=device, dtype=torch.float64)
            gram = a @ a.T if self.m <= self.pixels else a.T @ a
            self._gram_factor = torch.linalg.cholesky(gram)
        return self._gram_factor

    def _check_measurements(self, y: torch.Tensor) -> None:
        _check_real(y, "y")
        if y.ndim != 2 or y.shape[1] != self.m:
            raise ValueError(f"y: expected measurements of shape (N, m={self.m}), got {tuple(y.shape)}")


# Super-resolution ------------------------------------------------------------------------------
class SuperResolution(ImageOperator):
    """Super-resolution: ``A`` averages each ``factor x factor`` block (average pooling).

    ``A A^T = I / factor^2``, so the adjoint is nearest-neighbour upsampling divided by
    ``factor^2`` and the pseudo-inverse is plain nearest-neighbour upsampling. Measurements are
    ``(N, C, H / factor, W / factor)``; ``H`` and ``W`` must be multiples of ``factor``.

    Args:
        factor: the downscaling factor, an integer >= 1 (the paper uses 2, 4, 8 and beyond).
    """

    def __init__(self, factor: int) -> None:
        if not _is_int(factor) or factor < 1:
            raise ValueError(f"factor: expected an integer >= 1, got {factor!r}")
        self.factor = int(factor)

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        n, c, h, w = _image_shape(image_shape, "image_shape")
        self._check_divisible(h, w, "image_shape")
        return (n, c, h // self.factor, w // self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average pooling: ``(N, C, H, W)`` -> ``(N, C, H / f, W / f)``."""
        _check_image(x, "x")
        self._check_divisible(x.shape[-2], x.shape[-1], "x")
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour upsampling divided by ``f^2``: ``(N, C, h, w)`` -> ``(N, C, h f, w f)``."""
        _check_image(y, "y")
        return _upsample_nearest(y, self.factor) / self.factor**2

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T (A A^T)^-1 y = f^2 A^T y``: nearest-neighbour upsampling (exactly ``A A^+ y = y``)."""
        _check_image(y, "y")
        return _upsample_nearest(y, self.factor)

    def _check_divisible(self, h: int, w: int, name: str) -> None:
        bad = [f"{axis}={size}" for axis, size in (("H", h), ("W", w)) if size % self.factor]
        if bad:
            raise ValueError(f"{name}: image size {' and '.join(bad)} not divisible by factor={self.factor}")


# Gaussian blur ---------------------------------------------------------------------------------
class GaussianBlur(ImageOperator):
    """Gaussian blur (the deblurring task): each channel convolved with a normalised Gaussian kernel.

    "Same" convolution with zero padding (pixels outside the image are zero), so ``y`` has the
    image's shape and ``A`` is an exact matrix whose adjoint is the transposed convolution
    (correlation with the flipped kernel, equal to the kernel here since it is symmetric).

    Args:
        kernel_size: odd integer >= 1 (an even kernel has no centre pixel for "same" output).
        sigma: standard deviation in pixels, > 0.
    """

    def __init__(self, kernel_size: int, sigma: float) -> None:
        if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd integer >= 1, got {kernel_size!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 < sigma < math.inf):
            raise ValueError(f"sigma: expected a finite number > 0, got {sigma!r}")
        self.kernel_size = int(kernel_size)
        self.sigma = float(sigma)
        offsets = torch.arange(self.kernel_size, dtype=torch.float64) - self.kernel_size // 2
        profile = torch.exp(-(offsets**2) / (2 * self.sigma**2))
        kernel = torch.outer(profile, profile)
        self.kernel = kernel / kernel.sum()  # (k, k), float64, sums to 1

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _image_shape(image_shape, "image_shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = h * x`` per channel (convolution, zero boundary), same shape as ``x``."""
        _check_image(x, "x")
        # conv2d correlates, so a true convolution correlates with the flipped kernel.
        return F.conv2d(x, self._weight(x), padding=self.kernel_size // 2, groups=x.shape[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``: the transposed convolution of :meth:`forward` (same weight and padding)."""
        _check_image(y, "y")
        return F.conv_transpose2d(y, self._weight(y), padding=self.kernel_size // 2, groups=y.shape[1])

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = BLUR_CG_ITERATIONS) -> torch.Tensor:
        """Least squares by conjugate gradient on ``A^T A x = A^T y`` from zero, ``iterations`` steps:
        exact for a mild blur, while for a strong one the early stop regularises (:data:`BLUR_CG_ITERATIONS`)."""
        _check_image(y, "y")
        return conjugate_gradient(self.normal, self.adjoint(y), iterations=iterations)

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        kernel = self.kernel.flip(0, 1).to(device=x.device, dtype=x.dtype)
        return kernel.view(1, 1, k, k).expand(x.shape[1], 1, k, k)


# Helpers ---------------------------------------------------------------------------------------
def pseudo_inverse(operator: ImageOperator, y: torch.Tensor) -> torch.Tensor:
    """``A^+ y``, the least-squares image of smallest norm: the baseline a posterior sampler beats.

    Closed form for every operator but the blur (conjugate gradient: :meth:`GaussianBlur.pseudo_inverse`).
    """
    if not isinstance(operator, ImageOperator):
        raise ValueError(f"operator: expected an ImageOperator, got {type(operator).__name__}")
    return operator.pseudo_inverse(y)


def add_noise(y: torch.Tensor, sigma: float, *, generator: torch.Generator) -> torch.Tensor:
    """``y + sigma * n`` with standard Gaussian ``n`` (circular complex for complex ``y``).

    The operators are noiseless: a caller adds noise here, with its own generator so that it is
    reproducible. The noise is drawn on the generator's device and moved to ``y``'s.
    """
    if not isinstance(y, torch.Tensor) or not (y.is_floating_point() or y.is_complex()):
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y: expected a floating-point tensor, got {got}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 <= sigma < math.inf):
        raise ValueError(f"sigma: expected a finite number >= 0, got {sigma!r}")
    _check_generator(generator)
    noise = torch.randn(y.shape, generator=generator, device=generator.device, dtype=y.dtype)
    return y + sigma * noise.to(y.device)


def _upsample_nearest(y: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return y
    return y.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator (every random draw is seeded), got {generator!r}")


def _check_real(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a real floating-point tensor, got dtype {t.dtype}")


def _check_image(t: torch.Tensor, name: str) -> None:
    _check_real(t, name)
    if t.ndim != 4:
        raise ValueError(f"{name}: expected shape (N, C, H, W), got {tuple(t.shape)} ({t.ndim} dimensions)")


def _image_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int, int]:
    if not (
        isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 4 and all(_is_int(v) and v >= 1 for v in shape)
    ):
        raise ValueError(f"{name}: expected (N, C, H, W) as four positive integers, got {shape!r}")
    return tuple(int(v) for v in shape)  # type: ignore[return-value]


def _check_mask(mask: torch.Tensor, name: str, any_shape: bool = False) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex() or (mask.dtype != torch.bool and not bool(torch.all((mask == 0) | (mask == 1)))):
        raise ValueError(f"{name}: expected a boolean or 0/1 mask")
    if not any_shape and mask.ndim not in (2, 4):
        raise ValueError(f"{name}: expected shape (N|1, C|1, H, W) or (H, W), got {tuple(mask.shape)}")
    return mask


def _probability(value: float, name: str, *, low_open: bool) -> float:
    """Validate a probability in ``[0, 1)`` (``low_open``: ``(0, 1)``)."""
    in_range = isinstance(value, (int, float)) and (0 < value < 1 if low_open else 0 <= value < 1)
    if isinstance(value, bool) or not in_range:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name}: expected a probability in {interval}, got {value!r}")
    return float(value)

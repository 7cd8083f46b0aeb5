"""Natural-image operators: adjointness, masks, reproducibility, pseudo-inverses, bad input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from adps.images import (
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
from conftest import devices


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.flatten(), b.flatten())


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (name, builder, image shape): each builder draws whatever it needs from the generator it gets.
OPERATORS: list[tuple[str, Callable[[torch.Generator], ImageOperator], tuple[int, int, int, int]]] = [
    ("inpaint", lambda g: RandomInpainting(erasure_mask((3, 3, 16, 12), 0.5, generator=g)), (3, 3, 16, 12)),
    ("inpaint-2d-mask", lambda g: RandomInpainting(torch.rand(16, 12, generator=g) > 0.3), (2, 3, 16, 12)),
    (
        "inpaint-01-mask",
        lambda g: RandomInpainting((torch.rand(1, 3, 16, 12, generator=g) > 0.3).int()),
        (2, 3, 16, 12),
    ),
    ("box", lambda g: BoxInpainting((2, 3, 5, 4)), (2, 3, 16, 12)),
    ("cs", lambda g: GaussianCompressedSensing(50, (3, 8, 6), seed=7, dtype=torch.float64), (3, 3, 8, 6)),
    ("cs-overdetermined", lambda g: GaussianCompressedSensing(200, (1, 8, 6), seed=3), (2, 1, 8, 6)),
    ("sr1", lambda g: SuperResolution(1), (2, 3, 8, 8)),
    ("sr2", lambda g: SuperResolution(2), (2, 3, 16, 24)),
    ("sr4", lambda g: SuperResolution(4), (2, 3, 16, 24)),
    ("sr8", lambda g: SuperResolution(8), (1, 3, 16, 32)),
    ("blur5", lambda g: GaussianBlur(5, 1.2), (2, 3, 12, 10)),
    ("blur7", lambda g: GaussianBlur(7, 3.0), (2, 1, 9, 13)),
    ("blur1", lambda g: GaussianBlur(1, 1.0), (1, 3, 4, 4)),
]
IDS = [name for name, _, _ in OPERATORS]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(("name", "build", "shape"), OPERATORS, ids=IDS)
def test_adjointness_shapes_and_normal(
    device: str, name: str, build: Callable, shape: tuple[int, ...], generator: torch.Generator
) -> None:
    op = build(generator)
    y_shape = op.measurement_shape(shape)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    y = torch.randn(y_shape, generator=generator, dtype=torch.float64).to(device)
    ax, aty = op.forward(x), op.adjoint(y)
    assert tuple(ax.shape) == y_shape and tuple(aty.shape) == shape
    assert ax.dtype == aty.dtype == torch.float64 and ax.device.type == aty.device.type == device
    lhs, rhs = inner(ax, y), inner(x, aty)
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0), (name, float(lhs), float(rhs))
    torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op(x), ax)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(("name", "build", "shape"), OPERATORS, ids=IDS)
def test_float32_in_float32_out_and_differentiable(
    device: str, name: str, build: Callable, shape: tuple[int, ...], generator: torch.Generator
) -> None:
    """The DPS guidance term: grad_x ||A x - y||^2 = 2 A^T (A x - y), in the input's dtype."""
    op = build(generator)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    y = torch.randn(op.measurement_shape(shape), generator=generator).to(device)
    residual = op.forward(x) - y
    assert residual.dtype == torch.float32 and residual.device.type == device
    (grad,) = torch.autograd.grad(residual.pow(2).sum(), x)
    torch.testing.assert_close(grad, 2 * op.adjoint(residual).detach(), rtol=1e-4, atol=1e-4)


# Random inpainting ------------------------------------------------------------------------------
def test_erasure_mask_fraction_shape_and_channel_sharing() -> None:
    mask = erasure_mask((4, 3, 64, 64), 0.6, generator=seeded(1))
    assert mask.shape == (4, 1, 64, 64) and mask.dtype == torch.bool
    assert abs((~mask).float().mean().item() - 0.6) < 0.02
    # Applied to an RGB batch, a pixel is erased in every channel or in none.
    y = RandomInpainting(mask).forward(torch.rand(4, 3, 64, 64, generator=seeded(2)) + 0.5)
    zero = y == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero)) and torch.equal(zero[:, 0], ~mask[:, 0])
    assert bool(erasure_mask((2, 3, 8, 8), 0.0, generator=seeded(3)).all())


def test_erasure_mask_is_reproducible_from_the_generator() -> None:
    first = erasure_mask((2, 3, 32, 32), 0.4, generator=seeded(5))
    assert torch.equal(first, erasure_mask((2, 3, 32, 32), 0.4, generator=seeded(5)))
    assert not torch.equal(first, erasure_mask((2, 3, 32, 32), 0.4, generator=seeded(6)))


def test_further_corrupt_removes_about_delta_of_the_kept_pixels_only() -> None:
    mask = erasure_mask((8, 3, 64, 64), 0.4, generator=seeded(7))
    further = further_corrupt(mask, generator=seeded(8))  # default delta = 0.1
    assert further.shape == mask.shape and further.dtype == torch.bool
    assert not bool((further & ~mask).any())  # erased pixels stay erased
    removed = (mask & ~further).sum() / mask.sum()
    assert abs(removed.item() - 0.1) < 0.01
    assert torch.equal(further, further_corrupt(mask, 0.1, generator=seeded(8)))
    stronger = further_corrupt(mask, 0.5, generator=seeded(8))
    assert abs(((mask & ~stronger).sum() / mask.sum()).item() - 0.5) < 0.02
    # The operator-level shortcut is the same draw.
    op = RandomInpainting(mask).further_corrupt(0.1, generator=seeded(8))
    assert torch.equal(op.mask, further)


def test_box_inpainting_erases_exactly_the_box() -> None:
    x = torch.rand(2, 3, 10, 12, generator=seeded(9)) + 1.0
    y = BoxInpainting((1, 4, 3, 5)).forward(x)
    expected = x.clone()
    expected[:, :, 1:4, 4:9] = 0
    assert torch.equal(y, expected)
    BoxInpainting((7, 7, 3, 5)).forward(x)  # touching the bottom-right border is fine


# Compressed sensing -----------------------------------------------------------------------------
def test_cs_matrix_is_reproducible_from_its_seed() -> None:
    a = GaussianCompressedSensing(300, (3, 8, 8), seed=11)
    b = GaussianCompressedSensing(300, (3, 8, 8), seed=11)
    c = GaussianCompressedSensing(300, (3, 8, 8), seed=12)
    assert a.matrix.shape == (300, 192) and a.matrix.dtype == torch.float32
    assert torch.equal(a.matrix, b.matrix) and not torch.equal(a.matrix, c.matrix)
    # Entries N(0, 1/m), so columns have unit norm on average (E[A^T A] = I).
    assert abs(a.matrix.var().item() * 300 - 1) < 0.02 and abs(a.matrix.mean().item()) < 0.01
    # The same matrix for every image of a batch: batching changes nothing.
    x = torch.randn(4, 3, 8, 8, generator=seeded(13))
    torch.testing.assert_close(a.forward(x)[2:3], a.forward(x[2:3]))
    # A float64 input uses the same matrix in float64.
    torch.testing.assert_close(a.forward(x.double()), a.forward(x).double(), rtol=1e-5, atol=1e-5)


# Super-resolution and blur ----------------------------------------------------------------------
def test_super_resolution_is_average_pooling_with_nearest_adjoint() -> None:
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    op = SuperResolution(2)
    torch.testing.assert_close(op.forward(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]], dtype=torch.float64))
    y = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    nearest = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=torch.float64)
    torch.testing.assert_close(op.adjoint(y)[0, 0], nearest / 4)


def test_blur_kernel_is_a_normalised_gaussian_with_zero_boundary() -> None:
    op = GaussianBlur(5, 1.0)
    assert op.kernel.shape == (5, 5) and abs(op.kernel.sum().item() - 1) < 1e-12
    assert torch.equal(op.kernel, op.kernel.flip(0)) and torch.equal(op.kernel, op.kernel.T)
    assert op.kernel[2, 2] == op.kernel.max()
    y = op.forward(torch.ones(1, 2, 9, 9, dtype=torch.float64))
    torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.ones(1, 2, 5, 5, dtype=torch.float64))  # interior
    assert bool((y[..., 0, :] < 1).all())  # zero padding darkens the border
    # A delta image blurs into the kernel itself.
    delta = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    delta[0, 0, 4, 4] = 1
    torch.testing.assert_close(op.forward(delta)[0, 0, 2:7, 2:7], op.kernel)


# Pseudo-inverse ---------------------------------------------------------------------------------
def test_pseudo_inverse_of_masks_is_the_masked_measurement(generator: torch.Generator) -> None:
    for op in (RandomInpainting(erasure_mask((2, 3, 8, 8), 0.5, generator=generator)), BoxInpainting((1, 1, 3, 3))):
        x = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
        y = op.forward(x)
        assert torch.equal(pseudo_inverse(op, y), y)
        assert torch.equal(op.forward(pseudo_inverse(op, y)), y)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_pseudo_inverse_of_super_resolution(factor: int, generator: torch.Generator) -> None:
    op = SuperResolution(factor)
    y = torch.randn(2, 3, 32 // factor, 16 // factor, generator=generator, dtype=torch.float64)
    x = pseudo_inverse(op, y)
    assert x.shape == (2, 3, 32, 16)
    torch.testing.assert_close(op.forward(x), y, rtol=0, atol=1e-14)  # A A^+ y = y
    torch.testing.assert_close(x, op.adjoint(y) * factor**2)  # nearest-neighbour upsampling


@pytest.mark.parametrize("device", devices())
def test_pseudo_inverse_of_compressed_sensing(device: str, generator: torch.Generator) -> None:
    # Underdetermined (m < CHW): the minimum-norm solution reproduces every y, and lies in range(A^T).
    op = GaussianCompressedSensing(120, (3, 8, 8), seed=21, device=device, dtype=torch.float64)
    y = torch.randn(3, 120, generator=generator, dtype=torch.float64).to(device)
    x = pseudo_inverse(op, y)
    assert x.shape == (3, 3, 8, 8) and x.device.type == device
    torch.testing.assert_close(op.forward(x), y, rtol=1e-10, atol=1e-10)
    coefficients = torch.linalg.lstsq(op.matrix.T.cpu(), x.flatten(1).T.cpu()).solution
    torch.testing.assert_close(op.matrix.T.cpu() @ coefficients, x.flatten(1).T.cpu(), rtol=1e-8, atol=1e-8)
    # float32 measurements give a float32 answer of float32 accuracy.
    x32 = pseudo_inverse(op, y.float())
    assert x32.dtype == torch.float32
    torch.testing.assert_close(op.forward(x32.double()), y, rtol=1e-4, atol=1e-4)
    # Overdetermined (m > CHW): A is injective and x is recovered from A x.
    tall = GaussianCompressedSensing(400, (1, 8, 8), seed=22, device=device, dtype=torch.float64)
    x_true = torch.randn(2, 1, 8, 8, generator=generator, dtype=torch.float64).to(device)
    torch.testing.assert_close(pseudo_inverse(tall, tall.forward(x_true)), x_true, rtol=1e-10, atol=1e-10)


def test_pseudo_inverse_of_a_mild_blur_recovers_the_image(generator: torch.Generator) -> None:
    op = GaussianBlur(3, 0.5)  # frequency response >= 0.57 per axis: well conditioned
    x = torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(pseudo_inverse(op, op.forward(x)), x, rtol=1e-8, atol=1e-8)
    # A strong blur: the few CG steps still lower the residual well below the adjoint's.
    strong = GaussianBlur(9, 2.5)
    y = strong.forward(x)
    adjoint_residual = (strong.forward(strong.adjoint(y)) - y).norm()
    assert (strong.forward(strong.pseudo_inverse(y, iterations=20)) - y).norm() < 0.1 * adjoint_residual


# Noise ------------------------------------------------------------------------------------------
def test_add_noise_is_seeded_and_of_the_right_level() -> None:
    y = torch.zeros(20000, dtype=torch.float64)
    noisy = add_noise(y, 0.3, generator=seeded(30))
    assert noisy.dtype == torch.float64 and abs(noisy.std().item() - 0.3) < 0.01
    assert torch.equal(noisy, add_noise(y, 0.3, generator=seeded(30)))
    assert torch.equal(add_noise(y, 0.0, generator=seeded(31)), y)


# Bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: erasure_mask((2, 3, 8, 8), 1.0, generator=seeded()), r"p: expected a probability in \[0, 1\)"),
        (lambda: erasure_mask((2, 3, 8, 8), -0.1, generator=seeded()), "p: "),
        (lambda: erasure_mask((2, 3, 8, 8), float("nan"), generator=seeded()), "p: "),
        (lambda: erasure_mask((3, 8, 8), 0.5, generator=seeded()), r"shape: expected \(N, C, H, W\)"),
        (lambda: erasure_mask((2, 3, 8, 8), 0.5, generator=None), "generator: expected a torch.Generator"),
        (lambda: further_corrupt(torch.ones(8, 8, dtype=torch.bool), 0.0, generator=seeded()), r"delta: .*\(0, 1\)"),
        (lambda: further_corrupt(torch.ones(8, 8, dtype=torch.bool), 1.0, generator=seeded()), "delta: "),
        (lambda: further_corrupt(torch.full((8, 8), 0.5), 0.1, generator=seeded()), "mask: expected a boolean or 0/1"),
        (lambda: RandomInpainting(torch.ones(8, dtype=torch.bool)), r"mask: expected shape"),
        (lambda: RandomInpainting(torch.ones(1, 1, 8, 8)).forward(torch.ones(1, 3, 8, 6)), r"x: shape \(1, 3, 8, 6\)"),
        (lambda: RandomInpainting(torch.ones(2, 1, 8, 8)).adjoint(torch.ones(3, 3, 8, 8)), "y: shape"),
        (lambda: BoxInpainting((0, 0, 0, 4)), "box: expected top, left >= 0 and height, width >= 1"),
        (lambda: BoxInpainting((0, 0, 4)), "box: expected four integers"),
        (lambda: BoxInpainting((6, 0, 4, 4)).forward(torch.ones(1, 3, 8, 8)), "box: .* outside the x images"),
        (lambda: GaussianCompressedSensing(0, (3, 8, 8), seed=0), "m: expected the number of measurements"),
        (lambda: GaussianCompressedSensing(2.5, (3, 8, 8), seed=0), "m: "),
        (lambda: GaussianCompressedSensing(10, (8, 8), seed=0), r"image_shape: expected \(C, H, W\)"),
        (lambda: GaussianCompressedSensing(10, (3, 8, 8), seed=None), "seed: expected an integer"),
        (lambda: GaussianCompressedSensing(10, (3, 8, 8), seed=0).forward(torch.ones(2, 3, 8, 6)), "x: expected shape"),
        (lambda: GaussianCompressedSensing(10, (3, 8, 8), seed=0).adjoint(torch.ones(2, 11)), r"y: .*\(N, m=10\)"),
        (lambda: SuperResolution(0), "factor: expected an integer >= 1"),
        (lambda: SuperResolution(2.0), "factor: "),
        (lambda: SuperResolution(4).forward(torch.ones(1, 3, 30, 32)), r"x: image size H=30 not divisible by factor=4"),
        (lambda: SuperResolution(4).forward(torch.ones(1, 3, 30, 18)), r"H=30 and W=18 not divisible by factor=4"),
        (lambda: SuperResolution(8).measurement_shape((1, 3, 64, 60)), r"image_shape: image size W=60"),
        (lambda: GaussianBlur(4, 1.0), "kernel_size: expected an odd integer >= 1"),
        (lambda: GaussianBlur(0, 1.0), "kernel_size: "),
        (lambda: GaussianBlur(5, 0.0), "sigma: expected a finite number > 0"),
        (
            lambda: GaussianBlur(5, 1.0).forward(torch.ones(3, 8, 8)),
            r"x: expected shape \(N, C, H, W\), got \(3, 8, 8\)",
        ),
        (lambda: GaussianBlur(5, 1.0).adjoint(torch.ones(1, 1, 3, 8, 8)), r"y: expected shape \(N, C, H, W\)"),
        (lambda: SuperResolution(2).forward(torch.ones(1, 3, 8, 8, dtype=torch.int64)), "x: expected a real floating"),
        (lambda: SuperResolution(2).forward(torch.ones(1, 3, 8, 8, dtype=torch.complex64)), "x: expected a real"),
        (lambda: pseudo_inverse(torch.ones(3, 3), torch.ones(1, 3)), "operator: expected an ImageOperator"),
        (lambda: add_noise(torch.ones(3), -1.0, generator=seeded()), "sigma: expected a finite number >= 0"),
        (lambda: add_noise(torch.ones(3, dtype=torch.int64), 0.1, generator=seeded()), "y: expected a floating"),
    ],
)
def test_bad_input_names_the_argument(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()

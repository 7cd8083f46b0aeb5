"""The SENSE operator A = P F S: adjointness, agreement with sigpy, gradients, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adps.mri import SenseOperator, check_maps, column_mask
from conftest import devices, random_complex


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.vdot(a.flatten(), b.flatten())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("batch", "coils", "height", "width", "per_slice_mask"),
    [(3, 4, 32, 24, True), (2, 16, 40, 48, False), (2, 5, 15, 21, True), (1, 18, 64, 64, False)],
)
def test_adjointness(
    device: str, batch: int, coils: int, height: int, width: int, per_slice_mask: bool, generator: torch.Generator
) -> None:
    maps = random_complex(batch, coils, height, width, generator=generator).to(device)
    if per_slice_mask:
        mask = torch.rand(batch, width, generator=generator) > 0.5
    else:
        mask = torch.rand(width, generator=generator) > 0.5
    op = SenseOperator(maps, mask.to(device))
    x = random_complex(batch, height, width, generator=generator).to(device)
    y = random_complex(batch, coils, height, width, generator=generator).to(device)
    lhs, rhs = inner(op.forward(x), y), inner(x, op.adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    # The fused normal operator equals the adjoint of the forward.
    torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), rtol=1e-5, atol=1e-4)


def test_per_slice_masks_apply_to_their_slice(generator: torch.Generator) -> None:
    maps = random_complex(2, 3, 8, 10, generator=generator)
    masks = torch.zeros(2, 10, dtype=torch.bool)
    masks[0, :5] = True
    masks[1, 5:] = True
    y = SenseOperator(maps, masks).forward(random_complex(2, 8, 10, generator=generator))
    assert torch.all(y[0, :, :, 5:] == 0) and torch.all(y[0, :, :, :5] != 0)
    assert torch.all(y[1, :, :, :5] == 0) and torch.all(y[1, :, :, 5:] != 0)


def test_forward_matches_sigpy(generator: torch.Generator) -> None:
    """An independent implementation: sigpy's Sense linop (same centred orthonormal FFT)."""
    import sigpy.mri

    batch, coils, height, width = 2, 6, 24, 20
    maps = random_complex(batch, coils, height, width, generator=generator, dtype=torch.complex128)
    x = random_complex(batch, height, width, generator=generator, dtype=torch.complex128)
    mask = column_mask(width, 2, seed=0, slice_id=3, acs=4)
    ours = SenseOperator(maps, mask).forward(x).numpy()
    adj_in = random_complex(batch, coils, height, width, generator=generator, dtype=torch.complex128)
    ours_adj = SenseOperator(maps, mask).adjoint(adj_in).numpy()
    for i in range(batch):
        weights = np.broadcast_to(mask.numpy().astype(np.float64), (height, width))
        sense = sigpy.mri.linop.Sense(maps[i].numpy(), weights=weights)
        np.testing.assert_allclose(ours[i], sense * x[i].numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(ours_adj[i], sense.H * adj_in[i].numpy(), rtol=1e-10, atol=1e-10)


def test_gradient_of_data_consistency(generator: torch.Generator) -> None:
    """Differentiable: grad_x ||A x - y||^2 = 2 A^H (A x - y), the DPS guidance term."""
    maps = random_complex(2, 4, 12, 10, generator=generator, dtype=torch.complex128)
    op = SenseOperator(maps, torch.rand(10, generator=generator) > 0.4)
    y = random_complex(2, 4, 12, 10, generator=generator, dtype=torch.complex128)
    x = random_complex(2, 12, 10, generator=generator, dtype=torch.complex128).requires_grad_(True)
    loss = (op.forward(x) - op._apply_mask(y)).abs().pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    expected = 2 * op.adjoint(op.forward(x) - y)
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-10)


def test_with_mask_keeps_maps(generator: torch.Generator) -> None:
    maps = random_complex(1, 2, 8, 8, generator=generator)
    op = SenseOperator(maps)
    assert op.mask is None
    masked = op.with_mask(torch.ones(8, dtype=torch.bool))
    assert masked.maps is maps and masked.mask is not None
    assert op.kspace_shape == (1, 2, 8, 8) and op.image_shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("maps", "mask", "message"),
    [
        (torch.ones(1, 2, 8, 8), None, "complex"),
        (torch.ones(2, 8, 8, dtype=torch.complex64), None, r"\(N, C, H, W\)"),
        (torch.ones(1, 2, 8, 8, dtype=torch.complex64), torch.ones(7, dtype=torch.bool), "length W=8"),
        (torch.ones(2, 2, 8, 8, dtype=torch.complex64), torch.ones(3, 8, dtype=torch.bool), r"\(N, W\)=\(2, 8\)"),
        (torch.ones(1, 2, 8, 8, dtype=torch.complex64), torch.full((8,), 0.5), "0/1"),
        (torch.ones(1, 2, 8, 8, dtype=torch.complex64), torch.ones(1, 1, 8), r"\(W,\) or \(N, W\)"),
    ],
)
def test_bad_construction(maps: torch.Tensor, mask: torch.Tensor | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SenseOperator(maps, mask)


def test_bad_operands(generator: torch.Generator) -> None:
    op = SenseOperator(random_complex(2, 3, 8, 6, generator=generator))
    with pytest.raises(ValueError, match=r"image: expected shape \(2, 8, 6\).*got \(2, 6, 8\)"):
        op.forward(random_complex(2, 6, 8, generator=generator))
    with pytest.raises(ValueError, match="image: expected a complex tensor"):
        op.forward(torch.ones(2, 8, 6))
    with pytest.raises(ValueError, match=r"kspace: expected shape \(2, 3, 8, 6\)"):
        op.adjoint(random_complex(2, 4, 8, 6, generator=generator))
    with pytest.raises(ValueError, match="image"):
        op.normal(random_complex(1, 8, 6, generator=generator))


@pytest.mark.parametrize("device", devices())
def test_all_zero_maps_are_refused_naming_the_batch_item(device: str, generator: torch.Generator) -> None:
    maps = random_complex(3, 4, 8, 6, generator=generator).to(device)
    maps[1] = 0
    with pytest.raises(ValueError, match=r"maps: the coil maps of batch item 1 are all zero"):
        check_maps(maps)
    maps[2] = 0
    with pytest.raises(ValueError, match=r"maps: the coil maps of batch items 1, 2 are all zero"):
        check_maps(maps)
    # Zero coils are fine while some coil is not (test slices are zero-padded to a coil count).
    padded = random_complex(2, 4, 8, 6, generator=generator).to(device)
    padded[:, 2:] = 0
    check_maps(padded)

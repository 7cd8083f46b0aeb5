"""Column masks: line counts, ACS, nesting of the further-corrupted mask, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adps.mri import acs_columns, column_mask, further_corrupted_mask, lines_at, slice_masks

WIDTHS = (320, 368, 256)
ACCELERATIONS = (1, 2, 4, 6, 8)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("acceleration", ACCELERATIONS)
def test_line_counts_and_acs(width: int, acceleration: int) -> None:
    for slice_id in range(5):
        mask, further = slice_masks(width, acceleration, seed=7, slice_id=slice_id)
        assert mask.dtype == torch.bool and mask.shape == (width,)
        assert int(mask.sum()) == math.floor(width / acceleration)
        acs = acs_columns(width)
        assert len(acs) == 20 and acs[0] + 10 == width // 2
        assert mask[acs].all() and further[acs].all()
        assert int(further.sum()) == math.floor(width / (acceleration + 1))
        assert not torch.any(further & ~mask), "the R+1 mask must be a subset of the R mask"


def test_fractional_and_custom_acs() -> None:
    mask = column_mask(320, 2.5, seed=0, slice_id=0, acs=24)
    assert int(mask.sum()) == 128 and mask[acs_columns(320, 24)].all()
    assert lines_at(320, 3) == 106


def test_reproducible_from_seed_and_slice() -> None:
    a = slice_masks(320, 4, seed=3, slice_id=11)
    b = slice_masks(320, 4, seed=3, slice_id=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_slices_seeds_and_accelerations_differ() -> None:
    base = column_mask(320, 4, seed=3, slice_id=0)
    others = [column_mask(320, 4, seed=3, slice_id=i) for i in range(1, 50)]
    assert all(not torch.equal(base, other) for other in others)
    assert not torch.equal(base, column_mask(320, 4, seed=4, slice_id=0))
    # Independent across slices: the overlap of non-ACS lines is what independent draws give
    # (expected 60 * 60 / 300 = 12 shared random lines), not nested or identical.
    non_acs = torch.ones(320, dtype=torch.bool)
    non_acs[acs_columns(320)] = False
    overlaps = [int((base & other & non_acs).sum()) for other in others]
    assert 8 < sum(overlaps) / len(overlaps) < 16


def test_further_mask_deletes_different_lines_per_slice() -> None:
    mask = column_mask(320, 4, seed=0, slice_id=0)
    a = further_corrupted_mask(mask, 4, seed=0, slice_id=0)
    b = further_corrupted_mask(mask, 4, seed=0, slice_id=1)
    assert not torch.equal(a, b)


def test_all_lines_for_r1() -> None:
    assert column_mask(320, 1, seed=0, slice_id=0).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: column_mask(320, 0.5, seed=0, slice_id=0), "R must be >= 1"),
        (lambda: column_mask(100, 8, seed=0, slice_id=0), "fewer than the 20 ACS columns"),
        (lambda: column_mask(32, 2, seed=0, slice_id=0, acs=40), r"acs must be in \[0, width=32\]"),
        (lambda: further_corrupted_mask(torch.ones(4, 80, dtype=torch.bool), 2, seed=0, slice_id=0), "1-D"),
        (lambda: further_corrupted_mask(torch.zeros(320, dtype=torch.bool), 4, seed=0, slice_id=0), "ACS"),
        (lambda: further_corrupted_mask(torch.full((320,), 0.3), 4, seed=0, slice_id=0), "0/1"),
    ],
)
def test_bad_input(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()


def test_a_tr_is_a_fresh_draw_never_the_acquisition() -> None:
    """At R_inf = R_train with the same user seed for preparation and evaluation, A-DPS's A_tr
    (``train_masks``) overlaps the acquired columns outside the ACS as much as an independent
    draw does on average (each such column acquired with probability (floor(W/R) - acs) /
    (W - acs)), not fully, as it did when both drew from one stream (the stored R + 1 mask, a
    subset of the acquisition). The acquisition draw itself is unchanged."""
    from adps.mri.masks import DRAWS
    from adps.nn.samplers import train_masks

    width, r, acs, seed = 64, 4, 8, 0
    ids = list(range(400))
    a_tr = train_masks(width, r, len(ids), seed, ids, acs=acs).numpy()
    outside = np.setdiff1d(np.arange(width), acs_columns(width, acs))
    overlaps, same_stream = [], []
    for row, slice_id in zip(a_tr, ids, strict=True):
        acquired, stored_further = slice_masks(width, r, seed=seed, slice_id=slice_id, acs=acs)
        chosen = outside[row[outside]]
        overlaps.append(acquired.numpy()[chosen].mean())
        same_stream.append(acquired.numpy()[outside[stored_further.numpy()[outside]]].mean())
    expected = (width // r - acs) / (width - acs)
    assert abs(float(np.mean(overlaps)) - expected) < 0.03, (np.mean(overlaps), expected)
    assert float(np.mean(same_stream)) == 1.0  # the old draw: always inside the acquisition
    assert set(DRAWS) == {"acquisition", "a_tr"}
    with pytest.raises(ValueError, match="draw must be one of"):
        slice_masks(width, r, seed=seed, slice_id=0, acs=acs, draw="other")

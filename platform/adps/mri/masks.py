"""Column (phase-encode) undersampling masks, reproducible from (seed, slice id).

A mask is a 1-D boolean vector of length ``W`` (one entry per phase-encode column); the same
columns are kept in every row, so it broadcasts over coils and rows. METHOD.md:

* the central ``acs`` columns (default 20) are always kept;
* at acceleration ``R`` there are ``floor(W / R)`` kept columns in all (ACS + random others);
* the *further-corrupted* mask used by ambient training deletes random non-ACS columns of the
  ``R`` mask until ``floor(W / (R + 1))`` remain, so it is a subset of the ``R`` mask.

Every random draw comes from a ``numpy`` generator seeded with ``(seed, slice_id, stream, R)``
through ``SeedSequence``: masks of different slices are independent, the same slice always gets
the same masks, and the R mask and its further-corrupted mask use separate streams.

Two *draws* (:data:`DRAWS`) have their own pairs of streams: ``"acquisition"`` (the masks
``adps prepare`` stores: what was measured) and ``"a_tr"`` (A-DPS's training-corruption masks
``A_tr``, drawn at sampling time), so whatever seeds preparation and evaluation get, A_tr is an
independent draw and never the slice's own stored mask.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_ACS = 20

# Stream tags keep the draws for different purposes independent of each other: (R mask, R + 1 mask).
DRAWS: dict[str, tuple[int, int]] = {"acquisition": (1, 2), "a_tr": (3, 4)}
"""The mask draws and their ``(R mask, further-corrupted mask)`` stream tags."""


def _streams(draw: str) -> tuple[int, int]:
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
    return DRAWS[draw]


def acs_columns(width: int, acs: int = DEFAULT_ACS) -> np.ndarray:
    """Indices of the ``acs`` central columns (centred on the DC column ``width // 2``)."""
    if acs < 0 or acs > width:
        raise ValueError(f"acs must be in [0, width={width}], got {acs}")
    start = width // 2 - acs // 2
    return np.arange(start, start + acs)


def lines_at(width: int, acceleration: float) -> int:
    """Number of kept columns at acceleration ``R``: ``floor(W / R)``."""
    if not acceleration >= 1:
        raise ValueError(f"acceleration R must be >= 1, got {acceleration}")
    return math.floor(width / acceleration)


def _generator(seed: int, slice_id: int, stream: int, acceleration: float) -> np.random.Generator:
    # R may be fractional; its float bits make a valid, exact integer key.
    r_key = int(np.float64(acceleration).view(np.uint64))
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(slice_id), stream, r_key]))


def column_mask(width: int, acceleration: float, *, seed: int, slice_id: int, acs: int = DEFAULT_ACS,
                draw: str = "acquisition") -> torch.Tensor:
    """Random column mask at acceleration ``R``: ACS plus random others, ``floor(W/R)`` in all.

    Args:
        width: number of phase-encode columns ``W``.
        acceleration: ``R >= 1``; ``R = 1`` keeps every column.
        seed, slice_id: the experiment seed and the slice's integer id (unique within the dataset).
        acs: number of central columns always kept.
        draw: ``"acquisition"`` or ``"a_tr"`` (:data:`DRAWS`): which independent stream.

    Returns:
        Boolean tensor of shape ``(W,)``.
    """
    stream = _streams(draw)[0]
    n_lines = lines_at(width, acceleration)
    acs_idx = acs_columns(width, acs)
    if n_lines < acs:
        raise ValueError(f"R={acceleration} keeps floor({width}/{acceleration}) = {n_lines} columns, "
                         f"fewer than the {acs} ACS columns; lower R or acs")
    mask = np.zeros(width, dtype=bool)
    mask[acs_idx] = True
    others = np.setdiff1d(np.arange(width), acs_idx)
    rng = _generator(seed, slice_id, stream, acceleration)
    mask[rng.choice(others, size=n_lines - acs, replace=False)] = True
    return torch.from_numpy(mask)


def further_corrupted_mask(mask: torch.Tensor, acceleration: float, *, seed: int, slice_id: int, acs: int = DEFAULT_ACS,
                           draw: str = "acquisition") -> torch.Tensor:
    """Delete random non-ACS columns of an ``R`` mask until ``floor(W / (R + 1))`` remain.

    Args:
        mask: the slice's ``R`` mask, boolean ``(W,)``.
        acceleration: the ``R`` of ``mask``; the result is at ``R + 1``.
        seed, slice_id, draw: as for :func:`column_mask`.
        acs: ACS width; these columns are never deleted.

    Returns:
        Boolean tensor ``(W,)``, a subset of ``mask``.
    """
    mask_np = _as_bool_vector(mask, "mask")
    width = mask_np.shape[0]
    target = lines_at(width, acceleration + 1)
    acs_idx = acs_columns(width, acs)
    if not mask_np[acs_idx].all():
        raise ValueError(f"mask must keep the {acs} central ACS columns")
    if target < acs:
        raise ValueError(f"R+1={acceleration + 1} keeps floor({width}/{acceleration + 1}) = {target} columns, "
                         f"fewer than the {acs} ACS columns")
    kept = int(mask_np.sum())
    if kept < target:
        raise ValueError(f"mask keeps {kept} columns, fewer than the {target} wanted at R+1")
    removable = np.setdiff1d(np.flatnonzero(mask_np), acs_idx)
    rng = _generator(seed, slice_id, _streams(draw)[1], acceleration)
    further = mask_np.copy()
    further[rng.choice(removable, size=kept - target, replace=False)] = False
    return torch.from_numpy(further)


def slice_masks(width: int, acceleration: float, *, seed: int, slice_id: int, acs: int = DEFAULT_ACS,
                draw: str = "acquisition") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(R mask, R+1 further-corrupted mask)`` pair of one slice, from ``draw``'s streams."""
    mask = column_mask(width, acceleration, seed=seed, slice_id=slice_id, acs=acs, draw=draw)
    return mask, further_corrupted_mask(mask, acceleration, seed=seed, slice_id=slice_id, acs=acs, draw=draw)


def _as_bool_vector(mask: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D column mask of shape (W,), got shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 or booleans, got dtype {array.dtype}")
        array = array.astype(bool)
    return array

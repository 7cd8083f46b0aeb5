"""The cross-over computation on results tables whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from adps.crossover import bootstrap_mean_ci, crossover, crossover_table, paired_differences


def table(ambient_nrmse: dict[float, list[float]], fs_nrmse: dict[float, list[float]]) -> list[dict]:
    rows = []
    for model, per_r in (("ambient_r4", ambient_nrmse), ("edm_r1", fs_nrmse)):
        for r_inf, values in per_r.items():
            for s, value in enumerate(values):
                rows.append({"model": model, "r_inf": r_inf, "slice": f"s{s}", "nrmse": value, "psnr": -20 * np.log10(value)})
    return rows


def test_crossover_is_the_first_acceleration_where_the_ambient_model_wins() -> None:
    rows = table(
        {2: [0.10, 0.11, 0.12], 4: [0.15, 0.16, 0.17], 6: [0.18, 0.19, 0.20], 8: [0.20, 0.21, 0.22]},
        {2: [0.05, 0.06, 0.07], 4: [0.12, 0.13, 0.14], 6: [0.21, 0.22, 0.23], 8: [0.30, 0.31, 0.32]},
    )
    result = crossover(rows, "ambient_r4", "edm_r1", "nrmse", n_boot=500)
    assert result.crossover_r == 6
    assert result.margin == pytest.approx(0.03)  # every slice 0.03 lower
    assert result.ci_low == pytest.approx(0.03) and result.ci_high == pytest.approx(0.03)
    assert result.n_slices == 3
    # PSNR is higher-is-better: the same cross-over, a positive margin in dB.
    psnr = crossover(rows, "ambient_r4", "edm_r1", "psnr", n_boot=500)
    assert psnr.crossover_r == 6 and psnr.margin > 0


def test_no_crossover_when_the_clean_model_always_wins() -> None:
    rows = table({2: [0.2, 0.3], 8: [0.4, 0.5]}, {2: [0.1, 0.2], 8: [0.3, 0.4]})
    result = crossover(rows, "ambient_r4", "edm_r1", "nrmse")
    assert result.crossover_r is None and result.margin is None and result.n_slices == 0


def test_pairing_is_by_slice_and_ignores_unpaired_and_missing_values() -> None:
    rows = table({4: [0.1, 0.2, 0.3]}, {4: [0.2, 0.3]})  # s2 only in the ambient model
    rows.append({"model": "edm_r1", "r_inf": 4, "slice": "s2", "nrmse": float("nan")})
    d = paired_differences(rows, "ambient_r4", "edm_r1", "nrmse", 4)
    np.testing.assert_allclose(d, [0.1, 0.1])
    with pytest.raises(ValueError, match="metric 'dice'"):
        paired_differences(rows, "ambient_r4", "edm_r1", "dice", 4)


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_slices() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    low_s, high_s = bootstrap_mean_ci(small, seed=1)
    low_l, high_l = bootstrap_mean_ci(large, seed=1)
    assert low_s < small.mean() < high_s and low_l < large.mean() < high_l
    assert (high_l - low_l) < (high_s - low_s) / 5
    assert bootstrap_mean_ci(small, seed=1) == (low_s, high_s)  # seeded
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean_ci(np.array([]))


def test_table_has_one_entry_per_model_and_metric() -> None:
    rows = table({2: [0.1]}, {2: [0.2]})
    entries = crossover_table(rows, ["ambient_r4"], "edm_r1", metrics=("nrmse", "psnr"), n_boot=10)
    assert [(e.model, e.metric, e.crossover_r) for e in entries] == [("ambient_r4", "nrmse", 2), ("ambient_r4", "psnr", 2)]
    assert entries[0].as_row()["reference"] == "edm_r1"

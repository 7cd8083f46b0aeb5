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


def _noisy(means: dict[float, float], n: int = 12, spread: float = 0.02, seed: int = 0) -> dict[float, list[float]]:
    """Per-R_inf slice values around ``means``: the pairing below keeps the differences' spread."""
    rng = np.random.default_rng(seed)
    return {r: list(mean + spread * rng.standard_normal(n)) for r, mean in means.items()}


def _ambient_with(differences: dict[float, list[float]], base: dict[float, list[float]]) -> dict[float, list[float]]:
    """The ambient model's NRMSE: the clean model's minus ``differences`` (positive = better)."""
    return {r: [b - d for b, d in zip(base[r], differences[r], strict=True)] for r in base}


def test_a_crossover_needs_significant_wins_that_last() -> None:
    """Three crafted tables: (1) wins at R 6 and 8 whose intervals exclude 0: a cross-over at 6;
    (2) a significant win at 6 lost at 8: none (the first positive mean used to count); (3) means
    that favour the ambient model from 4 on with intervals that include 0: inconclusive, with
    the interval, and not a cross-over."""
    base = _noisy({2: 0.1, 4: 0.2, 6: 0.3, 8: 0.4}, seed=1)
    rng = np.random.default_rng(2)
    tight = {r: list(m + 0.003 * rng.standard_normal(12)) for r, m in {2: -0.05, 4: -0.02, 6: 0.03, 8: 0.05}.items()}
    lasting = crossover(table(_ambient_with(tight, base), base), "ambient_r4", "edm_r1", "nrmse", n_boot=500)
    assert (lasting.outcome, lasting.crossover_r) == ("crossover", 6) and lasting.ci_low > 0 and lasting.is_crossover

    lost = {**tight, 8: list(-0.04 + 0.003 * rng.standard_normal(12))}
    result = crossover(table(_ambient_with(lost, base), base), "ambient_r4", "edm_r1", "nrmse", n_boot=500)
    assert result.outcome == "none" and result.crossover_r is None and result.margin is None

    # Means of +0.005 with a spread of 0.05 over 12 slices: intervals around [-0.02, 0.03].
    weak = {r: list(m + 0.05 * rng.standard_normal(12)) for r, m in {2: -0.3, 4: 0.0, 6: 0.0, 8: 0.0}.items()}
    weak = {r: list(np.asarray(v) - np.mean(v) + {2: -0.3, 4: 0.005, 6: 0.01, 8: 0.02}[r]) for r, v in weak.items()}
    unsure = crossover(table(_ambient_with(weak, base), base), "ambient_r4", "edm_r1", "nrmse", n_boot=1000)
    assert unsure.outcome == "inconclusive" and unsure.crossover_r == 4 and not unsure.is_crossover
    assert unsure.ci_low < 0 < unsure.margin < unsure.ci_high and unsure.level == 0.95
    # A lower confidence level can turn a borderline case into a cross-over; the level is recorded.
    assert crossover(table(_ambient_with(tight, base), base), "ambient_r4", "edm_r1", "nrmse", level=0.5).level == 0.5
    with pytest.raises(ValueError, match="level"):
        crossover(table(_ambient_with(tight, base), base), "ambient_r4", "edm_r1", "nrmse", level=1.0)


def test_the_crossover_table_prints_and_logs_the_three_outcomes() -> None:
    from adps.orchestration.evaluate import format_crossover

    base = {r: [0.1 * r, 0.1 * r + 0.01, 0.1 * r + 0.02] for r in (2, 4)}
    winner = crossover(table({2: [v - 0.05 for v in base[2]], 4: [v - 0.05 for v in base[4]]}, base),
                       "ambient_r4", "edm_r1", "nrmse", n_boot=200)
    loser = crossover(table({2: [v + 0.05 for v in base[2]], 4: [v + 0.05 for v in base[4]]}, base),
                      "ambient_r4", "edm_r1", "nrmse", n_boot=200)
    unsure = crossover(table({2: [base[2][0] - 0.19, base[2][1] + 0.1, base[2][2] + 0.12],
                              4: [base[4][0] - 0.19, base[4][1] + 0.1, base[4][2] + 0.08]}, base),
                       "ambient_r4", "edm_r1", "nrmse", n_boot=200)
    assert (winner.outcome, loser.outcome, unsure.outcome) == ("crossover", "none", "inconclusive")
    text = format_crossover([winner, loser, unsure])
    assert "95% CI" in text.splitlines()[0]
    assert [line.split()[2] for line in text.splitlines()[1:]] == ["crossover", "none", "inconclusive"]

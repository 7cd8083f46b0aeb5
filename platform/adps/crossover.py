"""The cross-over: the acceleration at which a model trained on corrupted data beats the model trained on clean
data (paper section 3.3, figures 7-9).

Input is the evaluation's tidy results table, one row per (model, R_inf, slice) with the metric columns (``nrmse``,
``psnr``, ``ssim``, ``lpips``). For an ambient model and a metric, the comparison at each R_inf is *paired by slice*:
``d_s = sign * (metric_ambient(s) - metric_reference(s))`` with ``sign`` chosen so that ``d_s > 0`` means the ambient
model did better on slice ``s`` (lower NRMSE / LPIPS, higher PSNR / SSIM), summarised by its mean (the margin) and a
percentile bootstrap confidence interval over slices (resampling slices, keeping the pairs) at ``level`` (0.95).

A cross-over needs evidence, and it must last (METHOD.md "What the paper reports"). Scanning the R_inf the two
models share, from the smallest:

* **crossover**: the smallest R_inf from which the model wins *significantly* (the interval lies above 0) at that
  R_inf and at every higher one evaluated;
* **inconclusive**: no such R_inf, but from some R_inf on the *means* favour the model at every higher one; the
  smallest such R_inf is reported with its margin and interval (which includes 0 somewhere from there on);
* **none**: the model does not stay ahead: from every R_inf on, the clean model is as good or better somewhere
  (a win at R_inf 6 lost again at 8 is no cross-over).

The natural-image evaluation (:func:`adps.orchestration.study_images.image_crossovers`) uses the same functions
on its own axes: each task's difficulty as ``r_inf``, each image as ``slice``, the ``p = 0`` model as ``reference``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["HIGHER_IS_BETTER", "OUTCOMES", "CrossOver", "bootstrap_mean_ci", "crossover", "crossover_table",
           "paired_differences"]

HIGHER_IS_BETTER = {"nrmse": False, "psnr": True, "ssim": True, "lpips": False, "mse": False}
"""Direction of each metric of the results tables (``mse``: the natural-image evaluation's)."""

OUTCOMES = ("crossover", "inconclusive", "none")
"""The three answers of :func:`crossover` (see the module docstring)."""


@dataclass(frozen=True)
class CrossOver:
    """One model's cross-over on one metric against the reference model."""

    model: str
    reference: str
    metric: str
    crossover_r: float | None
    """``outcome`` ``crossover``: the cross-over R_inf; ``inconclusive``: the smallest R_inf from
    which the means favour ``model`` (not a cross-over); ``none``: None."""
    margin: float | None
    """Mean paired improvement at ``crossover_r`` (in the metric's units; positive = better)."""
    ci_low: float | None
    ci_high: float | None
    """Bootstrap confidence interval of the margin at ``level``."""
    n_slices: int
    """Slices paired at ``crossover_r`` (0 when there is none)."""
    outcome: str = "none"
    """``crossover``, ``inconclusive`` or ``none`` (:data:`OUTCOMES`)."""
    level: float = 0.95
    """Confidence level of the intervals."""

    @property
    def is_crossover(self) -> bool:
        return self.outcome == "crossover"

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def paired_differences(rows: Iterable[Mapping[str, Any]], model: str, reference: str, metric: str,
                       r_inf: float) -> np.ndarray:
    """``d_s`` (positive = ``model`` better) for the slices both models reconstructed at ``r_inf``."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(HIGHER_IS_BETTER)}")
    values: dict[str, dict[Any, float]] = {model: {}, reference: {}}
    for row in rows:
        if row["model"] in values and float(row["r_inf"]) == float(r_inf):
            value = row.get(metric)
            if value is not None and np.isfinite(value):
                values[row["model"]][row["slice"]] = float(value)
    shared = sorted(set(values[model]) & set(values[reference]), key=str)
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return np.array([sign * (values[model][s] - values[reference][s]) for s in shared], dtype=np.float64)


def bootstrap_mean_ci(differences: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (slices resampled with replacement)."""
    if differences.size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, differences.size, size=(n_boot, differences.size))
    means = differences[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def crossover(rows: Sequence[Mapping[str, Any]], model: str, reference: str, metric: str, *, n_boot: int = 2000,
              level: float = 0.95, seed: int = 0) -> CrossOver:
    """The cross-over of ``model`` (e.g. ``ambient_r4``) against ``reference`` (e.g. ``edm_r1``, FS-DPS) on
    ``metric`` (see the module docstring: ``crossover``, ``inconclusive`` or ``none``). ``rows``: the results
    table (dicts with ``model``, ``r_inf``, ``slice`` and metric keys); ``n_boot``, ``level`` (0 < level < 1)
    and ``seed``: the bootstrap's resamples, confidence level and seed."""
    if not 0 < level < 1:
        raise ValueError(f"crossover: level must be in (0, 1), got {level}")
    accelerations = sorted({float(r["r_inf"]) for r in rows if r["model"] == model}
                           & {float(r["r_inf"]) for r in rows if r["model"] == reference})
    found = []  # (r_inf, differences, mean, low, high) per R_inf with paired slices
    for r_inf in accelerations:
        d = paired_differences(rows, model, reference, metric, r_inf)
        if d.size:
            low, high = bootstrap_mean_ci(d, n_boot=n_boot, level=level, seed=seed)
            found.append((r_inf, d, float(d.mean()), low, high))

    def first_lasting(wins: Any) -> int | None:
        """The index from which ``wins`` holds at every R_inf up to the last, or None."""
        start = None
        for index, entry in enumerate(found):
            if not wins(entry):
                start = None
            elif start is None:
                start = index
        return start

    for outcome, wins in (("crossover", lambda e: e[3] > 0), ("inconclusive", lambda e: e[2] > 0)):
        start = first_lasting(wins)
        if start is not None:
            r_inf, d, mean, low, high = found[start]
            return CrossOver(model, reference, metric, r_inf, mean, low, high, int(d.size), outcome, level)
    return CrossOver(model, reference, metric, None, None, None, None, 0, "none", level)


def crossover_table(rows: Sequence[Mapping[str, Any]], models: Sequence[str], reference: str,
                    metrics: Sequence[str] = ("nrmse", "psnr", "ssim"), **options: Any) -> list[CrossOver]:
    """:func:`crossover` for every model and metric (``options`` go to it)."""
    return [crossover(rows, model, reference, metric, **options) for model in models for metric in metrics]

"""The evaluation's figures (matplotlib, no display): metrics against R_inf (paper figures 7-9), a
reconstruction grid with error maps on one stated scale (figure 6), posterior mean / error / standard deviation
maps of K samples per slice, and the natural-image study's metrics against its task settings (figures 2-4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ERROR_SCALE", "metric_figure", "posterior_grid", "reconstruction_grid", "sweep_figure"]

LABELS = {"mse": "MSE (lower is better)", "nrmse": "NRMSE (lower is better)", "psnr": "PSNR in dB (higher is better)",
          "ssim": "SSIM (higher is better)", "lpips": "LPIPS (lower is better)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: jobs run without a display
    import matplotlib.pyplot as plt

    return plt


def _metric_lines(axis: Any, table: Any, metric: str, x: str) -> None:
    """One line per (model, sampler) on ``axis``: the mean of ``metric`` over the rows at each
    ``x`` with a band of +-1 standard deviation (the spread over slices or images)."""
    plt = _pyplot()
    groups = list(table.groupby(["model", "sampler"], sort=True))
    # 20 distinct colours, and a second marker set past them: a line never shares both.
    colours = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    markers = "osD^v<>ph*"
    for index, ((model, sampler), group) in enumerate(groups):
        stats = group.groupby(x)[metric].agg(["mean", "std"]).sort_index()
        r, mean, std = stats.index.to_numpy(float), stats["mean"].to_numpy(), np.nan_to_num(stats["std"].to_numpy())
        colour = colours(index % colours.N)
        axis.plot(r, mean, marker=markers[(index // colours.N + index) % len(markers)], color=colour,
                  label=f"{model} ({sampler})")
        axis.fill_between(r, mean - std, mean + std, color=colour, alpha=0.12)
    axis.set_ylabel(LABELS.get(metric, metric))
    axis.grid(alpha=0.3)


def metric_figure(table: Any, metric: str, *, crossovers: Sequence[Any] = ()) -> Any:
    """``metric`` against R_inf, one line per (model, sampler): the mean over slices with a band of +-1 standard
    deviation. ``table``: the results DataFrame. ``crossovers`` (:class:`adps.crossover.CrossOver` of this
    metric) are drawn as vertical lines at their R_inf (solid: a cross-over; dotted: inconclusive) and listed in
    the title with the ones that are none, so the figure says all three outcomes."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    _metric_lines(axis, table, metric, "r_inf")
    axis.set_xlabel("R_inf (test acceleration)")
    said = []
    for c in crossovers:
        if c.outcome == "none":
            said.append(f"{c.model}: none")
            continue
        axis.axvline(c.crossover_r, color="black", linewidth=1.0, linestyle="-" if c.is_crossover else ":",
                     label=f"{c.model} {c.outcome} at {c.crossover_r:g}")
        said.append(f"{c.model}: {c.outcome} at {c.crossover_r:g} [{c.ci_low:.3g}, {c.ci_high:.3g}]")
    if said:
        axis.set_title(f"cross-over vs {crossovers[0].reference} ({crossovers[0].level:.0%} CI): " + "; ".join(said),
                       fontsize=7, wrap=True)
    # Outside the axes: with a dozen lines a legend inside hides them.
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    return figure


def sweep_figure(table: Any, metrics: Sequence[str], x: str, xlabel: str, *, title: str = "",
                 log_x: bool = False) -> Any:
    """One panel per metric of ``metrics`` against the column ``x``, one line per (model, sampler) with its +-1
    standard deviation band (the natural-image study's figures 2-4: metric against measurements, downscaling
    factor or NFE). ``table``: a results DataFrame."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        _metric_lines(axis, table, metric, x)
        axis.set_xlabel(xlabel)
        if log_x:
            axis.set_xscale("log")
        values = sorted(table[x].dropna().unique())
        axis.set_xticks(values, [f"{v:g}" for v in values])
        axis.minorticks_off()
    if title:
        figure.suptitle(title)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    return figure


ERROR_SCALE = 0.25
"""The error maps' shared colour scale: 0 to this fraction of the reference's peak magnitude."""


def _blank(axis: Any) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(False)


def reconstruction_grid(images: Mapping[tuple[str, float], tuple[np.ndarray, np.ndarray]], *,
                        error_scale: float = ERROR_SCALE) -> Any:
    """Methods by R_inf at a glance (paper figure 6): one row per (model sampler) pair, one pair of columns per
    R_inf (the magnitude image, then its error ``| |x^| - |x| |``), and the reference in the first column.

    Every magnitude image shares the grey scale ``[0, max |x|]`` and every error map the one colour scale
    ``[0, error_scale max |x|]`` (``ERROR_SCALE``: 25 %), stated on the colour bar: errors are comparable across
    the grid, and only errors beyond the scale saturate. ``images[(row name, r_inf)] = (reconstruction,
    reference)``, complex ``(H, W)``, the same reference slice throughout.
    """
    plt = _pyplot()
    rows = sorted({name for name, _ in images})
    columns = sorted({r for _, r in images})
    reference = np.abs(next(iter(images.values()))[1])
    peak = float(reference.max()) or 1.0
    height, width = reference.shape
    panel = 1.15  # inches per panel: the whole grid fits a screen for a dozen methods
    aspect = height / width
    figure, axes = plt.subplots(len(rows), 1 + 2 * len(columns), squeeze=False,
                                figsize=(panel * (1 + 2 * len(columns)) + 0.9, panel * aspect * len(rows) + 0.6))
    error_image = None
    for i, name in enumerate(rows):
        for axis in axes[i]:
            _blank(axis)
        axes[i, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        if i == 0:
            axes[i, 0].imshow(reference, cmap="gray", vmin=0, vmax=peak)
            axes[i, 0].set_title("reference", fontsize=7)
        for j, r in enumerate(columns):
            top, error = axes[i, 1 + 2 * j], axes[i, 2 + 2 * j]
            if i == 0:
                top.set_title(f"R_inf {r:g}", fontsize=7)
                error.set_title("error", fontsize=7)
            if (name, r) not in images:
                continue
            image = np.abs(images[(name, r)][0])
            top.imshow(image, cmap="gray", vmin=0, vmax=peak)
            error_image = error.imshow(np.abs(image - reference), cmap="magma", vmin=0, vmax=error_scale * peak)
    figure.subplots_adjust(left=0.16, right=0.88, wspace=0.04, hspace=0.04)
    if error_image is not None:
        # Its own axes right of the grid: a colour bar stolen from the panels would cover them.
        bar = figure.colorbar(error_image, cax=figure.add_axes((0.9, 0.3, 0.015, 0.4)))
        bar.set_label(f"| |x^| - |x| |, 0 to {error_scale:.0%} of max |x|", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return figure


def posterior_grid(means: np.ndarray, stds: np.ndarray, references: np.ndarray, *, title: str = "",
                   slices: Sequence[int] = (), error_scale: float = ERROR_SCALE) -> Any:
    """K posterior samples per slice, summarised: one column per slice, rows the posterior mean's magnitude, its
    error ``| |mean| - |x| |`` and twice the samples' standard deviation (where the error should mostly lie),
    the last two on one shared colour scale ``[0, error_scale max |x|]``. ``means``, ``references``: complex
    ``(N, H, W)``; ``stds``: real ``(N, H, W)``."""
    plt = _pyplot()
    n, height, width = references.shape
    panel = 1.3
    figure, axes = plt.subplots(3, n, squeeze=False, figsize=(panel * n + 1.2, panel * 3 * height / width + 0.6))
    images = None
    for k in range(n):
        reference = np.abs(references[k])
        peak = float(reference.max()) or 1.0
        mean = np.abs(means[k])
        axes[0, k].imshow(mean, cmap="gray", vmin=0, vmax=peak)
        axes[1, k].imshow(np.abs(mean - reference) / peak, cmap="magma", vmin=0, vmax=error_scale)
        images = axes[2, k].imshow(2 * stds[k] / peak, cmap="magma", vmin=0, vmax=error_scale)
        axes[0, k].set_title(f"slice {slices[k]}" if len(slices) > k else f"slice {k}", fontsize=7)
        for row in range(3):
            _blank(axes[row, k])
    for row, label in enumerate(("posterior mean", "error", "2 x std")):
        axes[row, 0].set_ylabel(label, fontsize=7)
    figure.subplots_adjust(left=0.1, right=0.86, wspace=0.04, hspace=0.06)
    if images is not None:
        bar = figure.colorbar(images, cax=figure.add_axes((0.88, 0.12, 0.02, 0.5)))
        bar.set_label(f"fraction of max |x| (0 to {error_scale:.0%})", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    if title:
        figure.suptitle(title, fontsize=8)
    return figure

"""The evaluation's figures (matplotlib, no display): metrics against R_inf (paper figures 7-9),
a reconstruction grid with x10 difference images (figure 6), and the natural-image study's
metrics against measurements, downscaling factor or NFE (figures 2-4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["metric_figure", "reconstruction_grid", "sweep_figure"]

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


def metric_figure(table: Any, metric: str) -> Any:
    """``metric`` against R_inf, one line per (model, sampler): the mean over slices with a band
    of +-1 standard deviation. ``table``: the results DataFrame."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    _metric_lines(axis, table, metric, "r_inf")
    axis.set_xlabel("R_inf (test acceleration)")
    # Outside the axes: with a dozen lines a legend inside hides them.
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    return figure


def sweep_figure(
    table: Any, metrics: Sequence[str], x: str, xlabel: str, *, title: str = "", log_x: bool = False
) -> Any:
    """One panel per metric of ``metrics`` against the column ``x``, one line per (model,
    sampler) with its +-1 standard deviation band (the natural-image study's figures 2-4:
    metric against measurements, downscaling factor or NFE). ``table``: a results DataFrame."""
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


def reconstruction_grid(images: Mapping[tuple[str, float], tuple[np.ndarray, np.ndarray]], *, scale: float = 10.0) -> Any:
    """Rows: (model sampler) pairs, each with a magnitude row and a ``scale`` x difference row;
    columns: R_inf. ``images[(row name, r_inf)] = (reconstruction, reference)``, complex (H, W)."""
    plt = _pyplot()
    rows = sorted({name for name, _ in images})
    columns = sorted({r for _, r in images})
    figure, axes = plt.subplots(2 * len(rows), len(columns), figsize=(2.2 * len(columns), 4.4 * len(rows)), squeeze=False)
    for i, name in enumerate(rows):
        for j, r in enumerate(columns):
            top, bottom = axes[2 * i, j], axes[2 * i + 1, j]
            for axis in (top, bottom):
                axis.set_xticks([])
                axis.set_yticks([])
            if (name, r) not in images:
                top.set_visible(False)
                bottom.set_visible(False)
                continue
            image, reference = (np.abs(a) for a in images[(name, r)])
            peak = float(reference.max()) or 1.0
            top.imshow(image, cmap="gray", vmin=0, vmax=peak)
            bottom.imshow(np.clip(scale * np.abs(image - reference), 0, peak), cmap="gray", vmin=0, vmax=peak)
            if i == 0:
                top.set_title(f"R_inf = {r:g}", fontsize=8)
            if j == 0:
                top.set_ylabel(name, fontsize=7)
                bottom.set_ylabel(f"x{scale:g} error", fontsize=7)
    figure.tight_layout()
    return figure

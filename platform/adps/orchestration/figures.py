"""The evaluation's figures (matplotlib, no display): metrics against R_inf (paper figures 7-9)
and a reconstruction grid with x10 difference images (figure 6)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["metric_figure", "reconstruction_grid"]

LABELS = {"nrmse": "NRMSE (lower is better)", "psnr": "PSNR in dB (higher is better)",
          "ssim": "SSIM (higher is better)", "lpips": "LPIPS (lower is better)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: jobs run without a display
    import matplotlib.pyplot as plt

    return plt


def metric_figure(table: Any, metric: str) -> Any:
    """``metric`` against R_inf, one line per (model, sampler): the mean over slices with a band
    of +-1 standard deviation. ``table``: the results DataFrame."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    groups = list(table.groupby(["model", "sampler"], sort=True))
    # 20 distinct colours, and a second marker set past them: a line never shares both.
    colours = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    markers = "osD^v<>ph*"
    for index, ((model, sampler), group) in enumerate(groups):
        stats = group.groupby("r_inf")[metric].agg(["mean", "std"]).sort_index()
        r, mean, std = stats.index.to_numpy(float), stats["mean"].to_numpy(), np.nan_to_num(stats["std"].to_numpy())
        colour = colours(index % colours.N)
        axis.plot(r, mean, marker=markers[(index // colours.N + index) % len(markers)], color=colour,
                  label=f"{model} ({sampler})")
        axis.fill_between(r, mean - std, mean + std, color=colour, alpha=0.12)
    axis.set_xlabel("R_inf (test acceleration)")
    axis.set_ylabel(LABELS.get(metric, metric))
    axis.grid(alpha=0.3)
    # Outside the axes: with a dozen lines a legend inside hides them.
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
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

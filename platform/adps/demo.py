"""The embedded demo: the study in miniature on synthetic data, on this machine.

What it does now (the physics core; later stages add preparation on Ray, training, tuning and
evaluation):

1. synthesises noisy multi-coil brain-like phantoms (birdcage coils, correlated coil noise);
2. prepares each slice as METHOD.md does: noise covariance from a background patch and
   pre-whitening, normalisation by the ACS RSS percentile, ESPIRiT maps, and the CG-SENSE
   reference image from the fully sampled k-space;
3. undersamples each slice at every R with its own column mask (reproducible from
   ``(seed, slice id)``) and reconstructs by zero-filling and CG-SENSE (and optionally
   L1-wavelet compressed sensing);
4. prints NRMSE / PSNR / SSIM per R and method against the reference, and writes them as CSV
   with a figure of the reconstructions.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adps.data.phantom import synthetic_slices
from adps.metrics import image_metrics
from adps.mri import (
    SenseOperator,
    background_patch,
    cg_sense,
    column_mask,
    espirit_maps,
    ifft2c,
    l1_wavelet_recon,
    noise_covariance,
    normalization_constant,
    whiten,
    zero_filled,
)


@dataclass
class DemoConfig:
    """Settings of ``adps demo``; every default is visible here."""

    slices: int = 4
    """Number of synthetic slices."""
    height: int = 192
    """Rows (readout) of the synthetic matrix."""
    width: int = 160
    """Columns (phase encodes); floor(width / max R) must be >= the 20 ACS columns."""
    coils: int = 8
    """Number of receive coils."""
    noise_std: float = 0.01
    """Per-coil k-space noise level of the synthetic data (before inter-coil coupling)."""
    accelerations: tuple[float, ...] = (2, 4, 8)
    """Accelerations R to reconstruct at."""
    reference_iterations: int = 30
    """CG-SENSE iterations of the fully sampled reference (METHOD.md: 30)."""
    cg_iterations: int = 10
    """CG-SENSE iterations on undersampled data (early stopping regularises noise)."""
    l1: bool = False
    """Also run L1-wavelet compressed sensing (sigpy; slower)."""
    seed: int = 0
    """Seed of the phantoms, noise and masks."""
    workdir: Path = field(default_factory=lambda: Path(".adps/demo"))
    """Where results.csv and figures/ are written."""

    def validate(self) -> None:
        """Refuse settings that cannot work, before any expensive stage starts."""
        if self.slices < 1:
            raise ValueError(f"slices must be >= 1, got {self.slices}")
        for acceleration in self.accelerations:
            column_mask(self.width, acceleration, seed=self.seed, slice_id=0)  # raises on impossible R

    @classmethod
    def quick(cls, **overrides: object) -> DemoConfig:
        """A smaller run for a first look and the test suite."""
        return cls(**{"slices": 2, **overrides})  # type: ignore[arg-type]


@dataclass
class PreparedSlices:
    kspace: torch.Tensor  # (N, C, H, W), whitened and normalised
    maps: torch.Tensor  # (N, C, H, W), ESPIRiT
    reference: torch.Tensor  # (N, H, W), CG-SENSE of the fully sampled k-space


def prepare(kspace: torch.Tensor, config: DemoConfig, progress: tqdm | None = None) -> PreparedSlices:
    """Whiten, normalise, estimate maps and reconstruct the reference, slice by slice."""
    prepared_k, maps = [], []
    for slice_kspace in kspace:
        covariance = noise_covariance(background_patch(ifft2c(slice_kspace), size=30))
        white = whiten(slice_kspace, covariance, coil_dim=0)
        white = white / normalization_constant(white)
        prepared_k.append(white)
        maps.append(espirit_maps(white))
        if progress is not None:
            progress.update(1)
    kspace_t, maps_t = torch.stack(prepared_k), torch.stack(maps)
    reference = cg_sense(SenseOperator(maps_t), kspace_t, iterations=config.reference_iterations)
    return PreparedSlices(kspace=kspace_t, maps=maps_t, reference=reference)


def reconstruct_at(
    data: PreparedSlices, acceleration: float, config: DemoConfig
) -> dict[str, torch.Tensor]:
    """Undersample every slice at ``R`` with its own mask and reconstruct with each method."""
    width = data.kspace.shape[-1]
    masks = torch.stack(
        [column_mask(width, acceleration, seed=config.seed, slice_id=i) for i in range(data.kspace.shape[0])]
    )
    op = SenseOperator(data.maps, masks)
    measured = data.kspace * masks[:, None, None, :]
    recons = {
        "zero-filled": zero_filled(op, measured),
        "CG-SENSE": cg_sense(op, measured, iterations=config.cg_iterations),
    }
    if config.l1:
        recons["L1-wavelet"] = l1_wavelet_recon(measured, data.maps, masks)
    return recons


def run_demo(config: DemoConfig) -> list[dict[str, object]]:
    """Run the demo; return one row per (R, method, slice) and write results and figures."""
    config.validate()
    started = time.monotonic()
    print("adps demo:", ", ".join(f"{k}={v}" for k, v in asdict(config).items()), flush=True)
    stages = 3
    print(f"[1/{stages}] synthesising {config.slices} slices ({config.coils} coils, {config.height} x {config.width})")
    synthetic = synthetic_slices(
        config.slices,
        height=config.height,
        width=config.width,
        n_coils=config.coils,
        noise_std=config.noise_std,
        seed=config.seed,
    )
    print(f"[2/{stages}] preparing: whitening, normalisation, ESPIRiT maps, CG-SENSE reference")
    with tqdm(total=config.slices, unit="slice", desc="prepare") as bar:
        data = prepare(synthetic.kspace, config, bar)

    print(f"[3/{stages}] undersampling and reconstructing at R = {', '.join(f'{r:g}' for r in config.accelerations)}")
    rows: list[dict[str, object]] = []
    figure_recons: dict[float, dict[str, torch.Tensor]] = {}
    for acceleration in tqdm(config.accelerations, unit="R", desc="reconstruct"):
        recons = reconstruct_at(data, acceleration, config)
        figure_recons[acceleration] = {name: image[0] for name, image in recons.items()}
        for method, image in recons.items():
            metrics = image_metrics(data.reference, image)
            for i in range(config.slices):
                rows.append(
                    {
                        "R": acceleration,
                        "method": method,
                        "slice": i,
                        **{name: float(values[i]) for name, values in metrics.items()},
                    }
                )

    print()
    print(format_table(rows))
    config.workdir.mkdir(parents=True, exist_ok=True)
    results = config.workdir / "results.csv"
    write_csv(rows, results)
    figure = config.workdir / "figures" / "reconstructions.png"
    save_figure(data.reference[0], figure_recons, figure)
    print(f"\nresults: {results}\nfigure:  {figure}\ndone in {time.monotonic() - started:.1f} s")
    return rows


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Mean and standard deviation over slices per (R, method), in first-seen order."""
    groups: dict[tuple[object, object], list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["R"], row["method"]), []).append(row)
    summary = []
    for (acceleration, method), members in groups.items():
        entry: dict[str, object] = {"R": acceleration, "method": method, "slices": len(members)}
        for metric in ("nrmse", "psnr", "ssim"):
            values = torch.tensor([float(m[metric]) for m in members], dtype=torch.float64)  # type: ignore[arg-type]
            entry[metric] = float(values.mean())
            entry[f"{metric}_std"] = float(values.std()) if len(members) > 1 else 0.0
        summary.append(entry)
    return summary


def format_table(rows: list[dict[str, object]]) -> str:
    """A plain-text table of the per-(R, method) means ± standard deviations."""
    header = f"{'R':>3}  {'method':<12} {'NRMSE':>16} {'PSNR (dB)':>16} {'SSIM':>16}"
    lines = [header, "-" * len(header)]
    for s in summarise(rows):
        cells = [f"{s[m]:.4f} ± {s[m + '_std']:.4f}" if m != "psnr" else f"{s[m]:.2f} ± {s[m + '_std']:.2f}"
                 for m in ("nrmse", "psnr", "ssim")]
        lines.append(f"{s['R']:>3g}  {s['method']:<12} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """Write rows as CSV under a temporary name, then rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def save_figure(reference: torch.Tensor, recons: dict[float, dict[str, torch.Tensor]], path: Path) -> None:
    """Magnitude images of slice 0: the reference, then one row per R with each method."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    methods = list(next(iter(recons.values())))
    fig, axes = plt.subplots(len(recons), len(methods) + 1, figsize=(2.4 * (len(methods) + 1), 2.6 * len(recons)),
                             squeeze=False)
    vmax = float(reference.abs().max())
    for row, (acceleration, images) in enumerate(recons.items()):
        axes[row, 0].imshow(reference.abs().numpy(), cmap="gray", vmin=0, vmax=vmax)
        axes[row, 0].set_title("reference" if row == 0 else "")
        for col, method in enumerate(methods, start=1):
            axes[row, col].imshow(images[method].abs().numpy(), cmap="gray", vmin=0, vmax=vmax)
            axes[row, col].set_title(f"{method}, R={acceleration:g}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

"""The MRI study's evaluation: every model x R_inf x test slice, metrics, figures and the cross-over.

:func:`adps.orchestration.evaluate.evaluate` runs it (``adps evaluate``, ``jobs/evaluate.py``); this module holds what
is the MRI study's own (docs/evaluation.md): its config, its cells (one model, one sampler, one R_inf, a chunk of
``slices_per_task`` test slices), the sampler settings of each cell (the paper's protocol, the config's or a fair
search's), the reconstruction of a cell, the cross-over of each ambient model against the fully sampled reference and
its figures (paper figures 6-9).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from adps.crossover import crossover_table
from adps.data import storage
from adps.data.dataset import PreparedSliceDataset
from adps.data.shards import read_manifest
from adps.metrics import image_metrics, posterior_summary
from adps.nn.learning_config import COMPILE_MODES
from adps.nn.reconstruct import DENOISER_METHODS
from adps.nn.samplers import ITERATIVE_SAMPLERS, METHOD_SAMPLERS
from adps.orchestration.cells import EvaluationConfig, Study, cell_path, reconstruct_batch, stack_batch
from adps.orchestration.denoising_check import check_denoisers, format_denoising_check
from adps.orchestration.figures import metric_figure, posterior_grid, reconstruction_grid
from adps.orchestration.registry import (
    FASTEST,
    load_model_entry,
    model_label,
    pin_model_entry,
    tuned_meta,
    tuned_settings,
)
from adps.perceptual import lpips_distance

__all__ = ["MRI_STUDY", "Cell", "EvaluateConfig", "evaluate_cell", "format_crossover", "format_results", "plan_cells",
           "network_for_sampler", "cell_settings", "resolve_models", "check_fair_tuning", "format_settings"]

METRICS = ("nrmse", "psnr", "ssim", "lpips")
TABLE_COLUMNS = ("model", "method", "sampler", "r_train", "r_inf", "slice", *METRICS, "seconds", "steps", "guidance",
                 "options", "settings", "samples", "calibration")


@dataclass(frozen=True)
class EvaluateConfig(EvaluationConfig):
    """Everything the MRI evaluation needs (with :class:`EvaluationConfig`'s keys; unknown keys refused by
    name). ``models`` may also name the classical reconstructions (:data:`~adps.orchestration.registry.CLASSICAL`):
    ``l1`` (L1-wavelet CS), ``zero_filled`` (``A^H y``), ``cg_sense`` (unregularised CG-SENSE)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"accelerations": "r_inf"}

    dataset: str = ""
    """Prepared dataset (folder or ``s3://``); its ``test`` split is reconstructed."""
    r_inf: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0)
    """R_inf, the test accelerations (docs/protocol.md "Names"; each must be prepared in the dataset)."""
    reference: str = "edm_r1"
    """The fully sampled model the cross-over is measured against (``<method>_r<R>``)."""
    slices: int = 0
    """Test slices to reconstruct (the first ones; 0 = all)."""
    slices_per_task: int = 4
    """Slices per Ray task, reconstructed as one batch."""
    # The samplers' settings. By default the paper's protocol (METHOD.md "Samplers"); a value set
    # here applies to every model (docs/protocol.md "Sampler settings").
    steps: int = 0
    """Steps of the iterative samplers (A-DPS, DPS, ALD) for every model; 0 = a tuned value (``sampler_settings``),
    else METHOD.md's (500 for A-DPS / DPS, 1,300 for ALD)."""
    guidance: float = 0.0
    """A-DPS / DPS step size l_ss for every model; 0 = tuned, else METHOD.md's 1.0."""
    sigma_max: float = 0.0
    """Start of the A-DPS / DPS schedule for every model; 0 = tuned, else METHOD.md's 10."""
    sigma_min: float = 0.0
    """End of the A-DPS / DPS schedule for every model; 0 = tuned, else ``a_dps_sigma_min`` for ambient models
    where set, else METHOD.md's 0.004."""
    rho: float = 0.0
    """Curvature of the A-DPS / DPS schedule; 0 = tuned, else METHOD.md's 7."""
    ald_step_scale: float = 0.0
    """ALD's ``eta_t / sigma_t^2``; 0 = tuned, else 0.5 (:func:`adps.nn.samplers.ald`)."""
    l1_lam: float = 0.0
    """L1-wavelet CS's lambda; 0 = METHOD.md's 0.001 (BART's scale)."""
    l1_iterations: int = 0
    """L1-wavelet CS's iterations; 0 = METHOD.md's 100."""
    cg_sense_iterations: int = 0
    """CG-SENSE's iterations; 0 = 10 (its only regulariser at R > 1 is stopping early)."""
    # sampler_settings (EvaluationConfig) best or fastest: the evaluation is fair or it refuses (check_fair_tuning).
    allow_untuned: bool = False
    """With ``sampler_settings`` best or fastest: evaluate a diffusion model that has no search at an R_inf
    where others have one with its untuned settings, its rows marked ``untuned``, instead of refusing."""
    a_os: bool = True
    """Also evaluate A-OS for ambient models, at R_inf = R_train only (its valid case)."""
    a_dps_sigma_min: float = 0.0
    """End of the A-DPS schedule of ambient models where neither ``sigma_min`` nor a search set one; 0 =
    METHOD.md's 0.004. A small ambient model needs more (the demo's: 0.1; docs/evaluation.md)."""
    a_os_sigma: float = 0.0
    """A-OS's sigma where no search (``tune_spaces/a_os.yaml``) set one; 0 = METHOD.md's 0.003."""
    compile_mode: str = ""
    """``torch.compile`` the network of the iterative samplers (A-DPS, DPS, ALD) in each task: ``""`` (off),
    ``default``, ``reduce-overhead``, ``max-autotune`` or ``max-autotune-no-cudagraphs``. The compilation takes
    minutes per task shape, so it pays with ``use_gpu``, 500 steps and a ``slices_per_task`` of 8-16
    (bench/README.md). One-call samplers (A-OS, unrolled) are never compiled."""
    experiment: str = "adps-eval"
    posterior_samples: int = 1
    """K: posterior samples per slice of the stochastic samplers (A-DPS, DPS, ALD), drawn in one batch of K x
    ``slices_per_task`` (K times the memory and time of one). With K > 1 a row's metrics are the posterior
    mean's, its ``calibration`` that of :func:`adps.metrics.posterior_summary` (2 standard deviations), and a
    figure per model, sampler and R_inf shows each slice's standard deviation map."""
    posterior_figure_slices: int = 8
    """Slices shown in each posterior figure (the first ones)."""
    denoising_check: bool = True
    """Before any sampler runs, check on a few test slices that each diffusion model's denoiser output is closer
    to the truth than its noisy input (:func:`check_denoisers`); a model that fails is reported (a warning, the
    MLflow tag ``adps.denoising_check_failed``) but still evaluated."""
    denoising_check_slices: int = 4
    """Test slices of the denoising check (the first ones)."""
    denoising_check_sigmas: tuple[float, ...] = (0.05, 0.1, 0.2)
    """Noise levels of the denoising check (:data:`adps.nn.reconstruct.DENOISING_CHECK_SIGMAS`)."""

    def validate(self) -> None:
        """Check values that need no I/O; names the key at fault."""
        if not self.dataset:
            raise ValueError("config key 'dataset' is empty: give the prepared dataset (folder or s3://)")
        super().validate()
        if not self.r_inf or any(r < 1 for r in self.r_inf):
            raise ValueError(f"config key 'r_inf' must be values >= 1, got {list(self.r_inf)}")
        if self.denoising_check_slices < 1 or any(not sigma > 0 for sigma in self.denoising_check_sigmas):
            raise ValueError("config keys 'denoising_check_slices' (>= 1) and 'denoising_check_sigmas' (each > 0) out "
                             f"of range: {self.denoising_check_slices}, {list(self.denoising_check_sigmas)}")
        for key in ("slices", "steps", "guidance", "a_dps_sigma_min", "a_os_sigma", "sigma_max", "sigma_min",
                    "rho", "ald_step_scale", "l1_lam", "l1_iterations", "cg_sense_iterations"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        for key in ("slices_per_task", "posterior_samples", "posterior_figure_slices"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.compile_mode not in ("", *COMPILE_MODES):
            raise ValueError(f"config key 'compile_mode' must be '' (eager) or one of {', '.join(COMPILE_MODES)}, "
                             f"got {self.compile_mode!r}")


# Cells ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One Ray task: one model and sampler at one R_inf, on a chunk of test slices."""

    model: str
    """The model's URI (see :func:`model_uri`)."""
    label: str
    method: str
    sampler: str
    r_train: float
    r_inf: float
    indices: tuple[int, ...]
    """Test-split indices."""
    steps: int = 0
    """Sampler steps (0 = the sampler's default)."""
    guidance: float = 1.0
    """l_ss of A-DPS / DPS."""
    options: tuple[tuple[str, float], ...] = ()
    """The sampler's other settings (``sigma_min``, ``churn``, ``step_scale``, ``iterations``, ...), sorted."""
    settings: str = "paper"
    """Where the settings came from: ``paper`` (METHOD.md's), ``config`` (the evaluation config's), ``tuned`` (a
    search's best), ``fastest`` (a search's fastest within its tolerance) or ``untuned`` (no search, others had)."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Cell:
        """The cell from its ``dataclasses.asdict`` form (what a Ray task receives)."""
        return cls(**{**values, "indices": tuple(values["indices"]),
                      "options": tuple((name, float(value)) for name, value in values["options"])})

    @property
    def key(self) -> str:
        # The settings and the model itself (its pinned registry version or folder) are part of the key: other
        # settings, or a retrained model registered under the same name, get new cells, not old results.
        extra = "".join(f"_{name}{value:g}" for name, value in self.options)
        model = hashlib.sha1(self.model.encode()).hexdigest()[:8]
        return (f"{self.label}-{model}__{self.sampler}__R{self.r_inf:g}__s{self.steps}_g{self.guidance:g}{extra}__"
                f"{self.indices[0]:05d}-{self.indices[-1]:05d}")


def check_fair_tuning(config: EvaluateConfig, models: Sequence[tuple[str, dict[str, Any]]]) -> dict[tuple[str, float], str]:
    """With ``sampler_settings`` best or fastest: which settings each diffusion model gets at each R_inf,
    refusing an unfair comparison. Returns ``{(label, r_inf): "tuned" | "untuned" | "paper"}``.

    At each R_inf, either every diffusion model has settings from a search, all with the same budget and none
    on the test split, or none has (``paper``: the protocol for all). A model without a search where others
    have one is refused, naming it and the command that tunes it, unless ``allow_untuned`` (then ``untuned``).
    """
    verdict: dict[tuple[str, float], str] = {}
    diffusion = [(uri, c) for uri, c in models if c["method"] in DENOISER_METHODS]
    if config.sampler_settings == "paper":
        return verdict
    which = FASTEST if config.sampler_settings == "fastest" else ""
    for r_inf in map(float, config.r_inf):
        tuned = {model_label(c): tuned_meta(c.get("_version_tags", {}), r_inf) for _, c in diffusion
                 if tuned_settings(c.get("_version_tags", {}), r_inf, which)}
        missing = [model_label(c) for _, c in diffusion if model_label(c) not in tuned]
        on_test = sorted(label for label, meta in tuned.items() if meta["split"] == "test")
        if on_test:
            raise ValueError(f"sampler_settings: the settings of {', '.join(on_test)} at R_inf {r_inf:g} were searched on the "
                             "test split, whose slices this evaluation scores; search again on val")
        budgets = {meta["budget"] for meta in tuned.values()}
        if len(budgets) > 1:
            found = ", ".join(f"{label} {meta['budget'] or '?'} trials" for label, meta in sorted(tuned.items()))
            raise ValueError(f"sampler_settings: at R_inf {r_inf:g} the searches had different budgets ({found}); "
                             "tune every model with the same num_samples")
        if tuned and missing and not config.allow_untuned:
            raise ValueError(f"sampler_settings: at R_inf {r_inf:g}, {', '.join(sorted(tuned))} have {which or 'best'} "
                             f"settings from a Ray Tune search but {', '.join(missing)} not: tune them with the same "
                             f"budget (adps tune --model ... --r-inf {r_inf:g}{'; fastest needs the protocol as a trial' if which else ''}), "
                             "or set allow_untuned: true to run them untuned (rows marked), or sampler_settings: paper "
                             "for the paper's protocol")
        verdict.update({(label, r_inf): "tuned" for label in tuned})
        verdict.update({(label, r_inf): "untuned" if tuned else "paper" for label in missing})
    return verdict


# The explicit config keys of each sampler: (config key, the sampler's option).
EXPLICIT_OPTIONS = {
    "a_dps": (("sigma_max", "sigma_max"), ("sigma_min", "sigma_min"), ("rho", "rho")),
    "dps": (("sigma_max", "sigma_max"), ("sigma_min", "sigma_min"), ("rho", "rho")),
    "ald": (("ald_step_scale", "step_scale"),), "l1_wavelet": (("l1_lam", "lam"), ("l1_iterations", "iterations")),
    "cg_sense": (("cg_sense_iterations", "iterations"),)}


def cell_settings(config: EvaluateConfig, model_config: dict[str, Any], sampler: str, r_inf: float,
                  fairness: dict[tuple[str, float], str] | None = None) -> tuple[int, float, dict[str, float], str]:
    """``(steps, guidance, options, source)`` of one model's ``sampler`` at ``r_inf``.

    Each value: the config's when set (for every model), else a search's (``sampler_settings`` best or fastest;
    A-OS, one network call, always takes its search's best), else, for ambient models, ``a_dps_sigma_min`` /
    ``a_os_sigma``, else METHOD.md's. Settings searched together are used together: an explicit guidance drops
    the rest of the tuned set. ``source`` is ``tuned`` (best) or ``fastest`` when any value came from a search,
    ``untuned`` for a model the fair rule let run without one (:func:`check_fair_tuning`), ``config`` when any
    came from the config, else ``paper``.
    """
    method = model_config["method"]
    tags = model_config.get("_version_tags", {})
    use_tuned = config.sampler_settings != "paper" and method in DENOISER_METHODS
    which = "a_os" if sampler == "a_os" else FASTEST if config.sampler_settings == "fastest" else ""
    tuned = tuned_settings(tags, r_inf, which) if use_tuned else {}
    tuned_steps, tuned_guidance = int(tuned.pop("steps", 0)), tuned.pop("guidance", 0.0)
    steps = (config.steps or tuned_steps) if sampler in ITERATIVE_SAMPLERS else 0
    guidance = config.guidance or tuned_guidance or 1.0
    options = {} if config.guidance else dict(tuned)
    explicit = {option: float(getattr(config, key)) for key, option in EXPLICIT_OPTIONS.get(sampler, ())
                if getattr(config, key)}
    options.update(explicit)
    fallback = {}
    if method == "ambient" and sampler == "a_dps" and config.a_dps_sigma_min:
        fallback["sigma_min"] = float(config.a_dps_sigma_min)
    if sampler == "a_os" and config.a_os_sigma:
        fallback["sigma"] = float(config.a_os_sigma)
    for option, value in fallback.items():
        options.setdefault(option, value)
    from_tuned = bool(tuned or tuned_steps or tuned_guidance) and not config.guidance
    from_config = bool(explicit or fallback.keys() & options.keys()
                       or (sampler in ITERATIVE_SAMPLERS and config.steps) or (sampler in ("a_dps", "dps") and config.guidance))
    source = ("fastest" if which == FASTEST else "tuned") if from_tuned else "config" if from_config else "paper"
    if (fairness or {}).get((model_label(model_config), r_inf)) == "untuned" and sampler != "a_os":
        source = "untuned"
    return steps, float(guidance), options, source


def plan_cells(config: EvaluateConfig, models: Sequence[tuple[str, dict[str, Any]]], n_test: int,
               fairness: dict[tuple[str, float], str] | None = None) -> list[Cell]:
    """Every cell: models x samplers x R_inf x slice chunks, with each model's settings (:func:`cell_settings`)."""
    count = min(n_test, config.slices) if config.slices else n_test
    chunks = [tuple(range(i, min(i + config.slices_per_task, count))) for i in range(0, count, config.slices_per_task)]
    cells = []
    for uri, model_config in models:
        method = model_config["method"]
        r_train = float(model_config["r_train"])
        for r_inf in map(float, config.r_inf):
            runs = [METHOD_SAMPLERS[method]]
            if method == "ambient" and config.a_os and r_inf == r_train:
                runs.append("a_os")
            for sampler in runs:
                steps, guidance, options, source = cell_settings(config, model_config, sampler, r_inf, fairness)
                for chunk in chunks:
                    cells.append(Cell(uri, model_label(model_config), method, sampler, r_train, r_inf, chunk,
                                      steps=steps, guidance=guidance, options=tuple(sorted(options.items())),
                                      settings=source))
    return cells


def _cell_path(config: EvaluateConfig, cell: Cell, suffix: str) -> str:
    return cell_path(config.resolved_output, cell.key, suffix)


def network_for_sampler(model: torch.nn.Module | None, sampler: str, compile_mode: str) -> torch.nn.Module | None:
    """The network a cell's sampler calls: ``model`` itself, or ``torch.compile(model)`` with static shapes (a
    task's batch never changes) for an iterative sampler when ``compile_mode`` is set. The samplers freeze the
    weights while they run, so the compiled backward of A-DPS / DPS computes the gradient to ``x`` alone."""
    if model is None or not compile_mode or sampler not in ITERATIVE_SAMPLERS:
        return model
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=False)


def evaluate_cell(config: EvaluateConfig, cell: Cell, *, device: str = "cpu") -> list[dict[str, Any]]:
    """Reconstruct and measure one cell; writes ``<key>.json`` (rows) and ``<key>.npz`` (the first slice's
    reconstruction and reference) and returns the rows."""
    model, _ = load_model_entry(cell.model, device, config.tracking_uri)
    model = network_for_sampler(model, cell.sampler, config.compile_mode)

    # A_tr masks like the training masks: the ACS width the dataset was prepared with.
    acs = read_manifest(config.dataset)["config"].get("acs")
    dataset = PreparedSliceDataset(config.dataset, "test", acceleration=cell.r_inf)
    try:
        items = [dataset[i] for i in cell.indices]
    finally:
        dataset.close()
    samples = config.posterior_samples if cell.sampler in ITERATIVE_SAMPLERS else 1
    # K samples per slice in one batch: the slices repeated K times, each row its own start noise.
    batch = stack_batch(items * samples, device)
    slice_ids = batch["slice_ids"][: len(items)]
    started = time.perf_counter()
    image = reconstruct_batch(cell.sampler, model, batch, r_train=cell.r_train, seed=config.seed, acs=acs,
                              amp=config.amp, steps=cell.steps or None, guidance=cell.guidance, **dict(cell.options))
    seconds = (time.perf_counter() - started) / len(items)
    reference = batch["reference"][: len(items)]
    extra: dict[str, np.ndarray] = {}
    calibration = [math.nan] * len(items)
    if samples > 1:
        summary = posterior_summary(image.reshape(samples, len(items), *image.shape[1:]), reference)
        image, calibration = summary["mean"], summary["calibration"].tolist()
        extra = {"means": summary["mean"].cpu().numpy(), "stds": summary["std"].float().cpu().numpy(),
                 "references": reference.cpu().numpy()}
    scores = {key: value.tolist() for key, value in image_metrics(reference, image).items()}
    if config.lpips:
        scores["lpips"] = lpips_distance(reference, image, weights=config.lpips_weights or None, device=device).tolist()
    rows = []
    for i, slice_id in enumerate(slice_ids):
        row = {"model": cell.label, "method": cell.method, "sampler": cell.sampler, "r_train": cell.r_train,
               "r_inf": cell.r_inf, "slice": slice_id, "seconds": seconds, "steps": cell.steps,
               "guidance": cell.guidance, "options": ",".join(f"{name}={value:g}" for name, value in cell.options),
               "settings": cell.settings, "samples": samples, "calibration": float(calibration[i])}
        row.update({metric: float(scores[metric][i]) if metric in scores else math.nan for metric in METRICS})
        rows.append(row)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=image[0].cpu().numpy(), reference=reference[0].cpu().numpy(),
                        slice=np.int64(slice_ids[0]), slices=np.asarray(slice_ids, dtype=np.int64), **extra)
    storage.write_bytes_atomic(_cell_path(config, cell, ".npz"), buffer.getvalue())
    # The rows last: a cell counts as done only when its JSON exists.
    storage.write_bytes_atomic(_cell_path(config, cell, ".json"), json.dumps(rows).encode())
    return rows


# The study's part of the driver ---------------------------------------------------------------
def resolve_models(config: EvaluateConfig) -> list[tuple[str, dict[str, Any]]]:
    """Every model's URI (pinned) and config (:func:`~adps.orchestration.registry.pin_model_entry`)."""
    return [(uri, model_config) for uri, _, model_config in
            (pin_model_entry(entry, config.tracking_uri) for entry in config.models)]


def check_data(config: EvaluateConfig) -> int:
    """The number of test slices; every R_inf must be prepared in the dataset (an older schema is refused)."""
    prepared = [float(r) for r in read_manifest(config.dataset)["config"]["accelerations"]]
    missing = [r for r in config.r_inf if float(r) not in prepared]
    if missing:
        raise ValueError(f"config key 'r_inf': R_inf {', '.join(f'{r:g}' for r in missing)} not prepared in "
                         f"{config.dataset} (it has {', '.join(f'{r:g}' for r in prepared)})")
    dataset = PreparedSliceDataset(config.dataset, "test", acceleration=config.r_inf[0])
    try:
        return len(dataset)
    finally:
        dataset.close()


def plan(config: EvaluateConfig, n_test: int, progress: bool) -> tuple[list[Cell], dict[str, Any]]:
    """Resolve the models (pinned), run the denoising check and the fair-tuning rule, and plan the cells of
    ``n_test`` test slices; ``extra``: the denoising check's rows."""
    models = resolve_models(config)
    checks: list[dict[str, Any]] = []
    if config.denoising_check:
        checks = check_denoisers(models, config.dataset, "test", slices=config.denoising_check_slices,
                                 sigmas=config.denoising_check_sigmas, seed=config.seed,
                                 tracking_uri=config.tracking_uri)
        if progress and checks:
            print("adps evaluate: denoising check on the test split (complex NRMSE of the noisy input -> the "
                  "model's output; a model must lower it)\n" + format_denoising_check(checks), flush=True)
    cells = plan_cells(config, models, n_test, check_fair_tuning(config, models))
    if progress:
        print(format_settings(cells), flush=True)
    return cells, {"denoising_check": checks}


def find_crossovers(config: EvaluateConfig, rows: list[dict[str, Any]]) -> list[Any]:
    """Each ambient model against ``reference`` per metric (none without the reference's rows)."""
    if config.reference not in {r["model"] for r in rows}:
        return []
    ambient = sorted({r["model"] for r in rows if r["method"] == "ambient"})
    compared = [r for r in rows if r["sampler"] != "a_os"]  # A-OS runs at R_inf = R_train only
    return crossover_table(compared, ambient, config.reference, metrics=("nrmse", "psnr", "ssim"),
                           n_boot=config.n_boot, level=config.crossover_level, seed=config.seed)


def report(config: EvaluateConfig, folder: Path, table: Any, crossovers: list[Any], cells: list[Cell],
           extra: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """``crossover.csv``, ``denoising_check.csv``, the metric, reconstruction and posterior figures; the mean
    metrics (``nrmse.<model>.<sampler>.r<R_inf>``), the cross-over, calibration and denoising-check metrics and tags."""
    checks = extra["denoising_check"]
    pd.DataFrame([c.as_row() for c in crossovers]).to_csv(folder / "crossover.csv", index=False)
    if checks:
        pd.DataFrame(list(checks)).to_csv(folder / "denoising_check.csv", index=False)
    for metric in ("nrmse", "psnr", "ssim"):
        metric_figure(table, metric, crossovers=[c for c in crossovers if c.metric == metric]).savefig(
            folder / f"{metric}_vs_r.png", dpi=120, bbox_inches="tight")
    images, posteriors = {}, {}
    for cell in cells:
        with storage.local_copy(_cell_path(config, cell, ".npz")) as path, np.load(path) as data:
            if cell.indices[0] == 0:
                name = cell.label if cell.label == cell.sampler else f"{cell.label} {cell.sampler}"
                images[(name, cell.r_inf)] = (data["image"], data["reference"])
            if "stds" in data:  # K posterior samples: the cells of one (model, sampler, R_inf) together
                parts = posteriors.setdefault((cell.label, cell.sampler, cell.r_inf), [])
                parts.append((cell.indices[0], {k: data[k] for k in ("means", "stds", "references", "slices")}))
    if images:
        reconstruction_grid(images).savefig(folder / "reconstructions.png", dpi=120, bbox_inches="tight")
    for (label, sampler, r_inf), parts in sorted(posteriors.items()):
        arrays = {k: np.concatenate([part[k] for _, part in sorted(parts, key=lambda p: p[0])])
                  [: config.posterior_figure_slices] for k in ("means", "stds", "references", "slices")}
        posterior_grid(arrays["means"], arrays["stds"], arrays["references"], slices=arrays["slices"].tolist(),
                       title=f"{label} {sampler} at R_inf {r_inf:g}: {config.posterior_samples} samples per slice"
                       ).savefig(folder / f"posterior_{label}_{sampler}_r{r_inf:g}.png", dpi=120, bbox_inches="tight")
    # The mean of each metric per model, sampler and R_inf (the table's rows are slices).
    means = table.groupby(["model", "sampler", "r_inf"])[[m for m in METRICS if table[m].notna().any()]].mean()
    metrics = {f"{metric}.{model}.{sampler}.r{r_inf:g}": float(value)
               for (model, sampler, r_inf), row in means.iterrows() for metric, value in row.items()
               if np.isfinite(value)}
    for c in crossovers:
        key = f"{c.model}.{c.metric}"
        if c.outcome != "none":
            name = "crossover_r" if c.is_crossover else "crossover_inconclusive_r"
            metrics.update({f"{name}.{key}": c.crossover_r, f"crossover_margin.{key}": c.margin,
                            f"crossover_ci_low.{key}": c.ci_low, f"crossover_ci_high.{key}": c.ci_high})
    calibrated = table[table["samples"] > 1]
    if not calibrated.empty:
        frame = calibrated.groupby(["model", "sampler", "r_inf"])["calibration"].mean()
        metrics.update({f"calibration.{model}.{sampler}.r{r_inf:g}": float(value)
                        for (model, sampler, r_inf), value in frame.items()})
    for check in checks:
        key = f"denoising_check.{check['model']}.{check['split']}.s{check['sigma']:g}"
        metrics.update({f"{key}.input_nrmse": check["input_nrmse"], f"{key}.output_nrmse": check["output_nrmse"]})
    tags = {f"adps.crossover_{outcome}": ",".join(f"{c.model}.{c.metric}" for c in crossovers if c.outcome == outcome)
            for outcome in ("none", "inconclusive")}
    tags["adps.crossover_level"] = f"{config.crossover_level:g}"
    tags["adps.denoising_check_failed"] = ",".join(sorted({c["model"] for c in checks if not c["passed"]}))
    return metrics, tags


def format_settings(cells: Sequence[Cell]) -> str:
    """One line per model, sampler and R_inf: the sampler's settings and where they came from (``paper``,
    ``config``, ``tuned``, ``untuned``); identical lines merged over R_inf."""
    seen: dict[tuple, list[float]] = {}
    for cell in cells:
        what = (cell.label, cell.sampler, cell.steps, cell.guidance, cell.options, cell.settings)
        if cell.r_inf not in seen.setdefault(what, []):
            seen[what].append(cell.r_inf)
    lines = []
    for (label, sampler, steps, guidance, options, source), r_infs in seen.items():
        values = ([f"steps {steps}"] if steps else []) + ([f"guidance {guidance:g}"] if sampler in ("a_dps", "dps") else [])
        values += [f"{name} {value:g}" for name, value in options]
        shown = ", ".join(values) or "its defaults"
        lines.append(f"adps evaluate: {label} {sampler} at R_inf {', '.join(f'{r:g}' for r in r_infs)}: {shown} "
                     f"({source})")
    return "\n".join(lines)


def format_results(rows: Sequence[dict[str, Any]], metric: str = "nrmse") -> str:
    """Mean ``metric`` over slices: one line per (model, sampler), one column per R_inf."""
    table = pd.DataFrame(list(rows))
    if table.empty:
        return "(no rows)"
    table["run"] = table["model"] + " " + table["sampler"]
    pivot = table.pivot_table(index="run", columns="r_inf", values=metric, aggfunc="mean")
    pivot.columns = [f"R={r:g}" for r in pivot.columns]
    return f"mean {metric} over slices\n" + pivot.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")


def format_crossover(crossovers: Sequence[Any]) -> str:
    """The cross-over table: model, metric, outcome (:func:`adps.crossover.crossover`), R_inf, margin and its CI."""
    level = f"{crossovers[0].level:.0%} CI" if crossovers else "CI"
    lines = [f"{'model':14s} {'metric':6s} {'outcome':12s} {'R_inf':>5s} {'margin':>9s}  {level}"]
    for c in crossovers:
        if c.outcome == "none":
            lines.append(f"{c.model:14s} {c.metric:6s} {'none':12s} {'-':>5s} {'-':>9s}  -")
        else:
            lines.append(f"{c.model:14s} {c.metric:6s} {c.outcome:12s} {c.crossover_r:5g} {c.margin:9.4g}  "
                         f"[{c.ci_low:.4g}, {c.ci_high:.4g}]")
    return "\n".join(lines)


MRI_STUDY = Study(
    name="mri", config=EvaluateConfig, cell=Cell.from_dict, columns=TABLE_COLUMNS, paths=("dataset",),
    check_data=check_data, plan=plan, evaluate_cell=evaluate_cell,
    describe=lambda cell: f"{cell.label} {cell.sampler} R_inf {cell.r_inf:g}",
    sort_key=lambda r: (r["model"], r["sampler"], r["r_inf"], r["slice"]), crossovers=find_crossovers, report=report,
    score="nrmse")

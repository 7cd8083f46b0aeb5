"""The natural-image study's evaluation (paper section 3.1, figures 2-4): MSE and LPIPS of posterior sampling
with models trained on randomly inpainted images, against the model trained on clean images (``p = 0``) and
the pseudo-inverse; docs/natural_images.md.

:func:`adps.orchestration.evaluate.evaluate` runs it (``adps evaluate --study images``). Three tasks, each *different*
from the models' training corruption: Gaussian compressed sensing over ``measurements`` (figure 2), super-resolution
over ``factors`` (figure 3) and compressed sensing at ``nfe_measurements`` over ``steps_list`` (figure 4,
``NFE = 2 steps - 1``). Each model is sampled with the sampler its weights call for
(:func:`~adps.nn.image_diffusion.image_sampler`) and the config's ``steps`` / ``guidance``, else those a search left
on the registered version (:data:`~adps.orchestration.registry.IMAGE_TUNED_TAG`), else the samplers' defaults; the
pseudo-inverse (sampler ``pinv``) is the baseline of ``cs`` and ``sr``. Every model sees the same images, matrix and
measurement noise (seeded), so results are paired by image; estimates are clipped to ``[-1, 1]``, then scored by MSE
on the ``[0, 1]`` scale (:func:`adps.metrics.rgb_mse`) and LPIPS (:func:`adps.perceptual.lpips_rgb`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from adps.crossover import crossover_table
from adps.data import storage
from adps.images import GaussianCompressedSensing, ImageDataset, SuperResolution, add_noise, pseudo_inverse
from adps.metrics import rgb_mse
from adps.nn.image_diffusion import IMAGE_SAMPLING, image_sampler, image_sampler_options
from adps.nn.samplers import network_calls, run_sampler
from adps.orchestration.cells import EvaluationConfig, Study, cell_path
from adps.orchestration.figures import sweep_figure
from adps.orchestration.registry import image_tuned_settings, load_model_entry, pin_model_entry
from adps.perceptual import lpips_rgb

__all__ = ["IMAGE_STUDY", "METRICS", "PINV", "TABLE_COLUMNS", "TASKS", "ImageCell", "ImageEvaluateConfig",
           "evaluate_image_cell", "format_image_crossover", "format_image_results", "image_crossovers",
           "plan_image_cells"]

TASKS = ("cs", "sr", "nfe")
"""The three tasks, as the module docstring says."""
METRICS = ("mse", "lpips")
PINV = "pinv"
"""Model label and sampler name of the pseudo-inverse baseline (no network)."""
TABLE_COLUMNS = ("model", "erasure_p", "sampler", "task", "measurements", "factor", "steps", "nfe", "guidance",
                 "image", *METRICS, "seconds")
FIGURES = {
    "cs": ("fig2_cs_vs_measurements.png", "measurements", "measurements m (Gaussian compressed sensing)"),
    "sr": ("fig3_sr_vs_factor.png", "factor", "downscaling factor (super-resolution)"),
    "nfe": ("fig4_cs_vs_nfe.png", "nfe", "NFE (network evaluations)")}
"""Per task: the figure's file name, its x column and x label (paper figures 2, 3 and 4)."""


@dataclass(frozen=True)
class ImageEvaluateConfig(EvaluationConfig):
    """Everything the natural-image evaluation needs (with :class:`EvaluationConfig`'s keys; unknown keys refused
    by name). One of the ``models`` should be the ``p = 0`` model (``adps-image-p0``): the cross-over's reference."""

    AMP_MODES = ("", "bf16", "fp16")
    images: str = ""
    """Test images: a folder or ``.zip`` of images, local or ``s3://`` (adps.images.ImageDataset)."""
    resolution: int = 64
    """Side of the square test images (they are resized to it); the models' resolution."""
    n_images: int = 16
    """Test images (the first ones in name order; 0 = all)."""
    images_per_task: int = 8
    """Images per Ray task, sampled as one batch."""
    measurements: tuple[int, ...] = (250, 500, 1000, 2000, 4000)
    """Compressed sensing: the measurement counts m (figure 2's axis); empty = no ``cs`` task."""
    factors: tuple[int, ...] = (2, 4, 8)
    """Super-resolution: the downscaling factors (figure 3's axis); empty = no ``sr`` task."""
    steps_list: tuple[int, ...] = (10, 25, 50, 100, 150)
    """The NFE sweep: Heun step counts at ``nfe_measurements`` (figure 4); empty = no sweep."""
    nfe_measurements: int = 4000
    """The compressed-sensing measurement count of the NFE sweep (the paper's 4000)."""
    steps: int = 0
    """Heun steps of the ``cs`` and ``sr`` tasks; 0 = tuned (model-version tag), else 100."""
    guidance: float = 0.0
    """DPS / A-DPS guidance zeta for every task; 0 = tuned (model-version tag), else 1."""
    sampler_settings: str = "best"
    """``best``: read ``adps.tuned.<task>.steps`` / ``.guidance`` tags of registered model versions for settings
    left at 0; ``paper``: the samplers' defaults (``fastest`` is MRI only)."""
    noise: float = 0.0
    """Standard deviation of the Gaussian noise added to the measurements (image units)."""
    pinv: bool = True
    """Also evaluate the pseudo-inverse baseline (``cs`` and ``sr``)."""
    lpips_resize: int = 0
    """Resize images to this side for LPIPS (0 = as they are); needed below 32 pixels."""
    run_name: str = "image-evaluation"
    experiment: str = "adps-image-eval"

    def validate(self) -> None:
        """Check values that need no I/O; names the key at fault."""
        if not self.images:
            raise ValueError("config key 'images' is empty: give the test images (a folder or .zip, local or s3://)")
        super().validate()
        if self.sampler_settings == "fastest":
            raise ValueError("config key 'sampler_settings': fastest is for the MRI study (an image search records "
                             "only its best settings); use best or paper")
        for key in ("resolution", "images_per_task"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("n_images", "steps", "guidance", "noise"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        if not (self.measurements or self.factors or self.steps_list):
            raise ValueError("config keys 'measurements', 'factors' and 'steps_list' are all empty: nothing to evaluate")
        pixels = 3 * self.resolution * self.resolution
        for key in ("measurements", "factors", "steps_list"):
            values = getattr(self, key)
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"config key {key!r} lists {repeated[0]} more than once: {list(values)}")
            if any(v < 1 for v in values):
                raise ValueError(f"config key {key!r} must hold integers >= 1, got {list(values)}")
        for m in (*self.measurements, *([self.nfe_measurements] if self.steps_list else [])):
            if not 1 <= m <= pixels:
                key = "measurements" if m in self.measurements else "nfe_measurements"
                raise ValueError(f"config key {key!r}: {m} measurements, but a {self.resolution} x {self.resolution} RGB "
                                 f"image has {pixels} pixels (1 <= m <= {pixels})")
        for factor in self.factors:
            if self.resolution % factor:
                raise ValueError(f"config key 'factors': {factor} does not divide the resolution {self.resolution}")
        if self.lpips_resize and self.lpips_resize < 32:
            raise ValueError(f"config key 'lpips_resize' must be 0 or >= 32 (AlexNet's smallest input), "
                             f"got {self.lpips_resize}")
        if self.lpips and not self.lpips_resize and self.resolution < 32:
            raise ValueError(f"config key 'lpips_resize': {self.resolution}-pixel images are too small for LPIPS's "
                             "AlexNet (at least 32); set lpips_resize (e.g. 64) or lpips: false")

    def context(self) -> str:
        """A short hash of every setting, besides the cell's own, that its numbers depend on."""
        values = {key: getattr(self, key) for key in ("images", "resolution", "noise", "seed", "lpips",
                                                      "lpips_resize", "amp")}
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


# Cells ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCell:
    """One Ray task: one model (or the pseudo-inverse) on one task setting, a chunk of images."""

    model: str
    """The model's URI (``pinv``: none)."""
    label: str
    """``p<erasure_p>`` (``p0.6``) or ``pinv``."""
    erasure_p: float | None
    sampler: str
    """``a_dps``, ``dps`` or ``pinv``."""
    task: str
    indices: tuple[int, ...]
    """Test-image indices."""
    measurements: int | None = None
    """m of ``cs`` / ``nfe``."""
    factor: int | None = None
    """Downscaling factor of ``sr``."""
    steps: int = 0
    guidance: float = 0.0
    delta: float = 0.1
    """The ambient model's further corruption (its training's)."""
    context: str = ""
    """:meth:`ImageEvaluateConfig.context` of the evaluation."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageCell:
        """The cell from its ``dataclasses.asdict`` form (what a Ray task receives)."""
        return cls(**{**values, "indices": tuple(values["indices"])})

    @property
    def setting(self) -> str:
        """``m<measurements>`` or ``x<factor>``."""
        return f"x{self.factor}" if self.task == "sr" else f"m{self.measurements}"

    @property
    def nfe(self) -> int:
        """Network evaluations per image (0 for the pseudo-inverse)."""
        return 0 if self.sampler == PINV else network_calls(self.steps, IMAGE_SAMPLING["solver"])

    @property
    def key(self) -> str:
        # The model version, the sampler settings and the config's context: other ones get new cells.
        model = hashlib.sha1(self.model.encode()).hexdigest()[:8]
        return (f"{self.label}-{model}__{self.sampler}__{self.task}_{self.setting}__s{self.steps}_g{self.guidance:g}__"
                f"{self.context}__{self.indices[0]:05d}-{self.indices[-1]:05d}")


def _settings(config: ImageEvaluateConfig, tags: dict[str, str], task: str) -> tuple[int, float, str]:
    """``(steps, guidance, where each came from)`` of ``task`` (``nfe`` takes ``cs``'s guidance): the config's,
    else tuned, else the samplers' defaults (100 steps, guidance 1)."""
    tuned = image_tuned_settings(tags, "cs" if task == "nfe" else task) if config.sampler_settings == "best" else {}
    steps = config.steps or int(tuned.get("steps", 0)) or int(IMAGE_SAMPLING["steps"])
    guidance = config.guidance or float(tuned.get("guidance", 0.0)) or float(IMAGE_SAMPLING["guidance"])
    sources = [f"{key} from {'config' if getattr(config, key) else 'tuned tag' if key in tuned else 'default'}"
               for key in ("steps", "guidance")]
    return steps, guidance, ", ".join(sources)


def plan_image_cells(config: ImageEvaluateConfig, models: Sequence[tuple[str, dict[str, Any]]],
                     n_test: int) -> list[ImageCell]:
    """Every cell: (models + the pseudo-inverse) x tasks x settings x image chunks. ``models``: ``(uri, config)``
    pairs, each config with ``erasure_p``, ``delta``, ``_sampler`` (the sampler's name) and ``_version_tags``."""
    count = min(n_test, config.n_images) if config.n_images else n_test
    chunks = [tuple(range(i, min(i + config.images_per_task, count))) for i in range(0, count, config.images_per_task)]
    context = config.context()
    runs = [(uri, model_config) for uri, model_config in models]
    if config.pinv:
        runs.append((PINV, {"erasure_p": None, "_sampler": PINV, "_version_tags": {}}))
    cells = []
    for uri, model_config in runs:
        sampler = model_config["_sampler"]
        p = model_config["erasure_p"]
        common = {"model": uri, "label": PINV if sampler == PINV else f"p{float(p):g}", "erasure_p": p,
                  "sampler": sampler, "delta": float(model_config.get("delta", 0.1)), "context": context}
        settings: list[tuple[str, dict[str, Any]]] = [("cs", {"measurements": m}) for m in config.measurements]
        settings += [("sr", {"factor": f}) for f in config.factors]
        if sampler != PINV:  # the pseudo-inverse has no steps to sweep
            settings += [("nfe", {"measurements": config.nfe_measurements, "steps": s}) for s in config.steps_list]
        for task, setting in settings:
            if sampler == PINV:
                steps, guidance = 0, 0.0
            else:
                steps, guidance, _ = _settings(config, model_config["_version_tags"], task)
            steps = setting.pop("steps", steps)
            for chunk in chunks:
                cells.append(ImageCell(**common, task=task, indices=chunk, steps=steps, guidance=guidance, **setting))
    return cells


def _operator(cell: ImageCell, resolution: int, seed: int) -> Any:
    """The cell's forward operator: one Gaussian matrix per (m, seed), shared by every model."""
    if cell.task == "sr":
        return SuperResolution(int(cell.factor))
    return GaussianCompressedSensing(int(cell.measurements), (3, resolution, resolution), seed)


def _seeded(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys`` through numpy's SeedSequence (independent streams)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def measure(operator: Any, images: torch.Tensor, indices: Sequence[int], *, noise: float, seed: int) -> torch.Tensor:
    """``y = A x (+ noise)``, the noise of each image drawn from its own seed ``(seed, 1, index)``,
    so every model and every chunking sees the same measurements."""
    y = operator(images)
    if noise <= 0:
        return y
    return torch.cat([add_noise(y[i : i + 1], noise, generator=_seeded(seed, 1, index))
                      for i, index in enumerate(indices)])


def evaluate_image_cell(config: ImageEvaluateConfig, cell: ImageCell, *, device: str = "cpu") -> list[dict[str, Any]]:
    """Sample and measure one cell; writes ``<output>/cells/<key>.json`` (its rows) and returns them."""
    with ImageDataset(config.images, config.resolution) as dataset:
        images = torch.stack([dataset[i]["image"] for i in cell.indices]).to(device)
    operator = _operator(cell, config.resolution, config.seed)
    y = measure(operator, images, cell.indices, noise=config.noise, seed=config.seed)
    started = time.perf_counter()
    if cell.sampler == PINV:
        estimate = pseudo_inverse(operator, y)
    else:
        model, _ = load_model_entry(cell.model, device, config.tracking_uri)
        options = image_sampler_options(model, steps=cell.steps, guidance=cell.guidance, delta=cell.delta,
                                        erasure_p=cell.erasure_p if cell.sampler == "a_dps" else None)
        estimate = run_sampler(model=model, y=y, operator=operator, generator=_seeded(config.seed, 2, cell.indices[0]),
                               amp=config.amp or None, **options)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / len(cell.indices)
    estimate = estimate.float().clamp(-1, 1)
    scores = {"mse": rgb_mse(images, estimate).tolist()}
    if config.lpips:
        scores["lpips"] = lpips_rgb(images, estimate, weights=config.lpips_weights or None, device=device,
                                    resize=config.lpips_resize or None).tolist()
    rows = []
    for i, index in enumerate(cell.indices):
        row = {"model": cell.label, "erasure_p": cell.erasure_p, "sampler": cell.sampler, "task": cell.task,
               "measurements": cell.measurements, "factor": cell.factor, "steps": cell.steps, "nfe": cell.nfe,
               "guidance": cell.guidance, "image": index, "seconds": seconds}
        row.update({metric: float(scores[metric][i]) if metric in scores else math.nan for metric in METRICS})
        rows.append(row)
    storage.write_bytes_atomic(cell_path(config.resolved_output, cell.key, ".json"), json.dumps(rows).encode())
    return rows


# Models --------------------------------------------------------------------------------------
def _resolve_models(config: ImageEvaluateConfig) -> list[tuple[str, dict[str, Any]]]:
    """Every model's URI (registry versions pinned) and config, loaded once on the driver:
    a wrong entry fails here, before any task starts."""
    resolved = []
    labels: dict[str, str] = {}
    for entry in config.models:
        if entry in ("l1", PINV):
            raise ValueError(f"config key 'models': {entry!r} is not an image model (the pseudo-inverse baseline is "
                             "added by 'pinv: true')")
        uri, model, model_config = pin_model_entry(entry, config.tracking_uri)
        if model_config.get("method") != "image" or "erasure_p" not in model_config:
            raise ValueError(f"config key 'models': {entry} is not a natural-image model (its config has method "
                             f"{model_config.get('method')!r}; expected 'image' with an 'erasure_p')")
        p = float(model_config["erasure_p"])
        sampler = image_sampler(model)
        if (sampler == "a_dps") != (p > 0):
            raise ValueError(f"config key 'models': {entry} says erasure_p {p:g}, but its network "
                             f"{'takes' if p == 0 else 'does not take'} a mask channel")
        trained_at = model_config.get("resolution")
        if trained_at is not None and int(trained_at) != config.resolution:
            raise ValueError(f"config key 'resolution': {config.resolution}, but {entry} was trained on "
                             f"{trained_at} x {trained_at} images")
        label = f"p{p:g}"
        if label in labels:
            raise ValueError(f"config key 'models': {labels[label]} and {entry} are both {label} models; "
                             "evaluate one model per erasure probability")
        labels[label] = entry
        resolved.append((uri, {**model_config, "_sampler": sampler}))
    return resolved


# The cross-over --------------------------------------------------------------------------------
def _difficulty(row: dict[str, Any]) -> float:
    """A task's axis as crossover.py's R_inf, growing with difficulty: ``1 / m`` for ``cs``, the
    factor for ``sr``, ``1 / NFE`` for the ``nfe`` sweep."""
    if row["task"] == "sr":
        return float(row["factor"])
    return 1.0 / float(row["nfe"] if row["task"] == "nfe" else row["measurements"])


def image_crossovers(rows: Sequence[dict[str, Any]], *, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> list[dict[str, Any]]:
    """For each ambient model (``p > 0``) against the ``p = 0`` model, per task and metric: the easiest setting
    at which the ambient model beats it, paired by image, scanning from the easiest setting to the hardest (most
    measurements, smallest factor, most NFEs first): where it "starts beating p = 0" (paper figures 2-4).

    :func:`adps.crossover.crossover_table` with the task's difficulty (:func:`_difficulty`) as ``r_inf``. Rows:
    one per model, ``task``, ``axis`` (``measurements`` / ``factor`` / ``nfe``), ``metric``: ``outcome``
    (:data:`adps.crossover.OUTCOMES`), ``crossover`` (the setting of a cross-over, else None), ``setting`` (the
    setting reported for a cross-over or an inconclusive outcome), ``margin`` (mean improvement there, positive
    = better), ``ci_low`` / ``ci_high`` (bootstrap interval) and ``n_images``. Empty without a ``p = 0`` model.
    """
    models = {r["model"]: r["erasure_p"] for r in rows if r["sampler"] != PINV}
    reference = next((label for label, p in models.items() if p == 0), None)
    ambient = sorted((label for label, p in models.items() if p and p > 0), key=lambda label: models[label])
    if reference is None or not ambient:
        return []
    metrics = [m for m in METRICS if any(math.isfinite(r[m]) for r in rows)]
    found = []
    for task in TASKS:
        axis = FIGURES[task][1]
        task_rows = [r for r in rows if r["task"] == task and r["sampler"] != PINV]
        if not task_rows:
            continue
        setting_of = {_difficulty(r): r[axis] for r in task_rows}
        mapped = [{"model": r["model"], "r_inf": _difficulty(r), "slice": r["image"], **{m: r[m] for m in metrics}}
                  for r in task_rows]
        for c in crossover_table(mapped, ambient, reference, metrics, n_boot=n_boot, level=level, seed=seed):
            setting = None if c.crossover_r is None else setting_of[c.crossover_r]
            found.append({"model": c.model, "reference": c.reference, "task": task, "axis": axis, "metric": c.metric,
                          "outcome": c.outcome, "crossover": setting if c.is_crossover else None, "setting": setting,
                          "margin": c.margin, "ci_low": c.ci_low, "ci_high": c.ci_high, "level": c.level,
                          "n_images": c.n_slices})
    return found


# The study's part of the driver ---------------------------------------------------------------
def count_test_images(config: ImageEvaluateConfig) -> int:
    """The number of test images (a missing folder or bucket fails here, naming it)."""
    with ImageDataset(config.images, config.resolution) as dataset:
        return len(dataset)


def plan(config: ImageEvaluateConfig, n_test: int, progress: bool) -> tuple[list[ImageCell], dict[str, Any]]:
    """Resolve the models (pinned; each must be an image model of the config's resolution),
    print each one's sampler settings and plan the cells of ``n_test`` images."""
    models = _resolve_models(config)
    if progress:
        tasks = [task for task, values in (("cs", config.measurements), ("sr", config.factors)) if values]
        for _, model_config in models:
            for task in tasks:
                steps, guidance, source = _settings(config, model_config["_version_tags"], task)
                print(f"adps evaluate: p{float(model_config['erasure_p']):g} ({model_config['_sampler']}) {task}: "
                      f"steps {steps}, guidance {guidance:g} ({source})", flush=True)
    return plan_image_cells(config, models, n_test), {}


def find_crossovers(config: ImageEvaluateConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return image_crossovers(rows, n_boot=config.n_boot, level=config.crossover_level, seed=config.seed)


def report(config: ImageEvaluateConfig, folder: Path, table: Any, crossovers: list[dict[str, Any]],
           cells: list[ImageCell], extra: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """``crossover.csv`` and figures 2-4; the means per (model, task, setting) and the
    cross-overs as metrics, the pairs without a cross-over as tags."""
    columns = ["model", "reference", "task", "axis", "metric", "outcome", "crossover", "setting", "margin", "ci_low",
               "ci_high", "level", "n_images"]
    pd.DataFrame(crossovers, columns=columns).to_csv(folder / "crossover.csv", index=False)
    measured = [m for m in METRICS if table[m].notna().any()]
    for task, (name, x, xlabel) in FIGURES.items():
        part = table[table["task"] == task]
        if not part.empty:
            title = f"compressed sensing, m = {config.nfe_measurements}" if task == "nfe" else ""
            sweep_figure(part, measured, x, xlabel, title=title, log_x=True).savefig(folder / name, dpi=120,
                                                                                     bbox_inches="tight")
    metrics: dict[str, float] = {}
    for (model, task, measurements, factor, nfe), group in table.groupby(
            ["model", "task", "measurements", "factor", "nfe"], dropna=False, sort=True):
        setting = f"x{factor:g}" if task == "sr" else f"nfe{nfe:g}" if task == "nfe" else f"m{measurements:g}"
        for metric in METRICS:
            metrics[f"{metric}.{model}.{task}.{setting}"] = float(group[metric].mean())
    for c in crossovers:
        if c["outcome"] != "none":
            key = f"{c['model']}.{c['task']}.{c['metric']}"
            name = "crossover" if c["outcome"] == "crossover" else "crossover_inconclusive"
            metrics.update({f"{name}.{key}": c["setting"], f"crossover_margin.{key}": c["margin"],
                            f"crossover_ci_low.{key}": c["ci_low"], f"crossover_ci_high.{key}": c["ci_high"]})
    tags = {f"adps.crossover_{outcome}": ",".join(f"{c['model']}.{c['task']}.{c['metric']}" for c in crossovers
                                                  if c["outcome"] == outcome) for outcome in ("none", "inconclusive")}
    return metrics, tags


# Printing ------------------------------------------------------------------------------------
def format_image_results(rows: Sequence[dict[str, Any]], metric: str = "mse") -> str:
    """Mean ``metric`` over images: one line per (model, sampler), one column per task setting."""
    table = pd.DataFrame(list(rows))
    if table.empty:
        return "(no rows)"
    table["run"] = table["model"] + " " + table["sampler"]
    table["setting"] = [f"{t} x{f:g}" if t == "sr" else f"nfe {n:g}" if t == "nfe" else f"{t} m {m:g}" for t, m, f, n
                        in zip(table["task"], table["measurements"], table["factor"], table["nfe"], strict=True)]
    order = list(dict.fromkeys(table["setting"]))
    pivot = table.pivot_table(index="run", columns="setting", values=metric, aggfunc="mean")
    pivot = pivot[[s for s in order if s in pivot.columns]]
    return f"mean {metric} over images\n" + pivot.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-")


def format_image_crossover(crossovers: Sequence[dict[str, Any]]) -> str:
    """The cross-over table: model, task, metric, outcome, the setting and the margin with its
    interval (``inconclusive``: the setting from which the means favour the ambient model)."""
    level = f"{crossovers[0].get('level', 0.95):.0%} CI" if crossovers else "CI"
    lines = [f"{'model':8s} {'task':4s} {'metric':6s} {'axis':>12s} {'outcome':12s} {'at':>6s} {'margin':>9s}  {level}"]
    for c in crossovers:
        head = f"{c['model']:8s} {c['task']:4s} {c['metric']:6s} {c['axis']:>12s} {c['outcome']:12s}"
        if c["outcome"] == "none":
            lines.append(f"{head} {'-':>6s} {'-':>9s}  -")
        else:
            lines.append(f"{head} {c['setting']:>6g} {c['margin']:9.4g}  [{c['ci_low']:.4g}, {c['ci_high']:.4g}]")
    return "\n".join(lines)


IMAGE_STUDY = Study(
    name="images", config=ImageEvaluateConfig, cell=ImageCell.from_dict, columns=TABLE_COLUMNS, paths=("images",),
    check_data=count_test_images, plan=plan, evaluate_cell=evaluate_image_cell,
    describe=lambda cell: f"{cell.label} {cell.task} {cell.setting} steps {cell.steps}",
    sort_key=lambda r: (r["model"], TASKS.index(r["task"]), r["measurements"] or 0, r["factor"] or 0, r["steps"],
                        r["image"]),
    crossovers=find_crossovers, report=report, score="mse")

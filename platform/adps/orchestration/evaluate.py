"""The study's evaluation: every model x R_inf x test slice, metrics, figures and the cross-over.

``adps evaluate`` / ``jobs/evaluate.py`` call :func:`evaluate`. The grid is cut into *cells*
(one model, one sampler, one R_inf, a chunk of ``slices_per_task`` test slices), each a Ray
task (one GPU each with ``use_gpu``). A cell writes its rows (and the reconstruction of the
first test slice, for the figure) to ``<output>/cells/`` atomically, so an interrupted
evaluation, run again, computes only the cells that are missing. At the end the driver
gathers every cell into one tidy table and logs to one MLflow run:

* ``results.parquet`` / ``results.csv``: model, method, sampler, r_train, r_inf, slice,
  nrmse, psnr, ssim, lpips, seconds (one row per slice);
* figures: NRMSE / PSNR / SSIM against R_inf per model with the spread over slices (paper
  figures 7-9) and a reconstruction grid with x10 difference images (figure 6);
* the cross-over of each ambient model against the fully sampled reference (FS-DPS, by
  default ``edm_r1``) per metric, as ``crossover.csv`` and as metrics
  ``crossover_r.<model>.<metric>`` (plus ``crossover_margin.`` / ``_ci_low.`` / ``_ci_high.``).

The same files also go to ``<output>/report/``. A cell's key holds its model (the registry
version it was pinned to, or its folder) and its sampler settings, so a retrained model or
other settings get new cells rather than old results.

The natural-image evaluation (:mod:`adps.orchestration.image_evaluate`) shares the cell
machinery: :func:`run_cells` (resume + Ray fan-out), :func:`cell_path` / :func:`done_rows` and
:func:`publish_report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adps.config import ConfigFile
from adps.data import storage

__all__ = [
    "Cell", "EvaluateConfig", "evaluate", "evaluate_cell", "format_crossover", "format_results", "plan_cells",
    "model_version_of", "network_for_sampler", "reconstruct_batch", "stack_batch", "tuned_settings", "TUNED_TAG",
    "cell_path", "done_rows", "publish_report", "run_cells",
]

METRICS = ("nrmse", "psnr", "ssim", "lpips")
TABLE_COLUMNS = ("model", "method", "sampler", "r_train", "r_inf", "slice", *METRICS, "seconds", "steps", "guidance")


@dataclass(frozen=True)
class EvaluateConfig(ConfigFile):
    """Everything an evaluation needs; unknown keys are refused by name."""

    dataset: str = ""
    """Prepared dataset (folder or ``s3://``); its ``test`` split is reconstructed."""
    models: tuple[str, ...] = ()
    """Models to evaluate: ``models:/<name>@<alias>`` / ``models:/<name>/<version>``, a bare
    registered name (``adps-ambient-r4`` = its newest version), ``runs:/<id>/model``, a local
    model folder, or ``l1`` (L1-wavelet CS, no network)."""
    accelerations: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0)
    """R_inf: the test accelerations (each must be prepared in the dataset)."""
    reference: str = "edm_r1"
    """The fully sampled model the cross-over is measured against (``<method>_r<R>``)."""
    slices: int = 0
    """Test slices to reconstruct (the first ones; 0 = all)."""
    slices_per_task: int = 4
    """Slices per Ray task, reconstructed as one batch."""
    steps: int = 0
    """Sampler steps for every model; 0 = the model's best Ray Tune result when there is one,
    else the sampler's METHOD.md default (500 for A-DPS / DPS)."""
    guidance: float = 0.0
    """A-DPS / DPS step size l_ss for every model; 0 = the model's best Ray Tune result when
    there is one, else METHOD.md's 1.0."""
    use_tuned: bool = True
    """Read the settings of ``adps tune`` searches from the registered model version's tags
    (:func:`tuned_settings`) for settings left at 0."""
    a_os: bool = True
    """Also evaluate A-OS for ambient models, at R_inf = R_train only (its valid case)."""
    lpips: bool = True
    """Compute LPIPS (needs the AlexNet weights locally; see adps.perceptual)."""
    lpips_weights: str = ""
    """AlexNet weights file for LPIPS; empty = found on the driver as adps.perceptual.find_weights
    does (``$ADPS_WEIGHTS_DIR``, then the torch hub cache) and passed to every task."""
    seed: int = 0
    """Seeds the samplers' noise and the A-DPS training masks, per slice."""
    use_gpu: bool = False
    """One GPU per task."""
    amp: str = ""
    """``bf16``: the network in bf16 autocast (GPU only)."""
    compile_mode: str = ""
    """``torch.compile`` the network of the iterative samplers (A-DPS, DPS, ALD) in each task:
    ``""`` (off), ``default``, ``reduce-overhead``, ``max-autotune`` or
    ``max-autotune-no-cudagraphs``. On one H200, A-DPS at 16 slices per call took 12.2 s/slice
    compiled against 21.6 s/slice eager at 8 (the most that fit eager); the compilation takes
    about 2 minutes per task shape, so it pays with ``use_gpu``, 500 steps and a
    ``slices_per_task`` of 8-16. One-call samplers (A-OS, unrolled) are never compiled."""
    output: str = ""
    """Folder or ``s3://`` prefix for the cells and the table (default ``.adps/eval/<run_name>``)."""
    run_name: str = "evaluation"
    """MLflow run name; re-running with the same name and output resumes."""
    tracking_uri: str = ""
    """MLflow tracking URI (default as for training: ``$MLFLOW_TRACKING_URI``, else
    ``.adps/mlflow.db``)."""
    experiment: str = "adps-eval"
    n_boot: int = 2000
    """Bootstrap resamples of the cross-over's confidence interval."""

    def validate(self) -> None:
        """Check values that need no I/O; names the key at fault."""
        if not self.dataset:
            raise ValueError("config key 'dataset' is empty: give the prepared dataset (folder or s3://)")
        if not self.models:
            raise ValueError("config key 'models' is empty: name at least one model (e.g. adps-ambient-r4)")
        if not self.accelerations or any(r < 1 for r in self.accelerations):
            raise ValueError(f"config key 'accelerations' must be values >= 1, got {list(self.accelerations)}")
        for key in ("slices", "steps", "n_boot", "guidance"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        if self.slices_per_task < 1:
            raise ValueError(f"config key 'slices_per_task' must be >= 1, got {self.slices_per_task}")
        if self.amp not in ("", "bf16"):
            raise ValueError(f"config key 'amp' must be '' or 'bf16', got {self.amp!r}")
        from adps.nn.train_config import COMPILE_MODES

        if self.compile_mode not in ("", *COMPILE_MODES):
            raise ValueError(f"config key 'compile_mode' must be '' (eager) or one of {', '.join(COMPILE_MODES)}, "
                             f"got {self.compile_mode!r}")

    @property
    def resolved_output(self) -> str:
        return self.output or str(Path(".adps") / "eval" / self.run_name)


# Models --------------------------------------------------------------------------------------
def model_uri(entry: str) -> str:
    """A ``models`` entry as something :func:`adps.orchestration.registry.load_model` opens."""
    if entry == "l1" or "://" in entry or entry.startswith(("models:/", "runs:/")) or Path(entry).exists():
        return entry
    if entry.startswith("adps-"):
        return f"models:/{entry}@latest"
    raise ValueError(f"config key 'models': {entry!r} is neither a models:/ or runs:/ URI, a registered adps-* "
                     "name, an existing folder, nor 'l1'")


def load_for_evaluation(
    uri: str, device: str, tracking_uri: str | None = None
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """The network and its config (``l1``: no network, method ``l1``)."""
    if uri == "l1":
        return None, {"method": "l1", "R": 1.0}
    from adps.orchestration.registry import load_model

    model, config = load_model(uri, device=device, tracking_uri=tracking_uri, with_config=True)
    return model, config


def model_label(config: dict[str, Any]) -> str:
    """``<method>_r<R_train>`` (``l1`` for L1-wavelet CS)."""
    if config["method"] == "l1":
        return "l1"
    return f"{config['method']}_r{float(config['R']):g}"


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
    """Other tuned sampler settings (``sigma_max``, ``churn``, ``step_scale``, ...), sorted."""

    @property
    def key(self) -> str:
        # The settings are part of the key: a re-run with other settings computes new cells.
        # So is the model itself (its pinned registry version or folder): a retrained model
        # registered under the same name gets new cells, not the old model's results.
        extra = "".join(f"_{name}{value:g}" for name, value in self.options)
        model = hashlib.sha1(self.model.encode()).hexdigest()[:8]
        return (f"{self.label}-{model}__{self.sampler}__R{self.r_inf:g}__s{self.steps}_g{self.guidance:g}{extra}__"
                f"{self.indices[0]:05d}-{self.indices[-1]:05d}")


TUNED_TAG = "adps.tuned.r{r_inf:g}.{key}"
"""Model-version tags an ``adps tune`` search leaves (``adps.tuned.r8.guidance``, ``.steps``)."""


def model_version_of(uri: str, tracking_uri: str) -> Any:
    """The registered model version a ``models:/name@alias`` / ``models:/name/N`` URI names, or
    None for any other model entry."""
    from mlflow import MlflowClient

    if not uri.startswith("models:/"):
        return None
    client = MlflowClient(tracking_uri)
    name, _, rest = uri[len("models:/"):].partition("@")
    if rest:
        return client.get_model_version_by_alias(name, rest)
    name, _, version = name.partition("/")
    return client.get_model_version(name, version) if version else None


def tuned_settings(tags: dict[str, str], r_inf: float) -> dict[str, float]:
    """The sampler settings a Ray Tune search at ``r_inf`` stored on the model version
    (:data:`TUNED_TAG`: ``guidance``, ``steps`` and any other searched setting), or ``{}``."""
    prefix = TUNED_TAG.format(r_inf=r_inf, key="")
    found = {}
    for tag, value in tags.items():
        key = tag[len(prefix):]
        if tag.startswith(prefix) and key != "run_id":
            found[key] = float(value)
    return found


def _settings(config: EvaluateConfig, tags: dict[str, str], r_inf: float) -> tuple[int, float, dict[str, float]]:
    """``(steps, guidance, options)``: explicit config values, else tuned at ``r_inf``, else
    METHOD.md's; ``options`` = the other tuned settings (used only with the tuned guidance)."""
    tuned = tuned_settings(tags, r_inf) if config.use_tuned else {}
    tuned_steps, tuned_guidance = tuned.pop("steps", 0), tuned.pop("guidance", 1.0)
    steps = config.steps or int(tuned_steps)
    guidance = config.guidance or float(tuned_guidance)
    # Settings searched together belong together: an explicit guidance drops the rest of the tuned set.
    return steps, guidance, {} if config.guidance else tuned


def plan_cells(config: EvaluateConfig, models: Sequence[tuple[str, dict[str, Any]]], n_test: int) -> list[Cell]:
    """Every cell of the grid: models x samplers x R_inf x slice chunks, each with its model's
    sampler settings (:func:`_settings`)."""
    from adps.nn.samplers import DEFAULT_SAMPLER

    count = min(n_test, config.slices) if config.slices else n_test
    chunks = [tuple(range(i, min(i + config.slices_per_task, count))) for i in range(0, count, config.slices_per_task)]
    cells = []
    for uri, model_config in models:
        tags = model_config.get("_version_tags", {})
        method = model_config["method"]
        r_train = float(model_config["R"])
        samplers = [DEFAULT_SAMPLER[method]]
        for r_inf in config.accelerations:
            runs = list(samplers)
            if method == "ambient" and config.a_os and float(r_inf) == r_train:
                runs.append("a_os")
            steps, guidance, options = _settings(config, tags, float(r_inf))
            for sampler in runs:
                for chunk in chunks:
                    # The tuned settings belong to the model's own sampler, not to the extra A-OS.
                    extra = tuple(sorted(options.items())) if sampler == DEFAULT_SAMPLER[method] else ()
                    cells.append(Cell(uri, model_label(model_config), method, sampler, r_train, float(r_inf), chunk,
                                      steps=steps, guidance=guidance, options=extra))
    return cells


def cell_path(output: str, key: str, suffix: str) -> str:
    """Where a cell's file lives: ``<output>/cells/<key><suffix>`` (folder or ``s3://``)."""
    return storage.join(output, "cells", key + suffix)


def done_rows(output: str, key: str) -> list[dict[str, Any]] | None:
    """The rows of a finished cell (its ``<key>.json``), or None when it has not finished."""
    path = cell_path(output, key, ".json")
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def _cell_path(config: EvaluateConfig, cell: Cell, suffix: str) -> str:
    return cell_path(config.resolved_output, cell.key, suffix)


# Samplers that call the network once per step, hundreds of times: the ones worth compiling.
ITERATIVE_SAMPLERS = ("a_dps", "dps", "ald")


def network_for_sampler(model: torch.nn.Module | None, sampler: str, compile_mode: str) -> torch.nn.Module | None:
    """The network a cell's sampler calls: ``model`` itself, or ``torch.compile(model)`` with
    static shapes (a task's batch never changes) for an iterative sampler when ``compile_mode``
    is set. The samplers freeze the weights while they run, so the compiled backward of A-DPS /
    DPS computes the gradient to ``x`` alone."""
    if model is None or not compile_mode or sampler not in ITERATIVE_SAMPLERS:
        return model
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=False)


def stack_batch(items: Sequence[dict[str, Any]], device: str | torch.device) -> dict[str, Any]:
    """Dataset items as one batch on ``device`` (k-space, maps, mask, reference) with their
    ``slice_ids``."""
    batch: dict[str, Any] = {key: torch.stack([item[key] for item in items]).to(device)
                             for key in ("kspace", "maps", "mask", "reference")}
    batch["slice_ids"] = [int(item["slice_id"]) for item in items]
    return batch


def reconstruct_batch(
    sampler: str, model: Any, batch: dict[str, Any], *, r_train: float, seed: int, acs: int | None,
    amp: str = "", steps: int | None = None, guidance: float | None = None, **options: float,
) -> torch.Tensor:
    """Reconstruct a :func:`stack_batch` batch from its masked k-space with ``sampler``
    (:func:`~adps.nn.samplers.run_sampler`). The noise is seeded by ``seed`` and the first
    slice id, so an evaluation cell and a Ray Tune trial on the same slices draw the same noise."""
    from adps.mri import SenseOperator
    from adps.nn.samplers import run_sampler

    mask = batch["mask"]
    y = batch["kspace"] * mask[:, None, None, :]
    operator = SenseOperator(batch["maps"], mask)
    slice_ids = batch["slice_ids"]
    generator = torch.Generator(device=y.device).manual_seed(seed * 1_000_003 + slice_ids[0])
    return run_sampler(sampler, model, y, operator, generator=generator, steps=steps, guidance=guidance,
                       train_acceleration=r_train, slice_ids=slice_ids, seed=seed, acs=acs, amp=amp, **options)


def evaluate_cell(config: EvaluateConfig, cell: Cell, *, device: str = "cpu") -> list[dict[str, Any]]:
    """Reconstruct and measure one cell; writes ``<key>.json`` (rows) and ``<key>.npz`` (the
    first slice's reconstruction and reference) and returns the rows."""
    from adps.data.dataset import PreparedSliceDataset
    from adps.metrics import image_metrics

    model, _ = load_for_evaluation(cell.model, device, config.tracking_uri)
    model = network_for_sampler(model, cell.sampler, config.compile_mode)
    from adps.data.shards import read_manifest

    # A_tr masks like the training masks: the ACS width the dataset was prepared with.
    acs = read_manifest(config.dataset)["config"].get("acs")
    dataset = PreparedSliceDataset(config.dataset, "test", acceleration=cell.r_inf)
    try:
        items = [dataset[i] for i in cell.indices]
    finally:
        dataset.close()
    batch = stack_batch(items, device)
    slice_ids = batch["slice_ids"]
    started = time.perf_counter()
    image = reconstruct_batch(
        cell.sampler, model, batch, r_train=cell.r_train, seed=config.seed, acs=acs, amp=config.amp,
        steps=cell.steps or None, guidance=cell.guidance, **dict(cell.options),
    )
    seconds = (time.perf_counter() - started) / len(items)
    reference = batch["reference"]
    scores = {key: value.tolist() for key, value in image_metrics(reference, image).items()}
    if config.lpips:
        from adps.perceptual import lpips_distance

        scores["lpips"] = lpips_distance(reference, image, weights=config.lpips_weights or None, device=device).tolist()
    rows = []
    for i, slice_id in enumerate(slice_ids):
        row = {"model": cell.label, "method": cell.method, "sampler": cell.sampler, "r_train": cell.r_train,
               "r_inf": cell.r_inf, "slice": slice_id, "seconds": seconds, "steps": cell.steps,
               "guidance": cell.guidance}
        row.update({metric: float(scores[metric][i]) if metric in scores else math.nan for metric in METRICS})
        rows.append(row)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=image[0].cpu().numpy(), reference=reference[0].cpu().numpy(),
                        slice=np.int64(slice_ids[0]))
    storage.write_bytes_atomic(_cell_path(config, cell, ".npz"), buffer.getvalue())
    # The rows last: a cell counts as done only when its JSON exists.
    storage.write_bytes_atomic(_cell_path(config, cell, ".json"), json.dumps(rows).encode())
    return rows


# The whole evaluation ------------------------------------------------------------------------
def _resolve(config: EvaluateConfig) -> list[tuple[str, dict[str, Any]]]:
    """Every model's URI and config, loaded once on the driver (fails before any task starts)."""
    resolved = []
    for entry in config.models:
        uri = model_uri(entry)
        _, model_config = load_for_evaluation(uri, "cpu", config.tracking_uri)
        version = model_version_of(uri, config.tracking_uri)
        if version is not None:
            # Pinned: every task loads this version, even if another is registered meanwhile.
            uri = f"models:/{version.name}/{version.version}"
        resolved.append((uri, {**model_config, "_version_tags": dict(version.tags) if version is not None else {}}))
    return resolved


def evaluate(config: EvaluateConfig, *, ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the evaluation; returns ``{"rows", "crossover", "run_id", "output"}``."""
    from adps.crossover import crossover_table
    from adps.data.dataset import PreparedSliceDataset
    from adps.data.shards import read_manifest
    from adps.orchestration.tracking import resolve_tracking_uri

    config.validate()
    # Resolved once on the driver: the tasks run in other folders (and models:/ URIs need it).
    config = config.replace(tracking_uri=resolve_tracking_uri(config.tracking_uri))
    if "://" not in config.resolved_output:
        config = config.replace(output=str(Path(config.resolved_output).resolve()))
    prepared = [float(r) for r in read_manifest(config.dataset)["config"]["accelerations"]]
    missing = [r for r in config.accelerations if float(r) not in prepared]
    if missing:
        raise ValueError(f"config key 'accelerations': R_inf {', '.join(f'{r:g}' for r in missing)} not prepared in "
                         f"{config.dataset} (it has {', '.join(f'{r:g}' for r in prepared)})")
    if config.lpips:
        from adps.perceptual import find_weights

        # A missing weights file fails here, naming it, not in every task.
        config = config.replace(lpips_weights=str(find_weights("alexnet", config.lpips_weights or None)))
    models = _resolve(config)
    dataset = PreparedSliceDataset(config.dataset, "test", acceleration=config.accelerations[0])
    n_test = len(dataset)
    dataset.close()
    cells = plan_cells(config, models, n_test)
    if progress:
        # One line per setting that came from a Ray Tune search, one for all the others.
        plain = 0
        for _, model_config in models:
            for r_inf in config.accelerations:
                tags = model_config["_version_tags"]
                if not (config.use_tuned and tuned_settings(tags, float(r_inf))):
                    plain += 1
                    continue
                steps, guidance, options = _settings(config, tags, float(r_inf))
                extra = "".join(f", {name} {value:g}" for name, value in sorted(options.items()))
                print(f"adps evaluate: {model_label(model_config)} at R_inf {r_inf:g}: steps {steps or 'default'}, "
                      f"guidance {guidance:g}{extra} (tuned)", flush=True)
        if plain:
            steps = f"steps {config.steps} (config)" if config.steps else "the sampler's default steps"
            guidance = f"guidance {config.guidance:g} (config)" if config.guidance else "guidance 1 (default)"
            print(f"adps evaluate: {plain} other model x R_inf pair(s): {steps}, {guidance}", flush=True)
    rows = run_cells(_cell_task, config.to_dict(), cells, output=config.resolved_output, use_gpu=config.use_gpu,
                     ray_address=ray_address, progress=progress,
                     describe=lambda cell: f"{cell.label} {cell.sampler} R_inf {cell.r_inf:g}")
    rows.sort(key=lambda r: (r["model"], r["sampler"], r["r_inf"], r["slice"]))
    ambient = sorted({r["model"] for r in rows if r["method"] == "ambient"})
    compared = [r for r in rows if r["sampler"] in ("a_dps", "dps", "ald", "l1_wavelet", "unrolled")]
    crossovers = crossover_table(compared, ambient, config.reference, metrics=("nrmse", "psnr", "ssim"),
                                 n_boot=config.n_boot, seed=config.seed) if config.reference in {r["model"] for r in rows} else []
    run_id = _log_to_mlflow(config, rows, crossovers, cells)
    return {"rows": rows, "crossover": crossovers, "run_id": run_id, "output": config.resolved_output}


def run_cells(
    task: Callable[[dict[str, Any], dict[str, Any]], list[dict[str, Any]]],
    config: dict[str, Any],
    cells: Sequence[Any],
    *,
    output: str,
    use_gpu: bool,
    ray_address: str | None = None,
    progress: bool = True,
    describe: Callable[[Any], str] = str,
    name: str = "adps evaluate",
) -> list[dict[str, Any]]:
    """The rows of every cell: those already done read back from ``<output>/cells/`` (resume),
    the others computed as Ray tasks ``task(config, dataclasses.asdict(cell))`` (one CPU each,
    or one GPU with ``use_gpu``), gathered as they finish.

    ``cells`` are dataclasses with a ``key`` (their file name); ``task`` must write
    ``<key>.json`` last (:func:`done_rows`). A failed task raises here, naming it. Prints one
    line of counts and a progress bar (``describe(cell)`` names the last finished cell) unless
    ``progress`` is False.
    """
    import ray

    rows: list[dict[str, Any]] = []
    todo = []
    for cell in cells:
        done = done_rows(output, cell.key)
        if done is None:
            todo.append(cell)
        else:
            rows.extend(done)
    if progress:
        print(f"{name}: {len(cells)} cells ({len(cells) - len(todo)} done before, {len(todo)} to run) "
              f"-> {output}", flush=True)
    if not todo:
        return rows
    if not ray.is_initialized():
        ray.init(address=ray_address)
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
    remote = ray.remote(**resources)(task)
    from tqdm.auto import tqdm

    pending = {remote.remote(config, dataclasses.asdict(cell)): cell for cell in todo}
    with tqdm(total=len(todo), desc=name, unit="cell", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            rows.extend(ray.get(ready[0]))  # a failed cell raises here, naming its task
            bar.set_postfix_str(describe(cell))
            bar.update(1)
    return rows


def _cell_task(config: dict[str, Any], cell: dict[str, Any]) -> list[dict[str, Any]]:
    config_obj = EvaluateConfig.from_dict(config)
    cell_obj = Cell(**{**cell, "indices": tuple(cell["indices"]),
                       "options": tuple((name, float(value)) for name, value in cell["options"])})
    torch.set_num_threads(1)
    device = "cuda" if config_obj.use_gpu and torch.cuda.is_available() else "cpu"
    return evaluate_cell(config_obj, cell_obj, device=device)


def publish_report(log: Any, folder: Path, output: str) -> None:
    """Every file of ``folder`` as an artifact of ``log``'s MLflow run (a
    :class:`~adps.orchestration.tracking.RunLogger`) and, for a reader without MLflow at hand,
    under ``<output>/report/`` (each written atomically)."""
    for path in sorted(folder.iterdir()):
        log.client.log_artifact(log.run_id, str(path))
        storage.upload_file_atomic(path, storage.join(output, "report", path.name))


def _log_to_mlflow(config: EvaluateConfig, rows: list[dict[str, Any]], crossovers: list, cells: list[Cell]) -> str:
    import tempfile

    import pandas as pd

    from adps.orchestration.figures import metric_figure, reconstruction_grid
    from adps.orchestration.tracking import RunLogger, end_run, open_run

    tracking_uri = config.tracking_uri
    run_id, _ = open_run(tracking_uri, config.experiment, f"{config.resolved_output}#{config.run_name}", config.run_name,
                         config.to_dict())
    log = RunLogger(tracking_uri, run_id)
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    with tempfile.TemporaryDirectory(prefix="adps-eval-") as tmp:
        folder = Path(tmp)
        table.to_parquet(folder / "results.parquet", index=False)
        table.to_csv(folder / "results.csv", index=False)
        pd.DataFrame([c.as_row() for c in crossovers]).to_csv(folder / "crossover.csv", index=False)
        for metric in ("nrmse", "psnr", "ssim"):
            metric_figure(table, metric).savefig(folder / f"{metric}_vs_r.png", dpi=120, bbox_inches="tight")
        images = {}
        for cell in cells:
            if cell.indices[0] == 0:
                with storage.local_copy(_cell_path(config, cell, ".npz")) as path, np.load(path) as data:
                    images[(f"{cell.label} {cell.sampler}", cell.r_inf)] = (data["image"], data["reference"])
        if images:
            reconstruction_grid(images).savefig(folder / "reconstructions.png", dpi=120, bbox_inches="tight")
        publish_report(log, folder, config.resolved_output)
    metrics = {}
    for c in crossovers:
        key = f"{c.model}.{c.metric}"
        if c.crossover_r is not None:
            metrics.update({f"crossover_r.{key}": c.crossover_r, f"crossover_margin.{key}": c.margin,
                            f"crossover_ci_low.{key}": c.ci_low, f"crossover_ci_high.{key}": c.ci_high})
    if metrics:
        log.log_metrics(metrics, 0)
    log.set_tags({"adps.crossover_none": ",".join(f"{c.model}.{c.metric}" for c in crossovers if c.crossover_r is None)})
    end_run(tracking_uri, run_id, "FINISHED")
    return run_id


def format_results(rows: Sequence[dict[str, Any]], metric: str = "nrmse") -> str:
    """Mean ``metric`` over slices: one line per (model, sampler), one column per R_inf."""
    import pandas as pd

    table = pd.DataFrame(list(rows))
    if table.empty:
        return "(no rows)"
    table["run"] = table["model"] + " " + table["sampler"]
    pivot = table.pivot_table(index="run", columns="r_inf", values=metric, aggfunc="mean")
    pivot.columns = [f"R={r:g}" for r in pivot.columns]
    return f"mean {metric} over slices\n" + pivot.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")


def format_crossover(crossovers: Sequence[Any]) -> str:
    """The cross-over table: model, metric, R_inf, margin and its confidence interval."""
    lines = [f"{'model':14s} {'metric':6s} {'R_inf':>5s} {'margin':>9s}  95% CI"]
    for c in crossovers:
        if c.crossover_r is None:
            lines.append(f"{c.model:14s} {c.metric:6s} {'none':>5s} {'-':>9s}  -")
        else:
            lines.append(f"{c.model:14s} {c.metric:6s} {c.crossover_r:5g} {c.margin:9.4g}  [{c.ci_low:.4g}, {c.ci_high:.4g}]")
    return "\n".join(lines)

"""The evaluation of both studies: one driver, each study's own part in its module.

``adps evaluate`` / ``jobs/evaluate.py`` call :func:`evaluate` with an
:class:`~adps.orchestration.study_mri.EvaluateConfig` (the MRI study: models x R_inf x test slices,
docs/evaluation.md) or an :class:`~adps.orchestration.study_images.ImageEvaluateConfig` (the natural-image
study: models x tasks x settings x test images, docs/natural_images.md). The config's type picks the
:class:`~adps.orchestration.cells.Study`; the driver does what both share:

1. resolve the tracking URI, the output folder and the LPIPS weights once on the driver (the tasks run in
   other folders; a missing file fails here, naming it, not in every task);
2. the study plans its cells (it pins the models first, so a wrong entry fails before any task starts);
3. :func:`~adps.orchestration.cells.run_cells` computes the cells not yet in ``<output>/cells/`` as Ray tasks
   (one GPU each with ``use_gpu``): an interrupted evaluation, run again, computes only what is missing;
4. the rows, sorted, go to one MLflow run (``results.parquet`` / ``results.csv``, the study's cross-over
   table and figures, its metrics and tags), and the same files to ``<output>/report/``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from adps.orchestration.cells import EvaluationConfig, Study, publish_report, run_cells
from adps.orchestration.registry import CHAMPION, set_champion
from adps.orchestration.study_images import (
    IMAGE_STUDY,
    ImageEvaluateConfig,
    format_image_crossover,
    format_image_results,
)
from adps.orchestration.study_mri import MRI_STUDY, EvaluateConfig, format_crossover, format_results
from adps.orchestration.tracking import RunLogger, end_run, open_run, refuse_job_scratch, resolve_tracking_uri
from adps.perceptual import find_weights

__all__ = ["STUDIES", "EvaluateConfig", "ImageEvaluateConfig", "evaluate", "format_crossover", "format_image_crossover",
           "format_image_results", "format_results", "study_of"]

STUDIES: dict[str, Study] = {study.name: study for study in (MRI_STUDY, IMAGE_STUDY)}
"""``adps evaluate --study`` -> the study."""


def study_of(config: EvaluationConfig) -> Study:
    """The study whose config ``config`` is."""
    for study in STUDIES.values():
        if type(config) is study.config:
            return study
    raise TypeError(f"not an evaluation config: {type(config).__name__} (expected one of "
                    f"{', '.join(study.config.__name__ for study in STUDIES.values())})")


def evaluate(config: EvaluationConfig, *, ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the evaluation ``config`` describes; returns ``{"rows", "crossover", "run_id", "output",
    "figures"}`` (the figures' file names) and what the study adds (MRI: ``denoising_check``)."""
    study = study_of(config)
    config.validate()
    n_test = study.check_data(config)
    refuse_job_scratch(config.resolved_output, "the evaluation's output",
                       "set output to durable storage (s3://..., or a folder outside the job)")
    resolved = {"tracking_uri": resolve_tracking_uri(config.tracking_uri), "output": config.resolved_output}
    if config.lpips:
        resolved["lpips_weights"] = str(find_weights("alexnet", config.lpips_weights or None))
    config = config.replace(**resolved).absolute_paths("output", *study.paths)
    cells, extra = study.plan(config, n_test, progress)
    rows = run_cells(_cell_task, {"study": study.name, **config.to_dict()}, cells, output=config.resolved_output,
                     use_gpu=config.use_gpu, ray_address=ray_address, progress=progress, describe=study.describe)
    rows.sort(key=study.sort_key)
    crossovers = study.crossovers(config, rows)
    run_id, figures = _log_to_mlflow(study, config, rows, crossovers, cells, extra)
    return {"rows": rows, "crossover": crossovers, "run_id": run_id, "output": config.resolved_output,
            "figures": figures, **extra}


def _cell_task(config: dict[str, Any], cell: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell in a Ray task: ``config`` is the evaluation's :meth:`to_dict` plus its ``study``."""
    study = STUDIES[config["study"]]
    config_obj = study.config.from_dict({key: value for key, value in config.items() if key != "study"})
    torch.set_num_threads(1)
    device = "cuda" if config_obj.use_gpu and torch.cuda.is_available() else "cpu"
    return study.evaluate_cell(config_obj, study.cell(cell), device=device)


def _log_to_mlflow(study: Study, config: EvaluationConfig, rows: list[dict[str, Any]], crossovers: list[Any],
                   cells: list[Any], extra: dict[str, Any]) -> tuple[str, list[str]]:
    """One MLflow run (found again by output and run name): the tables, the study's report and its metrics and
    tags; returns the run id and the figures' file names."""
    run_id, _ = open_run(config.tracking_uri, config.experiment, f"{config.resolved_output}#{config.run_name}",
                         config.run_name, config.to_dict())
    log = RunLogger(config.tracking_uri, run_id)
    table = pd.DataFrame(rows, columns=list(study.columns))
    with tempfile.TemporaryDirectory(prefix="adps-eval-") as tmp:
        folder = Path(tmp)
        table.to_parquet(folder / "results.parquet", index=False)
        table.to_csv(folder / "results.csv", index=False)
        metrics, tags = study.report(config, folder, table, crossovers, cells, extra)
        figures = sorted(path.name for path in folder.glob("*.png"))
        publish_report(log, folder, config.resolved_output)
    champion = crown_champion(study, config, rows, cells, run_id)
    if champion:
        tags = {**tags, "adps.champion": champion}
    if metrics:
        log.log_metrics(metrics, 0)
    log.set_tags(tags)
    end_run(config.tracking_uri, run_id, "FINISHED")
    return run_id, figures


def crown_champion(study: Study, config: EvaluationConfig, rows: list[dict[str, Any]], cells: list[Any],
                   run_id: str) -> str:
    """Point the alias ``@champion`` at the registered version that scored best here: the lowest mean
    ``study.score`` over its cells (its best sampler's), among the evaluated models that are registry versions
    (:func:`~adps.orchestration.registry.set_champion`). Returns ``models:/<name>/<version>`` ('' without)."""
    versions = {cell.label: cell.model for cell in cells if cell.model.startswith("models:/")}
    scores: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        value = row.get(study.score)
        if row["model"] in versions and value is not None and np.isfinite(value):
            scores.setdefault((row["model"], row.get("sampler", "")), []).append(float(value))
    if not scores:
        return ""
    best = min(scores, key=lambda key: float(np.mean(scores[key])))[0]
    set_champion(versions[best], list(versions.values()), config.tracking_uri, f"{config.run_name} (MLflow run {run_id})")
    print(f"adps evaluate: {versions[best]} is @{CHAMPION} (lowest mean {study.score}: {best})", flush=True)
    return versions[best]

"""The evaluation grid's machinery, shared by both studies' evaluations and the searches.

* :class:`EvaluationConfig` (the keys both evaluations share) and :class:`Study` (what differs between the MRI
  study, :mod:`~adps.orchestration.study_mri`, and the natural-image study, :mod:`~adps.orchestration.study_images`),
  which :func:`adps.orchestration.evaluate.evaluate` runs;
* cells: a cell is one Ray task of an evaluation grid (a model, a setting, a chunk of the test data);
  :func:`run_cells` computes the cells not yet done as Ray tasks and reads the others back from ``<output>/cells/``
  (:func:`cell_path`, :func:`done_rows`), so that re-running an evaluation resumes it; :func:`publish_report` puts
  the report files in MLflow and beside the cells;
* the MRI reconstruction of a batch of prepared slices (:func:`stack_batch`, :func:`reconstruct_batch`), the same
  for an evaluation cell and a Ray Tune trial, so that both draw the same noise for the same slices.

Ray is imported inside :func:`run_cells`, the one function that needs it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from adps.config import coerce_value
from adps.data import storage
from adps.mri import SenseOperator
from adps.nn.samplers import run_sampler
from adps.orchestration.tracking import RunConfig

__all__ = ["EvaluationConfig", "Study", "cell_path", "done_rows", "publish_report", "reconstruct_batch", "run_cells",
           "stack_batch"]


@dataclass(frozen=True)
class EvaluationConfig(RunConfig):
    """The keys both evaluations share; :class:`~adps.orchestration.study_mri.EvaluateConfig` and
    :class:`~adps.orchestration.study_images.ImageEvaluateConfig` add their study's."""

    models: tuple[str, ...] = ()
    """The models, as :func:`adps.orchestration.registry.model_uri` takes them: ``models:/<name>@<alias>`` or
    ``/<version>``, a bare registered name (its newest version), ``runs:/<id>/model`` or a local model folder."""
    use_gpu: bool = False
    """One GPU per task."""
    output: str = ""
    """Folder or ``s3://`` prefix for the cells and the report (default ``.adps/eval/<run_name>``)."""
    run_name: str = "evaluation"
    """MLflow run name; re-running with the same name and output resumes."""
    lpips: bool = True
    """Compute LPIPS (needs the AlexNet weights locally; see adps.perceptual)."""
    lpips_weights: str = ""
    """AlexNet weights file for LPIPS; empty = found on the driver as adps.perceptual.find_weights does
    (``$ADPS_WEIGHTS_DIR``, then the torch hub cache) and passed to every task."""
    n_boot: int = 2000
    """Bootstrap resamples of the cross-over's confidence interval."""
    crossover_level: float = 0.95
    """Confidence level of the cross-over's intervals: a cross-over needs the interval of every paired difference from
    its setting on to exclude 0 (:func:`adps.crossover.crossover`)."""
    sampler_settings: str = "paper"
    """The diffusion models' sampler settings, recorded per row (``settings``): ``paper`` (the protocol), ``best`` (the
    best-quality settings an ``adps tune`` search left on the model version), ``fastest`` (MRI: the search's fastest
    within its tolerance of the protocol's quality). The older key ``use_tuned``: true = best, false = paper."""

    SAMPLER_SETTINGS: ClassVar[tuple[str, ...]] = ("paper", "best", "fastest")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        values = dict(values)
        if "use_tuned" in values:  # the older on / off form of sampler_settings
            if "sampler_settings" in values:
                raise ValueError("config keys 'use_tuned' and 'sampler_settings' are one setting; give sampler_settings")
            values["sampler_settings"] = "best" if coerce_value("use_tuned", values.pop("use_tuned"), bool) else "paper"
        return super().from_dict(values)

    def validate(self) -> None:
        """Check values that need no I/O; names the key at fault."""
        super().validate()
        if self.sampler_settings not in self.SAMPLER_SETTINGS:
            raise ValueError(f"config key 'sampler_settings' must be one of {', '.join(self.SAMPLER_SETTINGS)}, got "
                             f"{self.sampler_settings!r}")
        if not self.models:
            raise ValueError("config key 'models' is empty: name at least one model (e.g. adps-ambient-r4)")
        if self.n_boot < 1:
            raise ValueError(f"config key 'n_boot' must be >= 1, got {self.n_boot}")
        if not 0 < self.crossover_level < 1:
            raise ValueError(f"config key 'crossover_level' must be in (0, 1), got {self.crossover_level}")

    @property
    def resolved_output(self) -> str:
        return self.output or str(Path(".adps") / "eval" / self.run_name)


@dataclass(frozen=True)
class Study:
    """What one study's evaluation brings to :func:`adps.orchestration.evaluate.evaluate`; the driver does the rest
    (paths, Ray tasks, resume, the MLflow run and the report)."""

    name: str
    """``mri`` or ``images`` (``adps evaluate --study``)."""
    config: type[EvaluationConfig]
    cell: Callable[[dict[str, Any]], Any]
    """A cell from its ``dataclasses.asdict`` form (what a Ray task receives)."""
    columns: tuple[str, ...]
    """The results table's columns."""
    paths: tuple[str, ...]
    """Config keys naming local folders or files, made absolute on the driver (a Ray task runs in another folder)."""
    check_data: Callable[[Any], int]
    """``config -> the number of test items``: opens the test data and refuses what the config asks of it that it
    lacks, naming the key (before the models load or the LPIPS weights are looked for)."""
    plan: Callable[[Any, int, bool], tuple[list[Any], dict[str, Any]]]
    """``(config, n_test, progress) -> (cells, extra)``: resolves the models (failing before any task starts), plans
    the cells and runs the checks before them; ``extra`` goes to ``report`` and into the result."""
    evaluate_cell: Callable[..., list[dict[str, Any]]]
    """``(config, cell, *, device) -> rows``; writes the cell's files, ``<key>.json`` last."""
    describe: Callable[[Any], str]
    """A cell in a few words, for the progress bar."""
    sort_key: Callable[[dict[str, Any]], Any]
    crossovers: Callable[[Any, list[dict[str, Any]]], list[Any]]
    report: Callable[..., tuple[dict[str, float], dict[str, str]]]
    """``(config, folder, table, crossovers, cells, extra) -> (metrics, tags)``: writes the study's figures and tables
    into ``folder`` (beside ``results.*``)."""
    score: str
    """The metric (lower is better) whose mean over its cells picks the evaluation's champion."""


def cell_path(output: str, key: str, suffix: str) -> str:
    """Where a cell's file lives: ``<output>/cells/<key><suffix>`` (folder or ``s3://``)."""
    return storage.join(output, "cells", key + suffix)


def done_rows(output: str, key: str) -> list[dict[str, Any]] | None:
    """The rows of a finished cell (its ``<key>.json``), or None when it has not finished."""
    path = cell_path(output, key, ".json")
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def run_cells(task: Callable[[dict[str, Any], dict[str, Any]], list[dict[str, Any]]], config: dict[str, Any],
              cells: Sequence[Any], *, output: str, use_gpu: bool, ray_address: str | None = None,
              progress: bool = True, describe: Callable[[Any], str] = str,
              name: str = "adps evaluate") -> list[dict[str, Any]]:
    """The rows of every cell: those already done read back from ``<output>/cells/`` (resume), the others computed as
    Ray tasks ``task(config, dataclasses.asdict(cell))`` (one CPU each, or one GPU with ``use_gpu``), gathered as they
    finish. ``cells`` are dataclasses with a ``key`` (their file name); ``task`` must write ``<key>.json`` last
    (:func:`done_rows`). A failed task raises here, naming it. Prints one line of counts and a progress bar
    (``describe(cell)`` names the last finished cell) unless ``progress`` is False."""
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


def publish_report(log: Any, folder: Path, output: str) -> None:
    """The files of ``folder`` as artifacts of ``log``'s MLflow run (a :class:`~adps.orchestration.tracking.RunLogger`)
    and, for a reader without MLflow at hand, under ``<output>/report/`` (each written atomically)."""
    for path in sorted(folder.iterdir()):
        log.client.log_artifact(log.run_id, str(path))
        storage.upload_file_atomic(path, storage.join(output, "report", path.name))


def stack_batch(items: Sequence[dict[str, Any]], device: str | torch.device) -> dict[str, Any]:
    """Dataset items as one batch on ``device`` (k-space, maps, mask, reference) with their ``slice_ids``."""
    batch: dict[str, Any] = {key: torch.stack([item[key] for item in items]).to(device)
                             for key in ("kspace", "maps", "mask", "reference")}
    batch["slice_ids"] = [int(item["slice_id"]) for item in items]
    return batch


def reconstruct_batch(sampler: str, model: Any, batch: dict[str, Any], *, r_train: float, seed: int, acs: int | None,
                      amp: str = "", steps: int | None = None, guidance: float | None = None,
                      **options: float) -> torch.Tensor:
    """Reconstruct a :func:`stack_batch` batch from its masked k-space with ``sampler``
    (:func:`~adps.nn.samplers.run_sampler`). The noise is seeded by ``seed`` and the first slice id, so an evaluation
    cell and a Ray Tune trial on the same slices draw the same noise."""
    mask = batch["mask"]
    y = batch["kspace"] * mask[:, None, None, :]
    operator = SenseOperator(batch["maps"], mask)
    slice_ids = batch["slice_ids"]
    generator = torch.Generator(device=y.device).manual_seed(seed * 1_000_003 + slice_ids[0])
    return run_sampler(sampler, model, y, operator, generator=generator, steps=steps, guidance=guidance,
                       r_train=r_train, slice_ids=slice_ids, seed=seed, acs=acs, amp=amp, **options)

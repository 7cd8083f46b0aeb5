"""Ray Tune search of the posterior samplers' settings (guidance, steps, ...) per model and R_inf.

``adps tune`` / ``jobs/tune_dps.py`` call :func:`tune_search`: a Ray Tune ``Tuner`` with Optuna's TPE (seeded) and ASHA
early stopping over the trials of :mod:`adps.orchestration.tune_trial` (each reconstructs the same validation slices
with the same noise and reports running means per batch). Running a search of the same name again restores it. Results
go to MLflow (a parent run, one child run per trial, ``best.json``, the figure ``objective_vs_steps.png``) and, for a
``models:/`` URI, become tags of that model version (:data:`~adps.orchestration.registry.TUNED_TAG`,
:data:`~adps.orchestration.registry.IMAGE_TUNED_TAG` for image models). docs/tuning.md and docs/natural_images.md
describe the search, its space files, its results and its tags.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from adps.data import storage
from adps.data.dataset import PreparedSliceDataset
from adps.data.preprocess import COMPRESSED_SPLITS
from adps.data.shards import read_manifest
from adps.images import ImageDataset
from adps.nn.image_diffusion import IMAGE_SAMPLING
from adps.nn.samplers import METHOD_SAMPLERS, network_calls
from adps.orchestration.denoising_check import check_denoisers, format_denoising_check
from adps.orchestration.figures import LABELS, _pyplot
from adps.orchestration.registry import CLASSICAL, model_label, model_uri, pin_model_entry, tag_tuned_settings
from adps.orchestration.tracking import RunLogger, end_run, find_run, open_run, refuse_job_scratch, resolve_tracking_uri
from adps.orchestration.tune_config import SearchConfig, SearchSpace, load_space
from adps.orchestration.tune_trial import search_trial

__all__ = ["fastest_within", "pareto_front", "truncated_search_state", "tune_search"]


# The search ----------------------------------------------------------------------------------
def _progress_callback(progress: bool, total: int, metric: str, n_batches: int) -> Any:
    from ray.tune import Callback

    class TrialLog(Callback):
        """A progress bar over the trials and one line per ended trial (its settings, its objective and how many
        batches it reported before ASHA stopped it or it finished)."""

        def __init__(self) -> None:
            self._bar: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "_bar": None}  # the experiment state is pickled; a bar is not

        def setup(self, **info: Any) -> None:
            from tqdm.auto import tqdm

            if progress and self._bar is None:
                self._bar = tqdm(total=total, desc="adps tune", unit="trial")

        def _line(self, trial: Any, word: str) -> None:
            result = trial.last_result or {}
            settings = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in trial.config.items())
            batches = result.get("training_iteration", 0)
            if word == "finished" and batches < n_batches:
                word = "stopped early by ASHA"
            score = f"{metric} {result[metric]:.4g} after {batches}/{n_batches} batches" if metric in result else "no result"
            line = f"adps tune: trial {trial.trial_id} {word}: {score} ({settings})"
            if not progress:
                if word == "failed":  # a failure is always said
                    print(line, flush=True)
                return
            self.setup()  # a callback restored from the pickled experiment state has no bar yet
            self._bar.write(line)
            self._bar.update(1)
            if self._bar.n >= total:
                self._bar.close()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, "finished")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, "failed")

    return TrialLog()


def _max_concurrent(config: SearchConfig) -> int:
    import ray

    if config.max_concurrent:
        return config.max_concurrent
    resources = ray.cluster_resources()
    if config.gpus_per_trial > 0:
        return max(1, int(resources.get("GPU", 0) / config.gpus_per_trial))
    return max(1, int(resources.get("CPU", 1) / config.cpus_per_trial))


def _model_info(config: SearchConfig, space: SearchSpace) -> tuple[str, dict[str, Any]]:
    """The model's URI, pinned as by :func:`pin_model_entry`, and config; refuses a model the space cannot search."""
    if model_uri(config.model) in CLASSICAL:
        raise ValueError(f"config key 'model': {config.model} has no sampler settings to search")
    uri, _, model_config = pin_model_entry(config.model, config.tracking_uri)
    method = model_config.get("method")
    if method == "image" or space.sampler == "image":
        _check_image_model(config, space, model_config)
        return uri, model_config
    if config.task:
        raise ValueError(f"config key 'task': {config.task!r} is for natural-image models; model {config.model} "
                         f"has method {method!r} (an MRI search takes 'r_inf')")
    expected = METHOD_SAMPLERS.get(model_config["method"])
    if method == "ambient" and space.sampler == "a_os":
        # A-OS is in-distribution only where the acquisition is at the training acceleration.
        if float(config.r_inf) != float(model_config["r_train"]):
            raise ValueError(f"config key 'r_inf': A-OS is searched at R_inf = R_train only; model {config.model} "
                             f"was trained at R {float(model_config['r_train']):g}, r_inf is {config.r_inf:g}")
        return uri, model_config
    if expected != space.sampler:
        raise ValueError(f"{space.path}: key 'sampler': {space.family!r} ({space.sampler}) does not reconstruct with "
                         f"model {config.model} (method {model_config['method']}, sampler {expected})")
    return uri, model_config


def _check_image_model(config: SearchConfig, space: SearchSpace, model_config: dict[str, Any]) -> None:
    """An image search needs an image model, the ``image_dps`` space and a task."""
    method = model_config.get("method")
    if method != "image":
        raise ValueError(f"{space.path}: key 'sampler': {space.family!r} searches natural-image models; model "
                         f"{config.model} has method {method!r}")
    if space.sampler != "image":
        raise ValueError(f"{space.path}: key 'sampler': {space.family!r} ({space.sampler}) is an MRI sampler; model "
                         f"{config.model} is a natural-image model (method image): use sampler image_dps "
                         "(tune_spaces/image_dps.yaml)")
    if not config.task:
        raise ValueError(f"config key 'task' is empty: model {config.model} is a natural-image model; set task cs "
                         "(with measurements) or sr (with factor)")
    if "erasure_p" not in model_config:
        raise ValueError(f"config key 'model': the config of {config.model} has no 'erasure_p' (the training erasure "
                         "probability of an image model)")


def _image_resolution(config: SearchConfig, model_config: dict[str, Any]) -> int:
    """The search's image size: the config's, else the model's; they must agree when both are set."""
    trained = model_config.get("resolution")
    if config.resolution and trained is not None and int(trained) != config.resolution:
        raise ValueError(f"config key 'resolution': {config.resolution}, but {config.model} was trained on "
                         f"{int(trained)} x {int(trained)} images")
    resolution = config.resolution or (int(trained) if trained is not None else 0)
    if resolution < 1:
        raise ValueError(f"config key 'resolution' is 0 and the config of {config.model} has no 'resolution': "
                         "set it to the model's image size")
    if config.task == "sr" and resolution % config.factor:
        raise ValueError(f"config key 'factor': {config.factor} does not divide the resolution {resolution}")
    return resolution


def _search_plan(config: SearchConfig, space: SearchSpace, model_config: dict[str, Any]) -> dict[str, Any]:
    """What differs between an MRI and an image search: label, default name, item count, trainable, parent run tags."""
    if space.sampler == "image":
        resolution = _image_resolution(config, model_config)
        label = f"image_p{float(model_config['erasure_p']):g}"
        with ImageDataset(config.dataset, resolution) as dataset:
            n_items = min(len(dataset), config.slices) if config.slices else len(dataset)
        return {"label": label, "name": f"tune-{label}-{config.image_setting}-image", "n_items": n_items,
                "trainable": (search_trial, {"resolution": resolution}), "title": f"{label} on {config.image_setting}",
                "tags": {"adps.task": config.image_setting, "adps.resolution": str(resolution)}}

    manifest = read_manifest(config.dataset)
    prepared = [float(r) for r in manifest["config"]["accelerations"]]
    if float(config.r_inf) not in prepared:
        raise ValueError(f"config key 'r_inf': {config.r_inf:g} not prepared in {config.dataset} "
                         f"(it has {', '.join(f'{r:g}' for r in prepared)})")
    label = model_label(model_config)
    coils = {split: manifest["splits"][split]["coils"] for split in (config.split, "test")}
    compressed = {split: split in COMPRESSED_SPLITS for split in coils}
    if compressed[config.split] != compressed["test"] or coils[config.split] > coils["test"]:
        raise ValueError(f"config key 'split': {config.split!r} of {config.dataset} has {coils[config.split]} "
                         f"{'virtual ' if compressed[config.split] else ''}coils, not the test split's coil setting "
                         f"({coils['test']} coils, uncompressed): settings tuned on it would not be those of the "
                         "evaluation; search on val")
    dataset = PreparedSliceDataset(config.dataset, config.split, acceleration=config.r_inf)
    n_items = min(len(dataset), config.slices) if config.slices else len(dataset)
    dataset.close()
    if n_items == 0:
        raise ValueError(f"config key 'split': {config.split!r} of {config.dataset} has no slices")
    return {"label": label, "name": f"tune-{label}-r{config.r_inf:g}-{space.sampler}", "n_items": n_items,
            "trainable": (search_trial, {"sampler": space.sampler}), "title": f"{label} at R_inf {config.r_inf:g}",
            "tags": {"adps.r_inf": f"{config.r_inf:g}"}}


def tune_search(config: SearchConfig, *, ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the search of an MRI model at ``r_inf`` on the prepared ``dataset``, or of a natural-image model
    (method ``image``) on ``task`` over the image folder ``dataset``; returns ``{"best", "trials", "run_id", "path",
    "resumed", "version"}``. ``best``: the best trial's settings, objective and id (also ``best.json``); ``trials``:
    one dict per trial (``trial_id``, ``settings``, the metrics, ``reports``, ``stopped_early``)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    config.validate()
    space = load_space(config.space)
    config = config.replace(tracking_uri=resolve_tracking_uri(config.tracking_uri))
    if "://" not in config.dataset and Path(config.dataset).exists():
        config = config.replace(dataset=str(Path(config.dataset).resolve()))
    if "://" not in config.model and Path(config.model).exists():
        config = config.replace(model=str(Path(config.model).resolve()))
    uri, model_config = _model_info(config, space)
    plan = _search_plan(config.replace(model=uri), space, model_config)
    label = plan["label"]
    name = config.name or plan["name"]
    refuse_job_scratch(config.resolved_storage, "Ray Tune's results folder", "set storage_path to durable storage "
                       "(s3://..., or a folder outside the job)")
    config = config.replace(name=name, storage_path=config.resolved_storage)
    path = storage.join(config.storage_path, name)
    started = find_run(config.tracking_uri, config.experiment, path)
    if started is not None and started.data.tags.get("adps.model", "").startswith("models:/"):
        uri = started.data.tags["adps.model"]  # a resumed search keeps the version it started with
    config = config.replace(model=uri)
    n_batches = math.ceil(plan["n_items"] / config.slices_per_report)

    if not ray.is_initialized():
        ray.init(address=ray_address)
    params = {**config.to_dict(), "space_sampler": space.sampler, "space_metric": space.metric,
              "space_mode": space.mode, "space_params": json.dumps(space.params, sort_keys=True)}
    run_id, _ = open_run(config.tracking_uri, config.experiment, path, name, params,
                         tags={"adps.model": uri, "adps.model_label": label, **plan["tags"]})
    if space.sampler != "image":
        _check_denoiser(config, uri, model_config, run_id, progress)

    function, extra = plan["trainable"]
    trainable = tune.with_resources(tune.with_parameters(function, config=config.to_dict(), **extra),
                                    {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial})
    reference = space.reference_point() if config.reference_trial and not config.task else None
    resumed = bool(tune.Tuner.can_restore(path))
    if resumed:
        if progress:
            print(f"adps tune: resuming {path}", flush=True)
        for cut in truncated_search_state(path):
            print(f"adps tune: warning: {cut} was cut short when the search was killed; Ray Tune cannot restore "
                  "its search algorithm from it and starts the search over (the finished trials stay in "
                  f"{path}, but are not reused)", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        callbacks = [_progress_callback(progress, config.num_samples, space.metric, n_batches)]
        try:
            import tensorboardX  # noqa: F401 - TensorBoard logs only where it is installed
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
        except ImportError:
            pass
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, num_samples=config.num_samples,
                max_concurrent_trials=_max_concurrent(config),
                # A trial's process is kept for the next trial: a new one would import torch and adps (seconds).
                reuse_actors=True,
                search_alg=OptunaSearch(space=space.ray_space(), metric=space.metric, mode=space.mode, seed=config.seed,
                                        points_to_evaluate=[reference] if reference else None),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=n_batches,
                                        grace_period=min(config.grace_period, n_batches),
                                        reduction_factor=config.reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=config.storage_path, callbacks=callbacks,
                                      verbose=0),  # our TrialLog shows the progress
        )
    trials = _trial_rows(tuner.fit(), space, n_batches, reference)
    return _finish(config, space, trials, run_id=run_id, path=path, resumed=resumed, label=label, n_batches=n_batches,
                   title=f"{plan['title']} ({space.sampler})", method=model_config.get("method", ""))


def _check_denoiser(config: SearchConfig, uri: str, model_config: dict[str, Any], run_id: str, progress: bool) -> None:
    """The evaluation's denoising check (:func:`adps.orchestration.evaluate.check_denoisers`) on the searched split,
    before any trial: a model that does not denoise these slices is warned about and tagged
    ``adps.denoising_check_failed`` on the search's run (its settings would be tuned to a mismatch)."""
    checks = check_denoisers([(uri, model_config)], config.dataset, config.split, slices=4, seed=config.seed,
                             tracking_uri=config.tracking_uri)
    if not checks:
        return
    if progress:
        print(f"adps tune: denoising check on the {config.split} split (complex NRMSE of the noisy input -> the "
              "model's output)\n" + format_denoising_check(checks), flush=True)
    log = RunLogger(config.tracking_uri, run_id)
    log.log_metrics({f"denoising_check.{c['split']}.s{c['sigma']:g}.{kind}_nrmse": c[f"{kind}_nrmse"]
                     for c in checks for kind in ("input", "output")}, 0)
    log.set_tags({"adps.denoising_check_failed": "" if checks[0]["passed"] else checks[0]["model"]})


def truncated_search_state(path: str) -> list[str]:
    """Ray Tune's search-algorithm state files in a local (not ``s3://``) experiment folder that a kill cut short.

    Tune copies these pickles into the experiment folder without an atomic rename: a driver killed during the copy
    leaves an empty or partial file, and on restore Tune fails to load it and silently starts the experiment over. A
    complete pickle ends with the STOP opcode (``.``), so the check reads one byte and unpickles nothing.
    """
    if "://" in path:
        return []
    cut = []
    for pattern in ("search_gen_state-*.json", "searcher-state-*.pkl"):
        newest = max(Path(path).glob(pattern), default=None)  # the file Tune restores from
        if newest is None:
            continue
        with open(newest, "rb") as handle:
            size = handle.seek(0, 2)
            if size:
                handle.seek(-1, 2)
            if not size or handle.read(1) != b".":
                cut.append(str(newest))
    return cut


def _trial_rows(grid: Any, space: SearchSpace, n_batches: int,
                reference: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per trial: settings, final metrics and seconds per item, the objective's running mean per batch
    (``history``), whether ASHA stopped it, whether it ran the ``reference`` point."""
    seconds = space.seconds_metric
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        settings = {k: result.config[k] for k in space.params if k in (result.config or {})}
        if "steps" in settings:
            settings["steps"] = int(settings["steps"])
        history = result.metrics_dataframe
        reports = int(metrics.get("training_iteration", 0) or 0)
        rows.append({
            "trial_id": str(metrics.get("trial_id") or Path(result.path).name), "settings": settings,
            "reports": reports,
            "error": None if result.error is None else str(result.error)[:500],
            "stopped_early": result.error is None and reports < n_batches,
            "history": [] if history is None or space.metric not in history else
            [float(v) for v in history[space.metric].tolist()],
            "reference": reference is not None and all(
                math.isclose(float(settings.get(k, math.nan)), float(v), rel_tol=1e-9) for k, v in reference.items()),
            **{m: float(metrics[m]) for m in (*space.metrics, seconds) if m in metrics},
        })
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def pareto_front(trials: list[dict[str, Any]], space: SearchSpace, seconds: str) -> list[dict[str, Any]]:
    """The complete trials (every slice, no error) that no other complete trial beats on both the objective and
    ``seconds`` (per slice): the quality each speed can have. Fastest first."""
    sign = 1 if space.mode == "min" else -1
    complete = [t for t in trials if t["error"] is None and not t["stopped_early"] and space.metric in t
                and seconds in t]
    front, best = [], math.inf
    for trial in sorted(complete, key=lambda t: (t[seconds], sign * t[space.metric])):
        if sign * trial[space.metric] < best:
            front.append(trial)
            best = sign * trial[space.metric]
    return front


def fastest_within(trials: list[dict[str, Any]], space: SearchSpace, seconds: str,
                   tolerance: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(fastest, reference)``: the quickest complete trial whose objective is within ``tolerance`` of the reference
    trial's, both taken on the slices the reference saw (their running means after its last batch: ASHA may have
    stopped it early); ``fastest`` None when no trial is within it, both None without a reference result."""
    reference = next((t for t in trials if t.get("reference") and t["error"] is None and t["history"]), None)
    if reference is None:
        return None, None
    batches = len(reference["history"])
    limit = reference["history"][-1] * (1 + tolerance if space.mode == "min" else 1 - tolerance)
    near = [t for t in trials if t["error"] is None and not t["stopped_early"] and seconds in t
            and len(t["history"]) >= batches and (t["history"][batches - 1] <= limit if space.mode == "min"
                                                  else t["history"][batches - 1] >= limit)]
    return (min(near, key=lambda t: t[seconds]) if near else None), reference


def _best(trials: list[dict[str, Any]], space: SearchSpace) -> dict[str, Any] | None:
    """The best trial that reconstructed every slice (a partial mean is on fewer slices); else the best of any."""
    scored = [t for t in trials if t["error"] is None and space.metric in t]
    complete = [t for t in scored if not t["stopped_early"]] or scored
    if not complete:
        return None
    sign = 1 if space.mode == "min" else -1
    return min(complete, key=lambda t: sign * t[space.metric])


def _finish(config: SearchConfig, space: SearchSpace, trials: list[dict[str, Any]], *, run_id: str, path: str,
            resumed: bool, label: str, n_batches: int, title: str, method: str = "") -> dict[str, Any]:
    """Log the trials as child runs and the search's results (``best.json``, ``trials.json``, ``pareto.csv``, the
    figures) to the parent run, tag the model version, and end the run; returns :func:`tune_search`'s result."""
    uri = config.tracking_uri
    parent = RunLogger(uri, run_id)
    seconds = space.seconds_metric
    for trial in trials:
        child_id, existed = open_run(uri, config.experiment, f"{path}#{trial['trial_id']}", f"{config.name}-{trial['trial_id']}",
                                     trial["settings"], tags={"mlflow.parentRunId": run_id})
        child = RunLogger(uri, child_id)
        if not existed:
            for step, value in enumerate(trial["history"], start=1):
                child.log_metrics({f"running_{space.metric}": value}, step)
            child.log_metrics({m: trial[m] for m in (*space.metrics, seconds) if m in trial}, trial["reports"])
        child.set_tags({"adps.stopped_early": str(trial["stopped_early"]).lower(), "adps.reports": trial["reports"],
                        "adps.trial_id": trial["trial_id"], "adps.reference": str(trial.get("reference", False)).lower()})
        end_run(uri, child_id, "FAILED" if trial["error"] else "FINISHED")
    best_trial = _best(trials, space)
    best = None if best_trial is None else {
        "model": config.model, "model_label": label, "r_inf": config.r_inf, "sampler": space.sampler,
        "metric": space.metric, "mode": space.mode, "value": best_trial[space.metric],
        "settings": best_trial["settings"], "trial_id": best_trial["trial_id"], "run_id": run_id,
        "trials": len(trials), "stopped_early": sum(t["stopped_early"] for t in trials),
        "errored": sum(t["error"] is not None for t in trials), "slices_per_trial": n_batches * config.slices_per_report,
    }
    if best is not None and config.task:  # an image search: its task instead of an R_inf
        best.update(r_inf=None, task=config.task, setting=config.image_setting, measurements=config.measurements,
                    factor=config.factor, noise=config.noise)
    front = pareto_front(trials, space, seconds)
    fastest, reference = fastest_within(trials, space, seconds, config.fastest_tolerance)
    if best is not None:
        best[seconds] = best_trial.get(seconds)
        best["pareto"] = [{"trial_id": t["trial_id"], "settings": t["settings"], space.metric: t[space.metric],
                           seconds: t[seconds]} for t in front]
        if reference is not None:
            best["reference"] = {"trial_id": reference["trial_id"], "settings": reference["settings"],
                                 space.metric: reference["history"][-1], "slices": len(reference["history"]) *
                                 config.slices_per_report, seconds: reference.get(seconds)}
        if fastest is not None:
            best["fastest"] = {"trial_id": fastest["trial_id"], "settings": fastest["settings"],
                               space.metric: fastest[space.metric], seconds: fastest[seconds],
                               "tolerance": config.fastest_tolerance}
    version = None
    with tempfile.TemporaryDirectory(prefix="adps-tune-") as tmp:
        folder = Path(tmp)
        (folder / "trials.json").write_text(json.dumps(trials, indent=1))
        if best is not None:
            (folder / "best.json").write_text(json.dumps(best, indent=1))
            storage.write_bytes_atomic(storage.join(path, "best.json"), json.dumps(best, indent=1).encode())
        _pareto_table(trials, front, space, seconds).to_csv(folder / "pareto.csv", index=False)
        figures = {"objective_vs_steps.png": objective_figure(trials, space, title),
                   "pareto.png": pareto_figure(trials, front, space, seconds, title, fastest, reference)}
        for name, figure in figures.items():
            if figure is not None:
                figure.savefig(folder / name, dpi=120, bbox_inches="tight")
        for item in sorted(folder.iterdir()):
            parent.client.log_artifact(run_id, str(item))
    if best is not None:
        parent.log_metrics({f"best_{space.metric}": best["value"]}, 0)
        for key, found in (("best", best_trial), ("fastest", fastest), ("reference", reference)):
            if found is not None and found.get(seconds) is not None:
                parent.log_metrics({f"{key}_{seconds}": found[seconds]}, 0)
        if fastest is not None:
            parent.log_metrics({f"fastest_{space.metric}": fastest[space.metric]}, 0)
            parent.set_tags({"adps.fastest." + k: v for k, v in fastest["settings"].items()})
        if reference is not None:
            parent.log_metrics({f"reference_{space.metric}": reference["history"][-1]}, 0)
        parent.set_tags({"adps.best." + k: v for k, v in best["settings"].items()})
        if config.tag_model and config.model.startswith("models:/"):
            version = tag_tuned_settings(config, best, run_id, sampler=space.sampler, model_method=method)
    parent.set_tags({"adps.trials": len(trials), "adps.resumed": str(resumed).lower()})
    end_run(uri, run_id, "FINISHED" if best is not None else "FAILED")
    return {"best": best, "trials": trials, "run_id": run_id, "path": path, "resumed": resumed, "version": version}


def _pareto_table(trials: list[dict[str, Any]], front: list[dict[str, Any]], space: SearchSpace, seconds: str) -> Any:
    """``pareto.csv``: each trial's settings, objective, seconds per item and network calls, and whether it is
    complete, on the Pareto front and the reference point."""
    on_front = {t["trial_id"] for t in front}
    rows = [{"trial_id": t["trial_id"], **t["settings"], space.metric: t.get(space.metric), seconds: t.get(seconds),
             "network_calls": _calls(space.sampler, t["settings"]), "complete": t["error"] is None and not t["stopped_early"],
             "pareto": t["trial_id"] in on_front, "reference": bool(t.get("reference"))} for t in trials]
    return pd.DataFrame(rows).sort_values(seconds, na_position="last") if rows else pd.DataFrame()


def _calls(sampler: str, settings: dict[str, Any]) -> int | None:
    """The network calls of a trial's settings (A-DPS / DPS / ALD with ``steps`` searched)."""
    if "steps" not in settings:
        return None
    if sampler == "image":
        return network_calls(int(settings["steps"]), IMAGE_SAMPLING["solver"])
    return network_calls(int(settings["steps"])) if sampler in ("a_dps", "dps") else int(settings["steps"])


def pareto_figure(trials: list[dict[str, Any]], front: list[dict[str, Any]], space: SearchSpace, seconds: str,
                  title: str, fastest: dict[str, Any] | None, reference: dict[str, Any] | None) -> Any:
    """The objective of every trial against its seconds per item (hollow: stopped early), the Pareto front joined, the
    reference and the fastest within tolerance marked; None without timed trials."""
    timed = [t for t in trials if seconds in t and space.metric in t]
    if not timed:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for trial in timed:
        axis.scatter([trial[seconds]], [trial[space.metric]], s=20, edgecolors="C0",
                     facecolors="none" if trial["stopped_early"] else "C0")
    if front:
        axis.plot([t[seconds] for t in front], [t[space.metric] for t in front], color="C1", marker="o",
                  label="Pareto front")
    for found, marker, label in ((reference, "s", "reference (protocol)"), (fastest, "*", "fastest within tolerance")):
        if found is not None and seconds in found and space.metric in found:
            axis.scatter([found[seconds]], [found[space.metric]], marker=marker, s=90, color="C3", label=label, zorder=3)
    axis.set_xscale("log")
    axis.set_xlabel(seconds.replace("_", " "))
    axis.set_ylabel(LABELS.get(space.metric, space.metric))
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def objective_figure(trials: list[dict[str, Any]], space: SearchSpace, title: str) -> Any:
    """The objective of every trial against its step count (hollow: stopped early, partial), with the best complete
    trial per step count joined by a line (paper figure 4); None when ``steps`` is not searched."""
    if "steps" not in space.params:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    sign = 1 if space.mode == "min" else -1
    best: dict[int, float] = {}
    for trial in trials:
        if space.metric not in trial or "steps" not in trial["settings"]:
            continue
        steps, value = trial["settings"]["steps"], trial[space.metric]
        axis.scatter([steps], [value], facecolors="none" if trial["stopped_early"] else "C0", edgecolors="C0", s=20)
        if not trial["stopped_early"] and (steps not in best or sign * value < sign * best[steps]):
            best[steps] = value
    if best:
        xs = sorted(best)
        axis.plot(xs, [best[x] for x in xs], color="C1", marker="o", label="best per step count")
        axis.legend(fontsize=7)
    axis.set_xlabel("sampler steps")
    axis.set_ylabel(LABELS.get(space.metric, space.metric))
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure

"""Ray Tune search of the posterior samplers' settings (guidance, steps, ...) per model and R_inf.

``adps tune`` / ``jobs/tune_dps.py`` call :func:`tune_search`: a Ray Tune ``Tuner`` with
Optuna's TPE (seeded) and ASHA early stopping. Each trial loads the model, reconstructs the
validation slices (``split``) at ``R_inf`` in batches of ``slices_per_report`` with the space's
sampler and, after each batch, reports the running mean NRMSE / PSNR / SSIM over the slices so
far, so that ASHA can stop a poor trial after ``grace_period`` batches. Every trial sees the
same slices with the same noise (seeded per slice), so trials differ only in their settings.

Resume: the experiment folder is ``<storage_path>/<name>``; when it holds a restorable Tune
experiment (``Tuner.can_restore``), running the same search again restores it (finished trials
are kept, unfinished and errored ones run again) instead of starting over.

Results (MLflow, experiment ``adps-tune``): one parent run per search (found again on resume),
one child run per trial (tag ``mlflow.parentRunId``; params = the trial's settings; metrics =
the objective's history per batch and the final / partial means; tag ``adps.stopped_early``),
``best.json`` and the figure ``objective_vs_steps.png`` (best objective per step count, paper
figure 4) on the parent run; ``best.json`` also in the experiment folder. When the model is a
``models:/`` URI, the best settings become tags of that registered model version:

* ``adps.tuned.r<R_inf:g>.<param>`` for every searched param (``guidance``, ``steps``, ...);
* ``adps.tuned.r<R_inf:g>.run_id``: the parent run's id.

(:func:`adps.orchestration.evaluate.tuned_settings` reads them.) Ray Tune writes TensorBoard
logs into each trial folder (tensorboardX is installed with Ray Tune here).

Search-space files (``tune_spaces/*.yaml``, one per sampler family)::

    sampler: adps            # adps (= a_dps), dps or ald
    objective: {metric: nrmse, mode: min}   # metric: nrmse | psnr | ssim; mode: min | max
    params:                  # name: spec; names the sampler takes (see SAMPLER_PARAMS)
      guidance: {type: loguniform, low: 0.1, high: 10.0}   # low > 0, low < high
      steps: {type: choice, values: [50, 100, 500]}        # a non-empty list
      sigma_max: {type: uniform, low: 20, high: 120}       # low < high
      rho: {type: randint, low: 5, high: 9}                # integers, high inclusive
      churn: {type: uniform, low: 0, high: 40}             # EDM S_churn (0 = METHOD.md's loop)

Param types: ``loguniform`` / ``uniform`` (``low``, ``high``: numbers), ``randint``
(``low``, ``high``: integers, both included), ``choice`` (``values``: a non-empty list of
numbers). ``steps`` must be integer valued. :func:`load_space` checks all of this and names the
file and the key at fault.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adps.config import ConfigFile
from adps.data import storage

__all__ = [
    "OBJECTIVE_METRICS",
    "SAMPLER_FAMILIES",
    "SAMPLER_PARAMS",
    "SearchConfig",
    "SearchSpace",
    "load_space",
    "truncated_search_state",
    "tune_search",
]

SAMPLER_FAMILIES = {"adps": "a_dps", "a_dps": "a_dps", "dps": "dps", "ald": "ald"}
"""A space file's ``sampler`` -> the :func:`adps.nn.samplers.run_sampler` name."""
SAMPLER_PARAMS = {
    "a_dps": ("guidance", "steps", "sigma_max", "sigma_min", "rho", "churn"),
    "dps": ("guidance", "steps", "sigma_max", "sigma_min", "rho", "churn"),
    "ald": ("steps", "step_scale", "likelihood_weight", "noise_std"),
}
"""The settings each sampler can search (``churn``: EDM's S_churn in the DPS / A-DPS loop)."""
OBJECTIVE_METRICS = ("nrmse", "psnr", "ssim")
PARAM_TYPES = {"loguniform": ("low", "high"), "uniform": ("low", "high"), "randint": ("low", "high"),
               "choice": ("values",)}


# Search spaces -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """A validated space file."""

    path: str
    family: str
    """The file's ``sampler`` (``adps``, ``dps``, ``ald``)."""
    sampler: str
    """The :func:`~adps.nn.samplers.run_sampler` name."""
    metric: str = "nrmse"
    mode: str = "min"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ray_space(self) -> dict[str, Any]:
        """The params as Ray Tune domains (OptunaSearch converts them to Optuna distributions)."""
        from ray import tune

        space = {}
        for name, spec in self.params.items():
            kind = spec["type"]
            if kind == "loguniform":
                space[name] = tune.loguniform(spec["low"], spec["high"])
            elif kind == "uniform":
                space[name] = tune.uniform(spec["low"], spec["high"])
            elif kind == "randint":
                space[name] = tune.randint(spec["low"], spec["high"] + 1)  # Ray's high is exclusive
            else:
                space[name] = tune.choice(list(spec["values"]))
        return space


def _number(path: str, key: str, value: Any, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{path}: key {key!r} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ValueError(f"{path}: key {key!r} must be an integer, got {value!r}")
        return int(value)
    return value


def _unknown(path: str, where: str, values: dict, known: tuple[str, ...]) -> None:
    extra = sorted(set(values) - set(known))
    if extra:
        name = f"{where}.{extra[0]}" if where else extra[0]
        raise ValueError(f"{path}: unknown key {name!r} (known: {', '.join(known)})")


def parse_space(values: Any, path: str = "<space>") -> SearchSpace:
    """Validate a space file's mapping (see the module docstring); errors name ``path`` and the key."""
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping with keys sampler, objective, params; got {type(values).__name__}")
    _unknown(path, "", values, ("sampler", "objective", "params"))
    family = values.get("sampler")
    if family not in SAMPLER_FAMILIES:
        raise ValueError(f"{path}: key 'sampler': unknown sampler {family!r} (choose one of "
                         f"{', '.join(sorted(SAMPLER_FAMILIES))})")
    sampler = SAMPLER_FAMILIES[family]
    objective = values.get("objective", {}) or {}
    if not isinstance(objective, dict):
        raise ValueError(f"{path}: key 'objective' must be a mapping {{metric, mode}}, got {objective!r}")
    _unknown(path, "objective", objective, ("metric", "mode"))
    metric = objective.get("metric", "nrmse")
    if metric not in OBJECTIVE_METRICS:
        raise ValueError(f"{path}: key 'objective.metric': {metric!r} is not one of {', '.join(OBJECTIVE_METRICS)}")
    mode = objective.get("mode", "min" if metric == "nrmse" else "max")
    if mode not in ("min", "max"):
        raise ValueError(f"{path}: key 'objective.mode': {mode!r} is not min or max")
    params = values.get("params")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: key 'params' must be a non-empty mapping of param name -> spec, got {params!r}")
    checked: dict[str, dict[str, Any]] = {}
    for name, spec in params.items():
        key = f"params.{name}"
        if name not in SAMPLER_PARAMS[sampler]:
            raise ValueError(f"{path}: unknown key {key!r}: sampler {family!r} ({sampler}) searches only "
                             f"{', '.join(SAMPLER_PARAMS[sampler])}")
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: key {key!r} must be a mapping with a 'type', got {spec!r}")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise ValueError(f"{path}: key '{key}.type': {kind!r} is not one of {', '.join(PARAM_TYPES)}")
        _unknown(path, key, spec, ("type", *PARAM_TYPES[kind]))
        integer = name == "steps" or kind == "randint"
        if kind == "choice":
            options = spec.get("values")
            if not isinstance(options, list) or not options:
                raise ValueError(f"{path}: key '{key}.values' must be a non-empty list, got {options!r}")
            checked[name] = {"type": kind, "values": [_number(path, f"{key}.values", v, integer=integer) for v in options]}
            if integer and min(checked[name]["values"]) < 1:
                raise ValueError(f"{path}: key '{key}.values' must be >= 1, got {options!r}")
            continue
        for bound in ("low", "high"):
            if bound not in spec:
                raise ValueError(f"{path}: key '{key}.{bound}' is missing")
        low = _number(path, f"{key}.low", spec["low"], integer=integer)
        high = _number(path, f"{key}.high", spec["high"], integer=integer)
        if low >= high:
            raise ValueError(f"{path}: key {key!r}: low ({low}) must be < high ({high})")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{path}: key '{key}.low' must be > 0 for loguniform, got {low}")
        if integer and kind != "randint":
            raise ValueError(f"{path}: key '{key}.type': {name!r} takes integers: use choice or randint, not {kind}")
        checked[name] = {"type": kind, "low": low, "high": high}
    return SearchSpace(path=path, family=family, sampler=sampler, metric=metric, mode=mode, params=checked)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file (see the module docstring)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    return parse_space(values, str(path))


# The config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchConfig(ConfigFile):
    """One Ray Tune search: one model at one R_inf over one space file; unknown keys refused."""

    model: str = ""
    """``models:/<name>@<alias>`` / ``models:/<name>/<version>``, a registered ``adps-*`` name,
    ``runs:/...`` or a model folder."""
    r_inf: float = 0.0
    """The acceleration searched at (prepared in the dataset)."""
    space: str = ""
    """The space file (``tune_spaces/adps.yaml``)."""
    dataset: str = ""
    """Prepared dataset (folder or ``s3://``)."""
    split: str = "val"
    """The split reconstructed (never ``test``: that is for the evaluation)."""
    slices: int = 8
    """Slices each trial reconstructs (the first ones; 0 = all of the split)."""
    slices_per_report: int = 2
    """Slices per batch: the trial reports its running mean after each batch."""
    num_samples: int = 32
    """Trials."""
    max_concurrent: int = 0
    """Trials at a time; 0 = as many as the cluster's GPUs (or CPUs) hold."""
    gpus_per_trial: float = 0.0
    """GPUs per trial (fractional allowed, e.g. 0.25; 0 = CPU)."""
    cpus_per_trial: float = 1.0
    seed: int = 0
    """Seeds TPE and the samplers' noise (per slice, the same in every trial)."""
    grace_period: int = 1
    """ASHA: batches a trial runs before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the best 1/reduction_factor at each rung."""
    amp: str = ""
    """``bf16``: the network in bf16 autocast (GPU only)."""
    storage_path: str = ""
    """Ray Tune storage (folder or ``s3://``; default ``.adps/tune``)."""
    name: str = ""
    """Experiment name (default ``tune-<method>_r<R_train>-r<R_inf>-<sampler>``); running a
    search of the same name again resumes it."""
    tracking_uri: str = ""
    experiment: str = "adps-tune"
    tag_model: bool = True
    """Write the best settings as tags on the registered model version (``models:/`` only)."""

    def validate(self) -> None:
        """Checks that need no I/O; names the key at fault."""
        for key in ("model", "space", "dataset"):
            if not getattr(self, key):
                raise ValueError(f"config key {key!r} is empty")
        if self.r_inf < 1:
            raise ValueError(f"config key 'r_inf' must be >= 1, got {self.r_inf}")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"config key 'split' must be train, val or test, got {self.split!r}")
        for key in ("slices", "max_concurrent", "seed"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        for key in ("slices_per_report", "num_samples", "grace_period"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.reduction_factor < 2:
            raise ValueError(f"config key 'reduction_factor' must be >= 2, got {self.reduction_factor}")
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            raise ValueError("config keys 'gpus_per_trial' (>= 0) and 'cpus_per_trial' (> 0) out of range: "
                             f"{self.gpus_per_trial}, {self.cpus_per_trial}")
        if self.amp not in ("", "bf16"):
            raise ValueError(f"config key 'amp' must be '' or 'bf16', got {self.amp!r}")

    @property
    def resolved_storage(self) -> str:
        path = self.storage_path or str(Path(".adps") / "tune")
        return path if storage.is_s3(path) else str(Path(path).resolve())


# A trial -------------------------------------------------------------------------------------
def _load_batches(config: SearchConfig, device: str) -> tuple[list[dict[str, Any]], int | None]:
    from adps.data.dataset import PreparedSliceDataset
    from adps.data.shards import read_manifest
    from adps.orchestration.evaluate import stack_batch

    acs = read_manifest(config.dataset)["config"].get("acs")
    dataset = PreparedSliceDataset(config.dataset, config.split, acceleration=config.r_inf)
    try:
        count = min(len(dataset), config.slices) if config.slices else len(dataset)
        batches = []
        for start in range(0, count, config.slices_per_report):
            items = [dataset[i] for i in range(start, min(start + config.slices_per_report, count))]
            batches.append(stack_batch(items, device))
    finally:
        dataset.close()
    return batches, acs


def _trial(params: dict[str, Any], *, config: dict[str, Any], sampler: str) -> None:
    """A Ray Tune function trainable: reconstruct batch after batch, report the running means."""
    import torch
    from ray import tune

    from adps.metrics import image_metrics
    from adps.orchestration.evaluate import load_for_evaluation, reconstruct_batch

    search = SearchConfig.from_dict(config)
    # The trial's params as the sampler takes them (Tune hands numpy / float values).
    settings = {key: int(value) if key == "steps" else float(value) for key, value in params.items()}
    torch.set_num_threads(max(1, int(search.cpus_per_trial)))
    device = "cuda" if search.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    model, model_config = load_for_evaluation(search.model, device, search.tracking_uri)
    batches, acs = _load_batches(search, device)
    totals = dict.fromkeys(OBJECTIVE_METRICS, 0.0)
    seen = 0
    for index, batch in enumerate(batches):
        image = reconstruct_batch(sampler, model, batch, r_train=float(model_config["R"]), seed=search.seed, acs=acs,
                                  amp=search.amp, **settings)
        scores = image_metrics(batch["reference"], image.detach())
        for metric in OBJECTIVE_METRICS:
            values = torch.nan_to_num(scores[metric].double().cpu(), nan=1e6 if metric == "nrmse" else -1e6)
            totals[metric] += float(values.sum())
        seen += len(batch["slice_ids"])
        tune.report({**{m: totals[m] / seen for m in OBJECTIVE_METRICS}, "slices": seen, "batch": index + 1})


# The search ----------------------------------------------------------------------------------
def _progress_callback(progress: bool, total: int, metric: str, n_batches: int) -> Any:
    from ray.tune import Callback

    class TrialLog(Callback):
        """A progress bar over the trials and one line per ended trial (its settings, its
        objective and how many batches it reported before ASHA stopped it or it finished)."""

        def __init__(self) -> None:
            self._bar: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "_bar": None}  # the experiment state is pickled; a bar is not

        def setup(self, **info: Any) -> None:
            from tqdm.auto import tqdm

            if progress and self._bar is None:
                self._bar = tqdm(total=total, desc="adps tune", unit="trial")

        def _line(self, trial: Any, word: str) -> None:
            from tqdm.auto import tqdm

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
            if self._bar is None:
                self._bar = tqdm(total=total, desc="adps tune", unit="trial")
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
    from adps.nn.samplers import METHOD_SAMPLERS
    from adps.orchestration.evaluate import load_for_evaluation, model_uri

    uri = model_uri(config.model)
    if uri == "l1":
        raise ValueError("config key 'model': l1 has no sampler settings to search")
    _, model_config = load_for_evaluation(uri, "cpu", config.tracking_uri)
    expected = METHOD_SAMPLERS.get(model_config["method"])
    if expected != space.sampler:
        raise ValueError(f"{space.path}: key 'sampler': {space.family!r} ({space.sampler}) does not reconstruct with "
                         f"model {config.model} (method {model_config['method']}, sampler {expected})")
    return uri, model_config


def tune_search(config: SearchConfig, *, ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the search; returns ``{"best", "trials", "run_id", "path", "resumed", "version"}``.

    ``best``: the best trial's settings, objective and id (also ``best.json``); ``trials``: one
    dict per trial (``trial_id``, ``settings``, the metrics, ``reports``, ``stopped_early``).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from adps.data.shards import read_manifest
    from adps.orchestration.evaluate import model_label
    from adps.orchestration.tracking import open_run, resolve_tracking_uri

    config.validate()
    space = load_space(config.space)
    config = config.replace(tracking_uri=resolve_tracking_uri(config.tracking_uri))
    if "://" not in config.dataset and Path(config.dataset).exists():
        config = config.replace(dataset=str(Path(config.dataset).resolve()))
    if "://" not in config.model and Path(config.model).exists():
        config = config.replace(model=str(Path(config.model).resolve()))
    uri, model_config = _model_info(config, space)
    config = config.replace(model=uri)
    prepared = [float(r) for r in read_manifest(config.dataset)["config"]["accelerations"]]
    if float(config.r_inf) not in prepared:
        raise ValueError(f"config key 'r_inf': {config.r_inf:g} not prepared in {config.dataset} "
                         f"(it has {', '.join(f'{r:g}' for r in prepared)})")
    label = model_label(model_config)
    name = config.name or f"tune-{label}-r{config.r_inf:g}-{space.sampler}"
    config = config.replace(name=name, storage_path=config.resolved_storage)
    path = storage.join(config.storage_path, name)

    from adps.data.dataset import PreparedSliceDataset

    dataset = PreparedSliceDataset(config.dataset, config.split, acceleration=config.r_inf)
    n_slices = min(len(dataset), config.slices) if config.slices else len(dataset)
    dataset.close()
    if n_slices == 0:
        raise ValueError(f"config key 'split': {config.split!r} of {config.dataset} has no slices")
    n_batches = math.ceil(n_slices / config.slices_per_report)

    if not ray.is_initialized():
        ray.init(address=ray_address)
    params = {**config.to_dict(), "space_sampler": space.sampler, "space_metric": space.metric,
              "space_mode": space.mode, "space_params": json.dumps(space.params, sort_keys=True)}
    run_id, _ = open_run(config.tracking_uri, config.experiment, path, name, params,
                         tags={"adps.model": uri, "adps.model_label": label, "adps.r_inf": f"{config.r_inf:g}"})

    trainable = tune.with_resources(
        tune.with_parameters(_trial, config=config.to_dict(), sampler=space.sampler),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
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
                search_alg=OptunaSearch(space=space.ray_space(), metric=space.metric, mode=space.mode, seed=config.seed),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=n_batches,
                                        grace_period=min(config.grace_period, n_batches),
                                        reduction_factor=config.reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=config.storage_path, callbacks=callbacks,
                                      verbose=0),  # our TrialLog shows the progress
        )
    grid = tuner.fit()
    trials = _trial_rows(grid, space, n_batches)
    return _finish(config, space, trials, run_id=run_id, path=path, resumed=resumed, label=label, n_batches=n_batches)


def truncated_search_state(path: str) -> list[str]:
    """Ray Tune's search-algorithm state files in a local experiment folder that a kill cut short.

    Tune copies these pickles into the experiment folder without an atomic rename, so a driver
    killed during the copy leaves an empty or partial file; on restore Tune fails to load it and
    silently starts the experiment over. A complete pickle ends with the STOP opcode (``.``), so
    the check reads one byte and unpickles nothing. Remote (``s3://``) folders are not checked.
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


def _trial_rows(grid: Any, space: SearchSpace, n_batches: int) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        settings = {k: result.config[k] for k in space.params if k in (result.config or {})}
        if "steps" in settings:
            settings["steps"] = int(settings["steps"])
        history = result.metrics_dataframe
        reports = int(metrics.get("training_iteration", 0) or 0)
        rows.append({
            "trial_id": str(metrics.get("trial_id") or Path(result.path).name),
            "settings": settings,
            "reports": reports,
            "error": None if result.error is None else str(result.error)[:500],
            "stopped_early": result.error is None and reports < n_batches,
            "history": [] if history is None or space.metric not in history else
            [float(v) for v in history[space.metric].tolist()],
            **{m: float(metrics[m]) for m in OBJECTIVE_METRICS if m in metrics},
        })
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _best(trials: list[dict[str, Any]], space: SearchSpace) -> dict[str, Any] | None:
    """The best trial that reconstructed every slice (a partial mean is on fewer slices); else
    the best of any."""
    scored = [t for t in trials if t["error"] is None and space.metric in t]
    complete = [t for t in scored if not t["stopped_early"]] or scored
    if not complete:
        return None
    sign = 1 if space.mode == "min" else -1
    return min(complete, key=lambda t: sign * t[space.metric])


def _finish(config: SearchConfig, space: SearchSpace, trials: list[dict[str, Any]], *, run_id: str, path: str,
            resumed: bool, label: str, n_batches: int) -> dict[str, Any]:
    from adps.orchestration.tracking import RunLogger, end_run, open_run

    uri = config.tracking_uri
    parent = RunLogger(uri, run_id)
    for trial in trials:
        child_id, existed = open_run(uri, config.experiment, f"{path}#{trial['trial_id']}", f"{config.name}-{trial['trial_id']}",
                                     trial["settings"], tags={"mlflow.parentRunId": run_id})
        child = RunLogger(uri, child_id)
        if not existed:
            for step, value in enumerate(trial["history"], start=1):
                child.log_metrics({f"running_{space.metric}": value}, step)
            child.log_metrics({m: trial[m] for m in OBJECTIVE_METRICS if m in trial}, trial["reports"])
        child.set_tags({"adps.stopped_early": str(trial["stopped_early"]).lower(), "adps.reports": trial["reports"],
                        "adps.trial_id": trial["trial_id"]})
        end_run(uri, child_id, "FAILED" if trial["error"] else "FINISHED")
    best_trial = _best(trials, space)
    best = None if best_trial is None else {
        "model": config.model, "model_label": label, "r_inf": config.r_inf, "sampler": space.sampler,
        "metric": space.metric, "mode": space.mode, "value": best_trial[space.metric],
        "settings": best_trial["settings"], "trial_id": best_trial["trial_id"], "run_id": run_id,
        "trials": len(trials), "stopped_early": sum(t["stopped_early"] for t in trials),
        "errored": sum(t["error"] is not None for t in trials), "slices_per_trial": n_batches * config.slices_per_report,
    }
    version = None
    with tempfile.TemporaryDirectory(prefix="adps-tune-") as tmp:
        folder = Path(tmp)
        (folder / "trials.json").write_text(json.dumps(trials, indent=1))
        if best is not None:
            (folder / "best.json").write_text(json.dumps(best, indent=1))
            storage.write_bytes_atomic(storage.join(path, "best.json"), json.dumps(best, indent=1).encode())
        figure = objective_figure(trials, space, f"{label} at R_inf {config.r_inf:g} ({space.sampler})")
        if figure is not None:
            figure.savefig(folder / "objective_vs_steps.png", dpi=120, bbox_inches="tight")
        for item in sorted(folder.iterdir()):
            parent.client.log_artifact(run_id, str(item))
    if best is not None:
        parent.log_metrics({f"best_{space.metric}": best["value"]}, 0)
        parent.set_tags({"adps.best." + k: v for k, v in best["settings"].items()})
        if config.tag_model and config.model.startswith("models:/"):
            version = _tag_version(config, best, run_id)
    parent.set_tags({"adps.trials": len(trials), "adps.resumed": str(resumed).lower()})
    end_run(uri, run_id, "FINISHED" if best is not None else "FAILED")
    return {"best": best, "trials": trials, "run_id": run_id, "path": path, "resumed": resumed, "version": version}


def _tag_version(config: SearchConfig, best: dict[str, Any], run_id: str) -> Any:
    from mlflow import MlflowClient

    from adps.orchestration.evaluate import TUNED_TAG, model_version_of

    version = model_version_of(config.model, config.tracking_uri)
    if version is None:  # ``models:/name`` without version or alias: the newest version
        client = MlflowClient(config.tracking_uri)
        name = config.model[len("models:/"):]
        version = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    client = MlflowClient(config.tracking_uri)
    for key, value in {**best["settings"], "run_id": run_id}.items():
        tag = TUNED_TAG.format(r_inf=float(config.r_inf), key=key)
        client.set_model_version_tag(version.name, version.version, tag, str(value))
    return client.get_model_version(version.name, version.version)


def objective_figure(trials: list[dict[str, Any]], space: SearchSpace, title: str) -> Any:
    """The objective of every trial against its step count (hollow: stopped early, partial),
    with the best complete trial per step count joined by a line (paper figure 4); None when
    ``steps`` is not searched."""
    if "steps" not in space.params:
        return None
    from adps.orchestration.figures import LABELS, _pyplot

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

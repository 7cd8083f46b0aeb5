"""What an ``adps tune`` search is: its search-space file and its config (:class:`SearchConfig`).

Search-space files (``tune_spaces/*.yaml``, one per sampler family)::

    sampler: adps            # adps (= a_dps), a_os, dps, ald; image_dps for natural-image models
    objective: {metric: nrmse, mode: min}   # metric: nrmse | psnr | ssim (image_dps: mse | psnr); mode: min | max
    params:                  # name: spec; names the sampler takes (see SAMPLER_PARAMS)
      guidance: {type: loguniform, low: 0.1, high: 10.0}   # low > 0, low < high
      steps: {type: choice, values: [50, 100, 500]}        # a non-empty list of numbers
      sigma_max: {type: uniform, low: 20, high: 120}       # low < high
      rho: {type: randint, low: 5, high: 9}                # integers, high inclusive
      churn: {type: uniform, low: 0, high: 40}             # EDM S_churn (0 = METHOD.md's loop)

``steps`` must be integer valued. :func:`load_space` checks all of this and names the file and the key at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adps.data import storage
from adps.nn.samplers import SAMPLER_DEFAULTS
from adps.orchestration.tracking import RunConfig

__all__ = ["IMAGE_OBJECTIVE_METRICS", "IMAGE_TASKS", "OBJECTIVE_METRICS", "SAMPLER_FAMILIES", "SAMPLER_PARAMS",
           "SECONDS_PER", "SearchConfig", "SearchSpace", "load_space", "parse_space"]

SAMPLER_FAMILIES = {"adps": "a_dps", "a_dps": "a_dps", "a_os": "a_os", "dps": "dps", "ald": "ald", "image_dps": "image"}
"""A space file's ``sampler`` -> the :func:`adps.nn.samplers.run_sampler` name (``image``: the natural-image samplers,
:func:`adps.nn.image_diffusion.image_sampler` picks A-DPS or DPS from the model)."""
SECONDS_PER = {"slices": "seconds_per_slice", "images": "seconds_per_image"}
"""The speed a trial reports beside its quality: the running mean of the sampler's wall time per slice (image), the
network on its device, data loading and metrics not counted."""
SAMPLER_PARAMS = {"a_dps": ("guidance", "steps", "sigma_max", "sigma_min", "rho", "churn"), "a_os": ("sigma",),
                  "dps": ("guidance", "steps", "sigma_max", "sigma_min", "rho", "churn"),
                  "ald": ("steps", "step_scale", "likelihood_weight", "noise_std"),
                  "image": ("guidance", "steps", "sigma_max", "sigma_min", "rho")}
"""The settings each sampler can search (``churn``: EDM's S_churn in the DPS / A-DPS loop)."""
OBJECTIVE_METRICS = ("nrmse", "psnr", "ssim")
"""The objectives of an MRI search (reported by every MRI trial)."""
IMAGE_OBJECTIVE_METRICS = ("mse", "psnr")
"""The objectives of a natural-image search (reported by every image trial): MSE per image on the ``[0, 1]`` scale
(:func:`adps.metrics.rgb_mse`) and its PSNR ``-10 log10 mse``."""
IMAGE_TASKS = ("cs", "sr")
"""Natural-image tasks: Gaussian compressed sensing (``measurements``), super-resolution (``factor``)."""
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

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric a trial of this space reports (the objective is one of them)."""
        return IMAGE_OBJECTIVE_METRICS if self.sampler == "image" else OBJECTIVE_METRICS

    @property
    def seconds_metric(self) -> str:
        """The speed a trial of this space reports beside its quality (:data:`SECONDS_PER`)."""
        return SECONDS_PER["images" if self.sampler == "image" else "slices"]

    def reference_point(self) -> dict[str, Any] | None:
        """The protocol's settings (METHOD.md, :data:`~adps.nn.samplers.SAMPLER_DEFAULTS`) of the searched params if
        the space holds them all, else None: a search's first trial, the quality its fastest trials are held to."""
        defaults = {**SAMPLER_DEFAULTS.get(self.sampler, {}), "churn": 0.0} if self.sampler != "image" else {}
        point = {}
        for name, spec in self.params.items():
            value = defaults.get(name)
            if value is None:
                return None
            if spec["type"] == "choice":
                held = value in spec["values"]
            else:
                held = spec["low"] <= value <= spec["high"] and (spec["type"] != "randint" or float(value).is_integer())
            if not held:
                return None
            point[name] = value
        return point

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
    metrics = IMAGE_OBJECTIVE_METRICS if sampler == "image" else OBJECTIVE_METRICS
    metric = objective.get("metric", metrics[0])
    if metric not in metrics:
        raise ValueError(f"{path}: key 'objective.metric': {metric!r} is not one of {', '.join(metrics)} "
                         f"(sampler {family!r})")
    mode = objective.get("mode", "min" if metric in ("nrmse", "mse") else "max")
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
    try:
        values = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    return parse_space(values, str(path))


# The config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchConfig(RunConfig):
    """One Ray Tune search: one model at one R_inf (an MRI model) or on one task (a natural-image model: ``task`` set)
    over one space file; unknown keys refused."""

    model: str = ""
    """``models:/<name>@<alias>`` or ``/<version>``, a registered ``adps-*`` name, ``runs:/...`` or a model folder."""
    r_inf: float = 0.0
    """The acceleration searched at (prepared in the dataset); MRI only (0 for an image search)."""
    space: str = ""
    """The space file (``tune_spaces/adps.yaml``; ``tune_spaces/image_dps.yaml`` for image models)."""
    dataset: str = ""
    """Prepared dataset (folder or ``s3://``); for an image search a folder or ``.zip`` of images."""
    split: str = "val"
    """The split reconstructed: ``val`` (or ``train``), never ``test``, whose slices the evaluation scores; it must
    have the test split's coil setting (prepared val does: every coil). MRI only."""
    slices: int = 8
    """Slices (images) each trial reconstructs (the first ones; 0 = all of the split / folder)."""
    slices_per_report: int = 2
    """Slices (images) per batch: the trial reports its running mean after each batch."""
    task: str = ""
    """Natural-image models only (method ``image``): ``cs`` (Gaussian compressed sensing with ``measurements``) or
    ``sr`` (super-resolution by ``factor``); empty for an MRI search."""
    measurements: int = 0
    """``task: cs``: the number of Gaussian measurements m (the matrix is seeded by ``seed``)."""
    factor: int = 0
    """``task: sr``: the downscaling factor (the resolution must be a multiple of it)."""
    noise: float = 0.0
    """Image search: the standard deviation of Gaussian noise added to the measurements."""
    resolution: int = 0
    """Image search: side of the square images; 0 = the model config's ``resolution``."""
    num_samples: int = 32
    """Trials."""
    max_concurrent: int = 0
    """Trials at a time; 0 = as many as the cluster's GPUs (or CPUs) hold."""
    gpus_per_trial: float = 0.0
    """GPUs per trial (fractional allowed, e.g. 0.25; 0 = CPU)."""
    cpus_per_trial: float = 1.0
    grace_period: int = 1
    """ASHA: batches a trial runs before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the best 1/reduction_factor at each rung."""
    storage_path: str = ""
    """Ray Tune storage (folder or ``s3://``; default ``.adps/tune``)."""
    name: str = ""
    """Experiment name (default ``tune-<method>_r<R_train>-r<R_inf>-<sampler>``); reusing a name resumes its search."""
    experiment: str = "adps-tune"
    tag_model: bool = True
    """Write the best settings as tags on the registered model version (``models:/`` only)."""
    reference_trial: bool = True
    """Run the protocol's settings (METHOD.md: 500 Euler steps, guidance 1, ...) as the first trial, when the space
    holds them: the quality that ``fastest`` is measured against (MRI)."""
    fastest_tolerance: float = 0.01
    """``fastest``: the quickest trial whose objective is within this fraction of the reference trial's on the same
    slices (NRMSE at most 1 % higher by default; PSNR / SSIM at most 1 % lower)."""

    def validate(self) -> None:
        """Checks that need no I/O; names the key at fault."""
        super().validate()
        for key in ("model", "space", "dataset"):
            if not getattr(self, key):
                raise ValueError(f"config key {key!r} is empty")
        if self.task:
            self._validate_image_task()
        elif self.r_inf < 1:
            raise ValueError(f"config key 'r_inf' must be >= 1, got {self.r_inf} (or set 'task' for a natural-image "
                             "model)")
        else:
            for key in ("measurements", "factor", "noise", "resolution"):
                if getattr(self, key):
                    raise ValueError(f"config key {key!r} is for a natural-image search (with 'task'); "
                                     "an MRI search takes 'r_inf'")
        if self.split == "test":
            raise ValueError("config key 'split': a search on the test split would tune the settings to the slices "
                             "the evaluation scores; search on val (it has the test split's coils)")
        if self.split not in ("train", "val"):
            raise ValueError(f"config key 'split' must be val or train, got {self.split!r}")
        for key in ("slices", "max_concurrent", "seed"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        for key in ("slices_per_report", "num_samples", "grace_period"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.reduction_factor < 2:
            raise ValueError(f"config key 'reduction_factor' must be >= 2, got {self.reduction_factor}")
        if not (0 <= self.fastest_tolerance < 1):
            raise ValueError(f"config key 'fastest_tolerance' must be in [0, 1), got {self.fastest_tolerance}")
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            raise ValueError("config keys 'gpus_per_trial' (>= 0) and 'cpus_per_trial' (> 0) out of range: "
                             f"{self.gpus_per_trial}, {self.cpus_per_trial}")

    def _validate_image_task(self) -> None:
        if self.task not in IMAGE_TASKS:
            raise ValueError(f"config key 'task' must be one of {', '.join(IMAGE_TASKS)} (or empty for an MRI "
                             f"search), got {self.task!r}")
        if self.r_inf:
            raise ValueError(f"config key 'r_inf' is for an MRI search; an image search (task {self.task!r}) "
                             f"takes {'measurements' if self.task == 'cs' else 'factor'}")
        needed, other = ("measurements", "factor") if self.task == "cs" else ("factor", "measurements")
        if getattr(self, needed) < 1:
            raise ValueError(f"config key {needed!r} must be >= 1 for task {self.task!r}, got {getattr(self, needed)}")
        if getattr(self, other):
            raise ValueError(f"config key {other!r} does not apply to task {self.task!r}")
        if not (0 <= self.noise < math.inf):
            raise ValueError(f"config key 'noise' must be a finite number >= 0, got {self.noise}")
        if self.resolution < 0:
            raise ValueError(f"config key 'resolution' must be >= 0, got {self.resolution}")
        if self.resolution and self.task == "sr" and self.resolution % self.factor:
            raise ValueError(f"config key 'resolution': {self.resolution} is not a multiple of factor {self.factor}")

    @property
    def image_setting(self) -> str:
        """An image search's task with its setting: ``cs_m1000``, ``sr_x4`` (empty for MRI)."""
        if not self.task:
            return ""
        return f"cs_m{self.measurements}" if self.task == "cs" else f"sr_x{self.factor}"

    @property
    def resolved_storage(self) -> str:
        path = self.storage_path or str(Path(".adps") / "tune")
        return path if storage.is_s3(path) else str(Path(path).resolve())

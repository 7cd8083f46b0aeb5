"""The embedded demo: the study of the paper in miniature, end to end, on this machine.

``adps demo`` runs every stage on the embedded defaults (a local Ray instance, a SQLite MLflow store with local
artifacts, synthetic data) inside one work folder: it synthesises a small multi-coil dataset in the FastMRI schema,
prepares it on Ray as real data, trains tiny models of every method through the real Ray Train path
(:func:`adps.orchestration.sweep.run_sweep`), searches every diffusion model's sampler settings with Ray Tune (the
same budget each), runs ``adps evaluate`` on the test slices and prints the tables, the cross-over and what they show.
Re-running reuses what is done (dataset, finished runs, searches, evaluated cells) unless ``fresh``; a changed setting
gets its own folders and run names. What its scale can and cannot show: docs/demo.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "demo_verdict", "run_demo"]

MARKER = ".adps-demo"
"""A file in every demo work folder: ``--fresh`` deletes only folders that hold it."""
STAGES = 6


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``adps demo``; every default is visible here (``quick()`` for ``--quick``)."""

    workdir: Path = field(default_factory=lambda: Path(".adps/demo"))
    """Everything the demo writes: data, runs, MLflow store and artifacts, evaluation, figures."""
    volumes: int = 6
    """Synthetic volumes: 1 test, 1 validation, the rest training."""
    slices_per_volume: int = 4
    """Slices kept per volume (test slices = this)."""
    height: int = 64
    """Rows (readout) of the prepared images."""
    width: int = 48
    """Columns (phase encodes); floor(width / (max R + 1)) must hold the ``acs`` columns."""
    coils: int = 4
    """Receive coils of the synthetic scanner."""
    acs: int = 4
    """Fully sampled centre columns of every mask (METHOD.md: 20 at full size)."""
    r_inf: tuple[float, ...] = (2.0, 4.0, 8.0)
    """R_inf of the evaluation grid (and R_train of the ambient models when ``ambient_r_train`` is empty)."""
    ambient_r_train: tuple[float, ...] = (2.0, 4.0)
    """R_train of the ambient models trained (empty = every R of ``r_inf``). At the demo's scale an ambient model
    trained at R 8 (5 of 48 columns, 4 of them the ACS, at its R + 1) learns little in minutes;
    ``--ambient-r-train 2 4 8`` trains it too (about 1.5 minutes more)."""
    methods: tuple[str, ...] = ("ambient", "edm", "edm_l1", "modl", "ssdu")
    """Methods trained: ambient at every R, edm at R 1, the others at ``baseline_r_train``."""
    baseline_r_train: float = 4.0
    """R_train of the edm_l1, modl and ssdu models."""
    train_steps: int = 800
    """Training steps of the diffusion models (ambient, edm, edm_l1). Measured on the demo's data (one CPU core,
    about 0.18 s a step at batch 8): edm_r1 after 600 steps gives DPS an NRMSE of 0.13 at R_inf 4 (L1-wavelet: 0.20),
    ambient_r2 after 800 steps gives A-DPS 0.27 at R_inf 8 (L1-wavelet: 0.35); after 250 steps neither beats L1."""
    baseline_steps: int = 250
    """Training steps of the unrolled baselines (modl, ssdu), which converge sooner."""
    batch_size: int = 8
    """Slices per training step."""
    concurrent_runs: int = 2
    """Training runs at a time (one CPU each)."""
    sampler_steps: int = 100
    """A-DPS / DPS steps in the search and the evaluation (METHOD.md: 500 at full size; at the demo's size 100
    come within a few per cent of more)."""
    ambient_sigma_min: float = 0.1
    """End of the A-DPS schedule of the ambient models (and A-OS's sigma) where the search set none (METHOD.md:
    0.004 and 0.003). A model trained for minutes returns its aliased input at low sigma, and A-DPS ending there
    ends on the aliased image (NRMSE 0.45 at R_inf 8, against 0.27 ending at 0.1); see docs/evaluation.md."""
    tune_trials: int = 6
    """Ray Tune trials of each search (one budget for all: a fair comparison) of every diffusion model's guidance
    and sigma_min at ``tune_r_inf`` and every ambient model's A-OS sigma; 0 = no search, all run the protocol."""
    tune_r_inf: float = 0.0
    """R_inf of the A-DPS search (0 = the largest of ``r_inf``)."""
    l1: bool = True
    """Evaluate L1-wavelet compressed sensing too (zero-filled and CG-SENSE are always shown)."""
    seed: int = 0
    """Seed of data, training, search and sampling."""
    fresh: bool = False
    """Delete the work folder first (only a folder a demo made)."""
    address: str = ""
    """Ray cluster address (empty: ``$RAY_ADDRESS`` as under ``ray job submit``, else a new local Ray instance
    with its dashboard). The work folder must be visible to every node."""
    tracking_uri: str = ""
    """MLflow tracking URI (empty: a SQLite store in the work folder, ``<workdir>/mlflow.db``)."""

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """``--quick``: one ambient model against the fully sampled EDM, at R_inf 4 and 8, in about 2-3 minutes on
        2 cores: every stage runs, the models are not trained enough to mean anything."""
        values: dict[str, Any] = {
            "volumes": 4, "slices_per_volume": 2, "r_inf": (4.0, 8.0), "ambient_r_train": (4.0,),
            "methods": ("ambient", "edm"), "batch_size": 4, "train_steps": 30, "baseline_steps": 30,
            "sampler_steps": 10, "tune_trials": 2, "l1": False}
        return cls(**{**values, **overrides})

    def runs(self) -> list[tuple[str, float]]:
        """The training runs of the demo, (method, R), in the order they start."""
        runs: list[tuple[str, float]] = []
        for method in self.methods:
            if method == "ambient":
                runs += [("ambient", float(r)) for r in (self.ambient_r_train or self.r_inf)]
            elif method in ("edm", "ncsnv2"):
                runs.append((method, 1.0))
            else:
                runs.append((method, float(self.baseline_r_train)))
        return runs

    def validate(self) -> None:
        """Refuse settings that cannot work, before anything starts; names the setting."""
        from adps.mri.masks import lines_at
        from adps.nn.train_step import MRI_METHODS

        if self.volumes < 3:
            raise ValueError(f"volumes must be >= 3 (1 test, 1 validation, >= 1 training), got {self.volumes}")
        for key in ("slices_per_volume", "train_steps", "baseline_steps", "batch_size", "concurrent_runs",
                    "sampler_steps", "coils"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.tune_trials < 0:
            raise ValueError(f"tune_trials must be >= 0, got {self.tune_trials}")
        if not self.ambient_sigma_min > 0:
            raise ValueError(f"ambient_sigma_min must be > 0, got {self.ambient_sigma_min}")
        unknown = sorted(set(self.methods) - set(MRI_METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(sorted(MRI_METHODS))}")
        for key in ("r_inf", "ambient_r_train"):
            values = getattr(self, key)
            if (key == "r_inf" and not values) or any(r <= 1 for r in values):
                raise ValueError(f"{key} must be values > 1, got {list(values)}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16 (the U-Net halves them 4 times), "
                             f"got {self.height} x {self.width}")
        # Ambient models train on R + 1 masks; each mask keeps the ACS block.
        hardest = max([*self.r_inf, *self.ambient_r_train, self.baseline_r_train]) + ("ambient" in self.methods)
        if lines_at(self.width, hardest) < self.acs:
            raise ValueError(f"r_inf: R {hardest:g} keeps {lines_at(self.width, hardest)} of {self.width} "
                             f"columns, fewer than the {self.acs} ACS columns; lower R or raise width")

    # Folders and names hold the data and training settings: a changed setting never reuses an earlier demo's.
    def _key(self, *names: str) -> str:
        values = {name: getattr(self, name) for name in names}
        return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]

    @property
    def data_key(self) -> str:
        # The prepared format's version too: data prepared by an older adps is never reused.
        from adps.data.shards import SCHEMA_VERSION

        return self._key("volumes", "slices_per_volume", "height", "width", "coils", "acs", "r_inf",
                         "ambient_r_train", "baseline_r_train", "seed") + (f"-v{SCHEMA_VERSION}" if SCHEMA_VERSION > 1 else "")

    @property
    def train_key(self) -> str:
        # The data's key too: a model trained on other data (or an older format) is not reused.
        return self._key("train_steps", "baseline_steps", "batch_size", "seed", "data_key")

    def steps_of(self, method: str) -> int:
        """Training steps of ``method``: ``train_steps`` for diffusion models, else ``baseline_steps``."""
        return self.baseline_steps if method in ("modl", "ssdu") else self.train_steps

    @property
    def tune_model(self) -> tuple[str, float]:
        """The ambient model the printout shows loading: at ``baseline_r_train`` when trained, else the first."""
        ambient = [r for method, r in self.runs() if method == "ambient"]
        return "ambient", (float(self.baseline_r_train) if float(self.baseline_r_train) in ambient else ambient[0])

    @property
    def search_r_inf(self) -> float:
        return float(self.tune_r_inf or max(self.r_inf))


def _stage(number: int, text: str) -> float:
    print(f"\n[{number}/{STAGES}] {text}", flush=True)
    return time.monotonic()


def _done(started: float, what: str = "") -> None:
    print(f"      done in {time.monotonic() - started:.0f} s{': ' + what if what else ''}", flush=True)


def _start_ray(config: DemoConfig) -> str:
    """Join ``config.address`` or start a local Ray instance; returns the dashboard URL ('' if none)."""
    import ray

    address = config.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        context = ray.get_runtime_context()
    elif address:
        context = ray.init(address=address, log_to_driver=False)
    else:
        # Worker logs stay in Ray's session folder: the demo shows its own progress instead.
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                           configure_logging=True, logging_level="ERROR")
    url = getattr(context, "dashboard_url", "") or ""
    return url if not url or url.startswith("http") else f"http://{url}"


def _ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:///"):
        return f".venv/bin/mlflow ui --workers 1 --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)"
    return f"open {tracking_uri}" if tracking_uri.startswith("http") else tracking_uri


def _fresh(workdir: Path) -> None:
    if not workdir.exists():
        return
    if not (workdir / MARKER).exists():
        raise ValueError(f"--fresh: {workdir} was not made by adps demo (no {MARKER} file); not deleting it")
    shutil.rmtree(workdir)


def _synthesize(config: DemoConfig, raw: Path) -> None:
    from adps.data.synth import synthesize_dataset

    done = raw / "complete.json"
    if done.exists():
        print(f"      reusing {raw}", flush=True)
        return
    # Acquired with 2x readout oversampling, as scanners do; prepare crops it.
    synthesize_dataset(raw, n_volumes=config.volumes, n_slices=config.slices_per_volume, n_coils=config.coils,
                       height=config.height, width=config.width, seed=config.seed, noise_std=0.005)
    done.write_text(json.dumps({"volumes": config.volumes}))


def _prepare(config: DemoConfig, raw: Path, prepared: Path) -> dict[str, Any]:
    from adps.data.preprocess import PrepareConfig
    from adps.orchestration.prepare import prepare_dataset

    # Masks at every R the models train at (ambient: R; MoDL / SSDU: R) and are tested at.
    accelerations = sorted({*map(float, config.r_inf), *map(float, config.ambient_r_train), float(config.baseline_r_train)})
    prepare = PrepareConfig.from_dict({
        # 1 test and 1 validation volume, the rest training (n_volumes counts training scans).
        "source": str(raw), "output": str(prepared), "n_volumes": config.volumes - 2,
        "slices_per_volume": config.slices_per_volume, "test_volumes": 1, "val_volumes": 1,
        "crop": (config.height, config.width), "noise_patch": 8, "calib_width": 12, "accelerations": accelerations,
        "acs": config.acs, "shard_size": 4, "reference_iterations": 10, "seed": config.seed,
        "l1": "edm_l1" in config.methods, "l1_iterations": 20})
    return prepare_dataset(prepare, progress=True)


def _train(config: DemoConfig, dataset: Path, tracking_uri: str) -> list[Any]:
    from tqdm.auto import tqdm

    from adps.orchestration.sweep import format_summary, run_sweep
    from adps.orchestration.train_config import TrainConfig

    configs = []
    for method, r in config.runs():
        steps = config.steps_of(method)
        configs.append(TrainConfig.from_dict({
            "method": method, "r_train": r, "preset": "tiny", "dataset": str(dataset),
            # max_steps governs every method (MoDL / SSDU would otherwise stop at METHOD.md's 10 epochs).
            "batch_size": config.batch_size, "max_steps": steps, "epochs": steps, "lr": 1e-3, "lr_rampup": 0,
            "ema_half_life_images": steps * config.batch_size / 10, "num_workers": 1, "cpus_per_worker": 1,
            "seed": config.seed, "checkpoint_every_steps": max(1, steps // 2), "keep_checkpoints": 1,
            "log_every_steps": max(1, steps // 20), "validate_every_steps": steps, "validation_slices": 2,
            "storage_path": str(config.workdir / "runs"), "run_name": f"{method}_r{r:g}-{config.train_key}",
            "tracking_uri": tracking_uri, "experiment": "adps-demo"}))
    # The longest runs first, so that the two slots finish together.
    configs.sort(key=lambda c: -c.max_steps)
    with tqdm(total=len(configs), desc="      train", unit="model") as bar:
        rows = run_sweep(configs, max_concurrent=config.concurrent_runs, progress=False,
                         on_run_end=lambda row: (bar.set_postfix_str(f"{row.run_name} {row.status}"), bar.update(1)))
    print(format_summary(rows), flush=True)
    failed = [row for row in rows if row.status == "failed"]
    if failed:
        raise RuntimeError(f"training failed for {', '.join(r.run_name for r in failed)} (see the table above; "
                           "worker logs under /tmp/ray/session_latest/logs)")
    return rows


def _search(config: DemoConfig, dataset: Path, tracking_uri: str, *, model: tuple[str, float], kind: str,
            r_inf: float, space_text: str) -> dict[str, Any]:
    """One Ray Tune search of ``model`` (or the finished one, read back)."""
    from adps.orchestration.tune import tune_search
    from adps.orchestration.tune_config import SearchConfig

    method, r_train = model
    space = config.workdir / f"tune_space_{kind}.yaml"
    space.write_text(space_text)
    search = SearchConfig(
        model=f"models:/adps-{method}-r{r_train:g}@latest", r_inf=r_inf, space=str(space),
        dataset=str(dataset), slices=0, slices_per_report=1, num_samples=config.tune_trials, seed=config.seed,
        storage_path=str(config.workdir / "tune"), tracking_uri=tracking_uri, experiment="adps-demo-tune",
        name=f"{kind}-{method}_r{r_train:g}-r{r_inf:g}-{config.train_key}-s{config.sampler_steps}-n{config.tune_trials}",
    )
    best_file = Path(search.storage_path) / search.name / "best.json"
    if best_file.exists():
        print(f"      reusing the finished search {best_file.parent}", flush=True)
        return {"best": json.loads(best_file.read_text()), "trials": None}
    return tune_search(search, progress=True)


def _tune(config: DemoConfig, dataset: Path, tracking_uri: str) -> dict[str, Any]:
    """The searches of a fair comparison: every diffusion model's guidance and schedule end at ``search_r_inf``,
    each with the same budget and space (the step count fixed to the demo's), and every ambient model's A-OS
    sigma at its R_train (the only R_inf where A-OS is in-distribution). The evaluation then uses them all
    (``sampler_settings: best``), or none."""
    from adps.nn.reconstruct import DENOISER_METHODS

    guided = ("objective: {metric: nrmse, mode: min}\nparams:\n"
              "  guidance: {type: loguniform, low: 0.1, high: 10.0}\n"
              f"  steps: {{type: choice, values: [{config.sampler_steps}]}}\n"
              "  sigma_min: {type: loguniform, low: 0.02, high: 0.5}\n")
    searches = {}
    for method, r_train in config.runs():
        if method not in DENOISER_METHODS:
            continue
        family = {"ambient": "adps", "ncsnv2": "ald"}.get(method, "dps")
        if family == "ald":
            text = ("sampler: ald\nobjective: {metric: nrmse, mode: min}\nparams:\n"
                    "  step_scale: {type: loguniform, low: 0.05, high: 1.0}\n")
        else:
            text = f"sampler: {family}\n" + guided
        label = f"{method}_r{r_train:g}"
        searches[label] = _search(config, dataset, tracking_uri, model=(method, r_train), kind=family,
                                  r_inf=config.search_r_inf, space_text=text)
        if method == "ambient" and r_train in config.r_inf:
            a_os_space = ("sampler: a_os\nobjective: {metric: nrmse, mode: min}\nparams:\n"
                          "  sigma: {type: loguniform, low: 0.003, high: 1.0}\n")
            searches[f"{label} a_os"] = _search(config, dataset, tracking_uri, model=(method, r_train), kind="a_os",
                                                r_inf=r_train, space_text=a_os_space)
    return searches


def _evaluate(config: DemoConfig, dataset: Path, tracking_uri: str) -> dict[str, Any]:
    from adps.orchestration.evaluate import EvaluateConfig, evaluate

    models = [f"adps-{method}-r{r:g}" for method, r in config.runs()]
    models += ["zero_filled", "cg_sense"] + (["l1"] if config.l1 else [])
    evaluation = EvaluateConfig(
        dataset=str(dataset), models=tuple(models), r_inf=tuple(map(float, config.r_inf)),
        # The step count everywhere; the searched models' settings from their registry tags (every diffusion
        # model was searched alike at search_r_inf in stage 4, or none was); the demo's schedule end elsewhere.
        steps=config.sampler_steps, a_dps_sigma_min=config.ambient_sigma_min, a_os_sigma=config.ambient_sigma_min,
        sampler_settings="best" if config.tune_trials else "paper", slices_per_task=config.slices_per_volume,
        lpips=False, seed=config.seed, output=str(config.workdir / "evaluation"), run_name="demo-evaluation",
        tracking_uri=tracking_uri, experiment="adps-demo-eval", n_boot=1000)
    return evaluate(evaluation, progress=True)


def demo_verdict(rows: list[dict[str, Any]], *, prior_r_inf: float = 4.0, ambient_r_inf: float = 8.0) -> list[str]:
    """What the demo's table shows, in words: the fully sampled prior with DPS against L1-wavelet at
    ``prior_r_inf``, and the best ambient model with A-DPS against L1-wavelet at ``ambient_r_inf`` (mean NRMSE
    over the test slices). Lines for the comparisons the rows allow (none without an ``l1`` row)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if table.empty or "l1" not in set(table["model"]):
        return []
    means = table.groupby(["model", "sampler", "r_inf"])["nrmse"].mean()
    lines = []
    for label, sampler, r_inf, models in (("the fully sampled prior", "dps", prior_r_inf, ["edm_r1"]),
                                          ("the best ambient model", "a_dps", ambient_r_inf,
                                           sorted({m for m in table["model"] if m.startswith("ambient_")}))):
        l1 = means.get(("l1", "l1_wavelet", r_inf))
        scored = {m: means[(m, sampler, r_inf)] for m in models if (m, sampler, r_inf) in means.index}
        if l1 is None or not scored:
            continue
        best = min(scored, key=scored.get)
        word = "ahead of" if scored[best] < l1 else "NOT ahead of"
        lines.append(f"  R_inf {r_inf:g}: {label}, {best} ({sampler}), NRMSE {scored[best]:.3f}: {word} L1-wavelet "
                     f"({l1:.3f})")
    return lines


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run (or resume) the demo; returns the evaluation's rows and cross-over, with paths."""
    from adps.orchestration.evaluate import format_crossover, format_results
    from adps.orchestration.tracking import resolve_tracking_uri

    config.validate()
    if config.fresh:
        _fresh(config.workdir)
    config = replace(config, workdir=config.workdir.resolve())
    config.workdir.mkdir(parents=True, exist_ok=True)
    (config.workdir / MARKER).write_text("made by adps demo; --fresh deletes this folder\n")
    tracking_uri = resolve_tracking_uri(config.tracking_uri or f"sqlite:///{config.workdir / 'mlflow.db'}")
    # Every stage (and every Ray worker, which inherits the environment) uses the demo's store;
    # the demo shows its own progress, not MLflow's per-download bars and database notices.
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    began = time.monotonic()
    print("adps demo: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()), flush=True)
    dashboard = _start_ray(config)
    if dashboard:
        print(f"adps demo: Ray dashboard at {dashboard} (while the demo runs)", flush=True)

    data = config.workdir / "data" / config.data_key
    started = _stage(1, f"synthesising {config.volumes} volumes x {config.slices_per_volume} slices "
                        f"({config.coils} coils, {config.height} x {config.width})")
    _synthesize(config, data / "raw")
    _done(started)

    started = _stage(2, "preparing on Ray: whitening, normalisation, ESPIRiT maps, CG-SENSE / L1 references, masks")
    manifest = _prepare(config, data / "raw", data / "prepared")
    splits = ", ".join(f"{name} {split['n_slices']}" for name, split in manifest["splits"].items())
    _done(started, f"slices {splits} in {data / 'prepared'}")

    runs = config.runs()
    started = _stage(3, f"training {len(runs)} tiny models on Ray Train ({config.train_steps} steps for the diffusion "
                        f"models, {config.baseline_steps} for modl / ssdu, batch {config.batch_size}, "
                        f"{config.concurrent_runs} at a time): " + ", ".join(f"{m}_r{r:g}" for m, r in runs))
    rows = _train(config, data / "prepared", tracking_uri)
    _done(started)

    search = None
    if config.tune_trials:
        from adps.nn.reconstruct import DENOISER_METHODS

        tuned = [f"{m}_r{r:g}" for m, r in runs if m in DENOISER_METHODS]
        started = _stage(4, f"Ray Tune (Optuna TPE + ASHA), {config.tune_trials} trials each on the validation split: "
                            f"the guidance and sigma_min of every diffusion model ({', '.join(tuned)}) at R_inf "
                            f"{config.search_r_inf:g}, and each ambient model's A-OS sigma at its own R")
        search = _tune(config, data / "prepared", tracking_uri)
        for label, result in search.items():
            best = result["best"] if result else None
            print(f"      {label}: " + ("no trial finished" if best is None else f"NRMSE {best['value']:.4f} at " +
                  ", ".join(f"{k} {v:.3g}" for k, v in best["settings"].items() if k != "steps")), flush=True)
        _done(started, "the best settings are tags of each model version")
    else:
        print(f"\n[4/{STAGES}] Ray Tune search skipped (tune_trials 0)", flush=True)

    started = _stage(5, f"evaluating at R_inf {', '.join(f'{r:g}' for r in config.r_inf)} on the test "
                        f"slices ({config.sampler_steps} sampler steps)")
    evaluation = _evaluate(config, data / "prepared", tracking_uri)
    _done(started)

    _stage(6, "results")
    for metric in ("nrmse", "psnr", "ssim"):
        print("\n" + format_results(evaluation["rows"], metric))
    print("\ncross-over against edm_r1 (FS-DPS): crossover = the smallest R_inf from which the ambient model beats it "
          "with every bootstrap interval over slices above 0; inconclusive = from there the means favour it, the "
          "intervals do not; none = it does not stay ahead\n" + format_crossover(evaluation["crossover"]))
    verdict = demo_verdict(evaluation["rows"], ambient_r_inf=max(config.r_inf))
    if verdict:
        print(f"\nwhat the table shows (mean NRMSE over the {len({r['slice'] for r in evaluation['rows']})} test "
              "slices; a demo-scale result, see docs/demo.md):\n" + "\n".join(verdict))
    report = Path(evaluation["output"]) / "report"
    print(f"""
where everything is
  MLflow UI:          {_ui_command(tracking_uri)}
                      (experiments adps-demo, adps-demo-tune, adps-demo-eval)
  registered models:  {', '.join(sorted({row.model for row in rows if row.model}))}
  load one:           adps.load_model("models:/adps-ambient-r{config.tune_model[1]:g}@latest")
  figures:            {report}/nrmse_vs_r.png, psnr_vs_r.png, ssim_vs_r.png, reconstructions.png
  tables:             {report}/results.csv, crossover.csv, denoising_check.csv
  training runs:      {config.workdir / 'runs'}
  everything:         {config.workdir} (run again to reuse it; --fresh to start over)
done in {time.monotonic() - began:.0f} s""", flush=True)
    return {**evaluation, "search": search, "train": rows, "tracking_uri": tracking_uri, "report": str(report)}

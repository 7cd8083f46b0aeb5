"""The ``adps`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import adps
from adps.config import parse_overrides


def _demo(args: argparse.Namespace) -> int:
    from adps.demo import DemoConfig, run_demo  # deferred: keeps `adps --help` fast

    overrides = {
        "volumes": args.volumes, "slices_per_volume": args.slices, "coils": args.coils,
        "r_inf": tuple(args.r_inf) if args.r_inf else None, "methods": tuple(args.methods) if args.methods else None,
        "train_steps": args.steps, "ambient_r_train": tuple(args.ambient_r_train) if args.ambient_r_train else None,
        "baseline_steps": args.baseline_steps, "sampler_steps": args.sampler_steps, "tune_trials": args.trials,
        "seed": args.seed, "workdir": args.workdir, "fresh": args.fresh or None, "address": args.address,
        "tracking_uri": args.tracking_uri, "l1": {"on": True, "off": False}.get(args.l1)}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(config)
    return 0


def _job_config(config_class: type, args: argparse.Namespace, command: str, **values: object) -> object:
    """The job's config from ``--config`` and ``--set`` (and ``values`` from flags), checked
    before Ray starts (a bad key costs a second, not a cluster start-up) and printed."""
    overrides = {**parse_overrides(args.set or []), **{k: v for k, v in values.items() if v is not None}}
    config = config_class.from_yaml(args.config, overrides) if args.config else config_class.from_dict(overrides)
    config.validate()
    print(f"adps {command}: config\n" + config.to_yaml(), flush=True)
    return config


def _synth(args: argparse.Namespace) -> int:
    from adps.data.synth import synthesize_dataset  # deferred: keeps `adps --help` fast

    try:
        written = synthesize_dataset(args.out, n_volumes=args.volumes, n_slices=args.slices, n_coils=args.coils,
                                     height=args.height, width=args.width, seed=args.seed,
                                     acquisitions=tuple(args.acquisitions), noise_std=args.noise_std,
                                     oversampling=args.oversampling)
    except FileNotFoundError as err:  # e.g. a missing bucket: a user's error, named in the message
        print(f"adps synth: error: {err}", file=sys.stderr)
        return 2
    sizes = f"{args.height * args.oversampling} x {args.width} k-space, recon {args.height} x {args.width}"
    print(f"adps synth: wrote {len(written)} volumes ({args.slices} slices, {args.coils} coils, {sizes}) to {args.out}")
    return 0


def _synth_images(args: argparse.Namespace) -> int:
    from adps.images.synth import write_image_folder, write_image_zip  # deferred: keeps `adps --help` fast

    try:
        write = write_image_zip if args.zip else write_image_folder
        write(args.out, args.count, resolution=args.resolution, seed=args.seed, fmt=args.format)
        where = f"one zip, {args.out}" if args.zip else args.out
    except (ValueError, FileNotFoundError) as err:  # a bad count, a missing bucket: named in the message
        print(f"adps synth-images: error: {err}", file=sys.stderr)
        return 2
    print(f"adps synth-images: wrote {args.count} images ({args.resolution} x {args.resolution} {args.format}, "
          f"seed {args.seed}) to {where}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import logging

    from adps.data.preprocess import PrepareConfig  # deferred: keeps `adps --help` fast

    try:
        config = _job_config(PrepareConfig, args, "prepare")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        from adps.orchestration.prepare import prepare_dataset  # imports Ray

        manifest = prepare_dataset(config, ray_address=args.address, progress=not args.no_progress)
    except FileNotFoundError as err:  # a missing config file, source folder or bucket: a user's error
        print(f"adps prepare: error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {manifest['splits'][split]['n_slices']}" for split in ("train", "val", "test"))
    rejected = manifest["rejected"]
    print(f"adps prepare: {config.output}: slices {counts}; {len(rejected)} source file(s) rejected"
          + (":" if rejected else ""))
    # Each rejected file by name and why, as the manifest holds them: where the user looks.
    for entry in rejected:
        print(f"  {entry['source']}: {entry['reason']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from adps.orchestration.train_config import TrainConfig  # deferred: keeps `adps --help` fast

    config = _job_config(TrainConfig, args, "train")
    from adps.orchestration.train import train  # imports Ray

    run = train(config, ray_address=args.address)
    print(f"adps train: {config.resolved_run_name}: step {run.metrics.get('step')}; checkpoint {run.checkpoint}")
    if run.model_uri:
        print(f"adps train: model {run.model_uri} (models:/{run.model_name}@latest); MLflow run {run.run_id}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from adps.orchestration.sweep import format_summary, grid_gaps, load_sweep_configs, run_sweep

    configs = load_sweep_configs(args.configs, parse_overrides(args.set or []), only=args.only or ())
    gaps = grid_gaps(configs)
    if gaps and not args.only:
        print(f"adps sweep: note: the configs do not cover the paper runs {', '.join(gaps)}", flush=True)
    rows = run_sweep(configs, max_concurrent=args.max_concurrent, ray_address=args.address)
    print("adps sweep: summary\n" + format_summary(rows), flush=True)
    return 1 if any(row.status == "failed" for row in rows) else 0


def _evaluate(args: argparse.Namespace) -> int:
    from adps.orchestration import evaluate as evaluation

    study = evaluation.STUDIES[args.study]
    if args.config:
        _refuse_other_study(args.config, study.name)
    config = _job_config(study.config, args, "evaluate")
    result = evaluation.evaluate(config, ray_address=args.address)
    if study.name == "images":
        for metric in ("mse", "lpips") if config.lpips else ("mse",):
            print("adps evaluate: " + evaluation.format_image_results(result["rows"], metric))
        print("adps evaluate: cross-over against the p = 0 model\n"
              + evaluation.format_image_crossover(result["crossover"]))
    else:
        print("adps evaluate: " + evaluation.format_results(result["rows"]))
        print(f"adps evaluate: cross-over against {config.reference}\n"
              + evaluation.format_crossover(result["crossover"]))
    figures = f", figures {', '.join(result['figures'])}" if result["figures"] else ""
    print(f"adps evaluate: {len(result['rows'])} rows{figures} in {result['output']}/report; "
          f"MLflow run {result['run_id']}")
    return 0


def _refuse_other_study(path: Path, study: str) -> None:
    """A config file of the other study (it has that study's data key) named with the wrong ``--study``: say so."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return  # from_yaml reports these, naming the file
    other, key = ("images", "images") if study == "mri" else ("mri", "dataset")
    if isinstance(values, dict) and key in values:
        raise ValueError(f"{path}: has the key {key!r} of a {other} evaluation; run "
                         f"`adps evaluate --study {other} --config {path}`")


def _fid(args: argparse.Namespace) -> int:
    from adps.orchestration.fid import FidConfig, format_fid_table, run_fid

    config = _job_config(FidConfig, args, "fid")
    result = run_fid(config, ray_address=args.address)
    print("adps fid: FID of unconditional samples (table 1)\n" + format_fid_table(result["rows"]))
    print(f"adps fid: MLflow run {result['run_id']}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from adps.orchestration.tune import tune_search
    from adps.orchestration.tune_config import SearchConfig

    config = _job_config(SearchConfig, args, "tune", model=args.model, r_inf=args.r_inf,
                         space=None if args.space is None else str(args.space), task=args.task,
                         measurements=args.measurements, factor=args.factor)
    result = tune_search(config, ray_address=args.address)
    best = result["best"]
    stopped = sum(t["stopped_early"] for t in result["trials"])
    print(f"adps tune: {len(result['trials'])} trials ({stopped} stopped early) in {result['path']}; "
          f"MLflow run {result['run_id']}")
    if best is None:
        print("adps tune: error: no trial finished", file=sys.stderr)
        return 1
    print(f"adps tune: best {best['metric']} {best['value']:.4g} with {json.dumps(best['settings'])}")
    return 0


def _job_arguments(parser: argparse.ArgumentParser, config_help: str, set_help: str) -> None:
    """``--config``, ``--set`` and ``--address``: what every job command takes."""
    parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adps", description="Ambient Diffusion Posterior Sampling: train and "
                                     "evaluate MRI diffusion models learned from undersampled data, on Ray and MLflow.")
    parser.add_argument("--version", action="version", version=f"adps {adps.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="the study in miniature: synthetic data, training, Ray Tune, evaluation, cross-over (~12 min)",
        description="Synthesise and prepare a small dataset, train tiny models on Ray Train (registered in MLflow), "
        "search one ambient model's guidance with Ray Tune, evaluate the grid and print the cross-over. Re-running "
        "reuses what is done.")
    demo.add_argument("--quick", action="store_true",
                      help="ambient R 4 against edm R 1 at R_inf 4 and 8, short training (~2.5 min); the values "
                      "after ; in the help below")
    demo.add_argument("--volumes", type=int, help="synthetic volumes: 1 test, 1 validation, the rest training (6; 4)")
    demo.add_argument("--slices", type=int, help="slices per volume (4; 2)")
    demo.add_argument("--coils", type=int, help="receive coils (4)")
    demo.add_argument("--r-inf", "--accelerations", type=float, nargs="+", metavar="R",
                      help="R_inf of the evaluation (2 4 8; 4 8)")
    demo.add_argument("--ambient-r-train", "--ambient-r", type=float, nargs="+", metavar="R",
                      help="R_train of the ambient models (2 4; 4)")
    demo.add_argument("--methods", nargs="+", metavar="METHOD",
                      help="methods trained (ambient edm edm_l1 modl ssdu; ambient edm)")
    demo.add_argument("--steps", type=int, help="training steps of the diffusion models (800; 30)")
    demo.add_argument("--baseline-steps", type=int, help="training steps of modl and ssdu (250; 30)")
    demo.add_argument("--sampler-steps", type=int, help="A-DPS / DPS steps (100; 10)")
    demo.add_argument("--trials", type=int, help="Ray Tune trials of each search, 0 = none (6; 2)")
    demo.add_argument("--l1", choices=("on", "off"), help="evaluate L1-wavelet CS too (on; off)")
    demo.add_argument("--seed", type=int, help="seed of data, training, search and sampling (0)")
    demo.add_argument("--workdir", type=Path, help="everything the demo writes (default .adps/demo)")
    demo.add_argument("--fresh", action="store_true", help="delete the work folder first instead of reusing it")
    demo.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray instance)")
    demo.add_argument("--tracking-uri", help="MLflow tracking URI (default: a SQLite store in the work folder)")
    demo.set_defaults(handler=_demo)

    synth = commands.add_parser(
        "synth", help="write synthetic multi-coil volumes in the FastMRI file schema (local folder or s3://)")
    synth.add_argument("out", metavar="OUT", help="output folder or s3://bucket/prefix")
    synth.add_argument("--volumes", type=int, default=4, help="number of volumes (default 4)")
    synth.add_argument("--slices", type=int, default=8, help="slices per volume (default 8)")
    synth.add_argument("--coils", type=int, default=16, help="receive coils (default 16)")
    synth.add_argument("--height", type=int, default=384, help="reconstructed rows (default 384)")
    synth.add_argument("--width", type=int, default=320, help="columns (default 320)")
    synth.add_argument("--oversampling", type=int, default=2, help="readout oversampling (default 2)")
    synth.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    synth.add_argument("--acquisitions", nargs="+", default=["AXT2"], metavar="NAME",
                       help="acquisition names, cycled over the volumes (default AXT2)")
    synth.add_argument("--noise-std", type=float, default=0.02, help="k-space noise level (default 0.02)")
    synth.set_defaults(handler=_synth)

    synth_images = commands.add_parser("synth-images", help="write synthetic natural images (a stand-in for CelebA / "
                                       "FFHQ / AFHQ) to a folder, a .zip or s3://")
    synth_images.add_argument("out", metavar="OUT",
                              help="output folder or s3://bucket/prefix; with --zip, a file ending in .zip")
    synth_images.add_argument("--count", type=int, default=256, help="number of images (default 256)")
    synth_images.add_argument("--resolution", type=int, default=64, help="side of the square images (default 64)")
    synth_images.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    synth_images.add_argument("--zip", action="store_true", help="write one .zip of images (the CelebA / FFHQ style)")
    synth_images.add_argument("--format", choices=("png", "jpg", "webp"), default="png",
                              help="image file format (default png, lossless)")
    synth_images.set_defaults(handler=_synth_images)

    prepare = commands.add_parser("prepare",
                                  help="prepare FastMRI volumes into training shards on Ray (local folder or s3://)")
    _job_arguments(prepare, "YAML file of PrepareConfig keys (see docs/data_format.md)",
                   "override a config key (repeatable), e.g. --set n_volumes=100 --set accelerations=4,8")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(handler=_prepare)

    train = commands.add_parser("train", help="train a model of the study on Ray Train (resumes a run of the same name)")
    _job_arguments(train, "YAML file of TrainConfig keys (see configs/)",
                   "override a config key (repeatable), e.g. --set dataset=s3://bucket/data --set num_workers=2")
    train.set_defaults(handler=_train)

    sweep = commands.add_parser(
        "sweep", help="train the paper's whole grid (one run per config file) as concurrent Ray Train runs")
    sweep.add_argument("--configs", type=Path, default=Path("configs"),
                       help="folder of TrainConfig YAML files, one per run (default configs/)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key in every run "
                       "(repeatable), e.g. --set dataset=s3://bucket/prepared")
    sweep.add_argument("--only", nargs="+", metavar="RUN", help="train only these run names (e.g. ambient_r4 edm_r1)")
    sweep.add_argument("--max-concurrent", type=int, default=0,
                       help="runs at a time (default: as many as the cluster's GPUs, or CPUs, hold)")
    sweep.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    sweep.set_defaults(handler=_sweep)

    evaluate = commands.add_parser(
        "evaluate", help="reconstruct the test slices with every model at every R_inf; metrics, figures, cross-over",
        description="The study's evaluation on Ray, logged to MLflow. --study mri (default): every MRI model at "
        "every R_inf (EvaluateConfig; NRMSE, PSNR, SSIM, LPIPS; figures 6-9). --study images: the natural-image "
        "models (ImageEvaluateConfig, e.g. configs/evaluate/images.yaml): compressed sensing, super-resolution "
        "and the NFE sweep (MSE, LPIPS; figures 2-4). Both resume: finished cells are not recomputed.")
    evaluate.add_argument("--study", choices=("mri", "images"), default="mri",
                          help="mri (default): the MRI study; images: the natural-image study (paper section 3.1)")
    _job_arguments(evaluate, "YAML file of EvaluateConfig keys (--study images: ImageEvaluateConfig keys)",
                   "override a config key (repeatable), e.g. --set models=adps-ambient-r4,adps-edm-r1 --set slices=8")
    evaluate.set_defaults(handler=_evaluate)

    fid = commands.add_parser("fid", help="unconditional samples and FID of each diffusion model (paper table 1)")
    _job_arguments(fid, "YAML file of FidConfig keys",
                   "override a config key (repeatable), e.g. --set models=adps-edm-r1,adps-ncsnv2-r1 --set samples=100")
    fid.set_defaults(handler=_fid)

    tune = commands.add_parser(
        "tune", help="Ray Tune search (Optuna TPE + ASHA) of a model's sampler settings at one R_inf, or for a "
        "natural-image model on one task (resumes by name)",
        description="Searches a model's sampler settings with Ray Tune (Optuna TPE + ASHA), logged to MLflow; the "
        "best become tags of the registered model version. An MRI model is searched at --r-inf on a prepared "
        "dataset; a natural-image model (method image) on --task cs --measurements M or --task sr --factor F over "
        "an image folder (--set dataset=...), with --space tune_spaces/image_dps.yaml.")
    tune.add_argument("--model", help="models:/<name>@<alias>, a registered adps-* name or a model folder")
    tune.add_argument("--r-inf", type=float, help="the acceleration R_inf searched at (MRI models)")
    tune.add_argument("--space", type=Path,
                      help="search-space file (tune_spaces/adps.yaml, dps.yaml, ald.yaml; image_dps.yaml for images)")
    tune.add_argument("--task", choices=("cs", "sr"),
                      help="natural-image models: cs (Gaussian compressed sensing) or sr (super-resolution)")
    tune.add_argument("--measurements", type=int, help="--task cs: the number of Gaussian measurements m")
    tune.add_argument("--factor", type=int, help="--task sr: the downscaling factor")
    _job_arguments(tune, "YAML file of SearchConfig keys",
                   "override a config key (repeatable), e.g. --set dataset=s3://bucket/prepared --set num_samples=64")
    tune.set_defaults(handler=_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        # Errors a user can cause (bad values, missing files or buckets) name the input.
        print(f"adps {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

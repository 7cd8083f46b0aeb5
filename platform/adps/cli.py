"""The ``adps`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import adps


def _demo(args: argparse.Namespace) -> int:
    from adps.demo import DemoConfig, run_demo  # deferred: keeps `adps --help` fast

    config = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {
        "slices": args.slices,
        "coils": args.coils,
        "accelerations": tuple(args.accelerations) if args.accelerations else None,
        "seed": args.seed,
        "workdir": args.workdir,
        "l1": args.l1 or None,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    run_demo(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adps",
        description="Ambient Diffusion Posterior Sampling: train and evaluate MRI diffusion models "
        "learned from undersampled data, on Ray and MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"adps {adps.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the embedded demo on synthetic data")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    demo.add_argument("--slices", type=int, help="number of synthetic slices (default 4; 2 with --quick)")
    demo.add_argument("--coils", type=int, help="number of receive coils (default 8)")
    demo.add_argument("--accelerations", type=float, nargs="+", metavar="R", help="accelerations (default 2 4 8)")
    demo.add_argument("--l1", action="store_true", help="also run L1-wavelet compressed sensing")
    demo.add_argument("--seed", type=int, help="seed of phantoms, noise and masks (default 0)")
    demo.add_argument("--workdir", type=Path, help="output folder (default .adps/demo)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:
        # Errors a user can cause are ValueErrors with a message naming the input.
        print(f"adps {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

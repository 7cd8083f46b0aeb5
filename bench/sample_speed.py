"""Speed of A-DPS sampling: seconds per slice against the batch size (slices per network call).

    python -m bench.sample_speed                     # CUDA when present (else the CPU case)
    python -m bench.sample_speed --device cpu        # small CPU case: tiny network, 32 x 32, 4 coils
    python -m bench.sample_speed --device cuda --batches 1 8 --amp none --json out.json
    python -m bench.sample_speed --device cuda --batches 8 --compile default

What is timed is :func:`adps.nn.samplers.a_dps` itself (the A-DPS loop of METHOD.md: per step
one ambient-network forward on ``[A_tr^H A_tr x, mask_tr]``, the data residual through
``A_inf``, one backward pass to ``x``, the Euler update), on the first ``--warmup`` +
``--timed-steps`` intervals of the ``--steps``-step EDM grid. The sampler's callback marks the
end of every step (after a CUDA synchronise); warm-up steps are dropped and the median of the
rest is the step time. Every step of the loop does the same work (same shapes, same network),
so ``s/slice = median step time x --steps / batch``: the time of a full ``--steps`` run,
extrapolated from a few measured steps so that a sweep over six batch sizes fits in minutes.
``--full`` runs all ``--steps`` steps instead (and times them all but the warm-up).

CUDA defaults are the paper's test setting: 500 steps, 384 x 320, 16 coils, R_inf = 4, the
``ambient`` preset (36.8 M parameters; random weights: the timing does not depend on them),
batches 1, 2, 4, 8, 16, 32, bf16 autocast of the network (``--amp none``: fp32 with TF32 as
torch's defaults allow). The paper's figures (one H100: 45.6 s/slice at batch 1, 20.4 s/slice
at batch 8) are printed beside those rows. A batch that runs out of memory is reported as such
and the others go on. CPU defaults are small: ``tiny`` preset, 32 x 32, 4 coils, batches 1 and
2, 2 + 3 steps.

``--precision-check`` also runs a complete A-DPS reconstruction (``--precision-steps`` steps,
20 by default, eager) under ``--amp`` and in float32 with the same weights, problem and noise,
and compares the two (issue 10: the same reconstructions as the float32 sampler within
tolerance): one more JSON line, ``"check": "a_dps_amp_vs_fp32"``.

Prints one JSON line per row on stdout (the device name in each), then a table on stderr;
``--json PATH`` also writes settings, environment and rows to a file. Exits non-zero if a row
failed other than by running out of memory. Needs only torch, numpy and adps layers 1-2 (no
Ray, MLflow or sigpy): runs on a bare GPU machine with ``PYTHONPATH=platform``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform as std_platform  # the standard library module (our package is adps)
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

from adps.data.phantom import brain_phantom
from adps.mri import SenseOperator, column_mask, lines_at
from adps.nn import build_model, count_parameters, edm_sigmas, train_masks
from adps.nn.samplers import a_dps
from adps.nn.unet import set_activation_checkpointing
from bench.train_step import (
    exact_float32,
    inductor_inlining,
    inductor_layout,
    move_off_initialisation,
)

# The mixed-precision check (--precision-check): the bf16 reconstructions may differ from the
# float32 ones by this much in relative norm. bf16 rounds every activation to 2^-9 relative; the
# training step's gradient, summed over many such roundings, moved by 3.7 % on one H200. A
# sampler feeds each step's rounding into the next, so the bound is that order, not 2^-9.
RECON_RTOL = 0.05

# Paper (Aali, Daras et al. 2025, section 3.3 / appendix): A-DPS, 500 steps, one H100.
PAPER_S_PER_SLICE = {1: 45.6, 8: 20.4}
PAPER_DEVICE = "1x NVIDIA H100"

CUDA_DEFAULTS = {"preset": "ambient", "height": 384, "width": 320, "coils": 16, "batches": [1, 2, 4, 8, 16, 32],
                 "warmup": 2, "timed_steps": 5, "amp": "bf16"}
CPU_DEFAULTS = {"preset": "tiny", "height": 32, "width": 32, "coils": 4, "batches": [1, 2],
                "warmup": 2, "timed_steps": 3, "amp": "none"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({std_platform.processor() or std_platform.machine()}, {torch.get_num_threads()} threads)"


def make_problem(n: int, coils: int, height: int, width: int, acceleration: float, r_train: float,
                 seed: int = 0) -> tuple[torch.Tensor, SenseOperator, torch.Tensor, torch.Tensor]:
    """``(y, A_inf, train_mask, phantoms)`` for ``n`` phantom slices with smooth coil maps (no sigpy)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    angles = 2 * np.pi * np.arange(coils) / coils
    maps = np.stack([np.exp(-((xx - np.cos(a)) ** 2 + (yy - np.sin(a)) ** 2)) * np.exp(1j * a) for a in angles])
    maps = maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    maps_t = torch.from_numpy(np.broadcast_to(maps, (n, coils, height, width)).astype(np.complex64).copy())
    image = torch.from_numpy(np.stack([brain_phantom(height, width, rng) for _ in range(n)]))
    acs = min(20, lines_at(width, r_train + 1))  # small CPU widths cannot hold 20 ACS columns
    masks = torch.stack([column_mask(width, acceleration, seed=seed, slice_id=i, acs=acs) for i in range(n)])
    operator = SenseOperator(maps_t, masks)
    train_mask = train_masks(width, r_train, n, seed + 1, acs=acs)
    return operator.forward(image), operator, train_mask, image


def bench_batch(model: torch.nn.Module, device: torch.device, batch: int, args: argparse.Namespace) -> dict:
    y, operator, train_mask, _ = make_problem(batch, args.coils, args.height, args.width, args.acceleration,
                                              args.r_train)
    operator = SenseOperator(operator.maps.to(device), operator.mask.reshape(batch, -1).to(device))
    y, train_mask = y.to(device), train_mask.to(device)
    run_steps = args.steps if args.full else min(args.steps, args.warmup + args.timed_steps)
    sigmas = edm_sigmas(args.steps)[: run_steps + 1]  # the first intervals of the real grid
    marks: list[float] = []

    def callback(info: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator(device=device).manual_seed(0)
    amp = None if args.amp == "none" else args.amp
    start = time.perf_counter()
    out = a_dps(model, y, operator, sigmas, train_mask=train_mask, amp=amp, generator=generator, callback=callback)
    step_times = np.diff([start, *marks]).tolist()
    timed = step_times[args.warmup:] or step_times[-1:]
    median = statistics.median(timed)
    return {
        "median_step_ms": round(median * 1e3, 3),
        "min_step_ms": round(min(timed) * 1e3, 3),
        "measured_steps": len(timed),
        "first_step_ms": round(step_times[0] * 1e3, 3),
        "s_per_slice": round(median * args.steps / batch, 3),
        "slices_per_hour": round(3600 * batch / (median * args.steps), 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "finite": bool(torch.isfinite(torch.view_as_real(out)).all()),
    }


def precision_check(model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> dict:
    """A-DPS reconstructions under ``--amp`` autocast against the float32 sampler (TF32 off):
    same weights, problem, grid and noise draws; a complete ``--precision-steps``-step run at batch
    ``--precision-batch``, eager. The weights are moved away from their initialisation first:
    the output layers start near zero, and D(x) would then be c_skip * x whatever the precision.
    Passes when the reconstructions differ by less than ``RECON_RTOL`` in relative norm; each
    one's NRMSE against the phantom is reported too."""
    net = copy.deepcopy(model)
    torch.manual_seed(1)
    move_off_initialisation(net)
    batch = args.precision_batch
    y, operator, train_mask, phantoms = make_problem(batch, args.coils, args.height, args.width, args.acceleration,
                                                     args.r_train)
    operator = SenseOperator(operator.maps.to(device), operator.mask.reshape(batch, -1).to(device))
    y, train_mask = y.to(device), train_mask.to(device)
    sigmas = edm_sigmas(args.precision_steps)

    def reconstruct(amp: str | None) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(0)
        return a_dps(net, y, operator, sigmas, train_mask=train_mask, amp=amp, generator=generator).cpu()

    with exact_float32():
        reference = reconstruct(None)
    amp = None if args.amp == "none" else args.amp
    mixed = reconstruct(amp)

    def nrmse(x: torch.Tensor, target: torch.Tensor) -> float:
        return float((x - target).abs().norm() / target.abs().norm())

    difference = nrmse(mixed, reference)
    finite = bool(torch.isfinite(torch.view_as_real(mixed)).all())
    return {
        "device": device_name(device), "check": "a_dps_amp_vs_fp32", "sampler": "a_dps", "preset": args.preset,
        "batch": batch, "height": args.height, "width": args.width, "coils": args.coils, "amp": args.amp,
        "compile": "off", "steps": args.precision_steps, "recon_rel_diff": difference, "recon_rtol": RECON_RTOL,
        "nrmse_fp32": nrmse(reference, phantoms), f"nrmse_{args.amp}": nrmse(mixed, phantoms),
        "finite": finite, "passed": difference < RECON_RTOL and finite,
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'batch':>5} {'amp':>5} {'ms/step':>9} {'s/slice':>9} {'paper s/slice':>14} {'peak GB':>8}  note"
    lines = [header, "-" * len(header)]
    for row in rows:
        paper = row["paper_s_per_slice"]
        lines.append(
            f"{row['batch']:>5} {row['amp']:>5} {row.get('median_step_ms') or float('nan'):>9.1f} "
            f"{row.get('s_per_slice') or float('nan'):>9.2f} {'' if paper is None else f'{paper:.1f}':>14} "
            f"{'' if row.get('peak_memory_gb') is None else format(row['peak_memory_gb'], '.2f'):>8}  "
            f"{row['error'] or ''}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when present, else the small CPU case")
    parser.add_argument("--preset", choices=["ambient", "tiny"], default=None, help="ambient network preset")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="slices per network call")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--coils", type=int, default=None)
    parser.add_argument("--acceleration", type=float, default=4.0, help="R_inf of the acquisition masks")
    parser.add_argument("--r-train", "--train-acceleration", type=float, default=4.0, help="R_train (A_tr is at R_train + 1)")
    parser.add_argument("--steps", type=int, default=500, help="sampler steps the s/slice figure is for")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the statistics")
    parser.add_argument("--timed-steps", type=int, default=None, help="steps measured after the warm-up")
    parser.add_argument("--full", action="store_true", help="run all --steps steps instead of extrapolating")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="network autocast (CUDA)")
    parser.add_argument("--compile", choices=["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        default="off", help="torch.compile the network, afresh for each batch size (static shapes; "
                                            "the compilation falls in the warm-up steps, see first_step_ms)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing in the network's gradient to x (less memory: larger batches)")
    parser.add_argument("--nhwc", action="store_true",
                        help="with --compile: force Inductor's layout optimisation (channels-last convolutions, no "
                             "cuDNN transposes; see bench/train_step.py's inductor_layout)")
    parser.add_argument("--inline", action="store_true",
                        help="with --compile: Inductor recomputes element-wise intermediates in the kernels that read "
                             "them instead of writing them out (fewer bytes; see bench/train_step.py's "
                             "inductor_inlining)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark: time cuDNN's algorithms once per shape, keep the fastest")
    parser.add_argument("--precision-check", action="store_true",
                        help="also compare a complete A-DPS run under --amp with the float32 sampler (eager; exits 1 "
                             "if the reconstructions differ by RECON_RTOL or more)")
    parser.add_argument("--precision-steps", type=int, default=20, help="steps of the precision check's run")
    parser.add_argument("--precision-batch", type=int, default=2, help="slices of the precision check")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write settings, environment and rows here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device found (--device cuda)")
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    args.device = "cpu" if args.device == "auto" else args.device
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.steps < 1 or args.timed_steps < 1 or args.warmup < 0 or min(args.batches) < 1
            or args.precision_steps < 1 or args.precision_batch < 1):
        parser.error("--steps, --timed-steps, --batches, --precision-steps and --precision-batch must be >= 1, "
                     "--warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    model = build_model("ambient", args.preset).to(device)
    if args.checkpointing:
        set_activation_checkpointing(model)
    name = device_name(device)
    check = None
    if args.precision_check:
        # Before the timed rows: a compiled network's CUDA graphs keep their memory pool while it lives.
        try:
            check = precision_check(model, device, args)
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            check = {"device": name, "check": "a_dps_amp_vs_fp32", "amp": args.amp, "passed": False,
                     "error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(check), flush=True)
    rows, failed = [], False
    for batch in args.batches:
        row = {
            "device": name,
            "sampler": "a_dps",
            "preset": args.preset,
            "parameters": count_parameters(model),
            "batch": batch,
            "height": args.height,
            "width": args.width,
            "coils": args.coils,
            "acceleration": args.acceleration,
            "r_train": args.r_train,
            "steps": args.steps,
            "extrapolated": not args.full,
            "amp": args.amp,
            "compile": args.compile,
            "activation_checkpointing": args.checkpointing,
            "cudnn_benchmark": args.cudnn_benchmark,
            "inductor_nhwc": args.nhwc,
            "inductor_inline": args.inline,
            "paper_s_per_slice": PAPER_S_PER_SLICE.get(batch) if args.device == "cuda" else None,
            "paper_device": PAPER_DEVICE,
            "error": None,
        }
        try:
            net = model
            if args.compile != "off":
                torch._dynamo.reset()  # a fresh static-shape graph per batch size
                net = torch.compile(model, mode=None if args.compile == "default" else args.compile, dynamic=False)
            with inductor_layout(args.nhwc), inductor_inlining(args.inline):  # read when the first step compiles
                row.update(bench_batch(net, device, batch, args))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:  # noqa: BLE001 (a benchmark reports every failure and goes on)
            row["error"] = f"{type(exc).__name__}: {exc}"
            failed = True
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(format_table(rows), file=sys.stderr)
    if check is not None and "error" not in check:
        print(f"precision: A-DPS {args.amp} against float32, {check['steps']} steps, batch {check['batch']}: "
              f"reconstructions {check['recon_rel_diff']:.2e} apart (tolerance {RECON_RTOL}), NRMSE to the phantom "
              f"{check['nrmse_fp32']:.4f} / {check[f'nrmse_{args.amp}']:.4f}: "
              f"{'ok' if check['passed'] else 'FAILED'}", file=sys.stderr)
    print(f"device: {name}; paper: {PAPER_DEVICE}, A-DPS 500 steps, "
          f"45.6 s/slice at batch 1, 20.4 s/slice at batch 8"
          + ("" if args.full else f"; s/slice here = median step time x {args.steps} / batch"), file=sys.stderr)
    if args.json is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        environment = {"torch": torch.__version__, "python": std_platform.python_version(),
                       "cuda": torch.version.cuda, "device": name}
        args.json.write_text(json.dumps({"settings": settings, "environment": environment, "rows": rows,
                                         "precision_check": check}, indent=2))
    failed = failed or (check is not None and not check["passed"])
    return 1 if failed or not all(math.isfinite(r.get("s_per_slice", 0.0) or 0.0) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""How many network calls A-DPS and DPS need for the protocol's quality (issue 29, part 2).

    python -m bench.fewer_calls                                  # exact Gaussian denoisers, CPU
    python -m bench.fewer_calls --model runs/ambient/ema --dataset prepared/axt2 --slices 4
    python -m bench.fewer_calls --device cuda --train-steps 1500 --height 64 --width 64 --coils 4

Each solver (``euler``, METHOD.md's; ``heun``, EDM's second order) runs at each of ``--steps``
and each ``--guidance`` (a small grid search: with fewer steps the guidance that keeps the
quality changes) on the same problems and noise, on the protocol's schedule (EDM, sigma 10 to
0.004, rho 7) with that many steps. Each row: the complex NRMSE against the truth (mean over slices),
the network calls (:func:`adps.nn.samplers.network_calls`), seconds per slice, and the NRMSE
relative to the 500-step Euler run's at guidance 1 (the protocol, the reference row). The summary
line per solver names the fewest calls within ``--tolerance`` (1 %) of the reference NRMSE, the
criterion ``adps tune``'s fastest settings use (a search finds them over a larger space).

Problems: with no ``--model``, the sampler tests' setting (``adps.nn.gaussian_denoisers``): a
Gaussian prior, its exact denoiser (DPS) and exact ambient denoiser at R_train 2 (A-DPS), the
truth drawn from the prior, measured at ``--r-inf`` through random coil maps. With ``--model``
(a saved model folder: ambient models run A-DPS, EDM / EDM-L1 DPS) the first ``--slices`` val
slices of ``--dataset`` at ``--r-inf``, against their references. With ``--train-steps`` a
small model (``--train-method`` ambient at R_train 2, or edm; ``--train-preset``) is first
trained here on synthetic phantoms (no Ray, MLflow or sigpy needed: the GPU check's "model trained
on the GPU in the session"), then reconstructs ``--slices`` other phantoms with A-DPS (DPS).

Prints one JSON line per row and per summary on stdout, a table on stderr; ``--json PATH`` also
writes them to a file. Needs torch and adps layers 1-2 only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from adps.metrics import nrmse
from adps.mri import SenseOperator, column_mask
from adps.nn.gaussian_denoisers import AmbientGaussianDenoiser, GaussianDenoiser
from adps.nn.samplers import SOLVERS, network_calls, run_sampler
from adps.nn.train_step import build_model, make_optimizer, train_step
from bench.train_step import benchmark_batch, device_name

PROTOCOL_STEPS = 500
"""METHOD.md's A-DPS / DPS step count: the reference every row is compared with."""


def _complex_normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))


def gaussian_problems(*, slices: int, coils: int, height: int, width: int, r_inf: float, seed: int,
                      prior_std: float = 0.3) -> list[dict[str, Any]]:
    """The sampler tests' problem: a truth from the Gaussian prior, measured at ``r_inf``; one
    entry per sampler (A-DPS with the exact ambient denoiser, DPS with the exact prior one)."""
    generator = torch.Generator().manual_seed(seed)
    maps = _complex_normal(generator, slices, coils, height, width)
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()
    mean = 1.0 + _complex_normal(generator, slices, height, width)
    truth = mean + prior_std * _complex_normal(generator, slices, height, width)
    masks = torch.stack([column_mask(width, r_inf, seed=seed, slice_id=i, acs=2) for i in range(slices)])
    operator = SenseOperator(maps, masks)
    y = operator.forward(truth)
    common = {"y": y, "operator": operator, "truth": truth, "acs": 2}
    return [{"problem": "gaussian", "sampler": "a_dps", "model": AmbientGaussianDenoiser(mean, prior_std, maps),
             "r_train": 2.0, **common},
            {"problem": "gaussian", "sampler": "dps", "model": GaussianDenoiser(mean, prior_std), **common}]


def model_problems(model_dir: str, dataset: str, *, slices: int, r_inf: float) -> list[dict[str, Any]]:
    """A saved model's sampler on the first ``slices`` val slices of a prepared dataset."""
    from adps.data.dataset import PreparedSliceDataset
    from adps.data.shards import read_manifest
    from adps.nn.checkpoint import load_model

    model, config = load_model(model_dir)
    samplers = {"ambient": "a_dps", "edm": "dps", "edm_l1": "dps"}
    if config["method"] not in samplers:
        raise ValueError(f"--model {model_dir}: method {config['method']!r} has no A-DPS / DPS sampler "
                         f"(choose a model of {', '.join(samplers)})")
    data = PreparedSliceDataset(dataset, "val", acceleration=r_inf)
    try:
        items = [data[i] for i in range(min(slices, len(data)))]
    finally:
        data.close()
    if not items:
        raise ValueError(f"--dataset {dataset}: no val slices")
    mask = torch.stack([item["mask"] for item in items])
    operator = SenseOperator(torch.stack([item["maps"] for item in items]), mask)
    return [{"problem": Path(model_dir).name, "sampler": samplers[config["method"]], "model": model.eval(),
             "y": torch.stack([item["kspace"] for item in items]) * mask[:, None, None, :], "operator": operator,
             "truth": torch.stack([item["reference"] for item in items]), "r_train": float(config.get("r_train") or 1),
             "acs": read_manifest(dataset)["config"].get("acs")}]


TRAINED_SAMPLERS = {"ambient": "a_dps", "edm": "dps"}
"""``--train-method`` -> the sampler its model reconstructs with."""


def trained_problem(*, steps: int, seconds: float, preset: str, batch_size: int, train_slices: int, slices: int,
                    coils: int, height: int, width: int, r_inf: float, device: torch.device, amp: str | None,
                    seed: int, method: str = "ambient", r_train: float = 2.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a ``method`` model here (``steps`` Adam steps of ``batch_size`` slices, or fewer if
    ``seconds`` run out) on ``train_slices`` synthetic phantoms (ambient: their k-space at
    ``r_train``; edm: the fully sampled images); the A-DPS / DPS problem of ``slices`` other
    phantoms (another seed) at ``r_inf``, and a record of the training."""
    data = benchmark_batch(train_slices, coils, height, width, r_train, seed=seed)
    data = {key: value.to(device) for key, value in data.items() if key != "l1"}
    torch.manual_seed(seed)
    model = build_model(method, preset).to(device).train()
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    started, losses, done = time.perf_counter(), [], 0
    while done < steps and time.perf_counter() - started < seconds:
        index = torch.randint(train_slices, (batch_size,), generator=generator).to(device)
        result = train_step(method, model, {k: v[index] for k, v in data.items()}, optimizer, generator=generator,
                            amp=amp)
        losses.append(result["loss"])
        done += 1
    training = {"train_method": method, "train_steps": done, "train_seconds": time.perf_counter() - started,
                "train_preset": preset, "train_batch": batch_size, "train_slices": train_slices, "r_train": r_train,
                "amp": amp, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}
    test = benchmark_batch(slices, coils, height, width, r_inf, seed=seed + 1)
    mask = test["mask"].to(device)
    problem = {"problem": f"trained-{method}-{preset}", "sampler": TRAINED_SAMPLERS[method], "model": model.eval(),
               "y": test["kspace"].to(device) * mask[:, None, None, :],
               "operator": SenseOperator(test["maps"].to(device), mask), "truth": test["reference"].to(device),
               "r_train": r_train, "amp": amp}  # acs None: the training masks' rule (run_sampler)
    return problem, training


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(problem: dict[str, Any], solver: str, steps: int, *, guidance: float, seed: int) -> dict[str, Any]:
    """One reconstruction of ``problem`` with ``solver`` at ``steps``: its NRMSE, calls and time."""
    device = problem["truth"].device
    _synchronize(device)
    started = time.perf_counter()
    image = run_sampler(problem["sampler"], problem["model"], problem["y"], problem["operator"],
                        generator=torch.Generator().manual_seed(seed), steps=steps, guidance=guidance,
                        r_train=problem.get("r_train"), seed=seed, acs=problem.get("acs"), solver=solver,
                        amp=problem.get("amp"))
    _synchronize(device)
    seconds = time.perf_counter() - started
    truth = problem["truth"]
    return {"problem": problem["problem"], "sampler": problem["sampler"], "solver": solver, "steps": steps,
            "network_calls": network_calls(steps, solver), "guidance": guidance,
            "nrmse": float(nrmse(image.detach(), truth).mean()), "s_per_slice": seconds / truth.shape[0]}


def summarise(rows: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """Per problem and solver: the fewest calls whose NRMSE is within ``tolerance`` of the
    reference (500-step Euler) row's, with both rows' seconds per slice."""
    out = []
    for key in sorted({(r["problem"], r["sampler"]) for r in rows}):
        group = [r for r in rows if (r["problem"], r["sampler"]) == key]
        reference = next(r for r in group if (r["solver"], r["steps"], r["guidance"]) == ("euler", PROTOCOL_STEPS, 1.0))
        for solver in sorted({r["solver"] for r in group}):
            near = [r for r in group if r["solver"] == solver and r["nrmse"] <= reference["nrmse"] * (1 + tolerance)]
            best = min(near, key=lambda r: r["network_calls"], default=None)
            out.append({"summary": "fewest_calls_within_tolerance", "problem": key[0], "sampler": key[1],
                        "solver": solver, "tolerance": tolerance, "reference_nrmse": reference["nrmse"],
                        "reference_calls": reference["network_calls"],
                        "reference_s_per_slice": reference["s_per_slice"],
                        **{key: None if best is None else best[key]
                           for key in ("network_calls", "steps", "guidance", "nrmse", "s_per_slice")},
                        "speedup": None if best is None else reference["network_calls"] / best["network_calls"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fewer_calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200, PROTOCOL_STEPS],
                        help="step counts of each solver (the 500-step Euler reference is always added)")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                        help="l_ss values: each step count runs each (a small grid search; METHOD.md's 1.0)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative NRMSE tolerance (0.01)")
    parser.add_argument("--r-inf", type=float, default=4.0)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--coils", type=int, default=2, help="Gaussian / trained problem: coils (2)")
    parser.add_argument("--height", type=int, default=16, help="Gaussian / trained problem: rows (16)")
    parser.add_argument("--width", type=int, default=12, help="Gaussian / trained problem: columns (12)")
    parser.add_argument("--model", default="", help="a saved model folder instead of the Gaussian denoisers")
    parser.add_argument("--dataset", default="", help="with --model: the prepared dataset (val slices)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train an ambient model here for this many steps first (0: no training)")
    parser.add_argument("--train-seconds", type=float, default=float("inf"), help="... or until this time is spent")
    parser.add_argument("--train-method", choices=list(TRAINED_SAMPLERS), default="ambient",
                        help="the model --train-steps trains: ambient (A-DPS, on R_train 2 k-space) or edm (DPS)")
    parser.add_argument("--train-preset", choices=["tiny", "ambient", "edm"], default="tiny",
                        help="tiny, or the method's paper-size preset")
    parser.add_argument("--train-batch", type=int, default=8, help="slices per training step (8)")
    parser.add_argument("--train-slices", type=int, default=64, help="synthetic training phantoms (64)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                        help="autocast of the trained model's training and sampling (default: float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.model and not args.dataset:
        parser.error("--model needs --dataset (the prepared dataset whose val slices it reconstructs)")
    if args.model and args.train_steps:
        parser.error("--model and --train-steps exclude each other (a saved model, or one trained here)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.device == "cuda" and not args.train_steps:
        parser.error("--device cuda is for --train-steps (the Gaussian and saved-model problems run on the CPU)")
    torch.set_num_threads(args.threads)
    training = None
    if args.model:
        problems = model_problems(args.model, args.dataset, slices=args.slices, r_inf=args.r_inf)
    elif args.train_steps:
        problem, training = trained_problem(
            steps=args.train_steps, seconds=args.train_seconds, preset=args.train_preset, batch_size=args.train_batch,
            train_slices=args.train_slices, slices=args.slices, coils=args.coils, height=args.height, width=args.width,
            r_inf=args.r_inf, device=torch.device(args.device), amp=args.amp, seed=args.seed, method=args.train_method)
        print(json.dumps({"training": training}), flush=True)
        print(f"trained {training['train_steps']} steps in {training['train_seconds']:.1f} s, loss "
              f"{training['final_loss']:.4f} (mean of the last 50)", file=sys.stderr)
        problems = [problem]
    else:
        problems = gaussian_problems(slices=args.slices, coils=args.coils, height=args.height, width=args.width,
                                     r_inf=args.r_inf, seed=args.seed)
    device = device_name(torch.device(args.device))
    plan = sorted({(solver, steps, guidance) for solver in args.solvers for steps in args.steps
                   for guidance in args.guidance} | {("euler", PROTOCOL_STEPS, 1.0)})
    rows = []
    for problem in problems:
        for solver, steps, guidance in plan:
            row = {**run_row(problem, solver, steps, guidance=guidance, seed=args.seed), "device": device}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarise(rows, args.tolerance)
    for line in summary:  # what the sampler improves on: the zero-filled (A^H y) reconstruction
        problem = next(p for p in problems if (p["problem"], p["sampler"]) == (line["problem"], line["sampler"]))
        line["zero_filled_nrmse"] = float(nrmse(problem["operator"].adjoint(problem["y"]), problem["truth"]).mean())
    for line in summary:
        print(json.dumps(line), flush=True)
    print(f"{'problem':10s} {'sampler':7s} {'solver':6s} {'steps':>5s} {'guid.':>5s} {'calls':>5s} {'nrmse':>8s} "
          f"{'vs 500':>8s} {'s/slice':>8s}", file=sys.stderr)
    for row in rows:
        reference = next(r for r in rows if (r["problem"], r["sampler"], r["solver"], r["steps"], r["guidance"]) ==
                         (row["problem"], row["sampler"], "euler", PROTOCOL_STEPS, 1.0))
        print(f"{row['problem'][:10]:10s} {row['sampler']:7s} {row['solver']:6s} {row['steps']:5d} {row['guidance']:5g} "
              f"{row['network_calls']:5d} {row['nrmse']:8.4f} {row['nrmse'] / reference['nrmse'] - 1:+8.2%} "
              f"{row['s_per_slice']:8.3f}", file=sys.stderr)
    for line in summary:
        found = (f"{line['network_calls']} calls ({line['steps']} steps, guidance {line['guidance']:g}), "
                 f"{line['speedup']:.0f}x fewer" if line["network_calls"] else "none")
        print(f"{line['problem']} {line['sampler']} {line['solver']}: fewest calls within {line['tolerance']:.0%} of "
              f"the 500-step Euler NRMSE {line['reference_nrmse']:.4f} (zero-filled {line['zero_filled_nrmse']:.4f}): "
              f"{found}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "training": training, "rows": rows,
                                               "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

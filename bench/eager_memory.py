"""What the eager training step keeps for its backward pass, per method, planned on the CPU.

    python bench/eager_memory.py                                  # ambient, edm, ncsnv2; plain and lean
    python bench/eager_memory.py --methods ncsnv2 --checkpointing on

One eager training step (bf16 autocast, the method's paper preset) runs at two small image
sizes under ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps
for the backward pass; their storages are summed once each, leaving out the float32 weights
themselves. What a step keeps is a fixed part (the bf16 copies of the weights that autocast
makes) plus a part proportional to the pixels, so the two sizes give both, and the line is
extrapolated to the paper's size (batch 8, 384 x 320 by default). The optimiser's states
(float32 weights, gradients, Adam's two moments and the EMA: 5 x 4 bytes per parameter) are
added to give ``planned_gib``.

A plan, not a measurement of a GPU's peak: the backward pass's working set comes on top (on
the H200 the compiled step peaked 1.2 GiB above what bench/memory_plan.py planned), and CPU
autocast and attention kernels may keep slightly different tensors from CUDA's. It prints one
JSON line per (method, checkpointing).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from adps.nn.train_step import PAPER_PRESETS, build_model, make_optimizer, make_synthetic_batch, train_step
from adps.nn.unet import count_parameters, set_activation_checkpointing
from memory_plan import STATE_BYTES_PER_PARAMETER  # bench/memory_plan.py: sys.path[0] for a script

METHODS = ("ambient", "edm", "ncsnv2")  # the networks whose memory decides the card (MoDL and SSDU are small)


def kept_bytes(method: str, preset: str, height: int, width: int, *, checkpointing: bool,
               coils: int = 4) -> tuple[int, int]:
    """Bytes of the tensors one eager bf16 training step of one slice keeps for its backward
    pass (each storage once; the float32 weights left out), and the network's parameters."""
    torch.manual_seed(0)
    model = build_model(method, preset).train()
    if checkpointing and not set_activation_checkpointing(model, True):
        raise ValueError(f"{method}: its network has no activation checkpointing")
    batch = make_synthetic_batch(1, coils, height, width, acceleration=4, seed=0, with_l1=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()  # alive until the backward: no address reuse
        return tensor

    optimizer = make_optimizer(model, lr=0.0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        train_step(method, model, batch, optimizer, generator=torch.Generator().manual_seed(0), amp="bf16")
    return sum(kept.values()), count_parameters(model)


def plan_row(method: str, *, checkpointing: bool, sizes: tuple[tuple[int, int], tuple[int, int]],
             target: tuple[int, int, int], preset: str | None = None) -> dict[str, Any]:
    """The linear fit of :func:`kept_bytes` over ``sizes`` (two (height, width)), extrapolated to
    ``target`` (batch, height, width)."""
    preset = preset or PAPER_PRESETS[method]
    started = time.perf_counter()
    (h0, w0), (h1, w1) = sizes
    (small, parameters), (large, _) = (kept_bytes(method, preset, h, w, checkpointing=checkpointing) for h, w in sizes)
    per_pixel = (large - small) / (h1 * w1 - h0 * w0)
    fixed = small - per_pixel * h0 * w0
    batch, height, width = target
    activations = per_pixel * batch * height * width
    return {
        "bench": "eager_memory", "device": "cpu (plan of the eager step's saved tensors)", "torch": torch.__version__,
        "method": method, "preset": preset, "amp": "bf16", "activation_checkpointing": checkpointing,
        "batch": batch, "height": height, "width": width, "fit_sizes": [list(s) for s in sizes],
        "kept_mib_at_fit_sizes": [round(small / 2**20, 2), round(large / 2**20, 2)],
        "fixed_mib": round(fixed / 2**20, 1), "activations_gib": round(activations / 2**30, 2),
        "optimizer_gib": round(parameters * STATE_BYTES_PER_PARAMETER / 2**30, 2), "parameters": parameters,
        "planned_gib": round((activations + fixed + parameters * STATE_BYTES_PER_PARAMETER) / 2**30, 2),
        "plan_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/eager_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--preset", default=None, help="network preset (default: each method's paper preset)")
    parser.add_argument("--sizes", type=int, nargs=4, default=[96, 80, 192, 160], metavar=("H0", "W0", "H1", "W1"),
                        help="the two image sizes of the fit (multiples of the network's size multiple)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=320)
    args = parser.parse_args(argv)
    h0, w0, h1, w1 = args.sizes
    if h0 * w0 >= h1 * w1:
        parser.error("--sizes: the second size must have more pixels than the first")
    for method in args.methods:
        for mode in args.checkpointing:
            row = plan_row(method, checkpointing=mode == "on", sizes=((h0, w0), (h1, w1)),
                           target=(args.batch, args.height, args.width), preset=args.preset)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

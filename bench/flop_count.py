"""What issue 10's speed targets ask of the GPU: the network's FLOPs, counted, against the peak.

    python bench/flop_count.py              # ambient preset, 384 x 320: seconds on the CPU, no memory

Counts the floating-point operations of the ambient network with ``torch.utils.flop_counter``
on the meta device (shapes only: nothing is computed or allocated), for the two workloads of
issue 10:
- a training step: forward and backward (gradients of the weights and of the input) per slice;
- an A-DPS step: forward and backward to ``x`` only (the weights are frozen while a sampler runs),
  per slice; a reconstruction is 500 of them.

Then, for each target, the sustained rate it needs in TFLOP/s and as a share of the dense bf16
peak of an H100 SXM (989 TFLOP/s; the H200 has the same compute), beside the rate the best
measured configuration reached. Only matrix products and convolutions are counted: the
element-wise work (GroupNorm, SiLU, gates) has few FLOPs but moves the activations through
memory, which is where the rest of the step's time goes.

Prints one JSON line per workload. Needs only torch and adps layer 2: ``PYTHONPATH=platform``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from adps.nn import PAPER_PRESETS, build_model

H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's H100 SXM5 datasheet: 1,979 with 2:4 sparsity, half without

# Issue 10's targets, and the best rows measured so far (bench/results/2026-11-27_h200.jsonl).
TARGETS = {
    "train": {"target_slices_per_s": 40.0, "paper_slices_per_s": 19.7,
              "measured": {"slices_per_s": 24.768, "device": "NVIDIA H200", "configuration": "compile default, cudnn"}},
    "a_dps": {"target_s_per_slice": 5.0, "paper_s_per_slice": 20.4, "steps": 500,
              "measured": {"s_per_slice": 12.244, "device": "NVIDIA H200",
                           "configuration": "compile default, weights frozen, batch 16"}},
}


def count_flops(preset: str, height: int, width: int, *, weights_grad: bool) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one slice through the ambient network. The backward
    computes the input's gradient, and the weights' too with ``weights_grad``. The network alone:
    the preconditioning around it is element-wise (and checks sigma's values, which the meta
    device does not have)."""
    with torch.device("meta"):
        net = build_model("ambient", preset).net.train(weights_grad)  # training: dropout on, as in a step
        net.requires_grad_(weights_grad)
        x = torch.zeros(1, net.config.in_channels, height, width, requires_grad=True)
        noise_label = torch.zeros(1)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x, noise_label)
    forward = counter.get_total_flops()
    with counter:
        net(x, noise_label).sum().backward()
    return float(forward), float(counter.get_total_flops())


def rows(preset: str, height: int, width: int) -> list[dict[str, object]]:
    forward, train = count_flops(preset, height, width, weights_grad=True)
    _, sample = count_flops(preset, height, width, weights_grad=False)
    common = {"bench": "flop_count", "preset": preset, "height": height, "width": width,
              "forward_flop_per_slice": int(forward), "forward_tflop_per_slice": round(forward / 1e12, 3),
              "peak_tflops": H100_BF16_DENSE_TFLOPS}
    train_target = TARGETS["train"]
    train_rate = train / 1e12 * train_target["target_slices_per_s"]
    measured = train_target["measured"]
    a_dps = TARGETS["a_dps"]
    per_slice = sample * a_dps["steps"] / 1e12
    a_dps_rate = per_slice / a_dps["target_s_per_slice"]
    return [
        {**common, "workload": "training step (forward, backward to weights and input)",
         "flop_per_slice": int(train), "tflop_per_slice": round(train / 1e12, 3), **train_target,
         "target_tflops": round(train_rate, 1), "target_share_of_peak": round(train_rate / H100_BF16_DENSE_TFLOPS, 3),
         "measured_tflops": round(train / 1e12 * measured["slices_per_s"], 1)},
        {**common, "workload": "A-DPS step (forward, backward to x)",
         "flop_per_slice_step": int(sample), "tflop_per_slice_step": round(sample / 1e12, 3),
         "tflop_per_slice": round(per_slice, 1), **a_dps,
         "target_tflops": round(a_dps_rate, 1), "target_share_of_peak": round(a_dps_rate / H100_BF16_DENSE_TFLOPS, 3),
         "measured_tflops": round(per_slice / a_dps["measured"]["s_per_slice"], 1)},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=PAPER_PRESETS["ambient"])
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=320)
    args = parser.parse_args(argv)
    for row in rows(args.preset, args.height, args.width):
        print(json.dumps(row), flush=True)
        print(f"{row['workload']}: {row['tflop_per_slice']} TFLOP per slice; the target needs {row['target_tflops']} "
              f"TFLOP/s ({100 * row['target_share_of_peak']:.0f} % of the H100's dense bf16 peak); measured "
              f"{row['measured_tflops']} TFLOP/s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

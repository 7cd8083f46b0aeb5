"""What the compiled training step keeps for its backward pass, planned on the CPU, no GPU needed.

    python bench/memory_plan.py                          # ambient preset, batch 8, 384 x 320, bf16
    python bench/memory_plan.py --budgets 1.0 0.5 --checkpointing
    python bench/memory_plan.py --preset tiny --height 64 --width 64 --budgets 1.0 0.5   # seconds

Under ``torch.compile`` the activations a training step keeps are fixed before any kernel runs:
AOTAutograd traces the joint forward-backward graph, and Inductor's partitioner (min-cut, with
``activation_memory_budget``, the TrainConfig key of the same name) splits it into a forward
graph that returns the tensors to save and a backward graph that takes them. This script runs
that same pipeline on the CPU: dynamo, AOTAutograd with Inductor's decompositions, and
Inductor's own ``partition_fn`` (its joint-graph passes, then the min-cut partitioner). It
stops after the partition, before code generation and before any kernel runs, so a
paper-size batch costs seconds of tracing and no memory. The sizes depend only on shapes and
dtypes, which are the GPU's.

Prints one JSON line per row (``--budgets`` x ``--checkpointing``):
- ``saved_gib``: the tensors the forward graph hands to the backward (the activations), by
  dtype in ``saved_gib_by_dtype``; views of one tensor are counted once, the weights not at all.
- ``states_gib``: float32 weights, gradients, Adam's two moments and the EMA copy (20 bytes
  per parameter).
- ``planned_gib`` = saved + states. The measured peak is higher by what the backward holds
  at its busiest moment (gradients of the largest activations, cuDNN workspace): on one H200
  the plain compiled step planned 40.7 GiB here and peaked at 41.9 GiB
  (``measured_reference``; measured before the change to the gated convolutions' bias dtype,
  after which the same step plans 32.9 GiB).
- ``recomputed_convolutions`` and ``recompute_share``: forward convolutions that the backward
  graph runs again, and their FLOPs over the step's (forward + both backward convolutions).
  Recomputing element-wise ops costs memory bandwidth; recomputing convolutions costs FLOPs,
  the step's scarce resource.

Autocast: the CPU's bf16 autocast runs ``group_norm`` in bf16 where CUDA's runs it in
float32, but Inductor decomposes GroupNorm into float32 arithmetic either way, so the
partitioned graph is the same (checked: forcing float32 GroupNorm inputs plans the same
40.0 GiB, before the bias change). Needs only torch and adps layers 1-2: ``PYTHONPATH=platform``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch._dynamo
from torch._functorch.aot_autograd import aot_module_simplified

from adps.nn import PAPER_PRESETS, build_model, method_loss
from adps.nn.unet import set_activation_checkpointing
from train_step import activation_budget, make_batch  # bench/train_step.py: sys.path[0] for a script

GIB = 2**30
STATE_BYTES_PER_PARAMETER = 4 * 5  # float32 weight, gradient, Adam exp_avg and exp_avg_sq, EMA
# The one configuration measured on a GPU so far (bench/results/2026-11-27_h200.jsonl).
MEASURED = {
    ("ambient", 8, 384, 320, "bf16", 1.0, False): {
        "device": "NVIDIA H200", "peak_memory_gib": 41.877, "date": "2026-11-27",
        "source": "bench/train_step.py --rows compile,cudnn (torch.cuda.max_memory_allocated)",
        # Its plan then was 40.7 GiB: the gated convolutions' float32 bias made the residual
        # stream float32 under autocast. With the bias in the output's dtype it plans 32.9 GiB.
        "code": "783d6cb, before the gated convolutions' bias change",
    },
}
CONVOLUTION = torch.ops.aten.convolution.default


class _Partitioned(Exception):
    """Raised once the joint graph is split: nothing after the partition is needed."""

    def __init__(self, forward: torch.fx.GraphModule, backward: torch.fx.GraphModule, num_fwd_outputs: int):
        super().__init__("partitioned")
        self.forward, self.backward, self.num_fwd_outputs = forward, backward, num_fwd_outputs


def _inductor_partition_fn():
    """Inductor's partition function: a module-level ``partition_fn`` in recent torch; in older
    releases (a nested function there) the same two steps, spelled out."""
    try:
        from torch._inductor.compile_fx import partition_fn

        return partition_fn
    except ImportError:
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        from torch._inductor.fx_passes.joint_graph import joint_graph_passes

        def partition_fn(joint, joint_inputs, **kwargs):
            joint_graph_passes(joint)
            return min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor", **kwargs)

        return partition_fn


def _stop_after_partition(joint: torch.fx.GraphModule, joint_inputs, **kwargs):
    from torch._guards import detect_fake_mode
    from torch._inductor.virtualized import V

    # Inductor's joint-graph passes read the tracing's fake mode from V, as under compile_fx.
    with V.set_fake_mode(detect_fake_mode(joint_inputs)):
        forward, backward = _inductor_partition_fn()(joint, joint_inputs, **kwargs)
    raise _Partitioned(forward, backward, kwargs["num_fwd_outputs"])


def _never_called(gm: torch.fx.GraphModule, example_inputs) -> None:
    raise AssertionError("the plan stops at the partition; no graph is compiled")


def _planning_backend(gm: torch.fx.GraphModule, example_inputs):
    from torch._inductor.decomposition import select_decomp_table

    return aot_module_simplified(gm, example_inputs, fw_compiler=_never_called, bw_compiler=_never_called,
                                 decompositions=select_decomp_table(), partition_fn=_stop_after_partition)


def _find_partition(err: BaseException | None) -> _Partitioned | None:
    """The _Partitioned under dynamo's wrapping exceptions, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, _Partitioned):
            return err
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


def partition_call(model: torch.nn.Module, call: Callable[[torch.nn.Module], object], amp: str | None) -> _Partitioned:
    """The forward and backward graphs Inductor would compile for ``model`` in ``call(compiled)``:
    one use of the compiled model whose output needs a gradient (the weights', the input's or both)."""
    torch._dynamo.reset()  # every row traces afresh, under its own budget
    compiled = torch.compile(model, backend=_planning_backend)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
    try:
        with autocast:
            call(compiled)
    except Exception as err:  # noqa: BLE001 - the partition arrives as an exception, wrapped by dynamo
        found = _find_partition(err)
        if found is None:
            raise
        return found
    raise RuntimeError("the model ran without being partitioned: did dynamo fall back to eager?")


def partition(model: torch.nn.Module, batch: dict, amp: str | None) -> _Partitioned:
    """The forward and backward graphs Inductor would compile for ``model`` in one ambient loss."""
    return partition_call(
        model, lambda compiled: method_loss("ambient", compiled, batch, generator=torch.Generator().manual_seed(0)), amp
    )


def fx_tensor(node: torch.fx.Node) -> torch.Tensor | None:
    """The (fake) tensor a traced node computes, from its metadata; None for anything else."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def convolution_node_flops(node: torch.fx.Node) -> float:
    """FLOPs of one forward ``aten.convolution`` node of a traced graph."""
    out, weight = fx_tensor(node), fx_tensor(node.args[1])
    return 2.0 * out.numel() * weight[0].numel()  # each output: one multiply-add per weight of its filter


def saved_tensors(part: _Partitioned) -> dict[str, float]:
    """GiB of the tensors the forward graph returns for the backward, by dtype; weights and other
    graph inputs are resident anyway and views of one storage count once."""
    output = next(n for n in part.forward.graph.nodes if n.op == "output")
    by_dtype: dict[str, float] = defaultdict(float)
    storages: set[int] = set()
    for node in output.args[0][part.num_fwd_outputs:]:
        value = fx_tensor(node)
        if value is None or node.op == "placeholder":
            continue
        storage = value.untyped_storage()
        if storage._cdata in storages:
            continue
        storages.add(storage._cdata)
        by_dtype[str(value.dtype).removeprefix("torch.")] += storage.nbytes() / GIB
    return dict(by_dtype)


def recomputation(part: _Partitioned) -> tuple[int, float]:
    """Forward convolutions that the backward graph runs again, and their share of the step's
    convolution FLOPs (each forward convolution counts three times: forward, input and weight
    gradient)."""
    forward_flops = sum(convolution_node_flops(n) for n in part.forward.graph.nodes if n.target is CONVOLUTION)
    again = [n for n in part.backward.graph.nodes if n.target is CONVOLUTION]
    share = sum(convolution_node_flops(n) for n in again) / (3 * forward_flops) if forward_flops else 0.0
    return len(again), share


def plan_row(preset: str, batch_size: int, height: int, width: int, coils: int, acceleration: float,
             amp: str | None, budget: float, checkpointing: bool) -> dict[str, object]:
    """One JSON row: the plan of the compiled ambient step under ``budget`` (and checkpointing)."""
    torch.manual_seed(0)
    model = build_model("ambient", preset).train()
    if checkpointing:
        set_activation_checkpointing(model)
    batch = make_batch(batch_size, coils, height, width, acceleration)
    start = time.perf_counter()
    with activation_budget(budget):
        part = partition(model, batch, amp)
    saved = saved_tensors(part)
    recomputed, share = recomputation(part)
    parameters = sum(p.numel() for p in model.parameters())
    states = parameters * STATE_BYTES_PER_PARAMETER / GIB
    key = (preset, batch_size, height, width, amp, budget, checkpointing)
    return {
        "bench": "memory_plan",
        "device": "cpu (trace only: sizes of the GPU step)",
        "torch": torch.__version__,
        "preset": preset,
        "parameters": parameters,
        "batch": batch_size,
        "height": height,
        "width": width,
        "coils": coils,
        "amp": amp,
        "activation_memory_budget": budget,
        "activation_checkpointing": checkpointing,
        "saved_gib": round(sum(saved.values()), 3),
        "saved_gib_by_dtype": {k: round(v, 3) for k, v in sorted(saved.items())},
        "states_gib": round(states, 3),
        "planned_gib": round(sum(saved.values()) + states, 3),
        "recomputed_convolutions": recomputed,
        "recompute_share": round(share, 4),
        "trace_s": round(time.perf_counter() - start, 1),
        "measured_reference": MEASURED.get(key),
    }


def parse_with_budgets(parser: argparse.ArgumentParser, argv: list[str] | None,
                       default: list[float]) -> argparse.Namespace:
    """Parse ``argv`` with a ``--budgets`` list added to ``parser``; budgets outside (0, 1] are refused."""
    parser.add_argument("--budgets", nargs="+", type=float, default=default,
                        help="activation memory budgets of the partitioner (0-1; 1 = Inductor's default)")
    args = parser.parse_args(argv)
    bad = [b for b in args.budgets if not 0 < b <= 1]
    if bad:
        parser.error(f"--budgets must be in (0, 1], got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=PAPER_PRESETS["ambient"], help="network preset of the ambient method")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--coils", type=int, default=4)
    parser.add_argument("--acceleration", type=float, default=4)
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="autocast of the step (GPU: bf16)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also plan each budget with the U-Net's activation checkpointing on")
    args = parse_with_budgets(parser, argv, default=[1.0, 0.7, 0.6, 0.5, 0.4, 0.3])
    amp = None if args.amp == "none" else args.amp
    for checkpointing in ([False, True] if args.checkpointing else [False]):
        for budget in args.budgets:
            row = plan_row(args.preset, args.batch, args.height, args.width, args.coils, args.acceleration, amp,
                           budget, checkpointing)
            print(json.dumps(row), flush=True)
            print(f"budget {budget:4.2f}{' ckpt' if checkpointing else '':5} saved {row['saved_gib']:7.2f} GiB  "
                  f"planned {row['planned_gib']:7.2f} GiB  recomputed convolutions {row['recomputed_convolutions']:3d}"
                  f" ({100 * row['recompute_share']:.1f} % of the step's)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

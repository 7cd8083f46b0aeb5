"""The kernels Inductor would run for a compiled step on an H100, and the bytes they move: planned
on the CPU, no GPU needed.

    python bench/kernel_plan.py                                  # training and A-DPS, paper sizes
    python bench/kernel_plan.py --workloads a_dps --batch 1 --top 20
    python bench/kernel_plan.py --workloads train --budgets 1.0 0.7 0.5 --nhwc off on
    python bench/kernel_plan.py --workloads a_dps --inline off on
    python bench/kernel_plan.py --preset tiny --height 64 --width 64 --batch 2   # seconds

Why: on a GPU the compiled steps spend as long in memory-bound element-wise kernels (GroupNorm,
SiLU, the gates, residual sums) as in their convolutions (H200 profile, ``bench/results``), and
those kernels are fixed by Inductor's fusion before anything runs. This script plans them:
``memory_plan.py``'s trace on the CPU (dynamo, AOTAutograd with Inductor's decompositions, its
partitioner), then each of the two graphs is moved to a CUDA device, faked (no memory, no
driver), and handed to Inductor's own lowering and scheduler, which fuse it into the kernels it
would generate for the GPU. It stops there: no kernel is generated, compiled or run.

Inductor asks the device for its properties while it lowers and fuses (multiprocessor count,
compute capability). The CPU has none, so an H100 SXM's stand in for the duration of the
lowering (:func:`stand_in_gpu`), and torch's choice of convolution kernel is cuDNN's, as on the
GPU (without one torch picks its reference kernel, whose outputs are always NCHW: the layouts,
and with them the copies between layouts, would differ). Nothing else is patched.

Per workload, one JSON line; every figure is per slice (the batch divided out):
- ``train``: one training step of the ambient method (``method_loss``, forward and backward to
  weights and input) at ``--batch``; ``a_dps``: one A-DPS step (the denoiser's forward at
  ``--batch`` slices and its gradient to ``x``, weights frozen), as ``adps.nn.samplers.a_dps``
  runs it under ``torch.compile``.
- ``generated_kernels`` and ``library_calls``: Inductor's (Triton) kernels and the library
  calls (cuDNN convolutions, cuBLAS GEMMs, attention), forward + backward.
- ``generated_gb``: bytes that the generated kernels read and write (Inductor's own count,
  ``GraphLowering.count_bytes``); they are memory-bound, so this sets their time.
  ``generated_gb_forward``: the forward graph's share.
- ``convolution_tflop``: the convolutions' FLOPs, forward and gradients, as the graphs run them.
- ``floor_ms``: a lower bound on the step's GPU time per slice on an H100 and an H200:
  convolutions at the dense bf16 peak (989 TFLOP/s) plus the generated kernels' bytes at the
  memory's peak bandwidth (3.35 TB/s and 4.8 TB/s). It leaves out the library calls' own
  traffic, cuDNN's layout transposes, launch gaps and every kernel's distance from its peak, so
  real steps are slower; ``floor_*_at_measured_conv_rate`` puts the convolutions at the rate
  cuDNN reached in the H200 profile (704 TFLOP/s) instead.
- ``target``: issue 10's target for the workload (training 40 slices/s, A-DPS 5 s per slice of
  500 steps) as a time per slice-step, beside the floors.
- ``saved_gib``: activations the forward keeps for the backward (as ``memory_plan.py``), under
  ``--budgets`` (the partitioner's ``activation_memory_budget``): a lower budget saves less and
  recomputes more in the backward, whose generated kernels then move more bytes.
- ``top_kernels``: the ``--top`` kernel groups moving the most bytes (the aten ops they fuse).
- ``channels_last_layouts``: whether Inductor gave each graph's convolutions channels-last
  layouts; its heuristic does not for this U-Net, ``--nhwc on`` forces it (as
  ``bench/train_step.py``'s ``nhwc`` row does), and the copies into that layout then appear as
  generated kernels named after the convolution they feed.
- ``inline``: with ``--inline on``, Inductor's thresholds for writing an element-wise
  intermediate to memory are raised (``bench/train_step.py``'s ``inductor_inlining``), so more of
  them are recomputed in the kernels that read them.

Autocast: the trace uses the CPU's bf16 autocast. It differs from CUDA's in one op here:
``group_norm`` runs in float32 on CUDA, in its input's dtype on the CPU. Inductor decomposes
GroupNorm into float32 arithmetic either way; emulating CUDA's rule moved the A-DPS plan by
0.7 % (11.01 against 11.09 GB forward at batch 1). Needs torch with triton (Inductor's GPU
scheduler) and adps layers 1-2: ``PYTHONPATH=platform``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import sys
import time
import types
from collections.abc import Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from adps.nn import PAPER_PRESETS, build_model
from memory_plan import (  # bench/memory_plan.py: sys.path[0] for a script
    CONVOLUTION,
    convolution_node_flops,
    fx_tensor,
    parse_with_budgets,
    partition,
    partition_call,
    saved_tensors,
)
from train_step import (  # bench/train_step.py
    activation_budget,
    inductor_inlining,
    inductor_layout,
    make_batch,
)

CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default

# The stand-in device: an H100 SXM5 (NVIDIA's datasheet). Bandwidths are the HBM's peak.
H100 = {"name": "NVIDIA H100 80GB HBM3", "multi_processor_count": 132, "major": 9, "minor": 0,
        "total_memory": 80 * 2**30, "regs_per_multiprocessor": 65536, "max_threads_per_multi_processor": 2048,
        "max_threads_per_block": 1024, "warp_size": 32, "L2_cache_size": 50 * 2**20}
DEVICES = {"h100": {"bf16_dense_tflops": 989.4, "memory_tbps": 3.35},
           "h200": {"bf16_dense_tflops": 989.4, "memory_tbps": 4.8}}
# cuDNN's convolutions in the compiled training step on one H200 (88 ms for 62 TFLOP; the
# profile of bench/train_step.py --profile, 2026-11-27).
MEASURED_CONV_TFLOPS = 704.0
# Issue 10's targets per slice and step: 40 slices/s; 5 s per slice for 500 steps.
TARGET_MS = {"train": 1000.0 / 40.0, "a_dps": 5000.0 / 500}
A_DPS_STEPS = 500


@contextlib.contextmanager
def stand_in_gpu(props: dict = H100) -> Iterator[None]:
    """Answer Inductor's device queries with ``props`` while it lowers and fuses on a machine
    without a GPU. Nothing is launched, so nothing else of the driver is needed."""
    from torch._inductor.runtime.hints import DeviceProperties

    namespace = types.SimpleNamespace(**props, gcnArchName="")
    capability = (props["major"], props["minor"])

    def device_properties(device: torch.device) -> DeviceProperties:
        return DeviceProperties(type="cuda", index=device.index or 0, multi_processor_count=props["multi_processor_count"],
                                cc=10 * capability[0] + capability[1], major=capability[0],
                                regs_per_multiprocessor=props["regs_per_multiprocessor"],
                                max_threads_per_multi_processor=props["max_threads_per_multi_processor"],
                                max_threads_per_block=props["max_threads_per_block"], warp_size=props["warp_size"])

    select_conv_backend = torch._C._select_conv_backend

    def gpu_conv_backend(input: torch.Tensor, *args, **kwargs) -> object:
        # Without a GPU, torch picks its slow reference convolution for a (fake) CUDA tensor,
        # whose output is always NCHW; on the GPU it picks cuDNN, whose output follows the
        # input's memory format. Fake tensor propagation and Inductor's convolution layouts ask.
        if input.device.type == "cuda":
            return torch._C._ConvBackend.Cudnn
        return select_conv_backend(input, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(DeviceProperties, "create", device_properties))
        stack.enter_context(mock.patch("torch._C._select_conv_backend", gpu_conv_backend))
        stack.enter_context(mock.patch("torch.cuda.get_device_properties", lambda *a, **k: namespace))
        stack.enter_context(mock.patch("torch.cuda.get_device_capability", lambda *a, **k: capability))
        stack.enter_context(mock.patch("torch.cuda.is_available", lambda: True))
        stack.enter_context(mock.patch("torch.cuda.device_count", lambda: 1))
        # Inductor checks that triton can reach a GPU before it picks its GPU scheduler.
        stack.enter_context(mock.patch("torch._inductor.scheduler.has_triton", lambda: True))
        yield


def _on_cuda(gm: torch.fx.GraphModule) -> list:
    """Move ``gm`` to CUDA in place (the devices in its nodes' arguments) and return fake CUDA
    inputs with its placeholders' shapes, strides and dtypes."""
    cuda = torch.device("cuda", 0)

    def swap(value: object) -> object:
        return cuda if isinstance(value, torch.device) and value.type == "cpu" else value

    inputs = []
    with FakeTensorMode():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = node.meta["val"]
                if isinstance(value, torch.Tensor):
                    value = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=cuda)
                inputs.append(value)
            node.args, node.kwargs = tree_map(swap, node.args), tree_map(swap, node.kwargs)
    gm.recompile()
    return inputs


def _ops(node) -> str:
    """The aten ops a scheduler node fuses, as one short label."""
    origins = {str(o.target) for part in node.get_nodes() if part.node is not None for o in part.node.origins}
    names = sorted(o.removeprefix("aten.").removeprefix("prims.").removesuffix(".default") for o in origins)
    return ",".join(names)


def schedule(gm: torch.fx.GraphModule, is_backward: bool) -> tuple[list[tuple[str, str, int]], bool]:
    """Inductor's kernels for ``gm`` on the stand-in GPU: ``(kind, ops, bytes)`` each, kind
    ``generated`` or ``library``, and whether Inductor chose channels-last layouts for the
    graph's convolutions; the same steps as ``compile_fx`` up to its scheduler."""
    from torch._inductor.compile_fx import _recursive_post_grad_passes, fake_tensor_prop
    from torch._inductor.debug import DebugContext
    from torch._inductor.fx_passes.post_grad import view_to_reshape
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import NopKernelSchedulerNode
    from torch._inductor.virtualized import V

    inputs = _on_cuda(gm)
    view_to_reshape(gm)
    with stand_in_gpu():
        with torch.no_grad():
            fake_mode = fake_tensor_prop(gm, inputs, force_allow_non_fake_inputs=True)
        with V.set_fake_mode(fake_mode), DebugContext():
            _recursive_post_grad_passes(gm, is_inference=False)
            graph = GraphLowering(gm, example_inputs=inputs, shape_env=fake_mode.shape_env, graph_id=0,
                                  is_inference=False, is_backward=is_backward)
            graph.freeze_runtime_asserts()
            with V.set_graph_handler(graph), V.set_extern_kernel_nodes([]):
                graph.run(*inputs)
                graph.init_wrapper_code()
                graph._update_scheduler()
                kernels = []
                for node in graph.scheduler.nodes:
                    if node.is_extern():
                        name = str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)
                        name = name.removesuffix(".default").rsplit(".", 1)[-1]  # convolution_backward, bmm, ...
                        kernels.append(("library", name, node.get_read_write_buffers_sizes()))
                    elif not isinstance(node, NopKernelSchedulerNode):  # views, concatenations written in place
                        kernels.append(("generated", _ops(node), node.get_read_write_buffers_sizes()))
    return kernels, bool(graph.layout_opt)


def convolution_flops(part) -> float:
    """FLOPs of the convolutions in both graphs: each output of a forward convolution costs one
    multiply-add per weight of its filter; its backward costs the same for each gradient it
    computes (input, weight: ``output_mask``)."""
    total = 0.0
    for gm in (part.forward, part.backward):
        for node in gm.graph.nodes:
            if node.target is CONVOLUTION:
                total += convolution_node_flops(node)
            elif node.target is CONVOLUTION_BACKWARD:
                grad_output, weight, output_mask = fx_tensor(node.args[0]), fx_tensor(node.args[2]), node.args[10]
                total += 2.0 * grad_output.numel() * weight[0].numel() * sum(bool(m) for m in output_mask[:2])
    return total


def partition_workload(workload: str, preset: str, batch_size: int, height: int, width: int, coils: int,
                       amp: str | None):
    """Trace and partition one step of ``workload`` on the CPU (see :mod:`memory_plan`)."""
    torch.manual_seed(0)
    if workload == "train":
        return partition(build_model("ambient", preset).train(), make_batch(batch_size, coils, height, width, 4.0), amp)
    # A-DPS: the sampler differentiates the denoiser's output with respect to its image input
    # (a_dps's ``denoise``); weights frozen, the conditioning [mask, ones] needs no gradient.
    model = build_model("ambient", preset).eval().requires_grad_(False)
    x = torch.randn(batch_size, 2, height, width, requires_grad=True)
    cond = torch.ones(batch_size, 2, height, width)
    sigma = torch.full((batch_size,), 1.0)
    return partition_call(model, lambda net: net(x, sigma, cond=cond), amp)


def plan_row(workload: str, preset: str, batch_size: int, height: int, width: int, coils: int, amp: str | None,
             top: int, budget: float = 1.0, nhwc: bool = False, inline: bool = False) -> dict[str, object]:
    """One JSON row: the planned kernels of ``workload``'s compiled step, per slice, with the
    partitioner's ``activation_memory_budget`` at ``budget``, with ``nhwc`` Inductor's
    channels-last layouts forced on (``bench/train_step.py``'s ``nhwc``) and with ``inline`` its
    element-wise intermediates recomputed in their readers (its ``inductor_inlining``)."""
    start = time.perf_counter()
    with activation_budget(budget):
        part = partition_workload(workload, preset, batch_size, height, width, coils, amp)
    saved = sum(saved_tensors(part).values())
    flops = convolution_flops(part)
    with inductor_layout(nhwc), inductor_inlining(inline):
        forward_kernels, forward_nhwc = schedule(part.forward, is_backward=False)
        backward_kernels, backward_nhwc = schedule(part.backward, is_backward=True)
    kernels = forward_kernels + backward_kernels
    generated = [k for k in kernels if k[0] == "generated"]
    library = [k for k in kernels if k[0] == "library"]
    generated_bytes = sum(k[2] for k in generated) / batch_size
    flop = flops / batch_size
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for kind, ops, nbytes in kernels:
        groups[f"{kind}: {ops}"][0] += 1
        groups[f"{kind}: {ops}"][1] += nbytes / batch_size / 1e9
    row: dict[str, object] = {
        "bench": "kernel_plan", "workload": workload,
        "device": "cpu (plan of Inductor's CUDA kernels; an H100's properties stand in)",
        "torch": torch.__version__, "preset": preset, "batch": batch_size, "height": height, "width": width,
        "coils": coils, "amp": amp, "activation_memory_budget": budget, "nhwc": nhwc,
        "inline": inline,
        "channels_last_layouts": {"forward": forward_nhwc, "backward": backward_nhwc},
        "generated_kernels": len(generated), "library_calls": len(library),
        "generated_bytes": int(generated_bytes), "generated_gb": round(generated_bytes / 1e9, 3),
        "generated_gb_forward": round(sum(k[2] for k in forward_kernels if k[0] == "generated") / batch_size / 1e9, 3),
        "library_gb": round(sum(k[2] for k in library) / batch_size / 1e9, 3),
        "convolution_flop": int(flop), "convolution_tflop": round(flop / 1e12, 3),
        "saved_gib": round(saved / batch_size, 3),
        "target_ms": TARGET_MS[workload],
    }
    floors_ms = {}
    for name, spec in DEVICES.items():
        memory_ms = generated_bytes / (spec["memory_tbps"] * 1e12) * 1e3
        floors_ms[name] = flop / (spec["bf16_dense_tflops"] * 1e12) * 1e3 + memory_ms
        row[f"floor_ms_{name}"] = round(floors_ms[name], 2)
        row[f"floor_ms_{name}_at_measured_conv_rate"] = round(flop / (MEASURED_CONV_TFLOPS * 1e12) * 1e3 + memory_ms, 2)
    # From the unrounded floor: a small plan's floor rounds to 0.00 ms.
    if workload == "a_dps":
        row["floor_s_per_slice_h100"] = round(floors_ms["h100"] * A_DPS_STEPS / 1e3, 2)
    else:
        row["ceiling_slices_per_s_h100"] = round(1e3 / floors_ms["h100"], 1)
    row["top_kernels"] = [{"kernel": k, "count": int(c), "gb": round(gb, 3)}
                          for k, (c, gb) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]]
    row["plan_s"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=["train", "a_dps"], default=["train", "a_dps"])
    parser.add_argument("--preset", default=PAPER_PRESETS["ambient"], help="network preset of the ambient method")
    parser.add_argument("--batch", type=int, default=8, help="slices per step (figures are per slice)")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--coils", type=int, default=4, help="coils of the training batch (A-DPS: not in the graph)")
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    parser.add_argument("--top", type=int, default=8, help="kernel groups to list, by bytes")
    parser.add_argument("--nhwc", nargs="+", choices=["off", "on"], default=["off"],
                        help="plan without and/or with Inductor's channels-last layouts forced on")
    parser.add_argument("--inline", nargs="+", choices=["off", "on"], default=["off"],
                        help="plan without and/or with element-wise intermediates recomputed in their readers")
    args = parse_with_budgets(parser, argv, default=[1.0])
    amp = None if args.amp == "none" else args.amp
    for workload, budget, nhwc, inline in itertools.product(args.workloads, args.budgets, args.nhwc, args.inline):
        row = plan_row(workload, args.preset, args.batch, args.height, args.width, args.coils, amp, args.top, budget,
                       nhwc == "on", inline == "on")
        print(json.dumps(row), flush=True)
        print(f"{workload}, budget {budget}{', nhwc' if nhwc == 'on' else ''}{', inline' if inline == 'on' else ''} "
              f"(channels-last: {row['channels_last_layouts']}): saves {row['saved_gib']} GiB; {row['generated_kernels']} generated "
              f"kernels moving {row['generated_gb']} GB and {row['library_calls']} library calls, {row['convolution_tflop']} TFLOP of convolutions per slice; "
              f"floor {row['floor_ms_h100']} ms per slice on an H100 ({row['floor_ms_h100_at_measured_conv_rate']} at "
              f"cuDNN's measured rate), target {row['target_ms']} ms", file=sys.stderr, flush=True)
        for kernel in row["top_kernels"]:
            print(f"  {kernel['gb']:7.3f} GB {kernel['count']:4d}x {kernel['kernel'][:110]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

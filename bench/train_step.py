"""Benchmark of one training step per method: slices/s and peak memory.

    python -m bench.train_step                    # CPU (tiny presets), and CUDA when present
    python -m bench.train_step --device cpu --height 64 --width 64 --repeats 2

Prints one JSON line per (device, method, preset): the median step time over ``--repeats``
steps after ``--warmup`` steps (a step = loss, backward, gradient clean-up, Adam, EMA: exactly
:func:`adps.nn.train_step`), slices/s and the peak memory. On every device each method runs
with its ``tiny`` preset at ``--batch`` x ``--height`` x ``--width`` x ``--coils``; on CUDA
the ``ambient`` preset (``--paper-methods``: others too) also runs at the paper's size (batch 8,
384 x 320, 4 coils) with ``--paper-amp`` autocast (bf16 by default). Rows of the ambient method carry the paper's own
figure for that step (one H100, fp16: 19.7 slices/s, 54 GB) in ``paper_reference``.
``--tiny-rows`` runs the rows with the tiny presets at the tiny rows' size on any device
instead: a check on a CPU that each row's configuration (compile mode, layout, memory budget)
compiles and steps under the installed torch, before a GPU's time is spent on it.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of that row; on CPU the process's
peak resident set size so far (``ru_maxrss``), which only grows from row to row.

Needs only torch and adps layers 1-2 (no Ray, no MLflow), so it runs on a bare GPU machine
with ``PYTHONPATH=platform``. Without sigpy (no birdcage maps) the batch falls back to
phantoms with smooth synthetic coil maps: the timing does not depend on the data.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

from adps.data.phantom import brain_phantom, synthetic_batch
from adps.mri import column_mask, fft2c, further_corrupted_mask, lines_at
from adps.nn import (
    EMA,
    MRI_METHODS,
    PAPER_PRESETS,
    build_model,
    make_optimizer,
    method_loss,
    train_step,
)
from adps.nn.unet import set_activation_checkpointing

# Tolerances of the mixed-precision check (--precision-check). bf16 keeps 8 mantissa bits
# (relative rounding 2^-9 = 0.2 %) on every activation: the loss moves by about that, the
# gradient, summed over many rounded terms, by more (on the CPU, tiny preset: loss 0.1 %,
# gradient 11 % in relative norm at a cosine of 0.994). A wrong cast or a dropped term moves
# the loss by far more.
LOSS_RTOL = 0.01
GRAD_MIN_COSINE = 0.98

PAPER_REFERENCE = {
    "source": "Aali, Daras et al. 2025 reference code (issue 4)",
    "device": "1x NVIDIA H100",
    "precision": "fp16",
    "preset": "ambient",
    "batch": 8,
    "height": 384,
    "width": 320,
    "coils": 4,
    "slices_per_s": 19.7,
    "peak_memory_gb": 54.0,
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform as std_platform  # the standard library module (our package is adps)

    return f"cpu ({std_platform.processor() or std_platform.machine()}, {torch.get_num_threads()} threads)"


def smooth_maps_batch(n: int, coils: int, height: int, width: int, acceleration: float, seed: int) -> dict:
    """A batch like :func:`synthetic_batch` without sigpy: Gaussian-bump coil maps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    angles = 2 * np.pi * np.arange(coils) / coils
    maps = np.stack([np.exp(-((xx - np.cos(a)) ** 2 + (yy - np.sin(a)) ** 2)) * np.exp(1j * a) for a in angles])
    maps = maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    maps_t = torch.from_numpy(np.broadcast_to(maps, (n, coils, height, width)).astype(np.complex64).copy())
    image = torch.from_numpy(np.stack([brain_phantom(height, width, rng) for _ in range(n)]))
    acs = min(20, lines_at(width, acceleration + 1))
    masks = [column_mask(width, acceleration, seed=seed, slice_id=i, acs=acs) for i in range(n)]
    further = [further_corrupted_mask(m, acceleration, seed=seed, slice_id=i, acs=acs) for i, m in enumerate(masks)]
    return {
        "kspace": fft2c(maps_t * image[:, None]),
        "maps": maps_t,
        "reference": image,
        "mask": torch.stack(masks),
        "mask_further": torch.stack(further),
        "l1": image.clone(),
        "slice_id": torch.arange(n, dtype=torch.int64),
    }


def benchmark_batch(n: int, coils: int, height: int, width: int, acceleration: float, seed: int = 0) -> dict:
    """:func:`adps.data.phantom.synthetic_batch` (sigpy's birdcage maps), else the sigpy-free
    :func:`smooth_maps_batch` (the GPU machine has no sigpy)."""
    try:
        return synthetic_batch(n, coils, height, width, acceleration, seed)
    except ImportError:
        return smooth_maps_batch(n, coils, height, width, acceleration, seed)


@functools.lru_cache(maxsize=4)  # the methods of one run share their batch (read-only)
def make_batch(n: int, coils: int, height: int, width: int, acceleration: float, seed: int = 0) -> dict:
    return benchmark_batch(n, coils, height, width, acceleration, seed)


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, "process_max_rss"


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """How one row runs the step (``--rows``; the defaults are the plain eager step)."""

    compile: str | None = None
    """torch.compile mode of the whole denoiser (None = eager)."""
    ckpt: bool = False
    """Activation checkpointing of the U-Net blocks."""
    cudnn: bool = False
    """torch.backends.cudnn.benchmark."""
    cl: bool = False
    """Channels-last weights."""
    nhwc: bool = False
    """Inductor's layout optimisation forced on (:func:`inductor_layout`)."""
    regional: bool = False
    """Compile each U-Net block alone instead of the whole denoiser (:func:`compile_regions`)."""
    budget: float = 1.0
    """The compiled backward's activation memory budget (:func:`activation_budget`)."""
    inline: bool = False
    """Inductor's element-wise intermediates recomputed in their readers (:func:`inductor_inlining`)."""

    def row_fields(self) -> dict[str, object]:
        """The settings as the JSON rows name them."""
        return {"compile": self.compile, "activation_checkpointing": self.ckpt, "cudnn_benchmark": self.cudnn,
                "channels_last": self.cl, "inductor_nhwc": self.nhwc, "regional_compile": self.regional,
                "activation_memory_budget": self.budget, "inductor_inline": self.inline}

    @property
    def has_plain_graph(self) -> bool:
        """Whether the precision check (whole denoiser, compiled or not, with the row's memory
        budget) runs this row's graph."""
        return not (self.ckpt or self.cl or self.regional or self.inline)


def bench_one(
    method: str, preset: str, device: torch.device, batch_size: int, height: int, width: int, coils: int,
    acceleration: float, amp: str | None, warmup: int, repeats: int, spec: RowSpec = RowSpec(), profile: int = 0,
) -> dict[str, object]:
    # All three are read when the first step compiles.
    with inductor_layout(spec.nhwc), inductor_inlining(spec.inline), activation_budget(spec.budget):
        return _bench_one(method, preset, device, batch_size, height, width, coils, acceleration, amp, warmup, repeats,
                          spec, profile)


def compile_regions(model: torch.nn.Module, compile_mode: str) -> int:
    """Regional compilation: each U-Net residual block compiled on its own, the rest eager.
    Blocks of the same shape share one compiled graph, so the compilation traces about 20
    distinct blocks instead of the whole network (on the CPU, the first step of the paper preset
    at 64 x 64 with ``aot_eager``: 13.5 s of tracing against 34.9 s whole), at the price of no
    fusion across blocks. Returns the number of blocks."""
    import torch._dynamo

    from adps.nn.unet import UNetBlock

    blocks = [m for m in model.modules() if isinstance(m, UNetBlock)]
    # Each distinct block shape is one more entry of UNetBlock.forward's compile cache. Static
    # shapes: by default dynamo would turn a block's sizes symbolic once it met a second shape,
    # and Inductor then failed to lower it ("cannot determine truth value of Relational"; torch
    # 2.11 and 2.14.1 alike, the tiny preset on the CPU), besides generating slower kernels.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
    for block in blocks:
        block.compile(mode=None if compile_mode == "default" else compile_mode, dynamic=False)
    return len(blocks)


def activation_budget(budget: float) -> contextlib.AbstractContextManager:
    """The compiled backward's activation memory budget (TrainConfig.activation_memory_budget):
    below 1 the partitioner recomputes the cheapest intermediates instead of keeping them."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=budget)


def inductor_layout(nhwc: bool) -> contextlib.AbstractContextManager:
    """With ``nhwc``, Inductor's layout optimisation is forced on: every convolution in a compiled
    graph gets channels-last inputs and weights, so cuDNN's Hopper kernels (NHWC only) need no
    transposes. Inductor's own heuristic turns it off for this U-Net, because the output
    convolution has fewer output than input channels; the profile on one H200 showed
    cuDNN's nchwToNhwc / nhwcToNchw kernels taking 61 of the compiled step's 264 ms."""
    if not nhwc:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(force_layout_optimization=True)


# Inductor's thresholds for materialising an element-wise intermediate instead of recomputing it in
# each consumer's kernel (torch 2.14's defaults: 4 readers, 30 ops). At 8 and 60, a CPU-side plan
# of the compiled A-DPS step's kernels (since removed: unconfirmed on a GPU) moved 23.8 instead of
# 26.7 GB per slice (paper size, batch 8); gpu_check.sh's sample_speed_compiled measures it.
INLINE_REALIZE_READS = 8
INLINE_REALIZE_OPCOUNT = 60


def inductor_inlining(inline: bool) -> contextlib.AbstractContextManager:
    """With ``inline``, Inductor recomputes element-wise intermediates with up to
    :data:`INLINE_REALIZE_READS` readers and :data:`INLINE_REALIZE_OPCOUNT` ops inside each
    reader's kernel instead of writing them to memory once and reading them back: more arithmetic,
    fewer bytes, for a memory-bound step. Read when a graph is lowered (its first call)."""
    if not inline:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(realize_reads_threshold=INLINE_REALIZE_READS,
                                 realize_opcount_threshold=INLINE_REALIZE_OPCOUNT)


def _bench_one(
    method: str, preset: str, device: torch.device, batch_size: int, height: int, width: int, coils: int,
    acceleration: float, amp: str | None, warmup: int, repeats: int, spec: RowSpec, profile: int,
) -> dict[str, object]:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = spec.cudnn  # per row: the rows compare it
    model = build_model(method, preset).to(device).train()
    if spec.ckpt and not set_activation_checkpointing(model):
        raise ValueError(f"--checkpointing: {method}'s network has no activation checkpointing")
    if spec.cl:
        model = model.to(memory_format=torch.channels_last)
    if spec.compile and spec.regional:
        compile_regions(model, spec.compile)
    elif spec.compile:
        # The whole denoiser (preconditioning included); train_step and the EMA look through the wrapper.
        model = torch.compile(model, mode=None if spec.compile == "default" else spec.compile)
    optimizer = make_optimizer(model)  # METHOD.md's Adam; fused on CUDA, as in adps train
    ema = EMA(model)
    batch = {k: v.to(device) for k, v in make_batch(batch_size, coils, height, width, acceleration).items()}
    generator = torch.Generator(device=device).manual_seed(0)  # every draw of the step, on its device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> dict:
        return train_step(method, model, batch, optimizer, generator=generator, amp=amp, ema=ema)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
        if start is not None:  # the first step: compilation, cuDNN's search, allocations
            first_step_s, start = time.perf_counter() - start, None
    times, losses = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = step()  # returns Python floats: the step has finished on the device
        times.append(time.perf_counter() - start)
        losses.append(result["loss"])
    median = statistics.median(times)
    memory, memory_kind = peak_memory_gb(device)
    kernels = None
    if profile:
        try:
            kernels = profile_step(step, device, profile)
        except Exception as err:  # noqa: BLE001 - a profiler that cannot run here must not lose the timing
            kernels = {"error": repr(err)[:300]}
    return {
        "device": device_name(device),
        "method": method,
        "preset": preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": batch_size,
        "height": height,
        "width": width,
        "coils": coils,
        "acceleration": acceleration,
        "amp": amp,
        **spec.row_fields(),
        "first_step_s": round(first_step_s, 2) if warmup else None,
        "median_ms": round(median * 1e3, 2),
        "slices_per_s": round(batch_size / median, 3),
        "peak_memory_gb": round(memory, 3),
        "peak_memory_kind": memory_kind,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "paper_reference": PAPER_REFERENCE if method == "ambient" else None,
        "profile": kernels,
    }


# Kernel families of a profiled step, matched in this order on the lower-cased kernel name.
KERNEL_FAMILIES = (
    ("layout transposes", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("convolution / matmul", ("conv", "xmma", "cutlass", "gemm", "cudnn", "wgrad", "dgrad", "fprop", "sm90", "sm80")),
    ("Inductor (Triton) fused", ("triton",)),
    ("attention", ("flash", "fmha", "attention")),
    ("elementwise / reductions (eager)", ("elementwise", "reduce", "vectorized", "norm", "pointwise")),
)


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, keys in KERNEL_FAMILIES:
        if any(key in lowered for key in keys):
            return family
    return "other"


def profile_step(step, device: torch.device, top: int) -> dict[str, object]:
    """One more step under ``torch.profiler``: the device time by kernel family (where a
    step's time goes: convolutions, layout changes, fused element-wise kernels, ...) and the
    ``top`` kernels by self device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0
              and (device.type != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA)]
    total_us = sum(getattr(e, attr) for e in events) or 1.0
    families: dict[str, float] = {}
    for e in events:
        families[kernel_family(e.key)] = families.get(kernel_family(e.key), 0.0) + getattr(e, attr)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {
        "device_ms": round(total_us / 1e3, 2),
        "families_ms": {k: round(v / 1e3, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": e.key[:120], "ms": round(getattr(e, attr) / 1e3, 2), "calls": e.count}
                        for e in events[:top]],
    }


def move_off_initialisation(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Add ``scale`` times standard normal noise to every weight, in place (from torch's global
    generator). For precision checks: the zero-initialised output layers would make a fresh
    network's output independent of everything before them, precision included."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=scale)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 with TF32 off in matrix products and convolutions: a precision check's reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def precision_check(method: str, preset: str, device: torch.device, batch_size: int, height: int, width: int,
                    coils: int, acceleration: float, amp: str, compile_mode: str | None = None,
                    nhwc: bool = False, budget: float = 1.0) -> dict[str, object]:
    """The loss and gradients of one step under ``amp`` autocast (and ``compile_mode``) against
    the same step in full float32 (TF32 off): same weights, batch and random draws.

    Passes when the loss differs by less than ``LOSS_RTOL`` relative (issue 10: the same loss
    as the float32 step within mixed-precision tolerance) and the gradients point the same way
    (cosine similarity at least ``GRAD_MIN_COSINE``); the gradient's relative difference in norm
    is reported too.
    """
    torch.manual_seed(0)
    model = build_model(method, preset).to(device).train()
    move_off_initialisation(model)
    batch = {k: v.to(device) for k, v in make_batch(batch_size, coils, height, width, acceleration).items()}

    def loss_and_grad(net: torch.nn.Module, dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        generator = torch.Generator(device=device).manual_seed(0)
        context = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with context:
            loss = method_loss(method, net, batch, generator=generator)
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        return float(loss.detach()), grad

    # The float32 reference recomputes each block in its backward: the same gradients
    # (tests/test_unet.py; dropout redraws the same masks) in a fraction of the memory (the plain
    # float32 step took 123 GB at batch 8), so the compared step runs at the timed rows' batch
    # on any card and reuses their compilation from Inductor's cache.
    set_activation_checkpointing(model, True)
    try:
        with exact_float32():
            reference_loss, reference_grad = loss_and_grad(model, None)
    finally:
        set_activation_checkpointing(model, False)
    net = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compile_mode else model
    with inductor_layout(nhwc), activation_budget(budget):  # the timed row's graph: Inductor's cache serves it
        loss, grad = loss_and_grad(net, {"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
    loss_rel = abs(loss - reference_loss) / abs(reference_loss)
    grad_rel = float((grad - reference_grad).norm() / reference_grad.norm())
    cosine = float(torch.nn.functional.cosine_similarity(grad, reference_grad, dim=0))
    return {
        "device": device_name(device), "check": "amp_vs_fp32", "method": method, "preset": preset, "batch": batch_size,
        "height": height, "width": width, "coils": coils, "amp": amp, "compile": compile_mode, "inductor_nhwc": nhwc,
        "activation_memory_budget": budget, "loss_fp32": reference_loss, "loss": loss, "loss_rel_diff": loss_rel,
        "grad_rel_diff": grad_rel, "grad_cosine": cosine, "loss_rtol": LOSS_RTOL, "grad_min_cosine": GRAD_MIN_COSINE,
        "passed": loss_rel < LOSS_RTOL and cosine >= GRAD_MIN_COSINE,
    }


def run_precision_checks(args: argparse.Namespace, device: torch.device, compile_mode: str | None,
                         nhwc: bool, checked: set[tuple], budget: float = 1.0) -> int:
    """The precision checks of one (compile, nhwc, budget) setting, once: paper size on CUDA, right
    after the first row that compiled the same graph (Inductor's cache then serves it);
    on the CPU, or with --tiny-rows, the tiny rows' size. Returns the number that failed."""
    if (compile_mode, nhwc, budget) in checked:
        return 0
    checked.add((compile_mode, nhwc, budget))
    failed = 0
    for amp in args.precision_check:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        preset, batch, height, width, coils = (
            (PAPER_PRESETS["ambient"], args.precision_batch, 384, 320, 4) if device.type == "cuda" and not args.tiny_rows
            else ("tiny", args.batch, args.height, args.width, args.coils))
        try:
            row = precision_check("ambient", preset, device, batch, height, width, coils, args.acceleration,
                                  amp, compile_mode, nhwc, budget)
        except Exception as err:  # noqa: BLE001 - reported as a failed check
            row = {"device": device_name(device), "check": "amp_vs_fp32", "amp": amp, "compile": compile_mode,
                   "inductor_nhwc": nhwc, "activation_memory_budget": budget, "passed": False,
                   "error": repr(err)[:500]}
        failed += not row["passed"]
        print(json.dumps(row), flush=True)
    return failed


def parse_row(text: str) -> RowSpec:
    """``--rows`` item: ``eager`` or a comma-separated set of ``compile[=MODE]``, ``ckpt``,
    ``cudnn``, ``cl``, ``nhwc``, ``regional``, ``inline`` and ``budget=X`` (the fields of
    :class:`RowSpec`)."""
    settings: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "compile":
            settings["compile"] = value or "default"
            if settings["compile"] not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
                raise argparse.ArgumentTypeError(f"unknown compile mode {value!r} in {text!r}")
        elif key == "budget":
            try:
                settings["budget"] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"budget needs a number in (0, 1], got {value!r} in {text!r}") from None
            if not 0 < settings["budget"] <= 1:
                raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {value!r} in {text!r}")
        elif key in ("ckpt", "cudnn", "cl", "nhwc", "regional", "inline") and not value:
            settings[key] = True
        elif key != "eager":
            raise argparse.ArgumentTypeError(f"unknown row option {part!r} in {text!r} (compile[=MODE], ckpt, cudnn, "
                                             "cl, nhwc, regional, inline, budget=X or eager)")
    return RowSpec(**settings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, and CUDA too when present")
    parser.add_argument("--methods", nargs="+", choices=MRI_METHODS, default=list(MRI_METHODS))
    parser.add_argument("--batch", type=int, default=1, help="slices per step for the tiny presets")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--coils", type=int, default=4)
    parser.add_argument("--acceleration", type=float, default=4)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast of the tiny rows")
    parser.add_argument("--paper-amp", choices=["bf16", "fp16", "none"], default="bf16",
                        help="autocast of the paper-size ambient row on CUDA")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-size rows on CUDA")
    parser.add_argument("--tiny-rows", action="store_true",
                        help="run the rows of --paper-methods (--rows, or --compile x --checkpointing x "
                             "--cudnn-benchmark) with the tiny presets at --batch/--height/--width/--coils on every "
                             "device, instead of with the paper presets at the paper's size on CUDA: the rows' "
                             "configurations checked on a CPU (gpu_check.sh's GPU_CHECK_DRY_RUN=compiled)")
    parser.add_argument("--paper-methods", nargs="+", choices=MRI_METHODS, default=["ambient"],
                        help="methods whose paper preset runs at the paper's size on CUDA (with --rows; "
                             "the precision check is the ambient step's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"],
                        help="activation checkpointing of the paper-size ambient row (both: --checkpointing off on)")
    parser.add_argument("--compile", nargs="+", choices=["off", "default", "max-autotune-no-cudagraphs"],
                        default=["off"], help="torch.compile the paper-size ambient row (one row per mode)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights for the paper-size row")
    parser.add_argument("--cudnn-benchmark", nargs="+", choices=["off", "on"], default=["off"],
                        help="torch.backends.cudnn.benchmark for the paper-size row (both: --cudnn-benchmark off on)")
    parser.add_argument("--rows", nargs="+", type=parse_row, default=None, metavar="SPEC",
                        help="paper-size rows to run instead of the product of --compile x --checkpointing x "
                             "--cudnn-benchmark: each a comma-separated set of compile[=MODE], ckpt, cudnn, cl "
                             "(channels-last weights), nhwc (Inductor's layout optimisation forced on), regional "
                             "(each U-Net block compiled alone), inline (Inductor recomputes element-wise "
                             "intermediates in their readers), budget=X (activation memory budget of the "
                             "compiled backward, 0-1), or 'eager' for none; e.g. --rows eager compile,cudnn,nhwc "
                             "compile,nhwc,budget=0.5")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more step of each paper-size row: device time by kernel family and the "
                             "N slowest kernels, in the row's 'profile'")
    parser.add_argument("--precision-check", nargs="+", choices=["bf16", "fp16"], default=[],
                        help="also compare one ambient step's loss and gradients under this autocast (and each "
                             "--compile mode) with full float32: paper size on CUDA, the tiny rows' size on CPU; "
                             "exits 1 if one is outside tolerance")
    parser.add_argument("--precision-batch", type=int, default=8,
                        help="slices of the paper-size precision check (its float32 reference is checkpointed)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        parser.error("no CUDA device found (--device cuda)")

    failed_checks = 0
    for device in devices:
        for method in args.methods:
            row = bench_one(method, "tiny", device, args.batch, args.height, args.width, args.coils,
                            args.acceleration, args.amp, args.warmup, args.repeats, profile=args.profile)
            print(json.dumps(row), flush=True)
        rows = args.rows or [
            RowSpec(compile=None if c == "off" else c, ckpt=k == "on", cudnn=b == "on", cl=args.channels_last)
            for c in args.compile for k in args.checkpointing for b in args.cudnn_benchmark]
        checked: set[tuple] = set()

        paper_methods = [m for m in args.paper_methods if m in args.methods]
        if paper_methods and (args.tiny_rows or (device.type == "cuda" and not args.no_paper)):
            paper_amp = None if args.paper_amp == "none" else args.paper_amp
            for method in paper_methods:
                preset, batch, height, width, coils, amp = (
                    ("tiny", args.batch, args.height, args.width, args.coils, args.amp) if args.tiny_rows
                    else (PAPER_PRESETS[method], 8, 384, 320, 4, paper_amp))
                for spec in rows:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    try:
                        row = bench_one(method, preset, device, batch, height, width, coils, args.acceleration, amp,
                                        args.warmup, args.repeats, spec, args.profile)
                    except Exception as err:  # one failed configuration must not hide the others
                        row = {"device": device_name(device), "method": method, **spec.row_fields(),
                               "error": repr(err)[:500]}
                    print(json.dumps(row), flush=True)
                    torch.backends.cudnn.benchmark = False
                    if spec.has_plain_graph and method == "ambient":
                        failed_checks += run_precision_checks(args, device, spec.compile, spec.nhwc, checked,
                                                              spec.budget)
        else:
            failed_checks += run_precision_checks(args, device, None, False, checked)
    return 1 if failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())

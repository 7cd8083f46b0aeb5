"""Benchmark of the SENSE operators: time of A^H A (and A, A^H) at the paper's test size.

    python -m bench.operators                 # CPU, and CUDA when present
    python -m bench.operators --device cpu --repeats 5

Prints one JSON line per (device, operation) with the median time over ``--repeats`` runs
after ``--warmup`` runs. Needs only torch and adps's physics core (no Ray, no MLflow), so it
runs on a bare GPU machine with ``PYTHONPATH=platform``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from adps.mri import SenseOperator, column_mask


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform as std_platform  # the standard library module (our package is adps)

    return f"cpu ({std_platform.processor() or std_platform.machine()}, {torch.get_num_threads()} threads)"


def time_it(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def normal_with_shifts(op: SenseOperator, image: torch.Tensor) -> torch.Tensor:
    """A^H A with explicit fftshift/ifftshift: the textbook form the fused operator replaces."""
    dims = (-2, -1)
    coil_images = op.maps * image.unsqueeze(1)
    kspace = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(coil_images, dim=dims), norm="ortho"), dim=dims)
    kspace = kspace * op.mask
    back = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(kspace, dim=dims), norm="ortho"), dim=dims)
    return torch.sum(op.maps.conj() * back, dim=1)


def run(device: torch.device, slices: int, coils: int, height: int, width: int, acceleration: float,
        warmup: int, repeats: int) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(slices, coils, height, width, dtype=torch.complex64, generator=generator).to(device)
    image = torch.randn(slices, height, width, dtype=torch.complex64, generator=generator).to(device)
    masks = torch.stack([column_mask(width, acceleration, seed=0, slice_id=i) for i in range(slices)]).to(device)
    op = SenseOperator(maps, masks)
    kspace = op.forward(image)
    operations = {
        "normal (A^H A, fused)": lambda: op.normal(image),
        "normal with explicit fftshifts (baseline)": lambda: normal_with_shifts(op, image),
        "adjoint(forward(x))": lambda: op.adjoint(op.forward(image)),
        "forward (A)": lambda: op.forward(image),
        "adjoint (A^H)": lambda: op.adjoint(kspace),
    }
    rows = []
    with torch.no_grad():
        for name, fn in operations.items():
            times = time_it(fn, device, warmup, repeats)
            median = statistics.median(times)
            rows.append({
                "bench": "operators",
                "operation": name,
                "device": device_name(device),
                "shape": [slices, coils, height, width],
                "R": acceleration,
                "median_ms": round(1e3 * median, 3),
                "min_ms": round(1e3 * min(times), 3),
                "slices_per_s": round(slices / median, 1),
                "repeats": repeats,
                "torch": torch.__version__,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--coils", type=int, default=16)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--acceleration", type=float, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            raise SystemExit("bench/operators.py: --device cuda asked for, but no CUDA device is available")
    for device in devices:
        for row in run(device, args.slices, args.coils, args.height, args.width, args.acceleration,
                       args.warmup, args.repeats):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

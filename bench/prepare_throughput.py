"""Benchmark of data preparation: per-stage cost per slice, and a scale run on local Ray.

    python -m bench.prepare_throughput                      # brain-sized stages, 1 thread
    python -m bench.prepare_throughput --slices 2 --l1      # ... with L1-wavelet at every R
    python -m bench.prepare_throughput --scale --n 1000     # 1,000 small slices on local Ray

Stage mode: synthetic brain-sized volumes (16 coils, 640 x 320 k-space before the crop to
384 x 320) are prepared slice by slice on ONE thread (so the numbers are per CPU core), for a
train slice (compressed to 4 virtual coils) and a test slice (all 16 coils). Prints one JSON
line per split with the seconds per slice of each stage (reading, whitening, ESPIRiT,
reference, L1, MVUE), then one line extrapolating to the paper's 10,000 slices on N cores.

Scale mode: ``--n`` small slices (8 coils, 192 x 160, 5 per volume) prepared by
``adps.orchestration.prepare.prepare_dataset`` on a local Ray instance: wall time, peak memory
(the driver's, and the summed resident memory of the driver and every process under it, Ray's
included, sampled every 0.2 s), and the throughput of the first and second half of the slices
(from the shards' write times) to see whether it holds as the run grows.
"""

from __future__ import annotations

import os

# One thread per process before numpy / torch load: "per CPU core" numbers, and no busy-waiting
# BLAS threads competing with Ray's workers in scale mode (they get OMP_NUM_THREADS=1 from Ray).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from adps.data.fastmri import open_volume  # noqa: E402
from adps.data.preprocess import PrepareConfig, preprocess_slice, slice_id  # noqa: E402
from adps.data.synth import synthesize_dataset, synthetic_volume, write_volume  # noqa: E402

STAGES = ("reading", "whitening", "espirit", "reference", "l1", "mvue")
PAPER_SLICES = 10_000
PAPER_TEST_SLICES = 100


def emit(row: dict[str, object]) -> None:
    print(json.dumps(row), flush=True)


# Stage mode -------------------------------------------------------------------------------------


def stage_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    config = PrepareConfig(source="bench", output="bench", l1=args.l1, l1_iterations=args.l1_iterations, mvue=True)
    height = args.recon_height
    with tempfile.TemporaryDirectory(prefix="adps-bench-") as folder:
        path = Path(folder) / "file_brain_AXT2_bench_0000.h5"
        volume = synthetic_volume(0, n_slices=args.slices, n_coils=args.coils, height=height, width=args.width,
                                  oversampling=args.oversampling, noise_std=0.02)
        write_volume(path, volume)
        kspace_shape = list(volume.kspace.shape[2:])
        del volume
        # Warm-up (not timed): first calls pay for imports (sigpy) and one-off allocations.
        with open_volume(path) as opened:
            preprocess_slice(opened.read_slices([0])[0], split="train", slice_id=0, config=config.replace(l1=False))
        per_split = {}
        for split in ("train", "test"):
            timings = dict.fromkeys(STAGES, 0.0)
            started = time.perf_counter()
            with open_volume(path) as opened:
                kspace = opened.read_slices(range(args.slices))
            timings["reading"] = time.perf_counter() - started
            for index in range(args.slices):
                preprocess_slice(kspace[index], split=split, slice_id=slice_id("bench", index), config=config,
                                 timings=timings)
            total = time.perf_counter() - started
            per_slice = {f"{stage}_s": round(timings[stage] / args.slices, 4) for stage in STAGES}
            per_split[split] = {**per_slice, "total_s": round(total / args.slices, 4)}
            emit({
                "bench": "prepare_stages",
                "split": split,
                "coils_in": args.coils,
                "coils_out": config.virtual_coils if split != "test" else args.coils,
                "kspace": kspace_shape,
                "crop": list(config.crop),
                "accelerations": list(config.accelerations),
                "l1": args.l1,
                "l1_iterations": args.l1_iterations if args.l1 else 0,
                "slices": args.slices,
                "threads": 1,
                **per_split[split],
                "slices_per_s_per_core": round(args.slices / total, 3),
            })
    extrapolate(per_split, l1_measured=args.l1, l1_iterations=args.l1_iterations)


def extrapolate(per_split: dict[str, dict[str, float]], *, l1_measured: bool, l1_iterations: int) -> None:
    """Core-hours for 10,000 slices (9,900 compressed + 100 test), and hours on N cores."""
    def seconds(split: str, with_l1: bool) -> float:
        row = per_split[split]
        base = row["total_s"] - row["l1_s"] - row["mvue_s"]
        # L1 cost scales with its iterations; extrapolate a short measured run to the default 100.
        l1 = row["l1_s"] * (100 / l1_iterations) if with_l1 and l1_measured else 0.0
        return base + l1

    for with_l1 in (False, True) if l1_measured else (False,):
        core_seconds = (PAPER_SLICES - PAPER_TEST_SLICES) * seconds("train", with_l1) + PAPER_TEST_SLICES * seconds(
            "test", with_l1
        )
        emit({
            "bench": "prepare_extrapolation",
            "slices": PAPER_SLICES,
            "l1": with_l1,
            "core_hours": round(core_seconds / 3600, 2),
            "hours_on": {str(n): round(core_seconds / 3600 / n, 3) for n in (2, 16, 64, 256)},
            "assumes": "linear scaling over cores (one task per volume, no shared state); reading from local disk",
        })


# Scale mode -------------------------------------------------------------------------------------


class MemorySampler:
    """Peak summed RSS of this process and all its descendants (Linux /proc), sampled in a thread.

    Shared pages (Ray's object store is shared memory) are counted once per process that maps
    them, so the sum is an upper bound of the memory actually used.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.tree_rss())
            self._stop.wait(self.interval)

    @staticmethod
    def tree_rss() -> int:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            pid = frontier.pop()
            children = [child for child, parent in parents.items() if parent == pid]
            tree.update(children)
            frontier.extend(children)
        total = 0
        for pid in tree:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total


def scale_run(args: argparse.Namespace) -> None:
    import ray

    from adps.orchestration.prepare import prepare_dataset

    logging.basicConfig(level=logging.WARNING)
    clock = PlanClock()
    prepare_log = logging.getLogger("adps.prepare")
    prepare_log.setLevel(logging.INFO)
    prepare_log.addHandler(clock)
    prepare_log.propagate = False  # keep the INFO lines off the JSON output
    per_volume = 5
    n_volumes = -(-args.n // per_volume)
    with tempfile.TemporaryDirectory(prefix="adps-scale-", dir=args.workdir) as folder:
        raw, output = Path(folder) / "raw", Path(folder) / "prepared"
        started = time.perf_counter()
        synthesize_dataset(raw, n_volumes=n_volumes, n_slices=per_volume, n_coils=8, height=192, width=160,
                           seed=0, noise_std=0.02, progress=False)
        synth_s = time.perf_counter() - started
        config = PrepareConfig(
            source=str(raw), output=str(output), n_volumes=n_volumes, slices_per_volume=per_volume,
            test_volumes=min(20, n_volumes // 10), val_volumes=min(20, n_volumes // 10), crop=(192, 160),
            # R = 8 would leave floor(160 / 9) = 17 columns at R + 1, fewer than the 20 ACS columns.
            accelerations=(2, 4, 6),
            shard_size=args.shard_size,
        )
        cpus = args.cpus or os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        try:
            with MemorySampler() as memory:
                started_wall = time.time()
                started = time.perf_counter()
                manifest = prepare_dataset(config, progress=False)
                wall = time.perf_counter() - started
        finally:
            ray.shutdown()
        slices = sum(manifest["splits"][s]["n_slices"] for s in ("train", "val", "test"))
        halves = throughput_halves(output, manifest, clock.planned_at or time.time())
        emit({
            "bench": "prepare_scale",
            "slices": slices,
            "volumes": n_volumes,
            "coils": 8,
            "kspace": [384, 160],
            "accelerations": list(config.accelerations),
            "crop": [192, 160],
            "cpus": cpus,
            "synthesis_s": round(synth_s, 1),
            "wall_s": round(wall, 1),
            "scan_and_plan_s": round((clock.planned_at or started_wall) - started_wall, 1),
            "slices_per_s": round(slices / wall, 2),
            "slices_per_s_per_core": round(slices / wall / cpus, 3),
            **halves,
            "peak_rss_driver_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_tree_mb": round(memory.peak_bytes / 2**20),
            "output_mb": round(sum(p.stat().st_size for p in output.glob("*.h5")) / 2**20, 1),
            **task_figures(clock.stats, wall),
        })


class PlanClock(logging.Handler):
    """Notes when prepare_dataset has finished planning (its "... drawn ..." log line), and the
    task statistics it logs at the end."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.planned_at: float | None = None
        self.stats: dict[str, object] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if self.planned_at is None and " drawn (" in record.getMessage():
            self.planned_at = record.created
        self.stats.update(getattr(record, "prepare_stats", {}))


def throughput_halves(output: Path, manifest: dict, planned_at: float) -> dict[str, float]:
    """Slices/s over the first and second half of the slices, from when each shard was written.

    The clock starts when planning ended, so the scan is excluded and Ray's worker start-up
    lands in the first half.
    """
    written = sorted(
        ((output / s["name"]).stat().st_mtime, s["n_slices"])
        for split in ("train", "val", "test") for s in manifest["splits"][split]["shards"]
    )
    total = sum(n for _, n in written)
    done = 0
    for mtime, n in written:
        done += n
        if done >= total / 2:
            half_time, half_done = mtime, done
            break
    end = written[-1][0]
    return {
        "first_half_slices_per_s": round(half_done / max(half_time - planned_at, 1e-9), 2),
        "second_half_slices_per_s": round((total - half_done) / max(end - half_time, 1e-9), 2),
    }


def task_figures(stats: dict, wall: float) -> dict[str, object]:
    """Utilisation and per-slice stage seconds (per core) from prepare_dataset's task statistics."""
    if not stats:
        return {}
    slices = stats["slices"]
    return {
        "task_busy_fraction": round(stats["task_s"] / (wall * stats["slots"]), 3),
        "task_s_per_slice": round(stats["task_s"] / slices, 3),
        "stage_s_per_slice": {k: round(v / slices, 4) for k, v in stats["stages_s"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", action="store_true", help="the scale run on local Ray instead of the stage timings")
    parser.add_argument("--slices", type=int, default=3, help="stage mode: slices timed per split (default 3)")
    parser.add_argument("--coils", type=int, default=16, help="stage mode: receive coils (default 16)")
    parser.add_argument("--recon-height", type=int, default=320,
                        help="stage mode: rows after removing oversampling (default 320: 640 x 320 k-space)")
    parser.add_argument("--width", type=int, default=320, help="stage mode: columns (default 320)")
    parser.add_argument("--oversampling", type=int, default=2, help="stage mode: readout oversampling (default 2)")
    parser.add_argument("--l1", action="store_true", help="stage mode: also time L1-wavelet at R = 2, 4, 6, 8")
    parser.add_argument("--l1-iterations", type=int, default=100, help="stage mode: L1 iterations (default 100)")
    parser.add_argument("--n", type=int, default=1000, help="scale mode: number of slices (default 1000)")
    parser.add_argument("--cpus", type=int, help="scale mode: Ray CPUs (default: all cores)")
    parser.add_argument("--shard-size", type=int, default=16, help="scale mode: slices per shard (default 16)")
    parser.add_argument("--workdir", help="scale mode: parent folder of the temporary data (default: system temp)")
    args = parser.parse_args()
    if args.scale:
        scale_run(args)
    else:
        stage_run(args)


if __name__ == "__main__":
    main()

"""The benchmark scripts run and print what they promise (a tiny size, on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_operators_bench_prints_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "bench/operators.py", "--device", "cpu", "--slices", "2", "--coils", "3",
         "--height", "32", "--width", "40", "--acceleration", "1", "--warmup", "1", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 5
    assert all(row["device"].startswith("cpu") and row["median_ms"] > 0 for row in rows)
    assert rows[0]["shape"] == [2, 3, 32, 40]


def test_baseline_in_bench_equals_the_operator() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from operators import normal_with_shifts
    finally:
        sys.path.pop(0)
    from adps.mri import SenseOperator

    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 16, 12, dtype=torch.complex64, generator=generator)
    image = torch.randn(2, 16, 12, dtype=torch.complex64, generator=generator)
    op = SenseOperator(maps, torch.rand(12, generator=generator) > 0.5)
    torch.testing.assert_close(normal_with_shifts(op, image), op.normal(image), rtol=1e-5, atol=1e-5)

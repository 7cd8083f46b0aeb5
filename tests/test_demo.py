"""The embedded demo and the command line, run as a user runs them."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def adps(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adps", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_console_entry_point_is_installed(tmp_path: Path) -> None:
    script = BIN / "adps"
    if not script.exists():
        pytest.skip("adps is not installed in this environment (run through bootstrap.py)")
    result = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("adps ")


def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = adps("demo", "--quick", "--workdir", str(workdir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "NRMSE" in out and "PSNR" in out and "SSIM" in out
    with (workdir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {float(r["R"]) for r in rows} == {2.0, 4.0, 8.0}
    assert {r["method"] for r in rows} == {"zero-filled", "CG-SENSE"}
    assert len(rows) == 3 * 2 * 2  # R x methods x slices

    def mean(method: str, acceleration: float, metric: str) -> float:
        values = [float(r[metric]) for r in rows if r["method"] == method and float(r["R"]) == acceleration]
        return sum(values) / len(values)

    for acceleration in (2.0, 4.0, 8.0):
        assert mean("CG-SENSE", acceleration, "nrmse") < mean("zero-filled", acceleration, "nrmse")
        assert mean("CG-SENSE", acceleration, "psnr") > mean("zero-filled", acceleration, "psnr")
    # Errors grow with acceleration.
    assert mean("CG-SENSE", 2.0, "nrmse") < mean("CG-SENSE", 4.0, "nrmse") < mean("CG-SENSE", 8.0, "nrmse")
    figure = workdir / "figures" / "reconstructions.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(workdir.rglob("*.tmp*")), "temporary files left behind"


def test_demo_rejects_an_impossible_acceleration(tmp_path: Path) -> None:
    result = adps("demo", "--quick", "--accelerations", "12", "--workdir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 2
    assert "fewer than the 20 ACS columns" in result.stderr
    assert "Traceback" not in result.stderr

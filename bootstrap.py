#!/usr/bin/env python3
"""Set up the project's environment in .venv/ and run the demo or the test suite.

    python3 bootstrap.py demo [adps demo options]    # e.g. --quick
    python3 bootstrap.py test [pytest options]      # e.g. -k masks

Needs only a Python >= 3.10 with the standard library. The first run creates .venv/ and
installs the project with its dev extra, pinned by constraints.txt (several minutes: torch and
Ray are large). Later runs reinstall only when pyproject.toml or constraints.txt changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".adps-install-stamp"
INSTALL_INPUTS = ("pyproject.toml", "constraints.txt")


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS:
        path = ROOT / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_environment() -> Path:
    python = venv_python()
    if not python.exists():
        print(f"[bootstrap] creating {VENV}", flush=True)
        run([sys.executable, "-m", "venv", str(VENV)])
    fingerprint = install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return python
    print("[bootstrap] installing adps and its dependencies into .venv (first time: several minutes)", flush=True)
    started = time.monotonic()
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-e", ".[dev]"]
    if (ROOT / "constraints.txt").exists():
        cmd += ["-c", "constraints.txt"]
    run(cmd)
    STAMP.write_text(fingerprint)
    print(f"[bootstrap] environment ready in {time.monotonic() - started:.0f} s", flush=True)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    python = ensure_environment()
    action, rest = argv[0], argv[1:]
    if action == "setup":
        return 0
    if action == "demo":
        cmd = [str(python), "-m", "adps", "demo", *rest]
    else:
        cmd = [str(python), "-m", "pytest", *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

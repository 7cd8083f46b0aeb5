"""Every local command the README and the docs show runs as written, in the documents' order.

``ADPS_DOCS_RUN=1 python -m pytest tests/test_docs_run.py`` (about 32 minutes on 2 cores; not in
CI's 15-minute suite, where it is skipped: tests/test_docs.py checks that every documented
command parses, and tests/test_cluster_path.py runs the cluster recipe as written).

What runs: each ``adps ...`` line of a ``bash`` block (continuations joined, comments dropped),
as a shell runs it, from the root of a copy of the repository's configs, search spaces and jobs,
with ``.venv/bin`` first on ``PATH`` and nothing else set up: the state the README's setup
leaves. The documents run in the order a user reads them (the README, then the pages the README
links), all in the same folder, so a page may use what the README's commands made (the
prepared dataset, the registered models); a command shown twice runs twice. LPIPS and FID find
their backbone weights in ``$ADPS_WEIGHTS_DIR``, as the README says: here, randomly initialised
files of torchvision's layout (no network access; the numbers are not the point).

What does not run here, and why: ``ray job submit`` lines (a cluster: docs/deployment.md's
recipe runs as written in tests/test_cluster_path.py), and lines naming an ``s3://`` bucket
(your bucket; the S3 code paths have their own tests against a moto server).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import write_stand_in_weights
from test_docs import ROOT, documented_commands

RUN = os.environ.get("ADPS_DOCS_RUN") == "1"
# The reading order: the README, then the pages in the order its "Using it" section links them.
ORDER = ["README.md", "docs/data.md", "docs/training.md", "docs/tuning.md", "docs/evaluation.md",
         "docs/natural_images.md"]
COPIED = ["configs", "tune_spaces", "jobs"]
PER_COMMAND_TIMEOUT_S = 900


def local_commands() -> list[tuple[str, str]]:
    """``(document, line)`` for every documented ``adps`` line that runs on this machine alone."""
    found = [(doc, line) for doc, line in documented_commands() if line.startswith("adps ") and "s3://" not in line]
    rank = {doc: i for i, doc in enumerate(ORDER)}
    return sorted(found, key=lambda item: rank.get(item[0], len(ORDER)))  # stable: each page keeps its order


def test_every_local_command_is_in_a_document_of_the_reading_order() -> None:
    """A page outside ORDER would run after the others, out of the order a reader meets it."""
    assert {doc for doc, _ in local_commands()} <= set(ORDER)


@pytest.mark.skipif(not RUN, reason="runs every local command of the docs (about 32 minutes): ADPS_DOCS_RUN=1")
def test_local_commands_run_as_written(tmp_path: Path) -> None:
    work = tmp_path / "clone"
    work.mkdir()
    for name in COPIED:
        shutil.copytree(ROOT / name, work / name)
    write_stand_in_weights(tmp_path / "weights")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "RAY_", "AWS_", "ADPS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["ADPS_WEIGHTS_DIR"] = str(tmp_path / "weights")
    # Ray's own temporary folder (its socket paths must stay short), not one a `ray start` left running.
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="adps-docs-ray-", dir="/tmp")
    env["PWD"] = str(work)
    total = 0.0
    try:
        for doc, line in local_commands():
            started = time.monotonic()
            result = subprocess.run(line, shell=True, cwd=work, env=env, capture_output=True, text=True,
                                    timeout=PER_COMMAND_TIMEOUT_S, executable="/bin/bash")
            took = time.monotonic() - started
            total += took
            print(f"{took:7.1f} s  exit {result.returncode}  {doc}: {line}", flush=True)
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
            assert result.returncode == 0, f"{doc}: `{line}` exited {result.returncode} after {took:.0f} s:\n{tail}"
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    print(f"{total:.0f} s for {len(local_commands())} commands")

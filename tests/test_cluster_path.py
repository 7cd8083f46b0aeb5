"""The cluster path as a user takes it: a local cluster from ``ray start --head`` (with token
authentication, on as soon as ``~/.ray/auth_token`` exists) and ``ray job submit --working-dir .`` of a job in
``jobs/``, as docs/deployment.md shows. Here: which code a submitted job runs, and that it
never keeps its MLflow store in Ray's temporary copy of the working dir.

The head runs in its own process group under a temporary HOME (its token goes there), on free
ports, and is killed with its group at the end: ``ray stop`` would also stop the suite's own
Ray instance.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path: Path):
    """``ray start --head --block`` in a process group of its own; yields ``(dashboard URL, env)``."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):  # a fresh shell has none of them
        env.pop(key, None)
    # Ray 2.60's `ray start --head` turns token authentication on when ~/.ray/auth_token exists,
    # as it does once `ray get-auth-token --generate` (or an earlier local cluster) made it.
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=120)
    dashboard = _free_port()
    temp_dir = Path("/tmp") / f"ray-head-{os.getpid()}-{dashboard}"  # short: Ray's socket paths are limited
    # Every port its own: the suite's Ray instance holds the defaults (its dashboard agent 52365),
    # and a head whose agent cannot bind never takes a job ("No available agent to submit job").
    ports = [f"--{name}={_free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", *ports, f"--dashboard-port={dashboard}",
         "--include-dashboard=true", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", dashboard)) == 0:
                    break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
        else:
            pytest.fail("the Ray dashboard did not come up in 120 s")
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(head.pid, signal.SIGKILL)  # the raylet, GCS and workers still in the group
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _submit(url: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    job_env = {**env, "RAY_AUTH_MODE": "token"}  # as docs/deployment.md says: a cluster with a token wants it
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", *args],
                                cwd=REPO, env=job_env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in result.stdout + result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)  # the head's job agent starts a few seconds after its dashboard


def test_a_submitted_job_runs_the_uploaded_tree(ray_head) -> None:
    """Submitted as docs/deployment.md says (RAY_AUTH_MODE=token). A job whose platform/ is not on PYTHONPATH is refused with the flag to pass; with it, the
    job's adps is the uploaded tree's (in the job's copy of the working dir, not the checkout's
    or an installed one)."""
    url, env = ray_head
    refused = _submit(url, env, "--", "python", "jobs/train.py", "--help")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "jobs/train.py: submitted with the checkout as working dir, but its platform/ is not on PYTHONPATH" in output
    assert """--runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}'""" in output

    ran = _submit(url, env, "--runtime-env-json", '{"env_vars": {"PYTHONPATH": "platform"}}', "--", "python",
                  "jobs/train.py", "--help")
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output
    line = next(line for line in output.splitlines() if "adps from the uploaded tree" in line)
    where = line.rsplit(", ", 1)[1].strip()
    assert "working_dir_files" in where and where.endswith("platform/adps"), line
    assert "usage: adps train" in output

    # Where things go is never the job's copy of its working dir (Ray deletes it with the session).
    scratch = _submit(url, env, "--runtime-env-json", '{"env_vars": {"PYTHONPATH": "platform"}}', "--", "python",
                      "-c", "from adps.orchestration.tracking import resolve_tracking_uri; resolve_tracking_uri()")
    output = scratch.stdout + scratch.stderr
    assert scratch.returncode != 0, output
    assert "the MLflow store would be /" in output and "inside this job's copy of its working dir" in output
    assert "pass MLFLOW_TRACKING_URI in the job's runtime env" in output

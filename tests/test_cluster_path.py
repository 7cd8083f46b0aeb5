"""The cluster path as a user takes it: docs/deployment.md's "A first run on a cluster", run
command by command as written, then checked where a user looks: the MLflow server, ``$WORK``,
the Ray dashboard's Train view.

The recipe's lines run in bash under a temporary HOME (Ray's token goes to ``~/.ray``, the
recipe's ``$WORK`` under HOME), each after the recipe's ``export`` lines so far. Three changes
only, all of ports and processes: the head gets free ports and ``--block`` (the suite's own Ray
holds the defaults, and a blocking head is killed with its process group at the end: ``ray
stop`` would also stop the suite's Ray), the MLflow server gets a free port instead of 5000,
and ``ray job submit`` finds the head through ``RAY_ADDRESS``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import stop_process_group

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RECIPE_HEADING = "## A first run on a cluster"


def recipe() -> list[str]:
    """The command lines of the recipe's code block (continuations joined, comments dropped)."""
    section = (REPO / "docs" / "deployment.md").read_text().split(RECIPE_HEADING, 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    commands, pending = [], ""
    for line in block.splitlines():
        line = pending + re.sub(r"\s+#\s.*$", "", line.strip())
        pending = line[:-1] if line.endswith("\\") else ""
        if line and not pending:
            commands.append(line)
    return commands


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Shell:
    """The user's shell: every line runs in bash after the ``export`` lines seen so far."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.exports: list[str] = []

    def _script(self, line: str) -> list[str]:
        return ["bash", "-c", "\n".join(["set -euo pipefail", *self.exports, line])]

    def run(self, line: str, *, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``line`` to its end; a submit the head's job agent is not ready for yet is retried."""
        deadline = time.monotonic() + 60
        while True:
            started = time.monotonic()
            result = subprocess.run(self._script(line), cwd=REPO, env=self.env, capture_output=True, text=True,
                                    timeout=timeout)
            output = result.stdout + result.stderr
            print(f"[{time.monotonic() - started:5.1f} s, rc {result.returncode}] {line[:150]}", flush=True)
            if "No available agent to submit job" not in output or time.monotonic() > deadline:
                return result
            time.sleep(2)  # the job agent starts a few seconds after the dashboard

    def start(self, line: str, log: Path) -> subprocess.Popen:
        """Start ``line`` in the background, in a process group of its own."""
        with open(log, "wb") as out:
            return subprocess.Popen(self._script(line), cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)


def _wait_for(url: str, process: subprocess.Popen, log: Path, what: str, *, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


class Head:
    """The recipe's ``ray start --head`` line on free ports, blocking in its own process group."""

    def __init__(self, shell: Shell, line: str, folder: Path) -> None:
        self.shell, self.line, self.folder = shell, line, folder
        self.dashboard = _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard}"
        self.process: subprocess.Popen | None = None
        self.temp_dir = Path()
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        # Short: Ray's socket paths are limited to 107 characters.
        self.temp_dir = Path("/tmp") / f"ray-head-{os.getpid()}-{self.dashboard}-{self.starts}"
        # Every port its own: a head whose agent cannot bind never takes a job.
        ports = " ".join(f"--{name}={_free_port()}" for name in (
            "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port"))
        self.process = self.shell.start(
            f"{self.line} --block {ports} --dashboard-port={self.dashboard} --include-dashboard=true --num-cpus=2 "
            f"--disable-usage-stats --temp-dir={self.temp_dir}", self.folder / f"head-{self.starts}.log")
        _wait_for(self.url, self.process, self.folder / f"head-{self.starts}.log", "the Ray head")

    def stop(self) -> None:
        """Kill the head's process group (raylet, GCS, workers) and delete its session folder."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)
        self.process = None


def _get_json(url: str, token: str) -> object:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        pytest.fail(f"{url}: {err.code} {err.read().decode(errors='replace')[:2000]}")


def _check(result: subprocess.CompletedProcess, line: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{line}\n{output[-6000:]}"
    return output


def test_the_documented_cluster_recipe(tmp_path: Path) -> None:
    """docs/deployment.md's recipe as written: every job succeeds; afterwards the MLflow server
    holds the training run (metrics, description linking checkpoint and model), the registered
    version made by it and tagged by the search, the search and the evaluation; ``$WORK`` holds
    Ray Train's and Ray Tune's folders; the dashboard's Train view lists the run; a search is
    restored by name on a new cluster after the old one's session folder is gone; a finished
    run submitted again is refused; the jobs run the uploaded tree."""
    from mlflow import MlflowClient

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):  # a fresh shell has none of them
        env.pop(key, None)
    # Token authentication as Ray 2.60 turns it on: `ray start --head` uses ~/.ray/auth_token when
    # it exists (made by `ray get-auth-token --generate` or an earlier cluster).
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()

    commands = recipe()
    shell = Shell(env)
    mlflow_port = _free_port()
    head: Head | None = None
    server: subprocess.Popen | None = None
    outputs: dict[str, str] = {}
    try:
        for line in commands:
            if line.startswith("export "):
                if "MLFLOW_TRACKING_URI" in line:
                    assert line.count("127.0.0.1:5000") == 1, line
                    line = line.replace("127.0.0.1:5000", f"127.0.0.1:{mlflow_port}")
                shell.exports.append(line)
            elif line.endswith("ray start --head"):
                head = Head(shell, line, tmp_path)
                head.start()
            elif " mlflow server " in f" {line}":
                assert line.endswith(" &") and line.count("--port 5000") == 1, line
                log = tmp_path / "mlflow.log"
                server = shell.start(line[:-2].replace("--port 5000", f"--port {mlflow_port}"), log)
                _wait_for(f"http://127.0.0.1:{mlflow_port}/health", server, log, "mlflow server")
            else:
                if head is not None:  # `ray job submit`'s default address is 127.0.0.1:8265
                    shell.env = {**env, "RAY_ADDRESS": head.url}
                outputs[line] = _check(shell.run(line), line)
        assert head is not None and server is not None, commands
        work = Path(shell.run('echo "$WORK"').stdout.strip())
        assert work.is_relative_to(home), work
        submits = [line for line in commands if line.startswith("ray job submit")]
        train_line = next(line for line in submits if "jobs/train.py" in line)
        tune_line = next(line for line in submits if "jobs/tune_dps.py" in line)

        # The jobs ran the uploaded tree, in the job's copy of the working dir: what
        # test_a_submitted_job_refuses_other_code_and_a_store_in_its_copy below relies on.
        line = next(line for line in outputs[train_line].splitlines() if "adps from the uploaded tree" in line)
        assert "/runtime_resources/working_dir_files/_ray_pkg_" in line and line.rstrip().endswith("platform/adps"), line

        # The dashboard's Train view lists the run.
        runs = _get_json(f"{head.url}/api/train/v2/runs/v1", token)  # the Train view of Ray Train V2
        assert "tiny-ambient-r2" in json.dumps(runs), runs

        # MLflow: the training run, its metrics and links; the version it registered, tagged by the search.
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        (train_run,) = client.search_runs([client.get_experiment_by_name("adps-tiny").experiment_id],
                                          "attributes.run_name = 'tiny-ambient-r2'")
        assert train_run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
        assert any(key.startswith("val_") for key in train_run.data.metrics), train_run.data.metrics
        description = train_run.data.tags["mlflow.note.content"]
        assert "models:/adps-ambient-r2/1" in description and f"{work}/runs/tiny-ambient-r2/checkpoint_" in description
        version = client.get_model_version("adps-ambient-r2", "1")
        assert version.run_id == train_run.info.run_id
        assert float(version.tags["adps.tuned.r2.guidance"]) > 0 and version.tags["adps.tuned.r2.steps"] == "4"
        assert client.get_registered_model("adps-ambient-r2").description
        (search,) = client.search_runs([client.get_experiment_by_name("adps-tiny-tune").experiment_id],
                                       "tags.mlflow.parentRunId IS NULL")
        assert search.info.status == "FINISHED" and version.tags["adps.tuned.r2.run_id"] == search.info.run_id
        (evaluation,) = client.search_runs([client.get_experiment_by_name("adps-tiny-eval").experiment_id])
        assert evaluation.info.status == "FINISHED" and evaluation.data.metrics, evaluation.data
        # The evaluation's best registered model (the only one here) is @champion.
        assert client.get_model_version_by_alias("adps-ambient-r2", "champion").version == "1"
        assert evaluation.data.tags["adps.champion"] == "models:/adps-ambient-r2/1"

        # $WORK: Ray Train's and Ray Tune's folders and the evaluation's tables; nothing in Ray's session.
        assert json.loads((work / "runs" / "tiny-ambient-r2" / "adps_finished.json").read_text())["step"] == 6
        best = json.loads((work / "tune" / "tiny-adps" / "best.json").read_text())
        assert (work / "evaluation" / "report" / "results.csv").is_file()
        assert not list(head.temp_dir.rglob(".adps")) and not list(head.temp_dir.rglob("mlflow.db"))

        # A finished run submitted again trains nothing: refused, naming what to change.
        again = shell.run(train_line)
        assert again.returncode != 0 and "holds a run that finished at step 6" in again.stdout + again.stderr

        # A new cluster, the old session folder gone: the search is restored by name, no trial run again.
        head.stop()
        head.start()
        restored = _check(shell.run(tune_line), tune_line)
        assert f"adps tune: resuming {work}/tune/tiny-adps" in restored, restored[-3000:]
        assert json.loads((work / "tune" / "tiny-adps" / "best.json").read_text())["trial_id"] == best["trial_id"]
        children = client.search_runs([search.info.experiment_id], f"tags.mlflow.parentRunId = '{search.info.run_id}'")
        assert len(children) == 2, [run.info.run_name for run in children]
    finally:
        if head is not None:
            head.stop()
        if server is not None:
            stop_process_group(server)


def test_a_submitted_job_refuses_other_code_and_a_store_in_its_copy(tmp_path: Path) -> None:
    """A job as Ray starts it (the variable Ray sets, the working dir's copy as cwd; both seen
    on the real head above): without ``platform`` on PYTHONPATH it refuses, naming the flag;
    with it, the default MLflow store (inside the copy, deleted with the session) is refused."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123456789abcdef"
    copy.mkdir(parents=True)
    for name in ("jobs", "platform"):
        (copy / name).symlink_to(REPO / name)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = "{}"
    bare = subprocess.run([sys.executable, "jobs/train.py", "--help"], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=120)
    assert bare.returncode != 0, bare.stdout
    assert "jobs/train.py: submitted with the checkout as working dir, but its platform/ is not on PYTHONPATH" in bare.stderr
    assert """--runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}'""" in bare.stderr
    scratch = subprocess.run(
        [sys.executable, "-c", "from adps.orchestration.tracking import resolve_tracking_uri; resolve_tracking_uri()"],
        cwd=copy, env={**env, "PYTHONPATH": "platform"}, capture_output=True, text=True, timeout=120)
    assert scratch.returncode != 0
    assert f"the MLflow store would be {copy}/.adps/mlflow.db, inside this job's copy of its working dir" in scratch.stderr
    assert "pass MLFLOW_TRACKING_URI in the job's runtime env" in scratch.stderr
    assert not (copy / ".adps").exists()

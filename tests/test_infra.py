"""Deployment files: ray_cluster.yaml, infra/Dockerfile, KubeRay manifests, MLflow and S3 scripts.

They are checked against what is installed here (Ray's own cluster-config schema and version,
the mlflow version) so that they cannot drift from the pinned stack unnoticed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
RAY_IMAGE = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+(?:-[\w.]+)?$")


def ray_version() -> str:
    return importlib.metadata.version("ray")


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


# --- ray_cluster.yaml -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return load_yaml(ROOT / "ray_cluster.yaml")


def test_ray_cluster_yaml_matches_rays_schema(cluster_config):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_config, schema)  # the file as written

    # What `ray up` does first: fill in the defaults, then validate the result.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster_config))


def test_ray_cluster_yaml_node_types(cluster_config):
    types = cluster_config["available_node_types"]
    head = cluster_config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("CPU") == 0, "the head must not take tasks"

    workers = {name: t for name, t in types.items() if name != head}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "no worker type advertises GPUs"
    for t in gpu_workers.values():
        assert t.get("min_workers", 0) == 0 and t["max_workers"] > 0
    assert cluster_config["provider"]["type"] == "aws"
    assert cluster_config["cluster_name"] == "adps"


def test_ray_cluster_yaml_installs_repo_and_exposes_dashboard(cluster_config):
    assert "/home/ray/adps" in cluster_config["file_mounts"]
    assert "pip install -e /home/ray/adps" in cluster_config["setup_commands"]
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    run_options = " ".join(cluster_config["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in run_options


def test_ray_cluster_image_matches_installed_ray(cluster_config):
    match = RAY_IMAGE.fullmatch(cluster_config["docker"]["image"])
    assert match, cluster_config["docker"]["image"]
    assert match.group(1) == ray_version()


# --- infra/Dockerfile -------------------------------------------------------------------------


def test_dockerfile_base_image_matches_installed_ray():
    text = (INFRA / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(froms) == 1, froms
    match = RAY_IMAGE.fullmatch(froms[0])
    assert match, f"FROM {froms[0]} is not a rayproject/ray:X.Y.Z-pyNN image"
    assert match.group(1) == ray_version(), (
        f"infra/Dockerfile uses Ray {match.group(1)} but Ray {ray_version()} is installed/pinned"
    )
    assert re.search(r"pip install .*-e \.", text)
    assert re.search(r"^USER ray\s*$", text, flags=re.MULTILINE)
    # The build context is the repo root: its ignore file must keep the virtualenv out.
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# --- KubeRay ----------------------------------------------------------------------------------


def kuberay_cluster_spec(name: str) -> tuple[dict, dict]:
    doc = load_yaml(INFRA / "kuberay" / name)
    assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "RayCluster":
        return doc, doc["spec"]
    assert doc["kind"] == "RayJob"
    return doc, doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize(("name", "kind"), [("raycluster.yaml", "RayCluster"), ("rayjob-train.yaml", "RayJob")])
def test_kuberay_manifest(name, kind):
    doc, spec = kuberay_cluster_spec(name)
    assert doc["kind"] == kind
    assert spec["rayVersion"] == ray_version()

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert 8265 in [p["containerPort"] for p in head_container["ports"]]

    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    for container in [head_container] + [g["template"]["spec"]["containers"][0] for g in groups]:
        assert container["image"] == "adps:latest"
        assert "MLFLOW_TRACKING_URI" in [e["name"] for e in container["env"]]
        assert {"secretRef": {"name": "adps-s3"}} in container["envFrom"]


def test_rayjob_runs_training():
    doc, _ = kuberay_cluster_spec("rayjob-train.yaml")
    entrypoint = doc["spec"]["entrypoint"]
    assert re.fullmatch(r"python jobs/train\.py --config configs/\S+\.yaml", entrypoint), entrypoint
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] == "/home/ray/adps"


# --- MLflow compose ---------------------------------------------------------------------------


def test_mlflow_compose():
    doc = load_yaml(INFRA / "mlflow" / "docker-compose.yaml")
    assert {"postgres", "mlflow"} <= set(doc["services"])
    mlflow = doc["services"]["mlflow"]
    base = re.search(r"FROM ghcr\.io/mlflow/mlflow:v(\S+)", mlflow["build"]["dockerfile_inline"])
    assert base and base.group(1) == importlib.metadata.version("mlflow")
    command = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql://" in command and "--artifacts-destination=" in command


# --- shell scripts ----------------------------------------------------------------------------

SCRIPTS = sorted(INFRA.rglob("*.sh"))


def test_scripts_found():
    names = {p.relative_to(INFRA).as_posix() for p in SCRIPTS}
    assert {"mlflow/run_server.sh", "local/s3_server.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_script_syntax_and_mode(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in script.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_s3_server_script_serves_a_bucket(tmp_path):
    boto3 = pytest.importorskip("boto3")
    env = dict(os.environ)
    # The virtualenv's bin first, so the script finds its moto_server (and python with boto3).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if shutil.which("moto_server", path=env["PATH"]) is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]', part of the dev extra)")
    port = free_port()
    env["PORT"] = str(port)
    bucket = "adps-infra-test"
    log_path = tmp_path / "s3_server.log"
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(INFRA / "local" / "s3_server.sh"), bucket],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"s3_server.sh exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
            except Exception:  # not listening yet
                names = []
            if bucket in names and f"AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in log_path.read_text():
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no bucket {bucket!r} after 20 s:\n{log_path.read_text()}")
            time.sleep(0.2)

        s3.put_object(Bucket=bucket, Key="probe.txt", Body=b"ok")
        assert s3.get_object(Bucket=bucket, Key="probe.txt")["Body"].read() == b"ok"
        log_text = log_path.read_text()
        for line in ("AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_DEFAULT_REGION=us-east-1"):
            assert line in log_text
    finally:
        stop_process_group(proc)

    deadline = time.monotonic() + 5
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_open(port), "the moto server outlived its script"

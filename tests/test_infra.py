"""Deployment files: ray_cluster.yaml, the image, KubeRay manifests, the MLflow server, dev services.

They are checked against what is installed here (Ray's own cluster-config schema and version,
the mlflow version) so that they cannot drift from the pinned stack unnoticed, and the local
development services (infra/local/dev_services.sh) are started and stopped for real.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DEV_SERVICES = INFRA / "local" / "dev_services.sh"
RAY_IMAGE = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+(?:-[\w.]+)?$")

# The infra tree, exactly (a new file gets a line here and a paragraph in infra/README.md).
INFRA_FILES = {
    "README.md",
    "docker/Dockerfile",
    "docker/Dockerfile.dockerignore",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "local/dev_services.sh",
    "mlflow/docker-compose.yaml",
    "mlflow/run_server.sh",
}


def ray_version() -> str:
    return importlib.metadata.version("ray")


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


def test_infra_tree_is_exactly_the_documented_one():
    files = {
        p.relative_to(INFRA).as_posix()
        for p in INFRA.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert files == INFRA_FILES


def test_every_piece_is_documented():
    infra_readme = (INFRA / "README.md").read_text()
    for name in sorted(INFRA_FILES - {"README.md"}) + ["../ray_cluster.yaml"]:
        assert f"`{name}`" in infra_readme, f"infra/README.md does not describe {name}"
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    for name in ("ray_cluster.yaml", "infra/docker/Dockerfile", "infra/kuberay/", "infra/mlflow/",
                 "infra/local/dev_services.sh", "infra/README.md"):
        assert name in deployment, f"docs/deployment.md does not mention {name}"
    assert "docs/deployment.md" in (ROOT / "README.md").read_text()
    # The commands of each piece.
    for command in ("infra/local/dev_services.sh start", "infra/local/dev_services.sh stop",
                    "infra/local/dev_services.sh status", "infra/local/dev_services.sh env",
                    "docker build -f infra/docker/Dockerfile", "ray up ray_cluster.yaml",
                    "kubectl apply -f infra/kuberay/rayjob.yaml", "kubectl apply -f infra/kuberay/raycluster.yaml",
                    "docker compose -f infra/mlflow/docker-compose.yaml up", "infra/mlflow/run_server.sh"):
        assert command in infra_readme, f"infra/README.md lacks `{command}`"


USER_DOCS = ["README.md", "bench/README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize(
    "doc",
    [
        *USER_DOCS,
        "infra/README.md",
        "ray_cluster.yaml",
        "infra/docker/Dockerfile",
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/rayjob.yaml",
        "infra/mlflow/docker-compose.yaml",
        "infra/mlflow/run_server.sh",
        "infra/local/dev_services.sh",
    ],
)
def test_referenced_paths_exist(doc):
    """Every path of the repository a deployment file or a user document names exists (a path
    followed by ``<`` is a pattern, e.g. ``configs/images/image_p<p>.yaml``)."""
    text = (ROOT / doc).read_text()
    prefixes = "infra|jobs|configs|tune_spaces|docs|bench|scripts|tests|platform"
    paths = {m.group(1) for m in re.finditer(rf"(?<![\w/.-])((?:{prefixes})/[\w./-]*\w)", text)
             if not text[m.end():m.end() + 1] == "<"}
    assert paths or doc in USER_DOCS, f"{doc} names no paths (the pattern is broken?)"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{doc} names paths that do not exist: {missing}"


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
        # Autoscaled: from none when idle up to a bound the cluster-wide limit allows.
        assert t.get("min_workers", 0) == 0 < t["max_workers"] <= cluster_config["max_workers"]
    assert cluster_config["idle_timeout_minutes"] > 0
    assert cluster_config["provider"]["type"] == "aws"
    assert cluster_config["cluster_name"] == "adps"
    # Every node has the instance profile infra/README.md creates (ECR pulls, S3, launching workers).
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"] == {"Name": "adps-ray"}


def test_ray_cluster_yaml_installs_repo_and_keeps_the_dashboard_private(cluster_config):
    assert cluster_config["file_mounts"]["/home/ray/adps"] == "."
    setup = " ".join(cluster_config["setup_commands"])
    assert "pip install" in setup and "-e /home/ray/adps" in setup
    assert "-c /home/ray/adps/constraints.txt" in setup and (ROOT / "constraints.txt").is_file()
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    # Inbound from outside: SSH only (the dashboard is reached through `ray dashboard`'s tunnel).
    rules = cluster_config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    run_options = " ".join(cluster_config["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in run_options
    assert "--env RAY_TRAIN_ENABLE_STATE_TRACKING=1" in run_options  # the dashboard's Train view


def test_ray_cluster_uses_the_adps_image_from_its_registry(cluster_config):
    image = cluster_config["docker"]["image"]
    match = re.fullmatch(r"(?P<registry>[\w.-]+\.dkr\.ecr\.(?P<region>[\w-]+)\.amazonaws\.com)/adps:[\w.-]+", image)
    assert match, f"docker.image {image!r} is not the adps image in ECR"
    assert match.group("region") == cluster_config["provider"]["region"]
    # Each host logs Docker in to that registry before pulling.
    init = " ".join(cluster_config["initialization_commands"])
    assert "aws ecr get-login-password" in init and f"--password-stdin {match.group('registry')}" in init


# --- infra/docker/Dockerfile ------------------------------------------------------------------


def test_dockerfile_base_image_matches_installed_ray():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(froms) == 1, froms
    match = RAY_IMAGE.fullmatch(froms[0])
    assert match, f"FROM {froms[0]} is not a rayproject/ray:X.Y.Z-pyNN image"
    assert match.group(1) == ray_version(), (
        f"{DOCKERFILE.relative_to(ROOT)} uses Ray {match.group(1)} but Ray {ray_version()} is installed/pinned"
    )
    assert froms[0].endswith("-gpu") or "-cu" in froms[0], "not a CUDA image"
    assert re.search(r"pip install .*-e \.", text)
    assert re.search(r"^USER ray\s*$", text, flags=re.MULTILINE)
    # The build command it documents: context = repo root, this file by its path.
    assert "docker build -f infra/docker/Dockerfile -t adps:latest ." in text


def test_dockerfile_context_and_ignore_file():
    text = DOCKERFILE.read_text()
    # The build context is the repo root: what the Dockerfile uses from it must be there.
    assert re.search(r"^COPY\s+(--\S+\s+)*\.\s+/home/ray/adps\s*$", text, flags=re.MULTILINE)
    for name in ("pyproject.toml", "constraints.txt", "platform/adps/__init__.py"):
        assert (ROOT / name).is_file(), name
    assert "constraints.txt" in text
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile; it must keep the
    # virtualenv and git out, and not drop what the install needs.
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    for needed in ("platform", "pyproject.toml", "constraints.txt", "jobs", "configs"):
        assert needed not in ignore
    assert not (ROOT / ".dockerignore").exists() or ".venv" in (ROOT / ".dockerignore").read_text()


# --- KubeRay ----------------------------------------------------------------------------------


def kuberay_cluster_spec(name: str) -> tuple[dict, dict]:
    doc = load_yaml(INFRA / "kuberay" / name)
    assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "RayCluster":
        return doc, doc["spec"]
    assert doc["kind"] == "RayJob"
    return doc, doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize(("name", "kind"), [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifest(name, kind):
    doc, spec = kuberay_cluster_spec(name)
    assert doc["kind"] == kind
    assert spec["rayVersion"] == ray_version()
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "the head's Service must stay inside the cluster"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the pod address, behind that Service
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must not take tasks"
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
        # The dashboard's Train view (tests/test_cluster_path.py checks it on a real head).
        assert {"name": "RAY_TRAIN_ENABLE_STATE_TRACKING", "value": "1"} in container["env"]
        assert {"secretRef": {"name": "adps-s3"}} in container["envFrom"]


def test_rayjob_runs_training_on_gpu_workers():
    doc, spec = kuberay_cluster_spec("rayjob.yaml")
    entrypoint = doc["spec"]["entrypoint"]
    match = re.fullmatch(r"python jobs/train\.py --config (configs/\S+\.yaml)((?: --set \w+=\S+)*)", entrypoint)
    assert match, entrypoint
    assert (ROOT / "jobs" / "train.py").is_file()
    overrides = dict(kv.split("=", 1) for kv in match.group(2).split(" --set ")[1:])
    # Several pods: the data and the run folder must be on shared storage.
    assert overrides["dataset"].startswith("s3://") and overrides["storage_path"].startswith("s3://")
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] == "/home/ray/adps"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True

    # The config trains on GPUs, one Ray Train worker per GPU, and the workers fit the cluster.
    config = load_yaml(ROOT / match.group(1))
    config.update(overrides)
    assert config["use_gpu"] is True
    gpus_per_pod = {
        g["groupName"]: int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in spec["workerGroupSpecs"]
    }
    start_gpus = sum(g["replicas"] * gpus_per_pod[g["groupName"]] for g in spec["workerGroupSpecs"])
    max_gpus = sum(g["maxReplicas"] * gpus_per_pod[g["groupName"]] for g in spec["workerGroupSpecs"])
    assert 1 <= int(config["num_workers"]) <= start_gpus <= max_gpus


# --- MLflow server ----------------------------------------------------------------------------


def test_mlflow_compose():
    doc = load_yaml(INFRA / "mlflow" / "docker-compose.yaml")
    assert {"postgres", "mlflow"} <= set(doc["services"])
    mlflow = doc["services"]["mlflow"]
    base = re.search(r"FROM ghcr\.io/mlflow/mlflow:v(\S+)", mlflow["build"]["dockerfile_inline"])
    assert base and base.group(1) == importlib.metadata.version("mlflow")
    assert "psycopg2" in mlflow["build"]["dockerfile_inline"]
    command = mlflow["command"]
    assert "--backend-store-uri=postgresql://mlflow:${POSTGRES_PASSWORD}@postgres:5432/mlflow" in command
    assert any(c.startswith("--artifacts-destination=${MLFLOW_ARTIFACTS_DESTINATION") for c in command)
    assert "--serve-artifacts" in command
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in mlflow["environment"]
    # Published on loopback unless told otherwise; the database not at all.
    assert mlflow["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"]
    assert "ports" not in doc["services"]["postgres"]


def test_no_manifest_opens_a_service_to_the_internet():
    """No LoadBalancer or NodePort Service, Ingress or host network in any manifest under infra/
    or in ray_cluster.yaml, and no server bound to every interface by default outside a pod."""
    import yaml

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("type", "serviceType"):
                    assert value not in ("LoadBalancer", "NodePort"), f"{where}: {key}: {value}"
                assert not (key == "hostNetwork" and value is True), f"{where}: hostNetwork"
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    files = [*INFRA.rglob("*.yaml"), ROOT / "ray_cluster.yaml"]
    assert len(files) >= 4
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Ingress"), f"{path}: an Ingress"
            walk(doc, path.name)
    assert "0.0.0.0" not in (INFRA / "mlflow" / "run_server.sh").read_text()
    assert "--dashboard-host=0.0.0.0" not in (ROOT / "ray_cluster.yaml").read_text()


def test_mlflow_run_server_script(tmp_path):
    """run_server.sh validates its settings and hands `mlflow server` the proxied-artifact flags."""
    script = INFRA / "mlflow" / "run_server.sh"
    fake = tmp_path / "bin" / "mlflow"  # records its arguments instead of serving
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"; echo "JOBS=$MLFLOW_SERVER_ENABLE_JOB_EXECUTION"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}

    result = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "MLFLOW_BACKEND_STORE_URI" in result.stderr

    env["MLFLOW_BACKEND_STORE_URI"] = "sqlite:///x.db"
    env["MLFLOW_ARTIFACTS_DESTINATION"] = "s3://bucket/mlflow"
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "postgresql://" in result.stderr

    env["MLFLOW_BACKEND_STORE_URI"] = "postgresql://mlflow:pw@db:5432/mlflow"
    env["MLFLOW_ALLOWED_HOSTS"] = "mlflow.example:*"
    result = subprocess.run([str(script), "--static-prefix", "/m"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[:3] == ["server", "--backend-store-uri", "postgresql://mlflow:pw@db:5432/mlflow"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert "--serve-artifacts" in args and args[args.index("--port") + 1] == "5000"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert {"localhost:*", "10.*", "172.16.*", "mlflow.example:*"} <= set(allowed)
    assert args[-3:] == ["--static-prefix", "/m", "JOBS=false"]


# --- shell scripts ----------------------------------------------------------------------------

SCRIPTS = sorted(INFRA.rglob("*.sh"))


def test_scripts_found():
    assert {p.relative_to(INFRA).as_posix() for p in SCRIPTS} == {"local/dev_services.sh", "mlflow/run_server.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_script_syntax_mode_and_usage(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in script.read_text()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Usage: infra/" in result.stdout, result.stdout + result.stderr


def test_dev_services_rejects_bad_usage(tmp_path):
    env = {**os.environ, "ADPS_DEV_SERVICES_DIR": str(tmp_path / "state")}
    result = subprocess.run([str(DEV_SERVICES)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "start|stop|status|env" in result.stderr
    result = subprocess.run([str(DEV_SERVICES), "start"], env={**env, "ADPS_S3_PORT": "x"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "not a number: 'x'" in result.stderr
    result = subprocess.run([str(DEV_SERVICES), "env"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "not running" in result.stderr
    result = subprocess.run([str(DEV_SERVICES), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "mlflow: stopped" in result.stdout


# --- the local development services, for real -------------------------------------------------


def free_port(taken: set[int] = frozenset()) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def live_members(pgid: int) -> list[int]:
    """Processes of a process group that are alive (zombies waiting for init do not count)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, group, stat in (line.split()[:3] for line in out.splitlines())
            if int(group) == pgid and not stat.startswith("Z")]


def test_dev_services_start_serve_and_stop(tmp_path):
    """`start` brings up MLflow and S3 in the background, they serve, `stop` ends every process."""
    boto3 = pytest.importorskip("boto3")
    mlflow = pytest.importorskip("mlflow")
    venv_bin = ROOT / ".venv" / "bin"
    search = os.pathsep.join([str(venv_bin), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for tool in ("mlflow", "moto_server"):
        if shutil.which(tool, path=search) is None:
            pytest.skip(f"{tool} not installed (.venv with the dev extra: python3 bootstrap.py test)")

    mlflow_port = free_port()
    s3_port = free_port({mlflow_port})
    state = tmp_path / "state"
    env = {
        **os.environ,
        "PATH": search,
        "ADPS_DEV_SERVICES_DIR": str(state),
        "ADPS_MLFLOW_PORT": str(mlflow_port),
        "ADPS_S3_PORT": str(s3_port),
        # ~15 s on an idle 2-core machine; far more while other jobs load it.
        "ADPS_DEV_SERVICES_TIMEOUT": "150",
    }

    def run(command: str, timeout: float = 200) -> subprocess.CompletedProcess:
        return subprocess.run([str(DEV_SERVICES), command], env=env, capture_output=True, text=True, timeout=timeout)

    pgids: list[int] = []
    try:
        started = run("start")
        assert started.returncode == 0, started.stderr
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", started.stdout, flags=re.MULTILINE))
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        endpoint = f"http://127.0.0.1:{s3_port}"
        assert exports == {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "AWS_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        pgids = [int((state / f"{name}.pid").read_text()) for name in ("mlflow", "s3")]
        members = [pid for pgid in pgids for pid in live_members(pgid)]
        assert len(members) >= 2

        assert run("env").stdout == started.stdout
        status = run("status")
        assert status.returncode == 0 and status.stdout.count("running") == 2, status.stdout
        again = run("start")
        assert again.returncode == 1 and "already running" in again.stderr

        # MLflow: a run with an artifact, which the server stores in the state folder (proxied).
        client = mlflow.MlflowClient(tracking_uri)
        experiment_id = client.create_experiment("infra-probe")
        assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
        run_id = client.create_run(experiment_id).info.run_id
        client.log_text(run_id, "ok", "probe.txt")
        assert [f.path for f in client.list_artifacts(run_id)] == ["probe.txt"]
        assert [p.read_text() for p in (state / "mlflow" / "artifacts").rglob("probe.txt")] == ["ok"]

        # S3.
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
        s3.create_bucket(Bucket="adps-infra-test")
        s3.put_object(Bucket="adps-infra-test", Key="probe.txt", Body=b"ok")
        assert s3.get_object(Bucket="adps-infra-test", Key="probe.txt")["Body"].read() == b"ok"

        stopped = run("stop", timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not list(state.glob("*.pid"))
        assert not [pid for pgid in pgids for pid in live_members(pgid)], "server processes outlived stop"
        assert not port_open(mlflow_port) and not port_open(s3_port)
        assert run("status").returncode == 3
        assert run("stop").returncode == 0  # nothing left to stop is fine
    finally:
        # Whatever a failed assertion or a timed-out `start` left running.
        for pid_file in state.glob("*.pid"):
            pgids.append(int(pid_file.read_text()))
        for pgid in set(pgids):
            if live_members(pgid):
                os.killpg(pgid, signal.SIGKILL)
        for log in sorted(state.glob("*.log")) if state.exists() else []:
            print(f"--- {log.name}:\n{log.read_text()[-3000:]}")

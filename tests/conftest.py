"""Shared fixtures. The suite runs on CPU; tests marked ``gpu`` run only where CUDA exists."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from flaky_network import FlakyProxy

# Ray Train's preemption watcher is one more process per training run (an actor that imports Ray
# Train, about 3 s of CPU) watching for node drains, which a local test cluster never has. Off
# for the tests' own runs and the drivers they start: two concurrent tiny runs took 69 s
# instead of 76 s (mean of two each). The platform leaves Ray's default alone.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped elsewhere)")
    config.addinivalue_line("markers", "faults: the fault-injection suite (select with -m faults; runs in CI)")
    config.addinivalue_line("markers", "slow: takes over 30 s here (deselect with -m 'not slow'; runs in CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_stray_mlruns():
    """Nothing may write MLflow's default ``./mlruns`` into the folder pytest runs in: every
    experiment the platform or a test creates needs an artifact location of its own."""
    stray = Path.cwd() / "mlruns"
    existed = stray.exists()
    yield
    assert existed or not stray.exists(), f"{stray} was created during the tests (an experiment without artifact_location)"


@pytest.fixture
def one_intra_op_thread():
    """Run a test on one intra-op thread (restored afterwards).

    Tests dominated by small tensors gain nothing from a second thread, and on a shared
    2-core machine a busy neighbour process makes every parallel region wait for a
    descheduled thread: the toy ambient-loss test took 140 s with 2 threads and 13 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stop_process_group(process: subprocess.Popen) -> None:
    """Terminate a server started with ``start_new_session=True`` and everything it spawned."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def devices() -> list[str]:
    """CPU always; CUDA too where present (the same code must run on both)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def random_complex(*shape: int, generator: torch.Generator, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.complex(
        torch.randn(*shape, generator=generator, dtype=real_dtype),
        torch.randn(*shape, generator=generator, dtype=real_dtype),
    ).to(dtype)


# A real S3 server (moto) ---------------------------------------------------------------------

S3_ENV = {
    # Dummy keys (moto accepts any) that are unmistakable, so a test can scan logs, MLflow
    # params / tags and artifacts for them: a credential must never be written anywhere.
    "AWS_ACCESS_KEY_ID": "AKIAADPSDUMMYKEY7Q2X",
    "AWS_SECRET_ACCESS_KEY": "adps-dummy-secret-3f9c2e71b5d04a8e",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on a free local port, reached through a :class:`FlakyProxy`; yields the
    endpoint URL (the proxy's).

    For the session, AWS_ENDPOINT_URL points at it and dummy credentials are set, so boto3 (and
    pyarrow, and subprocesses such as ``adps synth s3://...``) use it without any argument; the
    previous environment is restored afterwards. Tests should use their own bucket names, since
    the server is shared by the session. The proxy (fixture ``s3_network``) lets a fault test
    take S3 down and bring it back; everything else just goes through it.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    moto_server = Path(sys.executable).parent / "moto_server"
    with open(log_path, "wb") as log:
        # A session of its own, so that the whole process group can be stopped at the end.
        process = subprocess.Popen(
            [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means the server is up
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}:\n{log_path.read_text()}") from None
                time.sleep(0.1)
        proxy = FlakyProxy(("127.0.0.1", port))
        _S3_PROXY.append(proxy)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": proxy.url}.items():
                patch.setenv(key, value)
            # No user config or credential files: they could name another endpoint or profile.
            patch.setenv("AWS_CONFIG_FILE", str(log_path.parent / "no-aws-config"))
            patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(log_path.parent / "no-aws-credentials"))
            # Credentials or an endpoint just for S3 would override the ones above.
            for key in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                patch.delenv(key, raising=False)
            yield proxy.url
    finally:
        for proxy in _S3_PROXY:
            proxy.close()
        _S3_PROXY.clear()
        stop_process_group(process)


_S3_PROXY: list = []


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    from adps.data import storage

    name = f"adps-test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_network(s3_server: str) -> FlakyProxy:
    """The proxy between the session and its S3 server: ``.down()`` / ``.up()`` / ``.outage(s)``;
    ``.upstream`` is the server itself, for a test that must look past the outage."""
    return _S3_PROXY[0]


# A shared Ray instance ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session(s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    """One local Ray instance for the whole session: 2 CPUs, no dashboard (ray.init costs 5-12 s).

    It depends on ``s3_server`` because Ray workers inherit the environment of the moment Ray
    starts: the S3 endpoint and credentials must be set by then for tasks that read or write
    ``s3://``. HOME points at a temporary folder while Ray starts (it writes ``~/.ray``), token
    authentication is off for this local instance, and the temporary folder has a short path
    (Ray's Unix sockets live there, and socket paths are limited to 107 characters).
    """
    import shutil
    import tempfile

    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("ray-home")))
        patch.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# MLflow and a prepared dataset ---------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """A SQLite MLflow store for the session (MLFLOW_TRACKING_URI), so that no test writes the
    default ``.adps/mlflow.db`` of the folder pytest runs in; yields the URI."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        yield uri


TINY_HEIGHT, TINY_WIDTH = 48, 32


@pytest.fixture(scope="session")
def tiny_prepared(ray_session, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A prepared dataset of 48 x 32 slices for training tests: 4 train slices (2 volumes x 2),
    one val and one test volume, masks at R = 2 and 4, with L1 reconstructions (edm_l1)."""
    from adps.data.preprocess import PrepareConfig
    from adps.data.synth import synthetic_volume, volume_name, write_volume
    from adps.orchestration.prepare import prepare_dataset

    raw = tmp_path_factory.mktemp("train-raw")
    for i in range(4):
        volume = synthetic_volume(500 + i, n_slices=3, n_coils=4, height=TINY_HEIGHT, width=TINY_WIDTH, noise_std=0.005)
        write_volume(raw / volume_name(i, "AXT2"), volume, acquisition="AXT2", patient_id=f"p{i}")
    output = tmp_path_factory.mktemp("train-prepared") / "axt2"
    config = PrepareConfig.from_dict({
        "source": str(raw), "output": str(output), "n_volumes": 2, "slices_per_volume": 2,
        "test_volumes": 1, "val_volumes": 1, "crop": (TINY_HEIGHT, TINY_WIDTH), "noise_patch": 8,
        "virtual_coils": 2, "calib_width": 12, "accelerations": (2, 4), "acs": 4, "shard_size": 2,
        "reference_iterations": 5, "seed": 3, "l1": True, "l1_iterations": 10,
    })
    prepare_dataset(config, progress=False)
    return str(output)


def write_stand_in_weights(folder: Path) -> Path:
    """Random torchvision weights under torchvision's file names (AlexNet for LPIPS, VGG16 and
    Inception-v3 for FID) in ``folder``: no network access here, and the tests check the code
    paths, not the numbers. Returns ``folder``."""
    import torchvision

    from adps.perceptual import WEIGHT_FILES

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # AlexNet and Inception as complete state dicts, the layout of the real files.
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), folder / WEIGHT_FILES["alexnet"])
    inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    torch.save(inception.state_dict(), folder / WEIGHT_FILES["inception_v3"])
    # VGG16 `features` only: the code reads nothing else, and building and saving the
    # classifier (120 M parameters, 500 MB) would cost seconds for nothing.
    vgg_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in vgg_features.state_dict().items()}, folder / WEIGHT_FILES["vgg16"])
    return folder


def tiny_config(dataset: str, **changes: object):
    """A TrainConfig of the tiny preset on ``dataset`` (:func:`tiny_prepared`): ambient at R = 2,
    batch 1, no lr warm-up, every step logged; ``changes`` override any key."""
    from adps.orchestration.train_config import TrainConfig

    values = {"method": "ambient", "r_train": 2, "preset": "tiny", "dataset": dataset, "batch_size": 1,
              "lr_rampup": 0, "log_every_steps": 1,
              # Every step reports, and a report waits for the controller's next poll: 0.1 s, not 0.5
              # (the four training faults of test_faults.py took 129 s instead of 153).
              "controller_poll_s": 0.1}
    values.update(changes)
    return TrainConfig.from_dict(values)


def train_in_process(dataset: str, method: str, r_train: float, folder: Path, **changes: object) -> Path:
    """Train with the platform's worker loop in this process (no Ray, no MLflow) and keep the
    final checkpoint's EMA network as a model folder (what ``adps evaluate`` and
    ``adps.load_model`` open). ``changes`` override the TrainConfig (default: 2 steps of 2 slices)."""
    import shutil

    from adps.orchestration.train_config import TrainConfig
    from adps.orchestration.train_worker import WorkerContext, worker_loop

    kept = folder / f"{method}_r{r_train:g}"

    def report(metrics: dict, checkpoint: str | None) -> None:
        if checkpoint is not None:
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(Path(checkpoint) / "ema", kept)

    values = {"method": method, "r_train": r_train, "preset": "tiny", "dataset": dataset, "batch_size": 2,
              "max_steps": 2, "lr_rampup": 0, "validation_slices": 0, "tracking": False}
    values.update(changes)
    worker_loop(TrainConfig.from_dict(values), WorkerContext(rank=0, world_size=1, report=report))
    return kept


# Credentials ------------------------------------------------------------------------------------
def assert_no_credentials(run_id: str, models: list[str], *, bucket: str) -> None:
    """The S3 credentials of the environment appear nowhere the run wrote: MLflow params, tags
    and metric names, registered model versions and their artifacts, the checkpoints' text
    files on S3."""
    import json
    import tempfile

    import boto3
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    secrets = [S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"]]
    client = MlflowClient()
    data = client.get_run(run_id).data
    texts = {"params": json.dumps(data.params), "tags": json.dumps(data.tags), "metrics": json.dumps(list(data.metrics))}
    for name in models:
        for version in client.search_model_versions(f"name = '{name}'"):
            texts[f"{name}/{version.version} tags"] = json.dumps(version.tags)
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(download_artifacts(f"models:/{name}/{version.version}", dst_path=tmp))
                for path in folder.rglob("*"):
                    if path.is_file() and path.suffix in (".json", ".yaml", ".txt", ".py", "") and path.stat().st_size < 2**20:
                        texts[str(path.relative_to(folder))] = path.read_text(errors="replace")
    s3 = boto3.client("s3")
    for item in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        if item["Key"].endswith(".json"):
            texts[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode()
    assert len(texts) > 10, texts.keys()  # it looked at something
    leaks = [where for where, text in texts.items() if any(secret in text for secret in secrets)]
    assert not leaks, f"credentials written to {leaks}"


# Natural-image models ------------------------------------------------------------------------
IMAGE_RESOLUTION = 16
IMAGE_MODELS_P = (0.0, 0.6)
"""The erasure probabilities of the grid that ``image_models`` trains."""


@pytest.fixture(scope="session")
def image_models(ray_session, mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two of the paper's natural-image grid configs (``configs/images/image_p0.yaml`` and
    ``image_p0.6.yaml``: the clean EDM model and an ambient one) trained by one sweep
    (:func:`adps.orchestration.sweep.run_sweep`, what ``adps sweep`` runs) on 32 synthetic 16 x 16
    images: tiny preset, 20 steps of 8 images, 1 worker of one CPU each (both at once on the
    2-CPU cluster), registered in the session's MLflow. The other four p of the grid run the
    same code with another number; training them too cost about 90 s of the suite's budget (the
    whole grid took 140 s here), so ``test_image_train.py`` checks that all six configs load and
    differ only in p.

    Returns ``{"tracking_uri", "images" (the folder), "models" ({p: "models:/adps-image-p<p>/<v>"}),
    "rows" (the sweep's rows), "configs", "seconds"}``.
    """
    import time

    from adps.images import write_image_folder
    from adps.orchestration.sweep import load_sweep_configs, run_sweep

    folder = tmp_path_factory.mktemp("image-grid")
    images = folder / "images"
    write_image_folder(images, 32, IMAGE_RESOLUTION, seed=11)
    overrides = {
        "dataset": str(images), "preset": "tiny", "resolution": IMAGE_RESOLUTION, "max_steps": 20, "batch_size": 8,
        "num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "amp": "", "lr_rampup": 0,
        "checkpoint_every_steps": 20, "validate_every_steps": 0, "validation_slices": 4, "log_every_steps": 10,
        "storage_path": str(folder / "runs"), "experiment": "image-grid", "tracking_uri": mlflow_store,
    }
    grid = Path(__file__).resolve().parents[1] / "configs" / "images"
    configs = load_sweep_configs(grid, overrides, only=[f"image_p{p:g}" for p in IMAGE_MODELS_P])  # adps sweep --only
    started = time.perf_counter()
    rows = run_sweep(configs, progress=False)
    seconds = time.perf_counter() - started
    print(f"image grid sweep of {len(rows)} runs: {seconds:.0f} s")
    models = {config.erasure_p: f"models:/{row.model}" for config, row in zip(configs, rows, strict=True) if row.model}
    return {"tracking_uri": mlflow_store, "images": str(images), "models": models, "rows": rows, "configs": configs,
            "seconds": seconds}

"""The fault-injection suite: real processes (local Ray, a local MLflow server, a moto S3
server behind :class:`flaky_network.FlakyProxy`) meet a fault; each test states the fault and
what must hold after it.

Elsewhere, because they share those files' fixtures: a diverged run (NaN / Inf losses) stops
with a checkpoint (tests/test_train.py); an interrupted ``adps prepare`` resumes to identical
files (tests/test_prepare.py); a killed Ray Tune search resumes (tests/test_tune.py); crafted
pickles are refused and credentials never written (tests/test_security.py,
tests/test_tracking.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from adps.orchestration.train import train
from adps.orchestration.train_worker import worker_share
from conftest import tiny_config

pytestmark = pytest.mark.faults


def _in_background(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``function`` in a daemon thread while the test injects a fault; returns the thread and
    a dict that gets ``"result"`` or ``"error"``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - reported by the test's assertions
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_a_worker_killed_twice_resumes_exactly_in_one_mlflow_run(tiny_prepared: str, tmp_path: Path) -> None:
    """Fault: the process of worker rank 1 is SIGKILLed after step 3 and again after step 5 (2
    workers, checkpoint every 2 steps). Must hold: Ray restarts the worker group twice, each time
    from the latest checkpoint Ray's controller had recorded (step 2, then step 4; or step 2
    again when the kill after step 5 came before the controller's next poll collected step 4's
    report: a fresh-clone CI saw that once); the run ends with exactly max_steps steps, the right
    data position and one MLflow run, FINISHED."""
    config = tiny_config(
        tiny_prepared, num_workers=2, max_steps=6, checkpoint_every_steps=2, fail_at_steps=(3, 5), max_failures=2,
        storage_path=str(tmp_path / "runs"), run_name="ambient_fault", register=False, validate_every_steps=2,
        experiment="fault-test",
    )
    scratch_before = sorted(Path(tempfile.gettempdir()).glob("adps-resume-*")) + sorted(
        Path(tempfile.gettempdir()).glob("adps-ckpt-*"))
    result = train(config)
    assert result.error is None
    assert result.metrics["step"] == 6
    # The second restart resumes from the newest checkpoint the controller recorded by then.
    assert result.metrics["resumed_from"] in (2, 4), result.metrics["resumed_from"]
    assert all((tmp_path / "runs" / "ambient_fault" / f".adps-fault-step-{s}").exists() for s in (3, 5))
    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] == 6 and state["world_size"] == 2
        assert state["ema_images_seen"] == 6 * 2  # 6 steps x (1 slice x 2 workers)
        assert load_file(str(folder / "optimizer.safetensors"))
        assert (folder / "model" / "weights.safetensors").is_file()
        assert (folder / "ema" / "weights.safetensors").is_file()
    # Rank 0's last batch came from its own share of that epoch (4 slices, 2 per worker).
    # 4 train slices / 2 workers / batch 1 = 2 steps per epoch: step 6 is epoch 2, batch 1.
    from adps.data.dataset import PreparedSliceDataset

    dataset = PreparedSliceDataset(tiny_prepared, "train", acceleration=2)
    share = worker_share(len(dataset), 2, 0, 2, config.seed)
    assert result.metrics["slice_ids"] == [dataset.slices[share[1]]["slice_id"]]

    # One MLflow run across both restarts: the driver opened it before the workers started.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fault-test").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["method"] == "ambient" and runs[0].data.params["fail_at_steps"] == "3,5"
    losses = client.get_metric_history(result.run_id, "loss")
    assert {m.step for m in losses} == set(range(1, 7))  # steps 3 and 5 logged twice: before the kill and after
    assert {m.step for m in client.get_metric_history(result.run_id, "val_nrmse")} == {2, 4, 6}
    assert state["mlflow_run_id"] == result.run_id
    # Every checkpoint was logged as it was written; the run's tag names the final one.
    assert {m.step for m in client.get_metric_history(result.run_id, "checkpoint_step")} == {2, 4, 6}
    assert runs[0].data.tags["adps.checkpoint"] == result.checkpoint.path
    # The killed workers' local copies (of the checkpoint resumed from, of one being written) are
    # the run's own folders, emptied and reused by the restarted workers, gone at the end.
    assert sorted(Path(tempfile.gettempdir()).glob("adps-resume-*")) + sorted(
        Path(tempfile.gettempdir()).glob("adps-ckpt-*")) == scratch_before


# MLflow down ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` (SQLite store, proxied artifacts), reached through a
    :class:`FlakyProxy`; yields ``(proxy, server_url)``: the platform uses ``proxy.url``, and the
    test reads what arrived from ``server_url``, past any outage."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import stop_process_group
    from flaky_network import FlakyProxy

    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        proxy = FlakyProxy(("127.0.0.1", port))
        try:
            yield proxy, url
        finally:
            proxy.close()
    finally:
        stop_process_group(process)


def test_queued_logger_keeps_what_an_outage_holds_back(mlflow_server) -> None:
    """Fault: the MLflow server unreachable while metrics and tags are logged (no Ray). Must hold:
    logging returns at once; the queue is kept and retried; once the server is back it all
    arrives, in one run, each step once; ``close`` on a server that stays down returns the
    number of unsent items instead of hanging."""
    import time

    from adps.orchestration.tracking import QueuedRunLogger, open_run

    proxy, server_url = mlflow_server
    run_id, _ = open_run(proxy.url, "queued-logger", "key", "queued", {"a": 1})
    server = MlflowClient(server_url)
    logger = QueuedRunLogger(proxy.url, run_id, max_backoff_s=1.0)
    logger.log_metrics({"loss": 1.0}, 1)
    assert logger.close(timeout_s=30) == 0
    logger = QueuedRunLogger(proxy.url, run_id, max_backoff_s=1.0)
    proxy.down()
    try:
        started = time.monotonic()
        for step in range(2, 12):
            logger.log_metrics({"loss": 1.0 / step, "note": "not a number"}, step)
        logger.set_tags({"adps.checkpoint": "/somewhere/checkpoint_3"})
        assert time.monotonic() - started < 0.5, "logging must never wait for the server"
        time.sleep(2.5)
        assert logger.failed_attempts >= 2 and logger.pending > 0
        assert [m.step for m in server.get_metric_history(run_id, "loss")] == [1]
    finally:
        proxy.up()
    assert logger.close(timeout_s=60) == 0
    assert sorted(m.step for m in server.get_metric_history(run_id, "loss")) == list(range(1, 12))
    assert server.get_run(run_id).data.tags["adps.checkpoint"] == "/somewhere/checkpoint_3"

    stuck = QueuedRunLogger(proxy.url, run_id, max_backoff_s=1.0)
    proxy.down()
    try:
        stuck.log_metrics({"loss": 0.5}, 12)
        assert stuck.close(timeout_s=1.5) == 1
    finally:
        proxy.up()


def _latest_checkpoint_step(run_folder: Path) -> int:
    steps = [json.loads(p.read_text())["step"] for p in run_folder.glob("checkpoint_*/state.json")]
    return max(steps, default=0)


@pytest.mark.slow
def test_mlflow_down_during_training_loses_nothing(tiny_prepared: str, tmp_path: Path, mlflow_server,
                                                  mlflow_store: str) -> None:
    """Fault: the MLflow server becomes unreachable (every connection reset) after step 3 and
    stays so until training has written the step-20 checkpoint. Must hold: training goes on
    meanwhile; the metrics logged during the outage are retried and arrive once the server is
    back, each step once; the run finishes, FINISHED, and registers its model."""
    import time

    proxy, server_url = mlflow_server
    config = tiny_config(
        tiny_prepared, method="modl", num_workers=1, max_steps=30, checkpoint_every_steps=10, validation_slices=0,
        storage_path=str(tmp_path / "runs"), run_name="modl_mlflow_down", experiment="mlflow-down",
        tracking_uri=proxy.url,
    )
    thread, outcome = _in_background(train, config)
    server = MlflowClient(server_url)

    def logged_steps() -> set[int]:
        runs = server.search_runs([server.get_experiment_by_name("mlflow-down").experiment_id])
        return {m.step for m in server.get_metric_history(runs[0].info.run_id, "loss")} if runs else set()

    deadline = time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline:
        if server.get_experiment_by_name("mlflow-down") and len(logged_steps()) >= 3:
            break
        time.sleep(0.2)
    assert thread.is_alive(), f"training ended before the outage: {outcome}"
    proxy.down()
    down_at = time.monotonic()
    try:
        at_down = max(logged_steps())
        run_folder = tmp_path / "runs" / "modl_mlflow_down"
        while thread.is_alive() and _latest_checkpoint_step(run_folder) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        during = _latest_checkpoint_step(run_folder)
        assert logged_steps() and max(logged_steps()) == at_down, "nothing may reach the server during the outage"
    finally:
        proxy.up()
    outage_s = time.monotonic() - down_at
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert during >= 20 > at_down, f"training went on during the {outage_s:.0f} s outage (step {at_down} -> {during})"
    assert proxy.refused > 0, "the platform never met the outage"

    result = outcome["result"]
    assert result.metrics["step"] == 30
    run = server.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["adps.registered_model"] == "adps-modl-r2/" + result.model_version
    history = server.get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31)), "every step's loss arrives, once"
    assert {m.step for m in server.get_metric_history(result.run_id, "checkpoint_step")} == {10, 20, 30}
    assert server.get_model_version("adps-modl-r2", result.model_version).run_id == result.run_id
    # Registering through another tracking URI left this process's MLflow settings as they were.
    import mlflow

    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_store and mlflow.get_tracking_uri() == mlflow_store


# S3 down -------------------------------------------------------------------------------------
def _checkpoint_folders(bucket: str, prefix: str, endpoint: str) -> dict[str, set[str]]:
    """The checkpoint folders under ``s3://bucket/prefix`` and the files each holds, read from
    the S3 server itself (past the proxy)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    folders: dict[str, set[str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            rest = item["Key"][len(prefix):].lstrip("/")
            folder, slash, name = rest.partition("/")
            if folder.startswith("checkpoint_") and slash:  # not checkpoint_manager_snapshot.json
                if name and not name.endswith("/"):  # not the folder markers pyarrow writes
                    folders.setdefault(folder, set()).add(name)
    return folders


CHECKPOINT_FILES = {"state.json", "optimizer.json", "optimizer.safetensors", "model/weights.safetensors",
                    "model/config.json", "ema/weights.safetensors", "ema/config.json"}


@pytest.mark.slow
def test_s3_down_during_checkpointing_loses_nothing(tiny_prepared: str, s3_server: str, s3_network) -> None:
    """Fault: the S3 endpoint refuses every connection for 8 s while a 1-worker run writes a
    checkpoint every step to s3:// (pyarrow's default retries give up after about 6 s of it).
    Must hold: the uploads are retried with backoff and the run finishes with exactly max_steps
    steps without a restart; every checkpoint folder on S3 is complete (each object appears
    whole, and Ray records a checkpoint only once all of its files are up); the model registers
    from the S3 checkpoint, and a resubmission resumes from it in the same MLflow run. No
    credential of the environment is written anywhere the runs wrote."""
    import time

    import boto3

    from conftest import assert_no_credentials

    upstream = f"http://127.0.0.1:{s3_network.upstream[1]}"
    boto3.client("s3").create_bucket(Bucket="adps-faults")
    config = tiny_config(
        # R = 4: the models this file registers in the session's store must not collide with the
        # sweep's (tests/test_tracking.py expects version 1 of its R = 2 models).
        tiny_prepared, method="modl", r_train=4, num_workers=1, max_steps=10, checkpoint_every_steps=1,
        keep_checkpoints=20,
        validation_slices=1, validate_every_steps=5, storage_path="s3://adps-faults/runs", run_name="modl_s3_down",
        experiment="s3-down",
    )
    thread, outcome = _in_background(train, config)
    deadline = time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline:
        if len(_checkpoint_folders("adps-faults", "runs/modl_s3_down", upstream)) >= 2:
            break
        time.sleep(0.1)
    assert thread.is_alive(), f"training ended before the outage: {outcome}"
    refused = s3_network.refused
    with s3_network.outage(8):
        before = set(_checkpoint_folders("adps-faults", "runs/modl_s3_down", upstream))
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert s3_network.refused > refused, "the run never met the outage"

    result = outcome["result"]
    assert result.metrics["step"] == 10 and result.metrics["resumed_from"] is None, "no restart was needed"
    folders = _checkpoint_folders("adps-faults", "runs/modl_s3_down", upstream)
    incomplete = {name: CHECKPOINT_FILES - files for name, files in folders.items() if not CHECKPOINT_FILES <= files}
    assert not incomplete, f"partial checkpoints on S3: {incomplete}"
    assert len(folders) == 10 and before < set(folders), sorted(folders)

    assert result.checkpoint.path.startswith("adps-faults/runs/modl_s3_down/")
    version = MlflowClient().get_model_version("adps-modl-r4", result.model_version)
    assert version.run_id == result.run_id and version.tags["adps.checkpoint"].startswith("s3://adps-faults/runs/")
    again = train(config.replace(max_steps=11))
    assert again.run_id == result.run_id, "the resubmission continues the same MLflow run"
    assert again.metrics["step"] == 11 and again.metrics["resumed_from"] == 10
    assert int(again.model_version) == int(result.model_version) + 1
    assert_no_credentials(result.run_id, ["adps-modl-r4"], bucket="adps-faults")


# adps prepare: corrupt files, S3 down ----------------------------------------------------------
GOOD_FILES, SIZE = 18, 32


@pytest.fixture(scope="module")
def raw_with_corrupt_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """20 source files, 10% of them corrupt: 18 good volumes, one truncated file (rejected when
    the source is scanned) and one whose k-space holds NaNs in a centre slice (rejected when the
    volume is processed)."""
    import numpy as np

    from adps.data.synth import synthetic_volume, volume_name, write_volume

    folder = tmp_path_factory.mktemp("raw-corrupt")
    for i in range(GOOD_FILES):
        volume = synthetic_volume(700 + i, n_slices=3, n_coils=4, height=SIZE, width=SIZE, noise_std=0.005)
        write_volume(folder / volume_name(i, "AXT2"), volume, acquisition="AXT2", patient_id=f"p{i}")
    whole = (folder / volume_name(0, "AXT2")).read_bytes()
    (folder / "file_brain_AXT2_truncated.h5").write_bytes(whole[: len(whole) // 2])
    broken = synthetic_volume(799, n_slices=3, n_coils=4, height=SIZE, width=SIZE, noise_std=0.005)
    kspace = broken.kspace.copy()
    kspace[1, :, 5, 5] = np.nan
    broken = type(broken)(image=broken.image, maps=broken.maps, kspace=kspace,
                          noise_covariance=broken.noise_covariance, seed=broken.seed)
    write_volume(folder / "file_brain_AXT2_nan.h5", broken, acquisition="AXT2", patient_id="p-nan")
    return {"folder": folder, "bad": {"file_brain_AXT2_truncated.h5": "HDF5", "file_brain_AXT2_nan.h5": "NaN"}}


def _prepare_config(source: str, output: str):
    from adps.data.preprocess import PrepareConfig

    return PrepareConfig.from_dict({
        "source": source, "output": output, "n_volumes": 100, "slices_per_volume": 1, "test_volumes": 2,
        "val_volumes": 2, "crop": (SIZE, SIZE), "noise_patch": 8, "virtual_coils": 2, "calib_width": 12,
        "accelerations": (4,), "acs": 4, "shard_size": 4, "reference_iterations": 3, "seed": 5,
    })


@pytest.fixture(scope="module")
def prepared_despite_corrupt_files(raw_with_corrupt_files, ray_session, tmp_path_factory) -> dict:
    from adps.orchestration.prepare import prepare_dataset

    output = tmp_path_factory.mktemp("prepared-corrupt") / "axt2"
    return prepare_dataset(_prepare_config(str(raw_with_corrupt_files["folder"]), str(output)), progress=False)


def test_ten_percent_corrupt_files_are_listed_and_every_good_slice_prepared(
    raw_with_corrupt_files, prepared_despite_corrupt_files
) -> None:
    """Fault: 2 of 20 source files are corrupt. Must hold: the job finishes; every slice of the
    18 good files is in the dataset; each bad file is listed in the manifest with its reason."""
    from adps.data.synth import volume_name

    manifest = prepared_despite_corrupt_files
    slices = [s for split in ("train", "val", "test") for s in manifest["splits"][split]["slices"]]
    assert sorted(Path(s["source"]).name for s in slices) == sorted(volume_name(i, "AXT2") for i in range(GOOD_FILES))
    reasons = {Path(r["source"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == set(raw_with_corrupt_files["bad"])
    for name, word in raw_with_corrupt_files["bad"].items():
        assert word in reasons[name], (name, reasons[name])


def test_s3_down_during_prepare_loses_nothing(raw_with_corrupt_files, prepared_despite_corrupt_files, s3_server,
                                              s3_network) -> None:
    """Fault: the S3 endpoint refuses every connection for 5 s while ``adps prepare`` reads
    sources from and writes shards to S3. Must hold: requests are retried with backoff and the
    job finishes; the shards are those of the local run, byte for byte (checksums in the
    manifest); every object on S3 is whole and no temporary object is left."""
    import hashlib
    import time

    import boto3

    from adps.data import storage
    from adps.data.shards import MANIFEST_NAME, PROGRESS_NAME
    from adps.orchestration.prepare import prepare_dataset

    upstream = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_network.upstream[1]}")
    upstream.create_bucket(Bucket="adps-prepare-faults")
    for path in sorted(raw_with_corrupt_files["folder"].iterdir()):
        upstream.upload_file(str(path), "adps-prepare-faults", f"raw/{path.name}")
    config = _prepare_config("s3://adps-prepare-faults/raw", "s3://adps-prepare-faults/axt2")

    def shards() -> list[dict]:
        listed = upstream.list_objects_v2(Bucket="adps-prepare-faults", Prefix="axt2/")
        return [o for o in listed.get("Contents", []) if o["Key"].endswith(".h5")]

    thread, outcome = _in_background(prepare_dataset, config, progress=False)
    deadline = time.monotonic() + 240
    while thread.is_alive() and not shards() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread.is_alive(), f"prepare ended before the outage: {outcome}"
    refused = s3_network.refused
    with s3_network.outage(5):
        written_before = len(shards())
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert s3_network.refused > refused, "prepare never met the outage"

    manifest, local = outcome["result"], prepared_despite_corrupt_files
    total = sum(len(local["splits"][split]["shards"]) for split in ("train", "val", "test"))
    assert 0 < written_before < total, "the outage fell in the middle of the job"
    for split in ("train", "val", "test"):
        assert manifest["splits"][split]["shards"] == local["splits"][split]["shards"]
    assert {Path(r["source"]).name for r in manifest["rejected"]} == set(raw_with_corrupt_files["bad"])
    objects = upstream.list_objects_v2(Bucket="adps-prepare-faults", Prefix="axt2/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in objects) == sorted(
        [MANIFEST_NAME, PROGRESS_NAME] + [s["name"] for split in ("train", "val", "test") for s in local["splits"][split]["shards"]]
    ), "no temporary or partial object is left"
    for split in ("train", "val", "test"):
        for shard in manifest["splits"][split]["shards"]:
            data = storage.read_bytes(f"s3://adps-prepare-faults/axt2/{shard['name']}")
            assert hashlib.sha256(data).hexdigest() == shard["sha256"], shard["name"]


# The driver killed -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_driver_resubmitted_resumes_the_same_run(tiny_prepared: str, tmp_path: Path, ray_session) -> None:
    """Fault: the training driver (``python jobs/train.py``, joined to a running Ray cluster) is
    SIGKILLed once the step-10 checkpoint exists; Ray then ends the job's controller and workers.
    Must hold: submitting the same command again resumes from the latest checkpoint Ray recorded
    (not from scratch), continues the same MLflow run (one run, FINISHED, every step's loss logged) and finishes with exactly
    max_steps steps."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    repo = Path(__file__).resolve().parents[1]
    runs = tmp_path / "runs"
    config = tiny_config(
        tiny_prepared, method="ssdu", r_train=4, num_workers=1, max_steps=20, checkpoint_every_steps=5,
        validation_slices=0, storage_path=str(runs), run_name="ssdu_driver_killed", experiment="driver-killed",
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    address = ray_session.get_runtime_context().gcs_address
    command = [sys.executable, str(repo / "jobs" / "train.py"), "--config", str(path), "--address", address]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and _latest_checkpoint_step(runs / "ssdu_driver_killed") < 10:
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        assert first.poll() is None, f"the driver ended before it was killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    killed_at = _latest_checkpoint_step(runs / "ssdu_driver_killed")
    assert killed_at < 20, "the run had finished before the kill"
    # Ray ends a dead driver's actors (the Train controller, then its workers): wait for the CPUs.
    deadline = time.monotonic() + 60
    while ray_session.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("driver-killed").experiment_id])
    assert f"MLflow run {run.info.run_id} (resumed)" in output
    assert run.info.status == "FINISHED" and run.data.tags["adps.final_step"] == "20"
    assert "adps.registered_model" in run.data.tags
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, 21))
    final = json.loads((Path(run.data.tags["adps.checkpoint"]) / "state.json").read_text())
    # From the latest checkpoint Ray had recorded: the newest folder on disk may have been written
    # by the worker but not yet recorded by the controller when the driver died.
    assert final["step"] == 20 and killed_at - 5 <= final["resumed_from"] <= killed_at, (final, killed_at)
    assert final["resumed_from"] >= 5, "the resubmission must not start over"

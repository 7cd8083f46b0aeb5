"""MLflow runs, the model registry, the pyfunc model and ``adps sweep``.

The Ray part is one sweep over every method (2 workers each, tiny presets, 2 steps, all six
runs through the real sweep scheduler), a second sweep that must skip them all, and one run
with its storage on a real S3 server (moto). Everything else runs without Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import adps
from adps.nn.checkpoint import load_model as load_folder
from adps.nn.learning_config import PAPER_GRID
from adps.nn.train_step import MRI_METHODS
from adps.orchestration.registry import (
    compact_model_input,
    image_from_output,
    model_name,
    predict_arrays,
    to_model_input,
)
from adps.orchestration.sweep import SweepRun, format_summary, grid_gaps, load_sweep_configs, run_sweep, runs_at_once
from adps.orchestration.tracking import config_hash, flat_params, open_run, resolve_tracking_uri
from adps.orchestration.train_config import TrainConfig
from conftest import TINY_HEIGHT, TINY_WIDTH, random_complex, stop_process_group

REPO = Path(__file__).resolve().parents[1]
ONE_PASS = ("ambient", "modl", "ssdu")


# Without Ray ---------------------------------------------------------------------------------
def test_tracking_uri_defaults_and_checks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/.adps/mlflow.db"
    assert (tmp_path / ".adps").is_dir()
    assert resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path}/rel/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri() == "http://mlflow:5000"
    with pytest.raises(ValueError, match="'tracking_uri'.*not a tracking URI"):
        resolve_tracking_uri("some/folder")


def test_params_and_config_hash() -> None:
    config = TrainConfig(dataset="d", fail_at_steps=(3, 5))
    params = flat_params(config.to_dict())
    assert params["fail_at_steps"] == "3,5" and params["betas"] == "0.9,0.999" and params["run_name"] == ""
    assert config_hash(config.to_dict()) == config_hash(TrainConfig(dataset="d", fail_at_steps=(3, 5)).to_dict())
    assert config_hash(config.to_dict()) != config_hash(config.replace(lr=1e-4).to_dict())


def test_open_run_finds_the_same_run_again(mlflow_store: str) -> None:
    params = TrainConfig(dataset="d").to_dict()
    run_id, resumed = open_run(mlflow_store, "open-run", "/runs/a", "a", params, {"adps.method": "ambient"})
    assert not resumed
    MlflowClient(mlflow_store).set_terminated(run_id, "FAILED")
    again, resumed = open_run(mlflow_store, "open-run", "/runs/a", "a", {**params, "lr": 1e-4})
    assert (again, resumed) == (run_id, True)
    run = MlflowClient(mlflow_store).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["lr"] == "0.0002", "params stay those of the first submission"
    assert run.data.tags["adps.changed_on_resume"] == "lr" and run.data.tags["adps.method"] == "ambient"
    other, resumed = open_run(mlflow_store, "open-run", "/runs/b", "b", params)
    assert other != run_id and not resumed


def test_model_input_round_trip_and_errors(generator) -> None:
    kspace = random_complex(2, 3, 8, 6, generator=generator)
    maps = random_complex(2, 3, 8, 6, generator=generator)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, ::2] = True
    inputs = to_model_input(kspace, maps, mask)
    assert inputs["kspace"].shape == (2, 3, 8, 6, 2) and inputs["kspace"].dtype == np.float32
    assert inputs["mask"].dtype == np.bool_
    assert torch.equal(image_from_output(inputs["maps"][:, 0]), maps[:, 0])
    model = torch.nn.Linear(1, 1)  # never reached: the inputs are refused first
    with pytest.raises(ValueError, match="input 'maps' missing"):
        predict_arrays("modl", model, {"kspace": inputs["kspace"], "mask": inputs["mask"]})
    with pytest.raises(ValueError, match="'kspace' must be complex with 4 axes"):
        predict_arrays("modl", model, {**inputs, "kspace": inputs["kspace"][..., 0]})
    with pytest.raises(ValueError, match=r"shapes do not agree.*mask \(2, 5\)"):
        predict_arrays("modl", model, {**inputs, "mask": inputs["mask"][:, :5]})


def test_sweep_configs_cover_the_paper_grid(tiny_prepared: str) -> None:
    configs = [TrainConfig.from_yaml(path) for path in sorted((REPO / "configs").glob("*.yaml"))]
    assert len(configs) == sum(len(rs) for rs in PAPER_GRID.values()) == 18
    assert grid_gaps(configs) == []
    assert grid_gaps(configs[1:]) == [f"{configs[0].method}_r{configs[0].r_train:g}"]
    with pytest.raises(ValueError, match="no config runs nope"):
        load_sweep_configs(REPO / "configs", {"dataset": tiny_prepared}, only=["nope"])
    # The tiny dataset has masks at R = 2 and 4 only: the R = 6 config is refused, naming file and key.
    with pytest.raises(ValueError, match=r"ambient_r6.yaml: config key 'r_train'"):
        load_sweep_configs(REPO / "configs", {"dataset": tiny_prepared})
    picked = load_sweep_configs(REPO / "configs", {"dataset": tiny_prepared}, only=["ambient_r4", "edm_r1"])
    assert [c.resolved_run_name for c in picked] == ["ambient_r4", "edm_r1"]


def test_runs_at_once_follows_the_cluster() -> None:
    gpu = [TrainConfig(use_gpu=True, num_workers=2)]
    assert runs_at_once(gpu, {"CPU": 64, "GPU": 8}) == 4
    assert runs_at_once(gpu, {"CPU": 64}) == 1
    cpu = [TrainConfig(num_workers=2, cpus_per_worker=0.5)]
    assert runs_at_once(cpu, {"CPU": 2}) == 2


def test_summary_table() -> None:
    rows = [SweepRun("ambient_r4", "ambient", 4, "finished", 2, 0.5, 0.21, "adps-ambient-r4/1", 90.0),
            SweepRun("edm_r1", "edm", 1, "failed", error="boom")]
    table = format_summary(rows)
    assert "ambient_r4  finished  2" in table and "adps-ambient-r4/1" in table and "1.5" in table
    assert table.splitlines()[-1] == "  edm_r1: boom"


# With Ray: every method, through the sweep -----------------------------------------------------
def write_method_configs(folder: Path) -> None:
    folder.mkdir()
    for method in MRI_METHODS:
        r = 1 if method in ("edm", "ncsnv2") else 2
        (folder / f"{method}.yaml").write_text(f"method: {method}\nr_train: {r}\nrun_name: {method}_sweep\n")


def same_outputs(method: str, a: torch.nn.Module, b: torch.nn.Module, batch: dict) -> bool:
    """Do two networks of ``method`` give identical outputs on ``batch``? (A one-pass
    reconstruction for ambient / MoDL / SSDU, a denoising pass for the priors.)"""
    from adps.nn.reconstruct import denoise_once, reconstruct

    if method in ONE_PASS:
        outs = [reconstruct(method, m, batch["kspace"], batch["maps"], batch["mask"]) for m in (a, b)]
    else:
        outs = [denoise_once(m, batch["reference"], 0.5, generator=torch.Generator().manual_seed(0)) for m in (a, b)]
    return torch.equal(outs[0], outs[1])


@pytest.fixture(scope="module")
def sweep(tiny_prepared: str, tmp_path_factory: pytest.TempPathFactory):
    """All seven methods trained by one sweep: 1 worker each (1 CPU, so two runs share the 2-CPU
    cluster at a time; 2-worker DDP runs are in tests/test_faults.py and test_train.py), 2 steps,
    validation every step."""
    folder = tmp_path_factory.mktemp("sweep")
    write_method_configs(folder / "configs")
    overrides = {
        "dataset": tiny_prepared, "preset": "tiny", "num_workers": 1, "cpus_per_worker": 1, "batch_size": 1,
        "max_steps": 2, "checkpoint_every_steps": 2, "validate_every_steps": 1, "validation_slices": 2,
        "lr_rampup": 0, "log_every_steps": 1, "controller_poll_s": 0.1, "storage_path": str(folder / "runs"), "experiment": "sweep",
    }
    configs = load_sweep_configs(folder / "configs", overrides)
    started = time.perf_counter()
    rows = run_sweep(configs)
    print(f"sweep of {len(rows)} runs: {time.perf_counter() - started:.0f} s")
    return folder, configs, rows


@pytest.mark.slow
def test_sweep_trains_logs_and_registers_every_method(sweep, tiny_prepared: str) -> None:
    folder, configs, rows = sweep
    assert [(r.run_name, r.status) for r in rows] == [(f"{m}_sweep", "finished") for m in sorted(MRI_METHODS)], [
        r.error for r in rows
    ]
    client = MlflowClient()
    manifest_sha = hashlib.sha256((Path(tiny_prepared) / "manifest.json").read_bytes()).hexdigest()
    from adps.data.dataset import PreparedSliceDataset

    dataset = PreparedSliceDataset(tiny_prepared, "val", acceleration=2)
    batch = {key: torch.stack([dataset[i][key] for i in range(2)]) for key in ("kspace", "maps", "mask", "reference")}
    for config, row in zip(configs, rows, strict=True):
        name = model_name(config.method, config.r_train)
        assert row.step == 2 and row.model == f"{name}/1" and row.val_nrmse is not None and row.val_nrmse >= 0
        version = client.get_model_version_by_alias(name, "latest")  # MLflow resolves @latest itself
        assert str(version.version) == "1"
        assert version.tags["adps.dataset_sha256"] == manifest_sha
        assert version.tags["adps.config_hash"] == config_hash(config.replace(tracking_uri=mlflow.get_tracking_uri()).to_dict())
        assert len(version.tags["adps.git_commit"]) in (40, len("unknown"))
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and run.data.params["method"] == config.method
        for key in ("loss", "lr", "slices_per_s", "val_nrmse"):
            assert {m.step for m in client.get_metric_history(run.info.run_id, key)} == {1, 2}, key
        # The loss by noise level: one slice a step, so each step's one sample lands in one bin,
        # whose mean is that step's loss; methods without a sigma log none.
        by_sigma = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics
                    if key.startswith("loss_by_sigma/")}
        if config.method in ("ambient", "edm", "edm_l1"):
            losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
            binned = sorted((m.step, m.value) for history in by_sigma.values() for m in history)
            assert [step for step, _ in binned] == [1, 2], binned
            assert all(value == pytest.approx(losses[step], rel=1e-5) for step, value in binned)
        else:
            assert not by_sigma, config.method

        # The registered model is the final checkpoint's EMA model, bit for bit.
        pulled, model_config = adps.load_model(f"models:/{name}@latest", with_config=True)
        assert model_config["method"] == config.method
        with_ema = Path(run.data.tags["adps.checkpoint"]) / "ema"
        assert same_outputs(config.method, pulled, load_folder(with_ema)[0], batch), config.method

        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@latest")
        inputs = to_model_input(batch["kspace"], batch["maps"], batch["mask"])
        if config.method in ONE_PASS:
            out = pyfunc.predict(inputs)
            assert out.shape == (2, *batch["reference"].shape[1:], 2) and np.isfinite(out).all()
            np.testing.assert_array_equal(out, predict_arrays(config.method, pulled, inputs))
        else:
            with pytest.raises(Exception, match="is a prior"):
                pyfunc.predict(inputs)


@pytest.mark.slow  # shares the sweep fixture (~3 min)
def test_a_model_that_is_not_registered_is_named_in_the_error(sweep) -> None:
    """A registry name, alias or version that does not exist: FileNotFoundError naming the URI
    and what is missing (the sweep registered adps-modl-r2 version 1 and nothing else of it)."""
    assert adps.load_model("models:/adps-modl-r2@latest") is not None
    assert adps.load_model("adps-modl-r2") is not None  # a bare name, as the configs' models take it
    store = resolve_tracking_uri()
    for uri, missing in (("models:/adps-nope-r4@latest", "adps-nope-r4 not found"),
                         ("models:/adps-modl-r2@champion", "alias champion not found"),
                         ("models:/adps-modl-r2/99", "version=99) not found")):
        with pytest.raises(FileNotFoundError, match=re.escape(f"{uri}: not found in the MLflow store {store}: ") + ".*"
                           + re.escape(missing)):
            adps.load_model(uri)


def test_load_model_never_creates_a_store(tmp_path: Path, monkeypatch) -> None:
    """Without a tracking URI, the default store that is not there is named, not created."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no MLflow store at {tmp_path / '.adps' / 'mlflow.db'} "
                                                          "(the default store")):
        adps.load_model("adps-ambient-r4")
    assert not (tmp_path / ".adps").exists()


@pytest.mark.slow  # shares the sweep fixture (~3 min)
def test_sweep_again_skips_finished_runs(sweep) -> None:
    _, configs, _ = sweep
    rows = run_sweep(configs, progress=False)
    assert {r.status for r in rows} == {"done (skipped)"}
    assert [r.model for r in rows] == [f"{model_name(c.method, c.r_train)}/1" for c in configs]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # shares the sweep fixture (~3 min)
def test_mlflow_models_serve_reconstructs(sweep, tmp_path: Path) -> None:
    """``mlflow models serve`` of a registered ambient model answers /invocations with A-OS."""
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/adps-ambient-r2@latest",
             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # MLflow runs ``uvicorn`` from PATH: the environment's bin folder, as when activated.
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        generator = torch.Generator().manual_seed(1)
        # The trained size (the U-Net halves it at each level, so it must divide evenly).
        kspace = random_complex(1, 2, TINY_HEIGHT, TINY_WIDTH, generator=generator)
        maps = random_complex(1, 2, TINY_HEIGHT, TINY_WIDTH, generator=generator)
        mask = torch.rand(1, TINY_WIDTH, generator=generator) < 0.5
        inputs = to_model_input(kspace, maps, mask)
        body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
        expected = predict_arrays("ambient", adps.load_model("models:/adps-ambient-r2@latest"), inputs)
        np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)

        def post(payload: dict) -> tuple[int, bytes]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()

        # The compact format: float32 gives the same image, float16 nearly; the request is smaller.
        for dtype, tolerance in ((np.float32, 1e-6), (np.float16, 2e-2)):
            compact = {"inputs": compact_model_input(kspace, maps, mask, dtype=dtype)}
            status, answer = post(compact)
            assert status == 200, answer[:2000]
            image = np.asarray(json.loads(answer)["predictions"], dtype=np.float32)
            assert np.abs(image - expected).max() <= tolerance * np.abs(expected).max(), dtype
        assert len(json.dumps(compact)) < len(body) / 3

        # A bad request: HTTP 400, the reason first, the request never echoed.
        for payload, reason in (
                ({"inputs": {"kspace": inputs["kspace"].tolist(), "maps": inputs["maps"].tolist()}},
                 "predict: input 'mask' missing; expected keys kspace, maps, mask"),
                ({"inputs": {**{k: v.tolist() for k, v in inputs.items()}, "mask": [[True] * 10]}},
                 f"mask (1, 10) (expected (N, W) = (1, {TINY_WIDTH}))"),
                ({"inputs": {**compact, "kspace": "bm90IGFuIGFycmF5"}},
                 "predict: input 'kspace' is a string but not a base64 .npy array")):
            status, answer = post(payload)
            error = json.loads(answer)
            assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE", answer[:2000]
            assert error["message"].startswith("predict: ") and reason in error["message"], error["message"][:2000]
            assert len(error["message"]) < 1000 and "stack_trace" not in error
        # The registered version carries an input example that predict accepts.
        local = mlflow.artifacts.download_artifacts("models:/adps-ambient-r2@latest", dst_path=str(tmp_path / "model"))
        example = mlflow.models.Model.load(local).load_input_example(local)
        status, answer = post({"inputs": {key: np.asarray(value).tolist() for key, value in example.items()}})
        assert status == 200 and np.asarray(json.loads(answer)["predictions"]).shape == (1, 16, 16, 2), answer[:500]
    finally:
        stop_process_group(server)

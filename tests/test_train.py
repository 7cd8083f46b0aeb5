"""Training on Ray Train V2 (``adps train``): config checks, data shares, checkpoints, resume.

Few Ray runs, by design (a 2-worker Gloo run costs ~40 s here): the run whose worker is killed
twice, which checks completion, checkpoint contents, the resume from the latest checkpoint and
the exact step count all at once, is in tests/test_faults.py; everything else runs without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adps.cli import main as adps_main
from adps.config import parse_overrides
from adps.data.phantom import synthetic_batch
from adps.nn.learning_config import CHECKPOINTING_METHODS
from adps.nn.train_step import BATCH_KEYS, MRI_METHODS
from adps.orchestration.train import train, with_absolute_paths
from adps.orchestration.train_config import TrainConfig
from adps.orchestration.train_worker import (
    WorkerContext,
    build_trainee,
    load_training_checkpoint,
    mri_training_set,
    save_training_checkpoint,
    steps_per_epoch,
    train_one_step,
    worker_loop,
    worker_share,
)
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 48, 32


@pytest.fixture(scope="module")
def tiny_dataset(tiny_prepared: str) -> str:
    """The session's prepared dataset (tests/conftest.py): 4 train slices of 48 x 32."""
    return tiny_prepared


# Pure ---------------------------------------------------------------------------------------
def test_defaults_are_methods_values() -> None:
    config = TrainConfig()
    assert (config.batch_size, config.lr, config.betas, config.eps, config.grad_clip) == (8, 2e-4, (0.9, 0.999), 1e-8, 1.0)
    assert (config.ema_half_life_images, config.ema_rampup) == (500_000, 0.05)
    assert config.resolved_epochs == 250
    assert config.replace(method="modl").resolved_epochs == 10
    assert config.replace(method="ssdu").resolved_epochs == 10
    assert config.replace(method="edm").resolved_preset == "edm"


def test_local_paths_are_made_absolute_for_the_workers(tmp_path: Path, monkeypatch) -> None:
    """Ray workers run in other folders: a relative dataset path must not reach them."""
    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(TrainConfig(dataset="prepared", storage_path="runs"))
    assert config.dataset == str(tmp_path / "prepared") and config.storage_path == str(tmp_path / "runs")
    # Without a storage_path, the runs go beside the default MLflow store of this folder.
    assert with_absolute_paths(TrainConfig(dataset="prepared")).storage_path == str(tmp_path / ".adps" / "runs")
    remote = with_absolute_paths(TrainConfig(dataset="s3://bucket/prepared", storage_path="s3://bucket/runs"))
    assert remote.dataset == "s3://bucket/prepared" and remote.storage_path == "s3://bucket/runs"


def test_bad_configs_fail_fast_naming_the_key(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="'batch_size'"):
        TrainConfig.from_dict({"batch_size": "eight"})
    with pytest.raises(ValueError, match="'r_train'.*R = 1"):
        TrainConfig(method="edm", r_train=4, dataset="x").validate(check_dataset=False)
    with pytest.raises(ValueError, match="'r_train'.*R > 1"):
        TrainConfig(method="ambient", r_train=1, dataset="x").validate(check_dataset=False)
    with pytest.raises(ValueError, match="'method'"):
        TrainConfig(method="vae", dataset="x").validate(check_dataset=False)
    with pytest.raises(ValueError, match="'dataset'.*manifest"):
        TrainConfig(dataset=str(tmp_path / "nothing")).validate()
    with pytest.raises(ValueError, match="'dataset' is required"):
        TrainConfig().validate()
    # The command line refuses the same before Ray starts, naming the key.
    assert adps_main(["train", "--set", "dataset=" + str(tmp_path), "--set", "lr=fast"]) != 0
    assert "'lr'" in capsys.readouterr().err
    path = tmp_path / "run.yaml"
    path.write_text("method: modl\nacceleration: 4\n")  # the old name of r_train, still read
    config = TrainConfig.from_yaml(path, parse_overrides(["batch_size=2", "betas=0.5,0.9"]))
    assert (config.method, config.r_train, config.batch_size, config.betas) == ("modl", 4, 2, (0.5, 0.9))
    with pytest.raises(ValueError, match="'acceleration' and 'r_train' are the same key"):
        TrainConfig.from_dict({"acceleration": 4, "r_train": 2})
    from adps.orchestration.study_mri import EvaluateConfig

    assert EvaluateConfig.from_dict({"accelerations": [4, 8]}).r_inf == (4.0, 8.0)  # the old name of r_inf


def test_paper_grid_configs_load_and_check() -> None:
    files = sorted((REPO / "configs").glob("*.yaml"))
    names = {f.stem for f in files}
    expected = {"edm_r1", "ncsnv2_r1"} | {f"{m}_r{r}" for m in ("ambient", "edm_l1", "modl", "ssdu") for r in (2, 4, 6, 8)}
    assert names == expected
    for path in files:
        config = TrainConfig.from_yaml(path, {"dataset": "unused"})
        config.validate(check_dataset=False)
        assert config.resolved_run_name == path.stem
        # The shipped cluster's GPUs have 24 GB: only the memory-lean mode fits the paper-size
        # U-Net and NCSNv2 steps at batch 8 there (ambient: 18.3 GB measured, 82.7 GB without).
        assert config.activation_checkpointing == (config.method in CHECKPOINTING_METHODS), path.name


def test_worker_shares_are_disjoint_and_cover_each_epoch() -> None:
    for n, world in ((12, 2), (13, 4), (7, 1)):
        for epoch in range(3):
            shares = [worker_share(n, world, rank, epoch, seed=5) for rank in range(world)]
            flat = [i for share in shares for i in share]
            assert len(flat) == len(set(flat)), "shares overlap"
            assert len(set(map(len, shares))) == 1, "unequal shares would desynchronise DDP"
            assert n - len(flat) < world and set(flat) <= set(range(n))
        assert worker_share(n, world, 0, 0, 5) != worker_share(n, world, 0, 1, 5) or n <= 2  # reshuffled
    assert steps_per_epoch(13, 4, 2) == 1


def test_one_step_of_every_method_and_checkpoint_round_trip(tmp_path: Path, one_intra_op_thread) -> None:
    batch = synthetic_batch(2, 2, 32, 32, 4, seed=0, acs=4, l1_iterations=2)
    for method in MRI_METHODS:
        config = TrainConfig(method=method, r_train=1 if method in ("edm", "ncsnv2") else 4, preset="tiny",
                             dataset="x", lr_rampup=0)
        trainee = build_trainee(config)
        out = train_one_step(trainee, batch)
        assert trainee.step == 1 and not out["skipped"] and out["loss"] == out["loss"], method
    # The last trainee (ssdu): save, restore into a fresh one, identical state.
    train_one_step(trainee, batch)
    save_training_checkpoint(tmp_path / "ckpt", trainee, {"epoch": 0, "position": 2})
    restored = build_trainee(config.replace(seed=9))
    state = load_training_checkpoint(tmp_path / "ckpt", restored)
    assert state["step"] == restored.step == 2
    for a, b in zip(trainee.model.state_dict().values(), restored.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert restored.ema.images_seen == trainee.ema.images_seen
    before = trainee.optimizer.state_dict()["state"]
    after = restored.optimizer.state_dict()["state"]
    torch.testing.assert_close(before[0]["exp_avg"], after[0]["exp_avg"], rtol=0, atol=0)


def test_compiled_training_takes_the_same_steps_and_saves_plain_weights(tmp_path: Path, monkeypatch,
                                                                        one_intra_op_thread) -> None:
    """``compile_mode``: build_trainee hands the network to ``torch.compile`` (with the mode
    asked for); the compiled ambient step gives the eager step's loss and weights, and the
    checkpoint, EMA and restore see the plain module. Dynamo traces the network in one graph
    (no graph break) here, with the ``eager`` backend (the captured graph run as is) because
    Inductor's C++ build of the kernels costs minutes on this CPU; Inductor itself, on CUDA, is
    what bench/gpu_check.sh checks (``bench/train_step.py --compile default --precision-check
    bf16``: speed, and loss and gradients against float32)."""
    import torch._dynamo

    asked: list[str | None] = []
    real_compile = torch.compile

    def compile_cheaply(model, *, mode=None, **kwargs):
        asked.append(mode)
        return real_compile(model, backend="eager", fullgraph=True, **kwargs)  # fullgraph: a break fails

    monkeypatch.setattr(torch, "compile", compile_cheaply)
    torch._dynamo.reset()
    batch = synthetic_batch(2, 2, 32, 32, 4, seed=0, acs=4)
    config = TrainConfig(method="ambient", r_train=4, preset="tiny", dataset="x", lr_rampup=0)
    eager, compiled = build_trainee(config), build_trainee(config.replace(compile_mode="max-autotune"))
    assert asked == ["max-autotune"] and hasattr(compiled.model, "_orig_mod")
    for _ in range(2):  # the second step's loss is that of the weights the first step left
        a, b = train_one_step(eager, batch), train_one_step(compiled, batch)
        assert not b["skipped"]
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=0)
    plain = compiled.model._orig_mod.state_dict()
    save_training_checkpoint(tmp_path / "ckpt", compiled, {"epoch": 0, "position": 2})
    assert not any("_orig_mod" in key for key in load_file(tmp_path / "ckpt" / "model" / "weights.safetensors"))
    restored = build_trainee(config.replace(compile_mode="default"))
    assert load_training_checkpoint(tmp_path / "ckpt", restored)["step"] == 2 and asked[-1] is None
    torch.testing.assert_close(restored.model._orig_mod.state_dict(), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="config key 'compile_mode'"):
        config.replace(compile_mode="fast").validate(check_dataset=False)


@pytest.fixture
def restore_activation_budget():
    """build_trainee sets torch's global activation memory budget: put it back afterwards (a
    monkeypatch of torch's config module hides the key from later readers when it undoes)."""
    import torch._functorch.config as functorch_config

    before = functorch_config.activation_memory_budget
    yield
    functorch_config.activation_memory_budget = before


def test_activation_memory_budget_makes_the_compiled_step_keep_less(monkeypatch, one_intra_op_thread,
                                                                     restore_activation_budget) -> None:
    """``activation_memory_budget`` reaches the partitioner of the compiled backward: at 0.5 the
    compiled network keeps fewer bytes for the backward pass than at 1.0 and gives the same loss
    and gradients. Traced with ``aot_eager_decomp_partition`` (AOTAutograd's min-cut partitioner,
    the one Inductor uses, without Inductor's kernel build)."""
    import torch._dynamo

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, *, mode=None, **kwargs: real_compile(
        model, backend="aot_eager_decomp_partition", **kwargs))
    x, cond = torch.randn(2, 2, 32, 32), torch.ones(2, 2, 32, 32)
    results = {}
    for budget in (1.0, 0.5):
        torch._dynamo.reset()
        config = TrainConfig(method="ambient", preset="tiny", compile_mode="default", activation_memory_budget=budget)
        model = build_trainee(config).model
        saved: list[int] = []

        def keep(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(x, torch.full((2,), 0.7), cond=cond).square().mean()
        loss.backward()
        results[budget] = (sum(saved), float(loss), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert results[0.5][0] < 0.75 * results[1.0][0]
    assert results[0.5][1] == pytest.approx(results[1.0][1], rel=1e-5)
    torch.testing.assert_close(results[0.5][2], results[1.0][2], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="config key 'activation_memory_budget'"):
        TrainConfig(activation_memory_budget=0.0).validate(check_dataset=False)


@pytest.mark.parametrize("method", MRI_METHODS)
def test_a_worker_reads_only_the_keys_its_method_trains_on(tiny_dataset, method: str) -> None:
    """The training set of a run holds the keys its step reads and nothing more: an ambient
    (or SSDU) worker never reads the fully sampled reference, an EDM worker no k-space."""
    config = tiny_config(tiny_dataset, method=method, r_train=1 if method in ("edm", "ncsnv2") else 2)
    dataset, acceleration = mri_training_set(config)
    try:
        assert acceleration == 2  # R = 1 methods take the first stored masks, which they ignore
        assert dataset.keys == (*BATCH_KEYS[method], "slice_id")
        assert set(dataset.read_batch([0, 1])) == set(dataset.keys)
    finally:
        dataset.close()
    if method in ("ambient", "ssdu"):
        assert "reference" not in dataset.keys


def test_worker_loop_without_ray(tiny_dataset, one_intra_op_thread) -> None:
    """The loop Ray runs, driven in-process: reports, checkpoints and the step cap."""
    reports: list[tuple[dict, list[str] | None]] = []

    def report(metrics: dict, folder: str | None) -> None:
        reports.append((metrics, sorted(p.name for p in Path(folder).iterdir()) if folder else None))

    config = tiny_config(tiny_dataset, max_steps=3, checkpoint_every_steps=2)
    final = worker_loop(config, WorkerContext(rank=0, world_size=1, report=report))
    assert final["step"] == 3
    assert [m["step"] for m, _ in reports] == [1, 2, 3]
    assert reports[1][1] == ["ema", "model", "optimizer.json", "optimizer.safetensors", "state.json"]


def test_prefetching_trains_the_same_steps_and_passes_shard_errors_on(
    tiny_dataset, one_intra_op_thread, tmp_path: Path
) -> None:
    """``prefetch_batches``: loading ahead in a thread gives the run of loading in the loop
    (same slices, same losses, step by step), and a broken slice read by the thread stops the
    loop with the dataset's own error, naming the file and the slice."""
    import shutil
    import threading

    import h5py

    from adps.data.shards import MANIFEST_NAME, ShardError, file_sha256

    def run(dataset: str, depth: int) -> list[tuple]:
        reports: list[dict] = []
        config = tiny_config(dataset, max_steps=4, checkpoint_every_steps=100, prefetch_batches=depth,
                             validation_slices=0)
        worker_loop(config, WorkerContext(rank=0, world_size=1, report=lambda m, folder: reports.append(m)))
        return [(m["step"], m["slice_ids"], m["loss"]) for m in reports]

    loaded_in_the_loop = run(tiny_dataset, 0)
    assert len(loaded_in_the_loop) == 4
    assert run(tiny_dataset, 2) == loaded_in_the_loop

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    shard = broken / "train-00000.h5"
    with h5py.File(shard, "r+") as f:
        f["maps"][1] = 0
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    (entry,) = [e for e in manifest["splits"]["train"]["shards"] if e["name"] == shard.name]
    entry.update(sha256=file_sha256(shard), size=shard.stat().st_size)
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train-00000\.h5: slice id \d+ \(row 1\): coil maps are all zero"):
        run(str(broken), 2)
    assert not [t for t in threading.enumerate() if t.name == "adps-prefetch"]


# Ray ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_diverged_run_stops_with_a_checkpoint_and_a_message(tiny_dataset, tmp_path: Path) -> None:
    """Fault: lr 1e30 makes every loss from step 2 on NaN / Inf. Each such step is skipped and
    counted; at max_skipped_in_a_row in a row both workers stop together (no Ray retry), the
    last checkpoint holds the last good weights, the MLflow run is FAILED with the reason and
    nothing is registered."""
    from mlflow import MlflowClient

    config = tiny_config(
        tiny_dataset, method="modl", num_workers=2, max_steps=40, lr=1e30, max_skipped_in_a_row=3,
        checkpoint_every_steps=100, storage_path=str(tmp_path / "runs"), run_name="diverged",
        experiment="diverged-test", validation_slices=0,
    )
    with pytest.raises(RuntimeError, match=r"diverged: stopped: 3 steps in a row \(to step 4\) had a NaN / Inf "
                                           r"loss.*Nothing was registered.*checkpoint") as info:
        train(config)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("diverged-test").experiment_id])
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["adps.stopped"]
    assert "adps.registered_model" not in run.data.tags
    assert [m.value for m in client.get_metric_history(run.info.run_id, "skipped_steps")][-1] == 3
    checkpoint = Path(run.data.tags["adps.checkpoint"])
    assert checkpoint.name in str(info.value)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 4 and state["skipped_steps"] == 3
    weights = load_file(str(checkpoint / "model" / "weights.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())  # the last good weights


def test_a_finished_run_is_never_resumed_silently_and_a_bad_batch_fails_before_ray(tiny_dataset, tmp_path: Path) -> None:
    """Resubmitting a run whose folder holds a finished run (at the steps asked) would train
    nothing and register a version without metrics: it is refused, naming the run, or trained as
    a new run beside it with ``on_finished: new_run``, whose registered version points at the run
    that trained it. A batch larger than the split, and a resume with another network, are
    refused on the driver, before Ray starts."""
    from mlflow import MlflowClient

    from adps.orchestration.train import FINISHED_FILE, finished_in_another_store

    config = tiny_config(tiny_dataset, method="modl", max_steps=2, storage_path=str(tmp_path / "runs"),
                         run_name="once", experiment="finished-test", validation_slices=0, checkpoint_every_steps=100)
    first = train(config)
    record = json.loads((tmp_path / "runs" / "once" / FINISHED_FILE).read_text())
    assert (record["step"], record["mlflow_run_id"]) == (2, first.run_id)
    assert record["registered_model"] == f"{first.model_name}/{first.model_version}"
    with pytest.raises(ValueError, match=rf"'run_name': .*once holds a run that finished at step 2 \(MLflow run "
                                         rf"{first.run_id}, model {first.model_name}/{first.model_version}\)"):
        train(config)
    # The same folder seen from another MLflow store (another project's clone, or a store deleted
    # to start over): not this store's run, so a sweep does not skip it as done, and its train is
    # refused naming both stores (the model it registered is not in this one).
    other = config.replace(tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
    assert finished_in_another_store(record, other) == record["tracking_uri"]
    assert finished_in_another_store(record, config) == ""
    with pytest.raises(ValueError, match=r"'storage_path': .*once holds a run that finished at step 2 and registered "
                                         r"its model in another MLflow store \(sqlite:///\S+\), not in this one "
                                         r"\(sqlite:///\S+other\.db\)\. Give this project a storage_path"):
        train(other)
    assert not (tmp_path / "other.db").exists()
    second = train(config.replace(on_finished="new_run"))
    assert second.run_id != first.run_id and second.metrics["step"] == 2
    assert (tmp_path / "runs" / "once-2" / FINISHED_FILE).exists()
    client = MlflowClient()
    assert client.get_model_version(second.model_name, second.model_version).run_id == second.run_id
    assert [m.step for m in client.get_metric_history(second.run_id, "loss")] == [1, 2]
    with pytest.raises(ValueError, match=r"'batch_size': 64 per worker x 1 workers exceeds the \d+ slices"):
        train(config.replace(run_name="too-big", batch_size=64))
    assert not (tmp_path / "runs" / "too-big").exists()
    # Resuming with another network (more steps, another preset) is refused on the driver, not
    # retried by Ray in the workers that fail to load the checkpoint.
    with pytest.raises(ValueError, match=r"config key 'preset': 'modl', but the run's checkpoint \S+/once/checkpoint_"
                                         r"\S+ has 'tiny'\. The run once resumes from its checkpoints"):
        train(config.replace(max_steps=4, preset="modl"))


def test_the_learning_rate_reaches_its_value_early_and_is_logged_step_by_step(tiny_prepared: str) -> None:
    """The warm-up is a stated fraction of the run (``lr_rampup``, 5 %): the paper grid's ambient
    run (250 epochs of 9,900 slices at a global batch of 16, about 155 k steps) reaches its 2e-4
    after 5 % of its steps; EDM's 10 M-image ramp would have left it at 5e-5 at the very end.
    Training logs the effective rate at every warm-up step."""
    from adps.orchestration.train_worker import WorkerContext, learning_rate, rampup_steps, worker_loop

    grid = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "ambient_r4.yaml")
    assert grid.lr_rampup == 0.05 and grid.lr == 2e-4
    total = 250 * (9_900 // 16)
    ramp = rampup_steps(grid, total)
    assert ramp == round(0.05 * total)
    assert learning_rate(grid, 1, total) == pytest.approx(2e-4 / ramp)
    assert learning_rate(grid, ramp // 2, total) == pytest.approx(1e-4, rel=1e-3)
    assert learning_rate(grid, ramp, total) == learning_rate(grid, total, total) == 2e-4
    assert learning_rate(grid.replace(lr_rampup=0), 1, total) == 2e-4
    with pytest.raises(ValueError, match="lr_rampup_images' is no longer used: the warm-up is now lr_rampup"):
        TrainConfig.from_dict({"lr_rampup_images": 10_000_000})

    logged: list[tuple[int, dict]] = []
    config = tiny_config(tiny_prepared, method="edm", r_train=1, max_steps=6, lr_rampup=0.5, log_every_steps=10,
                         validation_slices=0, tracking=False, lr=1e-3)
    worker_loop(config, WorkerContext(rank=0, world_size=1, report=lambda metrics, checkpoint: None,
                                      log=lambda metrics, step: logged.append((step, metrics))))
    rates = {step: metrics["lr"] for step, metrics in logged}
    assert rates == pytest.approx({1: 1e-3 / 3, 2: 2e-3 / 3, 3: 1e-3, 6: 1e-3})


def test_every_setting_of_the_objective_and_network_is_a_config_key(one_intra_op_thread) -> None:
    """METHOD.md's settings reach the model and the loss from TrainConfig: the noise-level
    distribution (P_mean, P_std), sigma_data, the ambient mask scaling (the reference code's by
    default), MoDL's unrolls / CG steps / initial lambda; defaults are METHOD.md's."""
    from adps.nn.ema import unwrap_model

    defaults = TrainConfig()
    assert (defaults.p_mean, defaults.p_std, defaults.sigma_data, defaults.scale_cond) == (-1.2, 1.2, 0.5, True)
    assert (defaults.ssdu_rho, defaults.ssdu_keep_center) == (0.2, 4)
    batch = synthetic_batch(2, 2, 32, 32, 4, seed=0, acs=4, l1_iterations=2)
    config = TrainConfig(method="ambient", r_train=4, preset="tiny", dataset="x", lr_rampup=0, p_mean=5.0,
                         p_std=0.01, sigma_data=0.7, scale_cond=False)
    trainee = build_trainee(config)
    model = unwrap_model(trainee.model)
    assert model.sigma_data == 0.7 and model.scale_cond is False
    assert build_trainee(config.replace(scale_cond=True)).model.scale_cond is True
    out = train_one_step(trainee, batch)
    assert all(140 < s < 160 for s in out["sigma"]), out["sigma"]  # exp(5) = 148
    modl = build_trainee(TrainConfig(method="modl", r_train=4, preset="tiny", dataset="x", modl_unrolls=3,
                                     modl_cg_iterations=4, modl_lambda_init=0.2)).model
    assert (modl.config.unrolls, modl.config.cg_iterations, modl.config.lambda_init) == (3, 4, 0.2)
    assert build_trainee(TrainConfig(method="modl", r_train=4, preset="modl", dataset="x")).model.config.unrolls == 6
    with pytest.raises(ValueError, match="'ssdu_rho'"):
        TrainConfig(method="ssdu", r_train=4, dataset="x", ssdu_rho=1.5).validate(check_dataset=False)

"""The evaluation job on local Ray: tiny trained models, the table, figures and cross-over in
MLflow, and a resumed run that computes only the missing cells."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adps.orchestration.evaluate import EvaluateConfig, evaluate
from adps.orchestration.registry import load_model_entry, model_uri, tuned_meta, tuned_settings
from conftest import train_in_process


def train_tiny(dataset: str, method: str, acceleration: float, folder: Path) -> Path:
    """Two real training steps (the platform's worker loop, in this process, no Ray); keeps the
    final checkpoint's EMA network."""
    return train_in_process(dataset, method, acceleration, folder)


@pytest.fixture(scope="module")
def tiny_models(tiny_prepared: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval-models")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: train_tiny(tiny_prepared, method, r, folder)
                for name, method, r in (("ambient_r2", "ambient", 2), ("edm_r1", "edm", 1))}
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def lpips_weights(tmp_path: Path, monkeypatch) -> None:
    """Random AlexNet weights where adps.perceptual looks for them (no download in tests)."""
    from torchvision.models import alexnet

    from adps.perceptual import WEIGHT_FILES

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(alexnet(weights=None).state_dict(), weights / WEIGHT_FILES["alexnet"])
    monkeypatch.setenv("ADPS_WEIGHTS_DIR", str(weights))


def test_model_entries() -> None:
    assert model_uri("adps-ambient-r4") == "models:/adps-ambient-r4@latest"
    assert model_uri("models:/x/2") == "models:/x/2" and model_uri("l1") == "l1"
    with pytest.raises(ValueError, match="'models'"):
        model_uri("ambient")


def test_sampler_settings_follow_the_protocol_and_tuning_is_fair_or_refused(
    tiny_prepared: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """By default every model runs METHOD.md's settings, whatever its tags. With sampler_settings best, at
    an R_inf where one diffusion model has a search's settings, every compared one must have
    them, from a search of the same budget on val: otherwise the evaluation refuses (or, with
    allow_untuned, marks the rows). Settings searched together are used together; explicit
    config values win; every cell says where its settings came from."""
    from mlflow import MlflowClient

    from adps.orchestration.registry import register_model
    from adps.orchestration.study_mri import check_fair_tuning, plan_cells, resolve_models
    from adps.orchestration.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri()
    client = MlflowClient(uri)
    # An artifact location of its own: MLflow's default is ./mlruns of the folder pytest runs in.
    run = client.create_run(client.create_experiment("tuned-version", (tmp_path / "artifacts").as_uri()))
    search = {"adps.tuned.r4.run_id": "abc", "adps.tuned.r4.budget": "32", "adps.tuned.r4.split": "val"}
    ambient = register_model(tiny_models["ambient_r2"], tracking_uri=uri, run_id=run.info.run_id,
                             name="adps-tunetest-r2", tags={"adps.tuned.r4.guidance": "2.5", "adps.tuned.r4.steps": "7",
                                                            "adps.tuned.r4.churn": "3", **search})
    edm = register_model(tiny_models["edm_r1"], tracking_uri=uri, run_id=run.info.run_id, name="adps-tunetest-r1",
                         tags={"adps.tuned.r4.guidance": "0.7", **search})
    assert tuned_settings(dict(ambient.tags), 4.0) == {"guidance": 2.5, "steps": 7.0, "churn": 3.0}
    assert tuned_meta(dict(ambient.tags), 4.0) == {"run_id": "abc", "budget": "32", "split": "val"}
    assert tuned_settings(dict(ambient.tags), 2.0) == {}

    config = EvaluateConfig(dataset=tiny_prepared, models=("adps-tunetest-r2", "adps-tunetest-r1", "l1"),
                            r_inf=(2.0, 4.0), tracking_uri=uri)
    models = resolve_models(config)

    def plan(cfg: EvaluateConfig) -> dict:
        cells = plan_cells(cfg, models, 1, check_fair_tuning(cfg, models))
        return {(c.label, c.sampler, c.r_inf): (c.steps, c.guidance, c.options, c.settings) for c in cells}

    protocol = plan(config)  # sampler_settings is paper by default: the paper's protocol everywhere
    assert {v for k, v in protocol.items() if k[0] != "l1"} == {(0, 1.0, (), "paper")}
    tuned = plan(config.replace(sampler_settings="best"))
    assert tuned[("ambient_r2", "a_dps", 4.0)] == (7, 2.5, (("churn", 3.0),), "tuned")  # searched together
    assert tuned[("edm_r1", "dps", 4.0)] == (0, 0.7, (), "tuned")
    assert tuned[("ambient_r2", "a_dps", 2.0)] == tuned[("edm_r1", "dps", 2.0)][:3] + ("paper",) == (0, 1.0, (), "paper")
    assert tuned[("l1", "l1_wavelet", 4.0)][3] == "paper"
    explicit = plan(config.replace(sampler_settings="best", steps=20, guidance=0.5, sigma_min=0.05))
    assert explicit[("ambient_r2", "a_dps", 4.0)] == (20, 0.5, (("sigma_min", 0.05),), "config")
    # The search's fastest settings within its tolerance (adps.tuned.r4.fastest.*), and how fast each ran.
    for version, fastest in ((ambient, {"steps": "3", "guidance": "4"}), (edm, {"guidance": "1.5"})):
        for key, value in {**fastest, "seconds_per_slice": "9.5", "fastest_seconds_per_slice": "0.2"}.items():
            tag = f"adps.tuned.r4.fastest.{key}" if key in fastest else f"adps.tuned.r4.{key}"
            client.set_model_version_tag(version.name, version.version, tag, value)
    models = resolve_models(config)
    assert tuned_settings(dict(models[0][1]["_version_tags"]), 4.0) == {"guidance": 2.5, "steps": 7.0, "churn": 3.0}
    fastest = plan(config.replace(sampler_settings="fastest"))
    assert fastest[("ambient_r2", "a_dps", 4.0)] == (3, 4.0, (), "fastest")
    assert fastest[("edm_r1", "dps", 4.0)] == (0, 1.5, (), "fastest")
    assert fastest[("ambient_r2", "a_dps", 2.0)][3] == "paper"
    assert plan(config.replace(sampler_settings="best")) == tuned
    client.delete_model_version_tag(edm.name, edm.version, "adps.tuned.r4.fastest.guidance")
    models = resolve_models(config)
    with pytest.raises(ValueError, match=r"R_inf 4, ambient_r2 have fastest settings .* but edm_r1 not"):
        plan(config.replace(sampler_settings="fastest"))
    # use_tuned, the older on / off key, is read as sampler_settings.
    assert EvaluateConfig.from_dict({"dataset": "d", "use_tuned": "true"}).sampler_settings == "best"
    assert EvaluateConfig.from_dict({"dataset": "d", "use_tuned": False}).sampler_settings == "paper"
    with pytest.raises(ValueError, match="'sampler_settings' must be one of paper, best, fastest, got 'quick'"):
        EvaluateConfig(dataset="d", models=("l1",), sampler_settings="quick").validate()

    # Unfair: one model tuned at R_inf 4, the other not; different budgets; a search on test.
    client.delete_model_version_tag(edm.name, edm.version, "adps.tuned.r4.guidance")
    models = resolve_models(config)
    with pytest.raises(ValueError, match=r"R_inf 4, ambient_r2 have best settings .* but edm_r1 not: tune them"):
        plan(config.replace(sampler_settings="best"))
    marked = plan(config.replace(sampler_settings="best", allow_untuned=True))
    assert marked[("edm_r1", "dps", 4.0)][3] == "untuned" and marked[("ambient_r2", "a_dps", 4.0)][3] == "tuned"
    client.set_model_version_tag(edm.name, edm.version, "adps.tuned.r4.guidance", "0.7")
    client.set_model_version_tag(edm.name, edm.version, "adps.tuned.r4.budget", "8")
    models = resolve_models(config)
    with pytest.raises(ValueError, match="different budgets .*ambient_r2 32 trials, edm_r1 8 trials"):
        plan(config.replace(sampler_settings="best"))
    client.set_model_version_tag(edm.name, edm.version, "adps.tuned.r4.budget", "32")
    client.set_model_version_tag(edm.name, edm.version, "adps.tuned.r4.split", "test")
    models = resolve_models(config)
    with pytest.raises(ValueError, match="edm_r1 at R_inf 4 were searched on the test split"):
        plan(config.replace(sampler_settings="best"))


def test_bad_config_names_the_key(tiny_prepared: str) -> None:
    with pytest.raises(ValueError, match="'models'"):
        EvaluateConfig(dataset=tiny_prepared).validate()
    with pytest.raises(ValueError, match="unknown"):
        EvaluateConfig.from_dict({"dataset": tiny_prepared, "modles": "x"})
    config = EvaluateConfig(dataset=tiny_prepared, models=("l1",), r_inf=(3.0,), lpips=False)
    with pytest.raises(ValueError, match=r"R_inf 3 not prepared .* \(it has 2, 4\)"):
        evaluate(config, progress=False)


def test_evaluation_logs_table_figures_and_crossover_and_resumes(
    ray_session, tiny_prepared: str, tiny_models: dict[str, Path], lpips_weights, tmp_path: Path, capsys
) -> None:
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    config = EvaluateConfig(
        dataset=tiny_prepared, models=(str(tiny_models["ambient_r2"]), str(tiny_models["edm_r1"]), "l1"),
        r_inf=(2.0, 4.0), slices=2, slices_per_task=1, steps=4, n_boot=200,
        output=str(tmp_path / "eval"), run_name="eval-test", experiment="eval-test",
    )
    first = evaluate(config)
    # ambient: A-DPS at R 2, 4 and A-OS at R 2; edm: DPS at 2, 4; l1 at 2, 4: 7 x 2 slices.
    rows = first["rows"]
    assert len(rows) == 14
    assert {(r["model"], r["sampler"]) for r in rows} == {
        ("ambient_r2", "a_dps"), ("ambient_r2", "a_os"), ("edm_r1", "dps"), ("l1", "l1_wavelet")}
    assert all(0 <= r["nrmse"] < 10 and 0 <= r["ssim"] <= 1 and r["lpips"] >= 0 and r["seconds"] > 0 for r in rows)
    assert [(c.model, c.metric) for c in first["crossover"]] == [("ambient_r2", m) for m in ("nrmse", "psnr", "ssim")]

    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(first["run_id"])}
    assert {"results.parquet", "results.csv", "crossover.csv", "nrmse_vs_r.png", "psnr_vs_r.png", "ssim_vs_r.png",
            "reconstructions.png"} <= artifacts
    table = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=first["run_id"], artifact_path="results.parquet",
                                                                dst_path=str(tmp_path / "dl")))
    assert list(table.columns) == ["model", "method", "sampler", "r_train", "r_inf", "slice", "nrmse", "psnr", "ssim",
                                   "lpips", "seconds", "steps", "guidance", "options", "settings", "samples",
                                   "calibration"]
    assert set(table["guidance"]) == {1.0} and set(table["samples"]) == {1}
    # Where each row's settings came from: the config's step count for the iterative samplers,
    # METHOD.md's for A-OS (one call at sigma 0.003) and L1-wavelet.
    iterative = table["sampler"].isin(["a_dps", "dps"])
    assert set(table.loc[iterative, "settings"]) == {"config"} and set(table.loc[~iterative, "settings"]) == {"paper"}
    # The step count is the iterative samplers'; A-OS is one call, L1-wavelet keeps its own
    # iterations (METHOD.md's 100).
    assert set(table.loc[iterative, "steps"]) == {4} and set(table.loc[~iterative, "steps"]) == {0}
    assert len(table) == 14
    # The denoising check ran before the samplers, on both diffusion models (2 training steps:
    # they do not denoise yet, and the evaluation says so), and is logged with the run.
    checked = first["denoising_check"]
    assert {(c["model"], c["sigma"]) for c in checked} == {(m, s) for m in ("ambient_r2", "edm_r1")
                                                           for s in (0.05, 0.1, 0.2)}
    failed = sorted({c["model"] for c in checked if not c["passed"]})
    assert run.data.tags["adps.denoising_check_failed"] == ",".join(failed)
    assert "denoising_check.csv" in artifacts
    assert run.data.metrics["denoising_check.edm_r1.test.s0.1.input_nrmse"] == pytest.approx(
        next(c["input_nrmse"] for c in checked if (c["model"], c["sigma"]) == ("edm_r1", 0.1)))
    # Every (model, metric) cross-over is either a metric or listed as none.
    none = set(filter(None, run.data.tags["adps.crossover_none"].split(",")))
    for c in first["crossover"]:
        key = f"{c.model}.{c.metric}"
        assert (f"crossover_r.{key}" in run.data.metrics) != (key in none)
        if c.crossover_r is not None:
            assert c.ci_low <= c.margin <= c.ci_high and c.margin > 0

    # An interruption lost two cells: the second run computes exactly those, the rest is read back.
    cells = sorted((tmp_path / "eval" / "cells").glob("*.json"))
    assert len(cells) == 14
    kept = {p: p.stat().st_mtime_ns for p in cells[2:]}
    for path in cells[:2]:
        path.unlink()
    capsys.readouterr()
    second = evaluate(config)
    assert "(12 done before, 2 to run)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    def measured(table: list[dict]) -> list[str]:
        return sorted(str({k: v for k, v in r.items() if k != "seconds"}) for r in table)

    assert measured(second["rows"]) == measured(rows), "same seeds: the recomputed cells agree"
    assert second["run_id"] == first["run_id"], "the same MLflow run continues"


def test_posterior_samples_and_the_classical_rows(
    ray_session, tiny_prepared: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """K = 3 samples per slice of DPS in one batch: the rows hold the posterior mean's metrics and
    the calibration, MLflow the mean calibration and a figure of each slice's standard deviation;
    the zero-filled and CG-SENSE rows need no model (and CG-SENSE fits the data better)."""
    from mlflow import MlflowClient

    config = EvaluateConfig(
        dataset=tiny_prepared, models=(str(tiny_models["edm_r1"]), "zero_filled", "cg_sense"), r_inf=(4.0,),
        slices=2, slices_per_task=2, steps=3, posterior_samples=3, lpips=False, denoising_check=False,
        output=str(tmp_path / "eval"), run_name="posterior", experiment="eval-posterior",
    )
    result = evaluate(config, progress=False)
    rows = {(r["model"], r["sampler"], r["slice"]): r for r in result["rows"]}
    assert {(m, s) for m, s, _ in rows} == {("edm_r1", "dps"), ("zero_filled", "zero_filled"), ("cg_sense", "cg_sense")}
    dps = [r for r in result["rows"] if r["sampler"] == "dps"]
    assert len(dps) == 2 and all(r["samples"] == 3 and 0 <= r["calibration"] <= 1 for r in dps)
    assert all(r["samples"] == 1 and r["calibration"] != r["calibration"] for r in result["rows"] if r not in dps)
    for slice_id in {r["slice"] for r in dps}:
        assert rows[("cg_sense", "cg_sense", slice_id)]["nrmse"] < rows[("zero_filled", "zero_filled", slice_id)]["nrmse"]
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.metrics["calibration.edm_r1.dps.r4"] == pytest.approx(sum(r["calibration"] for r in dps) / 2)
    artifacts = {a.path for a in MlflowClient().list_artifacts(result["run_id"])}
    assert "posterior_edm_r1_dps_r4.png" in artifacts and "denoising_check.csv" not in artifacts


def test_compile_mode_compiles_the_iterative_samplers_network_in_one_graph(
    tiny_prepared: str, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """``compile_mode``: an A-DPS cell hands its network to ``torch.compile`` (static shapes)
    and gets the eager cell's reconstruction; the one-call A-OS cell is not compiled. Dynamo
    traces the real sampler loop with ``fullgraph=True`` (a graph break fails) and the ``eager``
    backend: Inductor's kernels are measured on a GPU (bench/sample_speed.py --compile)."""
    from adps.orchestration.study_mri import evaluate_cell, plan_cells

    real_compile, asked = torch.compile, []

    def compile_cheaply(model, *, mode=None, dynamic=None, **kwargs):
        asked.append((mode, dynamic))
        return real_compile(model, backend="eager", fullgraph=True, dynamic=dynamic, **kwargs)

    uri = str(tiny_models["ambient_r2"])
    models = [(uri, load_model_entry(uri, "cpu")[1])]
    config = EvaluateConfig(dataset=tiny_prepared, models=(uri,), r_inf=(2.0,), slices=2, slices_per_task=2,
                            steps=3, lpips=False, output=str(tmp_path / "eager"))
    cells = {cell.sampler: cell for cell in plan_cells(config, models, 2)}
    assert set(cells) == {"a_dps", "a_os"}
    eager = {name: evaluate_cell(config, cell) for name, cell in cells.items()}
    monkeypatch.setattr(torch, "compile", compile_cheaply)
    compiled_config = config.replace(compile_mode="max-autotune", output=str(tmp_path / "compiled"))
    compiled = {name: evaluate_cell(compiled_config, cell) for name, cell in cells.items()}
    assert asked == [("max-autotune", False)]  # A-DPS only

    for name in cells:
        assert [r["slice"] for r in compiled[name]] == [r["slice"] for r in eager[name]]
        for metric in ("nrmse", "psnr", "ssim"):
            assert [r[metric] for r in compiled[name]] == pytest.approx([r[metric] for r in eager[name]], rel=1e-5)
    with pytest.raises(ValueError, match="config key 'compile_mode'"):
        config.replace(compile_mode="fast").validate()


def test_fid_samples_each_prior_and_logs_the_table(
    ray_session, tiny_prepared: str, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """adps fid on local Ray: one prior sampler for every EDM-preconditioned model (EDM Heun, for
    the ambient model too), Langevin over the full range for NCSNv2, each logged with its settings;
    each FID is the FID of that sampler's samples against the split's references (recomputed
    here); a method without a prior is listed with the reason."""
    from mlflow import MlflowClient
    from torchvision.models import vgg16

    from adps.data.dataset import PreparedSliceDataset
    from adps.orchestration.fid import FidConfig, format_fid_table, run_fid, unconditional_samples
    from adps.perceptual import WEIGHT_FILES, fid

    # Random VGG16 convolution weights (the FID reads only features.*; no 500 MB classifier).
    weights = tmp_path / WEIGHT_FILES["vgg16"]
    torch.save({k: v for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}, weights)
    ncsnv2 = train_tiny(tiny_prepared, "ncsnv2", 1, tmp_path)
    config = FidConfig(
        dataset=tiny_prepared,
        models=(str(tiny_models["edm_r1"]), str(ncsnv2), str(tiny_models["ambient_r2"]), "l1"),
        split="train", samples=4, steps=3, batch=2, fid_weights=str(weights), run_name="fid-test", experiment="fid-test",
    )
    result = run_fid(config)
    by_model = {row["model"]: row for row in result["rows"]}
    assert set(by_model) == {"edm_r1", "ncsnv2_r1", "ambient_r2", "l1"}
    heun = "sampler=prior_heun steps=3 sigma_max=80 sigma_min=0.002 rho=7"
    assert by_model["edm_r1"]["sampler"] == by_model["ambient_r2"]["sampler"] == heun
    ncsn_model, _ = load_model_entry(str(ncsnv2), "cpu")
    assert by_model["ncsnv2_r1"]["sampler"].startswith(
        f"sampler=ald steps=3 steps_per_level=3 sigma_start={float(ncsn_model.sigmas()[0]):g} ")
    dataset = PreparedSliceDataset(tiny_prepared, "train", acceleration=2)
    items = [dataset[i] for i in range(len(dataset))]
    dataset.close()
    real = torch.stack([item["reference"] for item in items])
    maps = torch.stack([item["maps"] for item in items])
    for name, path in (("edm_r1", tiny_models["edm_r1"]), ("ncsnv2_r1", ncsnv2), ("ambient_r2", tiny_models["ambient_r2"])):
        model, model_config = load_model_entry(str(path), "cpu")
        fake = unconditional_samples(model_config["method"], model, 4, tuple(real.shape[-2:]), steps=3, batch=2,
                                     maps=maps, r_train=float(model_config["r_train"]), acs=4)
        assert by_model[name]["fid"] == pytest.approx(fid(real, fake, "vgg16", weights=weights, method="eigh"),
                                                      rel=1e-4), name
    assert by_model["l1"]["fid"] is None and "no unconditional sampler" in by_model["l1"]["note"]
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert set(run.data.metrics) == {"fid.edm_r1", "fid.ncsnv2_r1", "fid.ambient_r2"}
    assert run.data.tags["adps.fid_sampler.ambient_r2"] == heun
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"fid.csv", "samples_edm_r1.png", "samples_ncsnv2_r1.png", "samples_ambient_r2.png"} <= artifacts
    table = format_fid_table(result["rows"])
    assert "ambient_r2" in table and heun in table

    missing = config.replace(fid_weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        run_fid(missing)


def test_every_sampler_setting_is_a_key_applied_to_every_model_alike() -> None:
    """METHOD.md's sampler settings are EvaluateConfig keys (0 = METHOD.md's value), each given to
    the samplers it concerns for every model, and each cell says that its settings came from
    the config; the ambient-only fallbacks sit below the general keys."""
    from adps.nn.samplers import SAMPLER_DEFAULTS
    from adps.orchestration.study_mri import cell_settings

    ambient, edm, ncsn = ({"method": m, "r_train": r, "_version_tags": {}} for m, r in
                          (("ambient", 4.0), ("edm", 1.0), ("ncsnv2", 1.0)))
    plain = EvaluateConfig(dataset="d", models=("m",))
    assert cell_settings(plain, edm, "dps", 4.0) == (0, 1.0, {}, "paper")
    assert SAMPLER_DEFAULTS["a_dps"] == {"steps": 500, "sigma_min": 0.004, "sigma_max": 10.0, "rho": 7.0,
                                         "guidance": 1.0}
    config = plain.replace(steps=50, sigma_max=20.0, sigma_min=0.05, rho=5.0, ald_step_scale=0.3, l1_lam=0.002,
                           l1_iterations=30, cg_sense_iterations=4, a_dps_sigma_min=0.1, a_os_sigma=0.2)
    expected = {"sigma_max": 20.0, "sigma_min": 0.05, "rho": 5.0}
    assert cell_settings(config, edm, "dps", 4.0) == (50, 1.0, expected, "config")
    assert cell_settings(config, ambient, "a_dps", 4.0) == (50, 1.0, expected, "config")  # sigma_min wins
    assert cell_settings(config.replace(sigma_min=0.0), ambient, "a_dps", 4.0)[2]["sigma_min"] == 0.1
    assert cell_settings(config, ambient, "a_os", 4.0) == (0, 1.0, {"sigma": 0.2}, "config")
    assert cell_settings(config, ncsn, "ald", 4.0) == (50, 1.0, {"step_scale": 0.3}, "config")
    l1 = {"method": "l1", "r_train": 1.0, "_version_tags": {}}
    assert cell_settings(config, l1, "l1_wavelet", 4.0) == (0, 1.0, {"lam": 0.002, "iterations": 30.0}, "config")
    cg = {"method": "cg_sense", "r_train": 1.0, "_version_tags": {}}
    assert cell_settings(config, cg, "cg_sense", 4.0)[2] == {"iterations": 4.0}

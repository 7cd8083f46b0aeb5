"""The natural-image evaluation (adps evaluate --study images) on local Ray: the tiny p = 0 and
p = 0.6 models that the session's image grid fixture trained through Ray Train and registered
(tests/conftest.py ``image_models``), compressed sensing, super-resolution and the NFE
sweep on 16 x 16 synthetic images; the table, the three figures and the cross-over table in
MLflow and in the output folder; a re-run that computes nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adps.orchestration.evaluate import evaluate
from adps.orchestration.registry import image_tuned_settings
from adps.orchestration.study_images import (
    FIGURES,
    TABLE_COLUMNS,
    ImageEvaluateConfig,
    format_image_crossover,
    format_image_results,
    image_crossovers,
)

RESOLUTION = 16


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adps.images import write_image_folder

    folder = tmp_path_factory.mktemp("image-eval") / "test"
    write_image_folder(folder, 3, resolution=RESOLUTION, seed=7)
    return folder


@pytest.fixture
def alexnet_weights(tmp_path: Path) -> Path:
    """Random AlexNet ``features`` weights under torchvision's file name (LPIPS reads nothing
    else; no download, and 10 MB rather than the classifier's 230 MB)."""
    from torchvision.models import alexnet

    from adps.perceptual import WEIGHT_FILES

    path = tmp_path / WEIGHT_FILES["alexnet"]
    torch.save({k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}, path)
    return path


def _config(**values) -> ImageEvaluateConfig:
    return ImageEvaluateConfig.from_dict({"models": ["m"], "images": "x", "resolution": RESOLUTION, "lpips": False,
                                          **values})


def test_bad_config_names_the_key() -> None:
    small = {"measurements": [100, 200], "nfe_measurements": 200}
    _config(**small).validate()  # the defaults but for measurement counts that fit 16 x 16
    cases = {
        "'models' is empty": {"models": []},
        "'images' is empty": {"images": ""},
        r"'measurements': 1000 measurements, but a 16 x 16 RGB image has 768 pixels": {"measurements": [100, 1000]},
        r"'nfe_measurements': 5000": {"nfe_measurements": 5000},
        "'factors': 3 does not divide the resolution 16": {"factors": [2, 3]},
        "'factors' lists 2 more than once": {"factors": [2, 2]},
        "'steps_list' must hold integers >= 1": {"steps_list": [0, 5]},
        "'images_per_task' must be >= 1": {"images_per_task": 0},
        "'noise' must be >= 0": {"noise": -0.1},
        r"'lpips_resize': 16-pixel images are too small": {"lpips": True},
        "'lpips_resize' must be 0 or >= 32": {"lpips": True, "lpips_resize": 16},
        "'measurements', 'factors' and 'steps_list' are all empty": {"measurements": [], "factors": [],
                                                                     "steps_list": []},
        "'amp'": {"amp": "fp8"},
    }
    for message, values in cases.items():
        with pytest.raises(ValueError, match=message):
            _config(**{**small, **values}).validate()
    with pytest.raises(ValueError, match="unknown config key 'factor'"):
        ImageEvaluateConfig.from_dict({"factor": [2]})


def test_model_entries_are_checked_before_any_task(test_images: Path, tmp_path: Path) -> None:
    """A wrong model entry fails on the driver, naming it and the key."""
    from adps.nn import build_modl
    from adps.nn.checkpoint import save_model

    config = _config(images=str(test_images), measurements=[100], nfe_measurements=100, output=str(tmp_path))
    with pytest.raises(ValueError, match="'models': 'l1' is not an image model"):
        evaluate(config.replace(models=["l1"]), progress=False)
    modl = save_model(tmp_path / "modl", build_modl("tiny"), {"preset": "tiny", "method": "modl", "R": 4})
    with pytest.raises(ValueError, match="'models': .*modl is not a natural-image model"):
        evaluate(config.replace(models=[str(modl)]), progress=False)
    with pytest.raises(ValueError, match="'models'"):
        evaluate(config.replace(models=["no-such-model"]), progress=False)
    assert not (tmp_path / "cells").exists()


def test_cli_points_to_the_right_study(tmp_path: Path, capsys) -> None:
    from adps.cli import main

    path = tmp_path / "images.yaml"
    path.write_text("models: [adps-image-p0]\nimages: /data/test\n")
    assert main(["evaluate", "--config", str(path)]) == 2
    assert "adps evaluate --study images --config" in capsys.readouterr().err
    path.write_text("dataset: /data/prepared\nmodels: [adps-edm-r1]\n")
    assert main(["evaluate", "--study", "images", "--config", str(path)]) == 2
    assert "adps evaluate --study mri --config" in capsys.readouterr().err


def test_tuned_tags_are_read_per_task() -> None:
    tags = {"adps.tuned.cs.steps": "150", "adps.tuned.cs.guidance": "2.5", "adps.tuned.cs.run_id": "abc",
            "adps.tuned.sr.guidance": "0.5", "adps.tuned.r4.guidance": "9"}
    assert image_tuned_settings(tags, "cs") == {"steps": 150.0, "guidance": 2.5}
    assert image_tuned_settings(tags, "sr") == {"guidance": 0.5}
    from adps.orchestration.study_images import _settings

    config = _config(measurements=[100], nfe_measurements=100)
    assert _settings(config, tags, "cs")[:2] == (150, 2.5)
    assert _settings(config, tags, "sr")[:2] == (100, 0.5)  # the samplers' default steps
    assert _settings(config, tags, "nfe")[:2] == (150, 2.5)  # the sweep's steps replace these
    assert _settings(config.replace(steps=7, guidance=3.0), tags, "cs")[:2] == (7, 3.0)
    assert _settings(config.replace(sampler_settings="paper"), tags, "cs")[:2] == (100, 1.0)


def test_crossover_is_where_the_ambient_model_starts_winning() -> None:
    """Scanning from the easiest setting (most measurements, smallest factor, most NFEs) to the
    hardest, the first one at which the ambient model's mean error is lower."""
    rows = []
    p0_mse = {("cs", 4000): 0.01, ("cs", 1000): 0.03, ("cs", 100): 0.2, ("sr", 2): 0.01, ("sr", 4): 0.05,
              ("sr", 8): 0.1, ("nfe", 199): 0.01, ("nfe", 19): 0.3}
    ambient_delta = {("cs", 4000): +0.005, ("cs", 1000): -0.005, ("cs", 100): -0.05, ("sr", 2): +0.002,
                     ("sr", 4): -0.01, ("sr", 8): -0.02, ("nfe", 199): +0.004, ("nfe", 19): -0.1}
    for (task, setting), value in p0_mse.items():
        for model, p, shift in (("p0", 0.0, 0.0), ("p0.6", 0.6, ambient_delta[(task, setting)])):
            for image in range(3):
                rows.append({"model": model, "erasure_p": p, "sampler": "x", "task": task, "image": image,
                             "measurements": None if task == "sr" else (setting if task == "cs" else 4000),
                             "factor": setting if task == "sr" else None, "nfe": setting if task == "nfe" else 0,
                             "mse": value + shift + 0.001 * image, "lpips": math.nan})
    found = {(c["task"], c["metric"]): c for c in image_crossovers(rows, n_boot=100)}
    assert set(found) == {("cs", "mse"), ("sr", "mse"), ("nfe", "mse")}  # LPIPS not measured
    assert found[("cs", "mse")]["crossover"] == 1000 and found[("cs", "mse")]["axis"] == "measurements"
    assert found[("sr", "mse")]["crossover"] == 4
    assert found[("nfe", "mse")]["crossover"] == 19
    assert found[("cs", "mse")]["margin"] == pytest.approx(0.005) and found[("cs", "mse")]["n_images"] == 3
    assert "1000" in format_image_crossover(list(found.values()))
    assert image_crossovers([r for r in rows if r["model"] != "p0"]) == []  # no p = 0 model, no cross-over


def test_evaluation_writes_table_figures_and_crossover_and_resumes(
    ray_session, image_models: dict, test_images: Path, alexnet_weights: Path, tmp_path: Path, capsys
) -> None:
    """The models are the p = 0 and p = 0.6 models the image grid fixture trained through Ray
    Train and registered (``models:/adps-image-p0/<v>``): train, registry and evaluation chain."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    config = ImageEvaluateConfig(
        models=(image_models["models"][0.0], image_models["models"][0.6]), images=str(test_images), resolution=RESOLUTION,
        n_images=3, images_per_task=4, measurements=(64, 256), factors=(2, 4), steps_list=(2, 4),
        nfe_measurements=256, steps=3, noise=0.01, lpips_weights=str(alexnet_weights), lpips_resize=32, n_boot=200,
        output=str(tmp_path / "eval"), run_name="image-eval-test", experiment="image-eval-test",
    )
    first = evaluate(config)
    out = capsys.readouterr().out
    assert "(0 done before, 16 to run)" in out  # 2 models x 6 settings + pinv x 4 settings, one chunk each

    rows = first["rows"]
    assert len(rows) == 16 * 3
    assert {(r["model"], r["sampler"], r["erasure_p"]) for r in rows if r["model"] != "pinv"} == {
        ("p0", "dps", 0.0), ("p0.6", "a_dps", 0.6)}
    assert all(math.isfinite(r["mse"]) and r["mse"] >= 0 and math.isfinite(r["lpips"]) and r["lpips"] >= 0
               and r["seconds"] > 0 for r in rows)
    settings = {(r["model"], r["task"], r["measurements"], r["factor"], r["steps"], r["nfe"]) for r in rows}
    for model in ("p0", "p0.6"):
        assert {s[1:] for s in settings if s[0] == model} == {
            ("cs", 64, None, 3, 5), ("cs", 256, None, 3, 5), ("sr", None, 2, 3, 5), ("sr", None, 4, 3, 5),
            ("nfe", 256, None, 2, 3), ("nfe", 256, None, 4, 7)}
    # The pseudo-inverse baseline: cs and sr only, no network; more measurements / a smaller
    # factor leave it less to guess, on every image.
    pinv = {(r["task"], r["measurements"] or r["factor"], r["image"]): r["mse"] for r in rows if r["model"] == "pinv"}
    assert len(pinv) == 4 * 3 and all(r["nfe"] == 0 and r["sampler"] == "pinv" for r in rows if r["model"] == "pinv")
    assert all(pinv[("cs", 256, i)] < pinv[("cs", 64, i)] and pinv[("sr", 2, i)] < pinv[("sr", 4, i)] for i in range(3))

    # The cross-over of p0.6 against p0, per task and metric.
    assert {(c["model"], c["reference"], c["task"], c["metric"]) for c in first["crossover"]} == {
        ("p0.6", "p0", task, metric) for task in ("cs", "sr", "nfe") for metric in ("mse", "lpips")}
    for c in first["crossover"]:
        assert c["outcome"] in ("crossover", "inconclusive", "none")
        assert c["crossover"] is None or (c["outcome"] == "crossover" and c["ci_low"] > 0)
        assert c["outcome"] == "none" or (c["margin"] > 0 and c["ci_low"] <= c["margin"] <= c["ci_high"])

    # Files: under the output folder and as MLflow artifacts.
    names = {"results.csv", "results.parquet", "crossover.csv", *(figure for figure, _, _ in FIGURES.values())}
    assert first["figures"] == [figure for figure, _, _ in FIGURES.values()]
    report = tmp_path / "eval" / "report"
    assert {p.name for p in report.iterdir()} == names
    assert all((report / name).stat().st_size > 0 for name in names)
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(first["run_id"])} == names
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=first["run_id"], artifact_path="results.csv",
                                                            dst_path=str(tmp_path / "dl")))
    assert list(table.columns) == list(TABLE_COLUMNS) and len(table) == 48
    crossover = pd.read_csv(report / "crossover.csv")
    assert len(crossover) == 6 and {"model", "task", "axis", "metric", "crossover", "margin"} <= set(crossover.columns)
    metrics = run.data.metrics
    assert {"mse.p0.6.cs.m64", "lpips.p0.sr.x4", "mse.pinv.cs.m256", "mse.p0.nfe.nfe7"} <= set(metrics)
    assert metrics["mse.pinv.sr.x2"] == pytest.approx(sum(pinv[("sr", 2, i)] for i in range(3)) / 3)
    # Each (model, task, metric) has one of the three outcomes, said once: a metric or a tag.
    tagged = {outcome: set(filter(None, run.data.tags[f"adps.crossover_{outcome}"].split(",")))
              for outcome in ("none", "inconclusive")}
    for c in first["crossover"]:
        key = f"{c['model']}.{c['task']}.{c['metric']}"
        said = [f"crossover.{key}" in metrics, key in tagged["inconclusive"], key in tagged["none"]]
        assert said == [c["outcome"] == o for o in ("crossover", "inconclusive", "none")], (key, said)
        assert (f"crossover_inconclusive.{key}" in metrics) == (c["outcome"] == "inconclusive")
    text = format_image_results(rows)
    assert "p0.6 a_dps" in text and "cs m 64" in text and "sr x4" in text

    # Run again: every cell is read back, none computed, and the same MLflow run continues.
    cells = sorted((tmp_path / "eval" / "cells").glob("*.json"))
    assert len(cells) == 16
    stamps = {p: p.stat().st_mtime_ns for p in cells}
    second = evaluate(config)
    assert "(16 done before, 0 to run)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in cells} == stamps
    assert second["rows"] == rows and second["run_id"] == first["run_id"]

"""The Ray Tune search of sampler settings: space files, Optuna + ASHA on local Ray with a tiny
model, MLflow parent / child runs, best.json and model-version tags, and a killed search that
resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adps.orchestration.tune import truncated_search_state, tune_search
from adps.orchestration.tune_config import SearchConfig, load_space, parse_space
from conftest import stop_process_group
from test_evaluate import train_tiny

REPO = Path(__file__).resolve().parents[1]
TEST_SPACE = """# test space: tiny step counts
sampler: adps
objective: {metric: nrmse, mode: min}
params:
  guidance: {type: loguniform, low: 0.1, high: 10.0}
  steps: {type: choice, values: [2, 3, 4]}
"""


@pytest.fixture(scope="module")
def ambient_model(tiny_prepared: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny(tiny_prepared, "ambient", 2, tmp_path_factory.mktemp("tune-models"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(TEST_SPACE)
    return path


def test_space_files_of_the_repository_load() -> None:
    spaces = {name: load_space(REPO / "tune_spaces" / f"{name}.yaml") for name in ("adps", "a_os", "dps", "ald")}
    assert {name: s.sampler for name, s in spaces.items()} == {"adps": "a_dps", "a_os": "a_os", "dps": "dps",
                                                                "ald": "ald"}
    assert spaces["adps"].params["guidance"] == {"type": "loguniform", "low": 0.1, "high": 10.0}
    # The ambient models' defaults search where their schedule ends, and A-OS its sigma.
    assert spaces["adps"].params["sigma_min"] == spaces["dps"].params["sigma_min"] == {
        "type": "loguniform", "low": 0.004, "high": 0.5}
    assert {k: v for k, v in spaces["adps"].params.items()} == spaces["dps"].params  # the same search for both
    assert spaces["a_os"].params == {"sigma": {"type": "loguniform", "low": 0.003, "high": 1.0}}
    assert all(s.metric == "nrmse" and s.mode == "min" for s in spaces.values())


@pytest.mark.parametrize("text, message", [
    ("sampler: adps\nparams: {guidance: {type: loguniform, low: 0.1, high: 10}}\nsteps: 4",
     r"unknown key 'steps'"),
    ("sampler: adps\nparams: {guidance: {type: loguniform, low: 0.1, hihg: 10}}",
     r"unknown key 'params.guidance.hihg'"),
    ("sampler: ald\nparams: {churn: {type: uniform, low: 0, high: 1}}", r"unknown key 'params.churn'"),
    ("sampler: adps\nparams: {guidance: {type: loguniform, low: 10, high: 0.1}}", r"'params.guidance'.*low .* < high"),
    ("sampler: adps\nparams: {guidance: {type: loguniform, low: x, high: 1}}", r"'params.guidance.low' must be a number"),
    ("sampler: adps\nparams: {steps: {type: choice, values: []}}", r"'params.steps.values' must be a non-empty list"),
    ("sampler: adps\nparams: {steps: {type: choice, values: [2.5]}}", r"'params.steps.values' must be an integer"),
    ("sampler: edm\nparams: {steps: {type: choice, values: [2]}}", r"key 'sampler': unknown sampler 'edm'"),
    ("sampler: dps\nobjective: {metric: lpips}\nparams: {steps: {type: choice, values: [2]}}",
     r"'objective.metric': 'lpips'"),
    ("sampler: dps\nobjective: {metric: psnr, mode: maximum}\nparams: {steps: {type: choice, values: [2]}}",
     r"'objective.mode': 'maximum'"),
])
def test_malformed_space_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_config_and_sampler_mismatch_are_refused(
    tiny_prepared: str, ambient_model: Path, space_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="unknown config key 'trials'"):
        SearchConfig.from_dict({"trials": 4})
    with pytest.raises(ValueError, match="'slices_per_report'"):
        SearchConfig(model="m", r_inf=4, space="s", dataset="d", slices_per_report=0).validate()
    dps_space = tmp_path / "dps.yaml"
    dps_space.write_text(TEST_SPACE.replace("sampler: adps", "sampler: dps"))
    config = SearchConfig(model=str(ambient_model), r_inf=4, space=str(dps_space), dataset=tiny_prepared)
    with pytest.raises(ValueError, match=r"dps.yaml: key 'sampler'.*method ambient, sampler a_dps"):
        tune_search(config, progress=False)
    assert parse_space({"sampler": "adps", "params": {"steps": {"type": "randint", "low": 2, "high": 4}}}).params
    a_os_space = tmp_path / "a_os.yaml"
    a_os_space.write_text("sampler: a_os\nparams: {sigma: {type: loguniform, low: 0.003, high: 1.0}}\n")
    config = SearchConfig(model=str(ambient_model), r_inf=4, space=str(a_os_space), dataset=tiny_prepared)
    with pytest.raises(ValueError, match=r"A-OS is searched at R_inf = R_train only.*trained at R 2, r_inf is 4"):
        tune_search(config, progress=False)
    # Searching on test would tune to the slices the evaluation scores; train has other coils.
    with pytest.raises(ValueError, match="'split': a search on the test split"):
        config.replace(split="test").validate()
    with pytest.raises(ValueError, match="'split': 'train' .* has 2 virtual coils, not the test split's coil setting"):
        tune_search(config.replace(space=str(space_file), split="train"), progress=False)


@pytest.mark.slow
def test_search_with_asha_logs_runs_best_json_and_version_tags(
    ray_session, tiny_prepared: str, ambient_model: Path, space_file: Path, tmp_path: Path
) -> None:
    """6 trials, one at a time (deterministic: seeded TPE, seeded noise, ASHA sees the trials in
    order), 2 reports each (one slice per report); ASHA stops the trials whose first report is
    worse than the median of those before."""
    from mlflow import MlflowClient

    from adps.orchestration.registry import register_model
    from adps.orchestration.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri()
    client = MlflowClient(uri)
    # An artifact location of its own: MLflow's default is ./mlruns of the folder pytest runs in.
    run = client.create_run(client.create_experiment("tune-register", (tmp_path / "artifacts").as_uri()))
    version = register_model(ambient_model, tracking_uri=uri, run_id=run.info.run_id, name="adps-tunesearch-r2")
    config = SearchConfig(
        model="models:/adps-tunesearch-r2@latest", r_inf=4, space=str(space_file), dataset=tiny_prepared,
        slices=2, slices_per_report=1, num_samples=6, max_concurrent=1, grace_period=1, seed=1,
        storage_path=str(tmp_path / "tune"), name="search", experiment="tune-test",
    )
    started = time.perf_counter()
    result = tune_search(config, progress=False)
    elapsed = time.perf_counter() - started
    assert elapsed < 150, elapsed
    trials = result["trials"]
    assert len(trials) == 6 and not any(t["error"] for t in trials)
    assert all(t["settings"]["steps"] in (2, 3, 4) and 0.1 <= t["settings"]["guidance"] <= 10 for t in trials)
    assert any(t["stopped_early"] for t in trials), trials
    assert all(t["reports"] == (1 if t["stopped_early"] else 2) for t in trials)

    best = result["best"]
    assert best["metric"] == "nrmse" and best["trials"] == 6
    assert best["value"] == min(t["nrmse"] for t in trials if not t["stopped_early"])
    assert json.loads((Path(result["path"]) / "best.json").read_text()) == best
    parent = result["run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"best.json", "trials.json", "objective_vs_steps.png", "pareto.csv", "pareto.png"} <= artifacts
    # Every trial's speed; the Pareto front of quality and speed. No reference trial: this space
    # does not hold the protocol's 500 steps (the A-OS search below does hold its protocol).
    assert all(t["seconds_per_slice"] > 0 for t in trials) and not any(t["reference"] for t in trials)
    front = best["pareto"]
    assert front and [f["seconds_per_slice"] for f in front] == sorted(f["seconds_per_slice"] for f in front)
    assert [f["nrmse"] for f in front] == sorted((f["nrmse"] for f in front), reverse=True)
    assert best["trial_id"] in {f["trial_id"] for f in front} and "reference" not in best and "fastest" not in best
    logged = Path(client.download_artifacts(parent, "best.json", str(tmp_path / "download")))
    assert json.loads(logged.read_text())["settings"] == best["settings"]

    experiment = client.get_experiment_by_name("tune-test")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 6
    stopped = [c for c in children if c.data.tags["adps.stopped_early"] == "true"]
    assert len(stopped) == sum(t["stopped_early"] for t in trials) >= 1
    assert all(set(c.data.params) == {"guidance", "steps"} and "nrmse" in c.data.metrics for c in children)

    tags = client.get_model_version("adps-tunesearch-r2", version.version).tags
    assert tags["adps.tuned.r4.run_id"] == parent
    assert int(tags["adps.tuned.r4.steps"]) == best["settings"]["steps"]
    assert float(tags["adps.tuned.r4.guidance"]) == pytest.approx(best["settings"]["guidance"])
    # TensorBoard logs (tensorboardX) in the trial folders.
    assert list(Path(result["path"]).glob("*/events.out.tfevents*"))

    # adps evaluate picks the tuned settings up from the model version, at that R_inf only.
    from adps.orchestration.evaluate import EvaluateConfig, evaluate

    assert (tags["adps.tuned.r4.budget"], tags["adps.tuned.r4.split"]) == ("6", "val")  # for the fair-tuning rule
    evaluation = evaluate(EvaluateConfig(
        dataset=tiny_prepared, models=("adps-tunesearch-r2",), r_inf=(2.0, 4.0), slices=1, a_os=False,
        lpips=False, tracking_uri=uri, output=str(tmp_path / "evaluation"), experiment="tune-then-evaluate",
        sampler_settings="best", denoising_check=False,
    ), progress=False)
    used = {row["r_inf"]: (row["steps"], row["guidance"], row["settings"]) for row in evaluation["rows"]}
    assert used == {2.0: (0, 1.0, "paper"),
                    4.0: (best["settings"]["steps"], pytest.approx(best["settings"]["guidance"]), "tuned")}

    # A-OS's sigma has its own search (at R_inf = R_train) and its own tags, which A-DPS never reads.
    a_os_space = tmp_path / "a_os.yaml"
    a_os_space.write_text("sampler: a_os\nobjective: {metric: nrmse, mode: min}\n"
                          "params: {sigma: {type: loguniform, low: 0.003, high: 1.0}}\n")
    a_os = tune_search(config.replace(r_inf=2, space=str(a_os_space), num_samples=2, name="search-a-os"),
                       progress=False)
    sigma = a_os["best"]["settings"]["sigma"]
    assert len(a_os["trials"]) == 2 and 0.003 <= sigma <= 1.0
    tags = client.get_model_version("adps-tunesearch-r2", version.version).tags
    assert float(tags["adps.tuned.r2.a_os.sigma"]) == pytest.approx(sigma)
    assert tags["adps.tuned.r2.a_os.run_id"] == a_os["run_id"] and "adps.tuned.r2.sigma" not in tags
    from adps.orchestration.registry import tuned_settings

    assert tuned_settings(tags, 2.0) == {} and tuned_settings(tags, 2.0, "a_os") == {"sigma": pytest.approx(sigma)}
    assert "sigma" not in tuned_settings(tags, 4.0)
    # A-OS's space holds its protocol (sigma 0.003): the first trial runs it, the reference of "fastest".
    (reference,) = [t for t in a_os["trials"] if t["reference"]]
    assert reference["settings"] == {"sigma": pytest.approx(0.003)}
    assert a_os["best"]["reference"]["settings"] == reference["settings"]
    fastest = a_os["best"]["fastest"]
    assert fastest["seconds_per_slice"] <= reference["seconds_per_slice"] and fastest["tolerance"] == 0.01
    assert fastest["nrmse"] <= reference["nrmse"] * 1.01

    # A search's fastest settings become tags of their own, which only sampler_settings: fastest
    # reads; a later search without them takes the earlier ones away.
    from adps.orchestration.registry import tag_tuned_settings

    quick = {"settings": {"steps": 2, "guidance": 3.0}, "seconds_per_slice": 0.01}
    tags = tag_tuned_settings(config, {**best, "seconds_per_slice": 0.05, "fastest": quick}, parent, sampler="a_dps",
                              model_method="ambient").tags
    assert tuned_settings(tags, 4.0, "fastest") == {"steps": 2.0, "guidance": 3.0}
    assert tuned_settings(tags, 4.0) == {"steps": best["settings"]["steps"], "guidance": pytest.approx(
        best["settings"]["guidance"])}
    assert (tags["adps.tuned.r4.seconds_per_slice"], tags["adps.tuned.r4.fastest_seconds_per_slice"]) == ("0.05", "0.01")
    tags = tag_tuned_settings(config, best, parent, sampler="a_dps", model_method="ambient").tags
    assert tuned_settings(tags, 4.0, "fastest") == {}

    # A search is pinned to the version @latest named when it started: resumed after another version
    # is registered, it still loads and tags that one.
    assert client.get_run(parent).data.tags["adps.model"] == f"models:/adps-tunesearch-r2/{version.version}"
    newer = register_model(ambient_model, tracking_uri=uri, run_id=run.info.run_id, name="adps-tunesearch-r2")
    resumed = tune_search(config, progress=False)
    assert resumed["resumed"] and resumed["run_id"] == parent and resumed["version"].version == version.version
    assert not any(tag.startswith("adps.tuned.") for tag in client.get_model_version(newer.name, newer.version).tags)


def test_pareto_front_and_the_fastest_settings_within_tolerance() -> None:
    """The front keeps the complete trials no other beats on both quality and speed; the fastest
    within tolerance compares each trial with the reference on the slices the reference saw."""
    from adps.orchestration.tune import fastest_within, pareto_front
    from adps.orchestration.tune_config import parse_space

    space = parse_space({"sampler": "adps", "params": {"steps": {"type": "choice", "values": [10, 50, 500]}}})

    def trial(name: str, history: list[float], seconds: float, *, stopped: bool = False, reference: bool = False):
        return {"trial_id": name, "settings": {}, "history": history, "nrmse": history[-1], "error": None,
                "stopped_early": stopped, "reference": reference, "seconds_per_slice": seconds}

    protocol = trial("protocol", [0.200, 0.200], 10.0, reference=True)
    quick = trial("quick", [0.201, 0.203], 0.5)     # within 1 % after the first batch, 1.5 % after both
    fair = trial("fair", [0.201, 0.201], 2.0)
    slow_bad = trial("slow-bad", [0.3, 0.3], 20.0)
    stopped = trial("stopped", [0.19], 0.1, stopped=True)
    trials = [protocol, quick, fair, slow_bad, stopped]
    assert [t["trial_id"] for t in pareto_front(trials, space, "seconds_per_slice")] == ["quick", "fair", "protocol"]
    fastest, reference = fastest_within(trials, space, "seconds_per_slice", 0.01)
    assert (fastest["trial_id"], reference["trial_id"]) == ("fair", "protocol")
    assert fastest_within(trials, space, "seconds_per_slice", 0.02)[0]["trial_id"] == "quick"
    # A reference ASHA stopped after one batch: every trial compared on that batch.
    protocol.update(history=[0.200], stopped_early=True)
    assert fastest_within(trials, space, "seconds_per_slice", 0.01)[0]["trial_id"] == "quick"
    assert fastest_within([quick, fair], space, "seconds_per_slice", 0.01) == (None, None)


@pytest.mark.slow
def test_killed_search_resumes_and_accounts_for_every_trial(
    ray_session, tiny_prepared: str, ambient_model: Path, space_file: Path, tmp_path: Path
) -> None:
    """`adps tune` in a subprocess (a second driver on the session's Ray), killed with SIGKILL
    once a trial has finished and been recorded; the same search run again restores it."""
    storage_path = tmp_path / "tune"
    sets = {"dataset": tiny_prepared, "slices": 2, "slices_per_report": 1, "num_samples": 4, "max_concurrent": 1,
            "seed": 2, "storage_path": str(storage_path), "name": "resume", "experiment": "tune-resume"}
    command = [sys.executable, "-m", "adps", "tune", "--model", str(ambient_model), "--r-inf", "4",
               "--space", str(space_file), "--address", ray_session.get_runtime_context().gcs_address]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TUNE_GLOBAL_CHECKPOINT_S": "0", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            states = list((storage_path / "resume").glob("experiment_state*.json"))
            finished = "trial" in log_path.read_text() and "finished" in log_path.read_text()
            # Killed once the finished trial *and* Tune's search state are recorded: a kill while
            # Tune copies that state leaves it cut short, and Tune then starts the search over
            # (tune_search warns; test_truncated_search_state_is_detected).
            recorded = finished and any("TERMINATED" in s.read_text() for s in states)
            if recorded and list((storage_path / "resume").glob("search_gen_state-*.json")) \
                    and not truncated_search_state(str(storage_path / "resume")):
                break
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    finally:
        process.kill()
        stop_process_group(process)
    assert "adps tune: best" not in log_path.read_text()  # it did not finish on its own

    config = SearchConfig.from_dict({**sets, "model": str(ambient_model), "r_inf": 4, "space": str(space_file)})
    result = tune_search(config, progress=False)
    assert result["resumed"]
    trials = result["trials"]
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4
    assert not any(t["error"] for t in trials)
    assert all(t["reports"] >= 1 for t in trials)
    assert json.loads((storage_path / "resume" / "best.json").read_text())["trials"] == 4
    assert result["version"] is None  # a folder model: no registry tags


def test_truncated_search_state_is_detected(tmp_path: Path) -> None:
    """An empty or cut-short search-state pickle (a kill during Tune's copy) is found without
    unpickling it; a complete one is not."""
    import pickle

    complete = pickle.dumps({"counter": 3})
    (tmp_path / "search_gen_state-2026-01-01_00-00-00.json").write_bytes(complete)
    (tmp_path / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(complete)
    assert truncated_search_state(str(tmp_path)) == []
    (tmp_path / "search_gen_state-2026-01-01_00-00-09.json").write_bytes(b"")
    (tmp_path / "searcher-state-2026-01-01_00-00-09.pkl").write_bytes(complete[:-5])
    assert [Path(p).name for p in truncated_search_state(str(tmp_path))] == [
        "search_gen_state-2026-01-01_00-00-09.json", "searcher-state-2026-01-01_00-00-09.pkl"]
    assert truncated_search_state("s3://bucket/tune") == []


# Natural-image models (paper section 3.1) ---------------------------------------------------
IMAGE_TEST_SPACE = """# test space: tiny step counts
sampler: image_dps
objective: {metric: mse, mode: min}
params:
  guidance: {type: loguniform, low: 0.1, high: 10.0}
  steps: {type: choice, values: [2, 4]}
"""


def test_image_space_file_and_image_config_checks(tmp_path: Path) -> None:
    space = load_space(REPO / "tune_spaces" / "image_dps.yaml")
    assert (space.family, space.sampler, space.metric, space.mode) == ("image_dps", "image", "mse", "min")
    assert space.params["steps"]["values"] == [50, 100, 150, 200, 250, 300]
    assert space.params["guidance"] == {"type": "loguniform", "low": 0.1, "high": 10.0}
    assert space.metrics == ("mse", "psnr")
    assert parse_space({"sampler": "image_dps", "objective": {"metric": "psnr"},
                        "params": {"steps": {"type": "choice", "values": [2]}}}).mode == "max"
    with pytest.raises(ValueError, match=r"'objective.metric': 'nrmse' is not one of mse, psnr"):
        parse_space({"sampler": "image_dps", "objective": {"metric": "nrmse"},
                     "params": {"steps": {"type": "choice", "values": [2]}}})
    with pytest.raises(ValueError, match=r"unknown key 'params.churn'"):
        parse_space({"sampler": "image_dps", "params": {"churn": {"type": "uniform", "low": 0, "high": 1}}})
    base = {"model": "m", "space": "s", "dataset": "d"}
    assert SearchConfig(**base, task="cs", measurements=100).image_setting == "cs_m100"
    assert SearchConfig(**base, task="sr", factor=4).image_setting == "sr_x4"
    for values, message in [
        ({"task": "inpaint"}, r"'task' must be one of cs, sr"),
        ({"task": "cs"}, r"'measurements' must be >= 1 for task 'cs'"),
        ({"task": "sr", "factor": 2, "measurements": 10}, r"'measurements' does not apply to task 'sr'"),
        ({"task": "cs", "measurements": 10, "r_inf": 4}, r"'r_inf' is for an MRI search"),
        ({"task": "cs", "measurements": 10, "noise": -1.0}, r"'noise' must be a finite number >= 0"),
        ({"task": "sr", "factor": 3, "resolution": 16}, r"'resolution': 16 is not a multiple of factor 3"),
        ({"r_inf": 4, "measurements": 10}, r"'measurements' is for a natural-image search"),
        ({}, r"'r_inf' must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            SearchConfig(**base, **values).validate()


@pytest.fixture(scope="module")
def image_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ambient image model folder (untrained, p = 0.6, 16 x 16) and 2 synthetic images."""
    from adps.images import write_image_folder
    from adps.nn.checkpoint import save_model
    from adps.nn.image_diffusion import build_image_model

    folder = tmp_path_factory.mktemp("image-tune")
    torch.manual_seed(0)
    model = save_model(folder / "model", build_image_model("tiny", ambient=True),
                       {"method": "image", "erasure_p": 0.6, "delta": 0.1, "resolution": 16, "preset": "tiny"})
    write_image_folder(folder / "images", 2, resolution=16, seed=5)
    return {"model": model, "images": folder / "images"}


@pytest.mark.slow
def test_image_search_reports_mse_picks_the_best_and_tags_the_version(
    ray_session, image_setup: dict[str, Path], tmp_path: Path
) -> None:
    """An A-DPS search on compressed sensing through real Ray Tune with a local model folder:
    3 trials, one image per report; every trial reports the running MSE; the best becomes
    best.json and, for a registered version, its tags (the task's, read by the image
    evaluation, and the setting's)."""
    from mlflow import MlflowClient

    from adps.orchestration.registry import register_model, tag_tuned_settings
    from adps.orchestration.tracking import resolve_tracking_uri

    space = tmp_path / "image_space.yaml"
    space.write_text(IMAGE_TEST_SPACE)
    # A mismatched space or a missing task is refused before Ray runs anything.
    mri_space = tmp_path / "adps.yaml"
    mri_space.write_text(TEST_SPACE)
    common = {"model": str(image_setup["model"]), "dataset": str(image_setup["images"]), "slices": 2,
              "slices_per_report": 1, "seed": 1, "storage_path": str(tmp_path / "tune"),
              "experiment": "tune-image-test"}
    with pytest.raises(ValueError, match=r"adps.yaml: key 'sampler': 'adps' \(a_dps\) is an MRI sampler; .*image_dps"):
        tune_search(SearchConfig(space=str(mri_space), task="cs", measurements=192, **common), progress=False)
    with pytest.raises(ValueError, match=r"config key 'task' is empty: .* is a natural-image model"):
        tune_search(SearchConfig(space=str(space), r_inf=4, **common), progress=False)

    config = SearchConfig(space=str(space), task="cs", measurements=192, noise=0.01, num_samples=3,
                          max_concurrent=1, grace_period=2, name="image-search", **common)
    started = time.perf_counter()
    result = tune_search(config, progress=False)
    elapsed = time.perf_counter() - started
    assert elapsed < 120, elapsed  # measured: 21 s on 2 idle cores
    trials = result["trials"]
    assert len(trials) == 3 and not any(t["error"] for t in trials), trials
    assert all(t["settings"]["steps"] in (2, 4) and 0.1 <= t["settings"]["guidance"] <= 10 for t in trials)
    assert all(t["reports"] == 2 and len(t["history"]) == 2 and t["mse"] > 0 and "psnr" in t for t in trials)
    best = result["best"]
    assert best["metric"] == "mse" and best["value"] == min(t["mse"] for t in trials)
    assert (best["task"], best["setting"], best["measurements"], best["r_inf"]) == ("cs", "cs_m192", 192, None)
    assert json.loads((Path(result["path"]) / "best.json").read_text()) == best
    assert Path(result["path"]).name == "image-search" and result["version"] is None  # a folder: no tags

    uri = resolve_tracking_uri()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tune-image-test")
    parent = client.get_run(result["run_id"])
    assert parent.data.tags["adps.task"] == "cs_m192" and parent.data.tags["adps.model_label"] == "image_p0.6"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{result['run_id']}'")
    assert len(children) == 3 and all({"mse", "psnr"} <= set(c.data.metrics) for c in children)

    # The tags a search of a registered version leaves (what tune_search does for models:/ URIs).
    run = client.create_run(client.create_experiment("tune-image-register", (tmp_path / "artifacts").as_uri()))
    version = register_model(image_setup["model"], tracking_uri=uri, run_id=run.info.run_id,
                             name="adps-tuneimage-p0.6")
    tag_tuned_settings(config.replace(model="models:/adps-tuneimage-p0.6@latest", tracking_uri=uri), best,
                 result["run_id"])
    tags = client.get_model_version("adps-tuneimage-p0.6", version.version).tags
    for task in ("cs", "cs_m192"):
        assert int(tags[f"adps.tuned.{task}.steps"]) == best["settings"]["steps"]
        assert float(tags[f"adps.tuned.{task}.guidance"]) == pytest.approx(best["settings"]["guidance"])
        assert tags[f"adps.tuned.{task}.run_id"] == result["run_id"]
    assert not any(tag.startswith("adps.tuned.r") for tag in tags)  # no MRI R_inf tags

"""Data preparation end to end on synthetic FastMRI volumes: ``adps prepare`` on Ray.

Small sizes (8 coils, 96 x 64 reconstruction, 3 slices per volume) so that the whole file runs
in about a minute on 2 cores, on one shared Ray instance (``ray_session`` in conftest.py) and a
real moto S3 server. The raw volumes are written here from in-memory synthetic volumes, so their
ground truth (images, coil maps, noise covariance) is at hand for the checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from adps.cli import main as adps_main
from adps.config import parse_overrides
from adps.data import preprocess as preprocess_module
from adps.data import storage
from adps.data.dataset import PreparedSliceDataset
from adps.data.fastmri import open_volume
from adps.data.preprocess import (
    PrepareConfig,
    mask_key,
    preprocess_slice,
    slice_id,
    volume_id,
)
from adps.data.shards import MANIFEST_NAME, PROGRESS_NAME, SCHEMA_VERSION, slice_checksum
from adps.data.synth import central_rows, synthetic_volume, volume_name, write_volume
from adps.mri import background_patch, ifft2c, noise_covariance, slice_masks
from adps.orchestration import prepare as prepare_module
from adps.orchestration.prepare import VolumePlan, plan_volumes, prepare_dataset, prepare_volume

HEIGHT, WIDTH, COILS = 96, 64, 8
SLICES, TAKEN = 4, 3  # slices per raw volume, centre slices taken from each
CENTRE = [1, 2, 3]
NOISE_STD = 0.005
GOOD_VOLUMES = 5


def small_config(source: str, output: str, **overrides: object) -> PrepareConfig:
    values = {
        "source": source,
        "output": output,
        "n_volumes": 50,
        "slices_per_volume": TAKEN,
        "test_volumes": 1,
        "val_volumes": 1,
        "crop": (HEIGHT, WIDTH),
        # The corner patch must miss the phantom, which fills ~80 % of this small field of view.
        "noise_patch": 16,
        "accelerations": (2, 4),
        "acs": 8,
        "shard_size": 4,
        "seed": 7,
    }
    values.update(overrides)
    return PrepareConfig.from_dict(values)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A source folder: 5 good AXT2 volumes, one T1 volume (filtered out), and three bad files."""
    folder = tmp_path_factory.mktemp("raw")
    volumes = {}
    for i in range(GOOD_VOLUMES):
        volume = synthetic_volume(100 + i, n_slices=SLICES, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=NOISE_STD)
        path = folder / volume_name(i, "AXT2")
        write_volume(path, volume, acquisition="AXT2", patient_id=f"patient-{i}")
        volumes[path.name.removesuffix(".h5")] = volume
    other = synthetic_volume(200, n_slices=SLICES, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=NOISE_STD)
    write_volume(folder / volume_name(5, "AXT1"), other, acquisition="AXT1", patient_id="patient-t1")
    # Bad files: not HDF5 at all; truncated; valid schema but NaN k-space in a centre slice.
    (folder / "file_brain_AXT2_garbage.h5").write_bytes(b"this is not an HDF5 file")
    good_bytes = (folder / volume_name(0, "AXT2")).read_bytes()
    (folder / "file_brain_AXT2_truncated.h5").write_bytes(good_bytes[: len(good_bytes) // 2])
    broken = synthetic_volume(300, n_slices=SLICES, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=NOISE_STD)
    kspace = broken.kspace.copy()
    kspace[1, :, 10, 10] = np.nan
    broken = type(broken)(image=broken.image, maps=broken.maps, kspace=kspace,
                          noise_covariance=broken.noise_covariance, seed=broken.seed)
    write_volume(folder / "file_brain_AXT2_nan.h5", broken, acquisition="AXT2", patient_id="patient-nan")
    return {"folder": folder, "volumes": volumes}


@pytest.fixture(scope="module")
def prepared(raw, ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    output = tmp_path_factory.mktemp("prepared") / "axt2"
    config = small_config(str(raw["folder"]), str(output))
    manifest = prepare_dataset(config, progress=False)
    return {"config": config, "manifest": manifest, "output": output}


def read_shard(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        arrays = {}
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return arrays


def slice_arrays(shard: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    return {key: value[row] for key, value in shard.items() if key != "slice_id"}


def file_states(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
    }


def all_slices(manifest: dict) -> list[dict]:
    return [s for split in ("train", "val", "test") for s in manifest["splits"][split]["slices"]]


# Config ------------------------------------------------------------------------------------------


def test_config_defaults_are_methods_values() -> None:
    config = PrepareConfig()
    assert (config.acquisition, config.n_volumes, config.slices_per_volume) == ("AXT2", 2000, 5)
    assert config.crop == (384, 320) and config.noise_patch == 30 and config.virtual_coils == 4
    assert config.calib_width == 24 and config.norm_percentile == 99.0 and config.reference_iterations == 30
    assert config.accelerations == (2, 4, 6, 8) and config.acs == 20 and config.test_volumes == 20
    assert (config.l1, config.l1_lam, config.l1_iterations, config.mvue) == (False, 0.001, 100, False)
    assert config.shard_size == 64 and config.cpus_per_task == 1


def test_config_loading_coerces_and_refuses_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "prepare.yaml"
    path.write_text("source: /data/raw\noutput: s3://bucket/prepared\naccelerations: [4, 8]\ncrop: [64, 48]\n")
    overrides = parse_overrides(["l1=true", "n_volumes=100", "accelerations=2,4", "cpus_per_task=0.5"])
    config = PrepareConfig.from_yaml(path, overrides)
    assert config.accelerations == (2, 4) and config.crop == (64, 48) and config.l1 is True
    assert config.n_volumes == 100 and config.cpus_per_task == 0.5 and config.output == "s3://bucket/prepared"
    assert PrepareConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown config key 'slices'"):
        PrepareConfig.from_dict({"slices": 5})
    with pytest.raises(ValueError, match="'n_volumes': expected an integer"):
        PrepareConfig.from_dict({"n_volumes": "many"})
    with pytest.raises(ValueError, match="'crop': expected 2 values"):
        PrepareConfig.from_dict({"crop": [1, 2, 3]})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["n_volumes"])
    with pytest.raises(ValueError, match="fewer than the 20 ACS columns"):
        PrepareConfig(source="a", output="b", crop=(64, 48)).validate()
    with pytest.raises(ValueError, match="'source' is required"):
        PrepareConfig().validate()


def test_slice_ids_are_stable_and_order_free() -> None:
    first = slice_id("file_brain_AXT2_200_2000001", 7)
    assert first == slice_id("file_brain_AXT2_200_2000001", 7)
    assert 0 <= first < 2**63
    assert len({slice_id(f"v{v}", s) for v in range(50) for s in range(10)}) == 500


def test_bad_kspace_is_refused_naming_the_slice() -> None:
    config = small_config("a", "b")
    good = synthetic_volume(1, n_slices=1, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=NOISE_STD).kspace[0]
    bad = good.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="vol7 slice 3: k-space holds 1 NaN or Inf"):
        preprocess_slice(bad, split="train", slice_id=1, config=config, label="vol7 slice 3")
    with pytest.raises(ValueError, match="slice 9: k-space is all zero"):
        preprocess_slice(np.zeros_like(good), split="train", slice_id=9, config=config)
    with pytest.raises(ValueError, match="smaller than the crop"):
        preprocess_slice(good[:, :40], split="test", slice_id=1, config=config)


def test_unusable_espirit_maps_reject_the_volume_naming_the_slice(raw, monkeypatch) -> None:
    """ESPIRiT gives NaN maps where its calibration is degenerate; all-zero maps are caught too.

    Real k-space that leads there is refused earlier (all-zero k-space, an empty k-space
    centre), so ESPIRiT's output is replaced here.
    """
    config = small_config("a", "b")
    good = synthetic_volume(1, n_slices=1, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=NOISE_STD).kspace[0]
    monkeypatch.setattr(preprocess_module, "espirit_maps", lambda kspace, **_: torch.zeros_like(kspace))
    with pytest.raises(ValueError, match="slice 9: ESPIRiT coil maps are all zero"):
        preprocess_slice(good, split="train", slice_id=9, config=config)

    # In a prepare run the volume is rejected with that reason, like bad k-space.
    source = str(raw["folder"] / volume_name(0, "AXT2"))
    plan = VolumePlan(source=source, volume_id=volume_id(source), patient_id="p", split="train",
                      slice_indices=(2,), num_coils=COILS)
    summary, payload = prepare_volume(plan, config.virtual_coils, config)
    assert payload is None and not summary["ok"]
    assert summary["reason"] == f"{source} slice 2: ESPIRiT coil maps are all zero (degenerate calibration region)"

    monkeypatch.setattr(preprocess_module, "espirit_maps", lambda kspace, **_: torch.full_like(kspace, torch.nan))
    with pytest.raises(ValueError, match=rf"slice 9: ESPIRiT coil maps hold {4 * HEIGHT * WIDTH} NaN or Inf values"):
        preprocess_slice(good, split="train", slice_id=9, config=config)


def test_whitening_recovers_the_known_noise_covariance() -> None:
    """A 24 x 24 background patch of a 128 x 96 slice: 576 samples for 8 coils."""
    volume = synthetic_volume(5, n_slices=1, n_coils=COILS, height=128, width=96, noise_std=0.01)
    config = PrepareConfig(source="a", output="b", crop=(128, 96), noise_patch=24, accelerations=(2,))
    prepared = preprocess_slice(volume.kspace[0], split="test", slice_id=1, config=config)
    truth = volume.noise_covariance
    estimate = prepared["noise_covariance"]
    # Sampling error of a covariance from N samples: about sqrt(C / N) = 0.12 relative.
    assert np.linalg.norm(estimate - truth) / np.linalg.norm(truth) < 0.25
    assert float(prepared["noise_std"]) == pytest.approx(np.sqrt(np.trace(truth).real / COILS), rel=0.1)
    # The prepared k-space's noise, measured in another corner, is white with variance 1 / c^2.
    c = float(prepared["normalization"])
    white = noise_covariance(background_patch(ifft2c(torch.from_numpy(prepared["kspace"])), 24, "bottom-right"))
    assert np.abs(white.numpy() * c**2 - np.eye(COILS)).max() < 0.3  # entries within ~3 / 24


# End to end --------------------------------------------------------------------------------------


def test_prepare_writes_manifest_and_shards(prepared, raw) -> None:
    manifest, output, config = prepared["manifest"], prepared["output"], prepared["config"]
    assert (output / MANIFEST_NAME).is_file()
    assert json.loads((output / MANIFEST_NAME).read_text()) == manifest
    assert manifest["schema_version"] == SCHEMA_VERSION == 2 and manifest["config"] == config.to_dict()
    assert manifest["source"]["listed"] == 9 and manifest["source"]["matching_acquisition"] == 6  # the NaN volume is rejected later

    # Every good slice is present exactly once; the T1 volume is skipped, not rejected.
    present = sorted((s["volume_id"], s["slice_index"]) for s in all_slices(manifest))
    assert present == sorted((v, i) for v in raw["volumes"] for i in CENTRE)
    rejected = {Path(r["source"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {"file_brain_AXT2_garbage.h5", "file_brain_AXT2_truncated.h5", "file_brain_AXT2_nan.h5"}
    assert "not an HDF5 file" in rejected["file_brain_AXT2_garbage.h5"]
    assert "NaN or Inf" in rejected["file_brain_AXT2_nan.h5"] and "slice 1" in rejected["file_brain_AXT2_nan.h5"]

    # No patient in two splits; training is compressed, validation and test keep all coils.
    patients = {split: {v["patient_id"] for v in manifest["splits"][split]["volumes"]} for split in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    assert len(patients["test"]) == 1 and len(patients["val"]) == 1

    for split in ("train", "val", "test"):
        entry = manifest["splits"][split]
        coils = config.virtual_coils if split == "train" else COILS
        assert entry["coils"] == coils
        names = [s["name"] for s in entry["shards"]]
        assert names == [f"{split}-{i:05d}.h5" for i in range(len(names))]
        assert sum(s["n_slices"] for s in entry["shards"]) == entry["n_slices"] == len(entry["slices"])
        for info in entry["shards"]:
            path = output / info["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
            assert 1 <= info["n_slices"] <= config.shard_size
            n = info["n_slices"]
            with h5py.File(path, "r") as f:
                assert f["kspace"].shape == (n, coils, HEIGHT, WIDTH) and f["kspace"].dtype == np.complex64
                assert f["maps"].shape == (n, coils, HEIGHT, WIDTH) and f["maps"].dtype == np.complex64
                assert f["reference"].shape == (n, HEIGHT, WIDTH) and f["reference"].dtype == np.complex64
                for r in config.accelerations:
                    for group in ("mask", "mask_further"):
                        assert f[f"{group}/{mask_key(r)}"].shape == (n, WIDTH)
                        assert f[f"{group}/{mask_key(r)}"].dtype == np.bool_
                assert f["kspace"].chunks == (1, coils, HEIGHT, WIDTH)
                assert f["reference"].chunks == (1, HEIGHT, WIDTH)
                assert "l1" not in f and "mvue" not in f
        # Each slice's checksum matches its arrays in its shard.
        shards = {name: read_shard(output / name) for name in names}
        for s in entry["slices"]:
            shard = shards[s["shard"]]
            assert int(shard["slice_id"][s["row"]]) == s["slice_id"]
            assert slice_checksum(slice_arrays(shard, s["row"])) == s["sha256"]
            assert s["normalization"] > 0 and s["noise_std"] > 0
    assert not list(output.glob("*.tmp-*"))


def test_masks_in_shards_match_a_recomputation(prepared) -> None:
    manifest, output, config = prepared["manifest"], prepared["output"], prepared["config"]
    for s in all_slices(manifest):
        assert s["slice_id"] == slice_id(s["volume_id"], s["slice_index"])
        with h5py.File(output / s["shard"], "r") as f:
            for r in config.accelerations:
                mask, further = slice_masks(WIDTH, r, seed=config.seed, slice_id=s["slice_id"], acs=config.acs)
                np.testing.assert_array_equal(f[f"mask/{mask_key(r)}"][s["row"]], mask.numpy())
                np.testing.assert_array_equal(f[f"mask_further/{mask_key(r)}"][s["row"]], further.numpy())
                assert f[f"mask/{mask_key(r)}"][s["row"]].sum() == WIDTH // r
                assert f[f"mask_further/{mask_key(r)}"][s["row"]].sum() == WIDTH // (r + 1)


def test_reference_is_close_to_the_ground_truth(prepared, raw) -> None:
    """|reference| = |x| ||L^-1 S|| / c: whitening rescales each pixel by the whitened coil gain.

    Compared as magnitudes (ESPIRiT maps fix the phase only up to a smooth factor) after a
    least-squares scale, which must itself be close to 1 / c (the recorded normalisation).
    """
    manifest, output = prepared["manifest"], prepared["output"]
    for s in all_slices(manifest):
        volume = raw["volumes"][s["volume_id"]]
        chol_inv = np.linalg.inv(np.linalg.cholesky(volume.noise_covariance))
        maps = volume.maps[:, central_rows(volume.maps.shape[1], HEIGHT)]
        gain = np.sqrt((np.abs(np.tensordot(chol_inv, maps, axes=(1, 0))) ** 2).sum(axis=0))
        expected = np.abs(volume.image[s["slice_index"]]) * gain
        with h5py.File(output / s["shard"], "r") as f:
            reference = np.abs(f["reference"][s["row"]])
        scale = float((reference * expected).sum() / (expected**2).sum())
        nrmse = np.linalg.norm(reference - scale * expected) / np.linalg.norm(scale * expected)
        assert nrmse < 0.1, (s["volume_id"], s["slice_index"], nrmse)
        assert scale * s["normalization"] == pytest.approx(1.0, abs=0.1)


def test_whitened_shards_have_white_noise(prepared) -> None:
    """In the shards (test split: all coils), the background noise has covariance I / c^2."""
    manifest, output = prepared["manifest"], prepared["output"]
    for s in manifest["splits"]["test"]["slices"] + manifest["splits"]["train"]["slices"][:2]:
        with h5py.File(output / s["shard"], "r") as f:
            kspace = torch.from_numpy(f["kspace"][s["row"]][: s["coils"]])
        covariance = noise_covariance(background_patch(ifft2c(kspace), 16, "bottom-right")).numpy()
        deviation = np.abs(covariance * s["normalization"] ** 2 - np.eye(s["coils"])).max()
        assert deviation < 0.4, (s["volume_id"], deviation)  # 256 samples: entries within ~3/16


def test_plan_splits_by_patient() -> None:
    """Volumes of one patient land in one split; the draw is seeded and listing-order free."""
    records = [
        {"source": f"/raw/vol{i:02d}.h5", "ok": True, "acquisition": "AXT2", "patient_id": f"p{i // 3}",
         "num_slices": 16, "num_coils": 8 + i % 4, "slice_indices": [6, 7, 8, 9, 10]}
        for i in range(30)
    ]
    config = small_config("/raw", "/out", n_volumes=20, test_volumes=4, val_volumes=3)
    plan = plan_volumes(config, records)
    assert plan == plan_volumes(config, list(reversed(records)))
    # The paper's split: n_volumes training scans, test and validation from other scans.
    assert len(plan.volumes["train"]) == 20 and plan.source_summary["drawn"] == 20 + 6 + 3
    owners: dict[str, str] = {}
    for split, volumes in plan.volumes.items():
        for volume in volumes:
            assert owners.setdefault(volume.patient_id, split) == split
    assert len(plan.volumes["test"]) == 6 and len(plan.volumes["val"]) == 3  # whole patients of 3 volumes
    assert plan.coils["test"] == max(v.num_coils for v in plan.volumes["test"])
    assert plan.coils["val"] == max(v.num_coils for v in plan.volumes["val"]) and plan.coils["train"] == config.virtual_coils
    assert plan_volumes(config.replace(seed=8), records) != plan
    # The older way, configurable: test and validation taken out of the n_volumes drawn.
    within = plan_volumes(config.replace(held_out_within_draw=True), records)
    held_out = len(within.volumes["test"]) + len(within.volumes["val"])
    assert sum(len(v) for v in within.volumes.values()) == 20 and held_out >= 7
    assert len(within.volumes["train"]) == 20 - held_out


def test_prepare_volume_pads_coils_and_rejects_bad_files(raw) -> None:
    """The per-volume task body, without Ray: padding of the test split, timings, rejection."""
    source = str(raw["folder"] / volume_name(0, "AXT2"))
    plan = VolumePlan(source=source, volume_id=volume_id(source), patient_id="p", split="test",
                      slice_indices=(2,), num_coils=COILS)
    summary, payload = prepare_volume(plan, COILS + 2, small_config("a", "b"))
    assert summary["ok"] and summary["n_slices"] == 1
    assert {"reading", "whitening", "espirit", "reference"} <= set(summary["timings"])
    arrays, meta = payload[0]["arrays"], payload[0]["meta"]
    assert arrays["kspace"].shape == (COILS + 2, HEIGHT, WIDTH) and arrays["maps"].shape == (COILS + 2, HEIGHT, WIDTH)
    assert not arrays["kspace"][COILS:].any() and not arrays["maps"][COILS:].any()
    assert meta["coils"] == COILS and meta["slice_id"] == slice_id(volume_id(source), 2)
    assert meta["sha256"] == slice_checksum(arrays)

    garbage = str(raw["folder"] / "file_brain_AXT2_garbage.h5")
    summary, payload = prepare_volume(
        VolumePlan(source=garbage, volume_id="g", patient_id="g", split="train", slice_indices=(0,), num_coils=8),
        4, small_config("a", "b"),
    )
    assert payload is None and not summary["ok"] and "not an HDF5 file" in summary["reason"]


# Resume, idempotence, refusal ---------------------------------------------------------------------


def test_interrupted_job_resumes_to_identical_files(prepared, raw, tmp_path, monkeypatch, caplog) -> None:
    reference_dir = prepared["output"]
    output = tmp_path / "axt2"
    config = prepared["config"].replace(output=str(output))

    # 1. Interrupt after two shards: the driver dies while writing the third.
    real_write = prepare_module.write_shard
    calls = {"n": 0}

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(config, progress=False)
    monkeypatch.setattr(prepare_module, "write_shard", real_write)
    assert (output / PROGRESS_NAME).is_file() and not (output / MANIFEST_NAME).exists()
    assert len(list(output.glob("*.h5"))) == 2 and not list(output.glob("*.tmp-*"))

    # 2. Resume: the result equals an uninterrupted run's, byte for byte.
    with caplog.at_level(logging.INFO, logger="adps.prepare"):
        manifest = prepare_dataset(config, progress=False)
    assert "2 shard(s) verify" in caplog.text
    expected = {p.name: p.read_bytes() for p in reference_dir.glob("*.h5")}
    assert {p.name: p.read_bytes() for p in output.glob("*.h5")} == expected
    assert manifest == {**prepared["manifest"], "config": config.to_dict()}

    # 3. Lose a shard and the manifest, corrupt another: only those are rewritten.
    names = sorted(expected)
    lost, corrupt = names[0], names[-1]
    (output / lost).unlink()
    (output / MANIFEST_NAME).unlink()
    data = bytearray((output / corrupt).read_bytes())
    data[-100] ^= 0xFF
    (output / corrupt).write_bytes(bytes(data))
    (output / "train-00007.h5.tmp-0123abcd").write_bytes(b"left by a killed run")
    before = file_states(output)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adps.prepare"):
        assert prepare_dataset(config, progress=False) == manifest
    assert "volume(s) already in verified shards are skipped" in caplog.text
    after = file_states(output)
    assert {p.name: p.read_bytes() for p in output.glob("*.h5")} == expected
    assert json.loads((output / MANIFEST_NAME).read_text()) == manifest
    untouched = [n for n in names if n not in (lost, corrupt)]
    assert all(after[n] == before[n] for n in untouched)
    assert "train-00007.h5.tmp-0123abcd" not in after

    # 4. A second run changes nothing: same bytes, same modification times.
    assert prepare_dataset(config, progress=False) == manifest
    assert file_states(output) == after


def test_a_changed_config_is_refused(prepared) -> None:
    config = prepared["config"].replace(seed=8, accelerations=(2,))
    with pytest.raises(ValueError, match=r"different config \(accelerations: \[2, 4\] -> \[2\]; seed: 7 -> 8\)"):
        prepare_dataset(config, progress=False)
    # Execution settings may change: more CPUs per task does not change the bytes.
    assert prepare_dataset(prepared["config"].replace(cpus_per_task=2), progress=False) == prepared["manifest"]


def test_a_resume_refuses_a_manifest_naming_shards_outside_the_output(prepared, tmp_path) -> None:
    """Resuming hashes every recorded shard: a hostile manifest must not make it read elsewhere."""
    output = tmp_path / "axt2"
    output.mkdir()
    manifest = json.loads((prepared["output"] / MANIFEST_NAME).read_text())
    manifest["splits"]["val"]["shards"][0]["name"] = "/etc/passwd"
    (output / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=(
        rf"{output / MANIFEST_NAME}: split 'val' names the shard '/etc/passwd'; shard names must be plain file "
        r"names inside the dataset folder \(like 'val-00000\.h5'\)"
    )):
        prepare_dataset(prepared["config"].replace(output=str(output)), progress=False)
    assert sorted(p.name for p in output.iterdir()) == [MANIFEST_NAME]  # nothing written


def test_cli_prints_the_config_and_finds_nothing_to_do(prepared, tmp_path, capsys) -> None:
    config = prepared["config"]
    path = tmp_path / "prepare.yaml"
    path.write_text(config.to_yaml().replace("seed: 7", "seed: 3"))
    assert adps_main(["prepare", "--config", str(path), "--set", "seed=7", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and f"output: {config.output}" in out
    counts = ", ".join(f"{s} {prepared['manifest']['splits'][s]['n_slices']}" for s in ("train", "val", "test"))
    assert f"slices {counts}; 3 source file(s) rejected:" in out
    # Each rejected file with its reason, as the manifest holds them (not only a count).
    for entry in prepared["manifest"]["rejected"]:
        assert f"  {entry['source']}: {entry['reason']}" in out
    assert {Path(e["source"]).name for e in prepared["manifest"]["rejected"]} == {
        "file_brain_AXT2_garbage.h5", "file_brain_AXT2_truncated.h5", "file_brain_AXT2_nan.h5"}
    assert adps_main(["prepare", "--config", str(path), "--set", "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


# S3 ------------------------------------------------------------------------------------------------


def test_prepare_reads_and_writes_s3(prepared, raw, s3_server, tmp_path) -> None:
    client = storage.s3_client()
    client.create_bucket(Bucket="prepare-raw")
    client.create_bucket(Bucket="prepare-out")
    for path in sorted(raw["folder"].iterdir()):
        storage.upload_file_atomic(path, f"s3://prepare-raw/brain/{path.name}")
    config = prepared["config"].replace(source="s3://prepare-raw/brain", output="s3://prepare-out/axt2")
    manifest = prepare_dataset(config, progress=False)

    # The same shards, byte for byte, as the local run (shards hold no paths).
    local = prepared["manifest"]
    for split in ("train", "val", "test"):
        assert manifest["splits"][split]["shards"] == local["splits"][split]["shards"]
    assert {Path(r["source"]).name for r in manifest["rejected"]} == {Path(r["source"]).name for r in local["rejected"]}
    assert all(s["source"].startswith("s3://prepare-raw/brain/") for s in all_slices(manifest))
    assert storage.exists("s3://prepare-out/axt2/manifest.json")
    with open_volume("s3://prepare-raw/brain/" + volume_name(0, "AXT2")) as volume:
        assert volume.num_slices == SLICES

    # A second run verifies the S3 shards and writes nothing.
    keys = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket="prepare-out")["Contents"]}
    assert prepare_dataset(config, progress=False) == manifest
    again = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket="prepare-out")["Contents"]}
    assert again == keys

    # The dataset reads an S3 root through its local cache, with the same content as the local one.
    cache = tmp_path / "cache"
    remote = PreparedSliceDataset("s3://prepare-out/axt2", "train", acceleration=4, cache_dir=cache)
    local_ds = PreparedSliceDataset(prepared["output"], "train", acceleration=4)
    assert len(remote) == len(local_ds) > 0
    for key, value in remote[0].items():
        assert torch.equal(value, local_ds[0][key]), key
    assert sorted(p.name for p in cache.rglob("*.h5")) == sorted(s["name"] for s in manifest["splits"]["train"]["shards"])


def test_prepare_names_a_missing_source(ray_session, tmp_path) -> None:
    config = small_config(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        prepare_dataset(config, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .h5 files found"):
        prepare_dataset(config.replace(source=str(empty)), progress=False)
    assert not (tmp_path / "out").exists()  # nothing written before the source is known to be usable

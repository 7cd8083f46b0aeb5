"""One complex-image convention for every split (schema version 2; docs/data_format.md).

The same raw slice, prepared as a training slice (coils compressed to virtual coils) and as a
test slice (every coil kept), must give the same *complex* reference, not only the same
magnitude: under schema version 1 they differed by a sign (sigpy's ESPIRiT phases the maps by
their first coil, which is another coil in each basis), and every complex-valued prior failed
on the test split while the magnitude metrics of the classical baselines saw nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adps.data.preprocess import PrepareConfig, preprocess_slice
from adps.data.shards import MANIFEST_NAME, SCHEMA_VERSION, read_manifest
from adps.data.synth import central_rows, synthetic_volume
from adps.mri import align_map_phase, apply_coil_matrix, principal_coil
from conftest import random_complex

HEIGHT, WIDTH = 64, 48


def _config(**changes: object) -> PrepareConfig:
    values = {"source": "unused", "output": "unused", "crop": (HEIGHT, WIDTH), "noise_patch": 8, "calib_width": 12,
              "accelerations": (4,), "acs": 4, "reference_iterations": 10}
    values.update(changes)
    return PrepareConfig.from_dict(values)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _unitary(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))
    return q


# ------------------------------------------------------------------------------ the coil tools


def test_align_map_phase_makes_the_combination_real_and_forgets_the_input_phase(generator) -> None:
    maps = random_complex(6, 10, 8, generator=generator)
    weights = random_complex(6, generator=generator)
    aligned = align_map_phase(maps, weights, coil_dim=0)
    combined = torch.einsum("c,chw->hw", weights.conj(), aligned)
    assert float(combined.imag.abs().max()) < 1e-5 and float(combined.real.min()) > 0
    torch.testing.assert_close(aligned.abs(), maps.abs())  # a phase per pixel, nothing else
    # Whatever phase per pixel the maps came with (ESPIRiT's is arbitrary), the result is the same.
    twisted = maps * torch.exp(1j * torch.rand(10, 8, generator=generator) * 6.3)[None]
    torch.testing.assert_close(align_map_phase(twisted, weights, coil_dim=0), aligned, atol=1e-5, rtol=0)
    # In another coil basis (maps V S, weights V w) it is the same rotation: V applied to the result.
    v = torch.from_numpy(_unitary(6, 1)).to(torch.complex64)
    rotated = align_map_phase(apply_coil_matrix(maps, v, coil_dim=0), v @ weights, coil_dim=0)
    torch.testing.assert_close(rotated, apply_coil_matrix(aligned, v, coil_dim=0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="weights"):
        align_map_phase(maps, weights[:3], coil_dim=0)


def test_principal_coil_is_a_property_of_the_scan_not_of_its_coil_basis(generator) -> None:
    images = random_complex(5, 12, 10, generator=generator) + 2.0  # a non-zero mean, as tissue has
    w = principal_coil(images, coil_dim=0)
    assert float(torch.linalg.vector_norm(w)) == pytest.approx(1.0, abs=1e-5)
    total = torch.einsum("c,chw->", w.conj(), images)
    assert abs(float(total.imag)) < 1e-3 * abs(float(total.real)) and float(total.real) > 0
    v = torch.from_numpy(_unitary(5, 2)).to(torch.complex64)
    torch.testing.assert_close(principal_coil(apply_coil_matrix(images, v, coil_dim=0), coil_dim=0), v @ w,
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ preparation


@pytest.mark.parametrize("coils", [4, 8])
def test_a_slice_prepared_for_training_and_for_testing_gives_the_same_complex_images(coils: int) -> None:
    """Compressed to 4 virtual coils (train, val) or with every coil (test): the same complex
    reference (measured: 2e-7 relative with 4 coils, 1.5e-4 with 8; schema version 1 gave 1.99,
    x against -x), and with L1 reconstructions and the MVUE the same as well."""
    volume = synthetic_volume(3, n_slices=2, n_coils=coils, height=HEIGHT, width=WIDTH, noise_std=0.005)
    config = _config(l1=True, l1_iterations=10, mvue=True)
    train = preprocess_slice(volume.kspace[1], split="train", slice_id=1, config=config)
    test = preprocess_slice(volume.kspace[1], split="test", slice_id=1, config=config)
    assert train["maps"].shape[0] == 4 and test["maps"].shape[0] == coils
    for key in ("reference", "l1/r4", "mvue"):
        assert _relative(train[key], test[key]) < 2e-3, key
        assert _relative(np.abs(train[key]), np.abs(test[key])) < 2e-3, key


def test_the_convention_ignores_the_order_and_phase_of_the_raw_coils() -> None:
    """A scanner that lists its coils in another order, or with other phases, or mixed by any
    unitary matrix, gives the same prepared complex reference: nothing depends on which coil is
    first. Its phase follows the ground truth's (mean offset measured: -0.04 rad) and its mean
    is real and positive."""
    volume = synthetic_volume(4, n_slices=2, n_coils=8, height=HEIGHT, width=WIDTH, noise_std=0.005)
    raw = volume.kspace[1]
    phases = np.exp(1j * np.random.default_rng(5).uniform(0, 2 * np.pi, 8))[:, None, None]
    reordered = (raw[::-1] * phases).astype(np.complex64)
    mixed = np.tensordot(_unitary(8, 6), raw, axes=(1, 0)).astype(np.complex64)
    config = _config()
    reference = preprocess_slice(raw, split="test", slice_id=1, config=config)["reference"]
    for other in (reordered, mixed):
        for split in ("test", "train"):
            assert _relative(preprocess_slice(other, split=split, slice_id=1, config=config)["reference"],
                             reference) < 2e-3
    truth = volume.image[1]
    tissue = np.abs(truth) > 0.2 * np.abs(truth).max()
    offset = np.angle(reference * truth.conj())[tissue]
    assert abs(float(np.mean(offset))) < 0.15 and float(np.std(offset)) < 0.2
    assert abs(float(np.angle(reference.sum()))) < 1e-3


# ------------------------------------------------------------------------------ older datasets


def _as_version_1(dataset: Path, tmp_path: Path) -> Path:
    """A copy of ``dataset`` whose manifest says schema version 1 (what adps before the fix wrote)."""
    import shutil

    old = tmp_path / "prepared-v1"
    shutil.copytree(dataset, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 1
    (old / MANIFEST_NAME).write_text(json.dumps(manifest, sort_keys=True))
    return old


def test_a_dataset_prepared_before_the_fix_is_refused_with_a_re_prepare_message(
    tiny_prepared: str, tmp_path: Path
) -> None:
    """Every study command (train, tune, evaluate, fid: all read the manifest) refuses a dataset
    of schema version 1, saying why and to re-prepare; so does a resumed ``adps prepare``."""
    from adps.data.dataset import PreparedSliceDataset

    assert SCHEMA_VERSION == 2 and read_manifest(tiny_prepared)["schema_version"] == 2
    old = _as_version_1(Path(tiny_prepared), tmp_path)
    for read in (lambda: read_manifest(str(old)), lambda: PreparedSliceDataset(str(old), "train", acceleration=2)):
        with pytest.raises(ValueError, match="schema version 1") as refused:
            read()
        assert "phase" in str(refused.value) and "Re-prepare" in str(refused.value)
        assert str(old / MANIFEST_NAME) in str(refused.value)
    from adps.orchestration.prepare import prepare_dataset

    with pytest.raises(ValueError, match="schema version 1.*Re-prepare.*or delete this folder"):
        prepare_dataset(PrepareConfig.from_dict({**read_manifest(tiny_prepared)["config"], "output": str(old)}),
                        progress=False)
    commands = [
        ["train", "--set", f"dataset={old}", "--set", "method=edm", "--set", "r_train=1", "--set", "preset=tiny"],
        ["evaluate", "--set", f"dataset={old}", "--set", "models=[l1]"],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "adps", *command], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 2, (command, result.stdout[-2000:], result.stderr[-2000:])
        assert "schema version 1" in result.stderr and "Re-prepare" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_synthetic_maps_fix_the_ground_truth_phase_up_to_the_whitening() -> None:
    """The prepared maps agree with the synthetic scanner's maps after whitening, up to the one
    phase per pixel that the convention chooses: |<S_prepared, L^-1 S_true>| / (|S_p| |L^-1 S|)
    is close to 1 inside the object (ESPIRiT recovers the maps; the convention only rotates)."""
    volume = synthetic_volume(6, n_slices=2, n_coils=4, height=HEIGHT, width=WIDTH, noise_std=0.005)
    prepared = preprocess_slice(volume.kspace[1], split="test", slice_id=1, config=_config())
    chol_inv = np.linalg.inv(np.linalg.cholesky(volume.noise_covariance))
    true_maps = np.tensordot(chol_inv, volume.maps[:, central_rows(volume.maps.shape[1], HEIGHT)], axes=(1, 0))
    inner = np.abs(np.sum(prepared["maps"].conj() * true_maps, axis=0))
    norms = np.linalg.norm(prepared["maps"], axis=0) * np.linalg.norm(true_maps, axis=0)
    tissue = np.abs(volume.image[1]) > 0.2 * np.abs(volume.image[1]).max()
    assert float(np.median((inner / norms)[tissue])) > 0.99


# ------------------------------------------------------------------------------ a trained prior


@pytest.fixture(scope="module")
def trained_prior(tiny_prepared: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny EDM prior trained on the training split (virtual coils) of ``tiny_prepared`` by
    the platform's worker loop, long enough to denoise (300 steps of 4 slices, about 25 s)."""
    from conftest import train_in_process

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_in_process(tiny_prepared, "edm", 1, tmp_path_factory.mktemp("prior"), batch_size=4,
                                max_steps=300, lr=1e-3, ema_half_life_images=120)
    finally:
        torch.set_num_threads(before)


def _test_batch(dataset: str, count: int = 4) -> dict[str, torch.Tensor]:
    from adps.data.dataset import PreparedSliceDataset

    data = PreparedSliceDataset(dataset, "test", acceleration=2)
    try:
        items = [data[i] for i in range(min(count, len(data)))]
    finally:
        data.close()
    return {key: torch.stack([item[key] for item in items]) for key in ("reference", "maps")}


def test_a_prior_trained_on_the_training_split_denoises_the_test_split(tiny_prepared: str, trained_prior: Path) -> None:
    """The prior learned the training split's complex images (2 virtual coils); on the test split
    (4 coils) its output is closer to the truth than its noisy input at every sigma. Shown the
    test images of the other sign (what schema version 1 gave it), it is not: the check that
    would have caught the defect."""
    from adps.nn.reconstruct import denoising_check
    from adps.orchestration.registry import load_model

    model = load_model(str(trained_prior))
    batch = _test_batch(tiny_prepared)
    assert read_manifest(tiny_prepared)["splits"]["test"]["coils"] > read_manifest(tiny_prepared)["splits"]["train"]["coils"]
    sigmas = (0.05, 0.1, 0.2, 0.5)
    found = denoising_check("edm", model, batch, sigmas=sigmas, generator=torch.Generator().manual_seed(0))
    for sigma in sigmas:
        assert float(found[sigma]["output"].mean()) < 0.8 * float(found[sigma]["input"].mean()), (sigma, found[sigma])
    flipped = denoising_check("edm", model, {**batch, "reference": -batch["reference"]}, sigmas=(0.05, 0.1),
                              generator=torch.Generator().manual_seed(0))
    for sigma, errors in flipped.items():
        assert float(errors["output"].mean()) > float(errors["input"].mean()), (sigma, errors)


def test_the_evaluation_check_flags_a_model_that_does_not_denoise(
    tiny_prepared: str, trained_prior: Path, tmp_path: Path
) -> None:
    """``check_denoisers`` (what ``adps evaluate`` runs before any sampler) passes the trained
    prior, and flags with a warning that names it a model whose output is
    no better than its input (a few steps at a learning rate 250 times too high); classical
    entries are not checked."""
    from adps.orchestration.denoising_check import check_denoisers, format_denoising_check
    from adps.orchestration.registry import load_model_entry
    from conftest import train_in_process

    # A few steps at a learning rate far too high: a broken model, whose output is worse than its input.
    untrained = train_in_process(tiny_prepared, "edm", 1, tmp_path, max_steps=3, batch_size=1, lr=0.05,
                                 ema_half_life_images=0.01)
    models = [(str(path), load_model_entry(str(path), "cpu")[1]) for path in (trained_prior, untrained)]
    models.append(("l1", load_model_entry("l1", "cpu")[1]))
    with pytest.warns(UserWarning, match="does not denoise the test slices") as caught:
        rows = check_denoisers(models, tiny_prepared, "test", slices=2, sigmas=(0.05, 0.1))
    assert len(caught) == 1 and str(untrained) in str(caught[0].message)
    assert [(r["model"], r["sigma"]) for r in rows] == [("edm_r1", 0.05), ("edm_r1", 0.1)] * 2
    assert [r["passed"] for r in rows] == [True, True, False, False]
    assert all(r["split"] == "test" and r["input_nrmse"] > 0 for r in rows)
    table = format_denoising_check(rows)
    assert "ok" in table and "FAILED" in table

"""FastMRI reading, local and S3 storage, and the synthetic FastMRI generator (``adps synth``).

Small sizes throughout (8 coils, 64 x 48 reconstruction) so that the file stays fast; the S3
tests run against a real moto server (the ``s3_server`` fixture of conftest.py).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from adps.cli import main as adps_main
from adps.data import storage
from adps.data.fastmri import FastMRIFormatError, list_volumes, open_volume, parse_ismrmrd_header
from adps.data.synth import (
    central_rows,
    ismrmrd_header_xml,
    rss_reconstruction,
    synthesize_dataset,
    synthetic_volume,
    write_volume,
)
from adps.mri.coils import noise_covariance
from adps.mri.fft import ifft2c

HEIGHT, WIDTH, COILS, SLICES = 64, 48, 8, 5


@pytest.fixture(scope="module")
def volume():
    return synthetic_volume(3, n_slices=SLICES, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=0.02)


@pytest.fixture(scope="module")
def volume_file(volume, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fastmri") / "file_brain_AXT2_synth_0000.h5"
    write_volume(path, volume, acquisition="AXT2", patient_id="patient-7")
    return path


def coil_images(kspace: np.ndarray) -> torch.Tensor:
    return ifft2c(torch.from_numpy(kspace))


# Synthetic volumes -----------------------------------------------------------------------------


def test_synthetic_volume_shapes_and_layout(volume) -> None:
    assert volume.image.shape == (SLICES, HEIGHT, WIDTH) and volume.image.dtype == np.complex64
    assert volume.maps.shape == (COILS, 2 * HEIGHT, WIDTH)
    assert volume.kspace.shape == (SLICES, COILS, 2 * HEIGHT, WIDTH) and volume.kspace.dtype == np.complex64
    assert volume.noise_covariance.shape == (COILS, COILS)
    assert (volume.height, volume.width, volume.oversampling) == (HEIGHT, WIDTH, 2)
    # Normalised maps, and a different phantom on every slice.
    np.testing.assert_allclose(np.sum(np.abs(volume.maps) ** 2, axis=0), 1.0, rtol=1e-5)
    assert not np.allclose(np.abs(volume.image[0]), np.abs(volume.image[1]))


def test_synthetic_volume_is_reproducible() -> None:
    kwargs = dict(n_slices=2, n_coils=4, height=32, width=24)
    a, b = synthetic_volume(5, **kwargs), synthetic_volume(5, **kwargs)
    np.testing.assert_array_equal(a.kspace, b.kspace)
    assert not np.array_equal(a.kspace, synthetic_volume(6, **kwargs).kspace)


def test_synthetic_volume_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_coils"):
        synthetic_volume(0, n_coils=0)
    with pytest.raises(ValueError, match="seed"):
        synthetic_volume(-1)
    with pytest.raises(ValueError, match="noise_std"):
        synthetic_volume(0, noise_std=-0.1, height=8, width=8, n_coils=2, n_slices=1)


def test_cropped_coil_images_combine_to_the_ground_truth() -> None:
    noiseless = synthetic_volume(1, n_slices=2, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=0.0)
    noisy = synthetic_volume(1, n_slices=2, n_coils=COILS, height=HEIGHT, width=WIDTH, noise_std=0.02)
    rows = central_rows(2 * HEIGHT, HEIGHT)
    maps = torch.from_numpy(noiseless.maps[:, rows])
    truth = torch.from_numpy(noiseless.image)
    for vol in (noiseless, noisy):
        combined = torch.sum(maps.conj() * coil_images(vol.kspace)[:, :, rows], dim=1)
        error = float(torch.linalg.norm(combined - truth) / torch.linalg.norm(truth))
        if vol is noiseless:
            assert error < 1e-5
        else:
            # Expected error energy: per pixel m^H Cov m (white noise of covariance Cov through
            # the combination m^H), summed over pixels and slices.
            cov = torch.from_numpy(vol.noise_covariance).to(torch.complex64)
            per_pixel = torch.einsum("chw,cd,dhw->hw", maps.conj(), cov, maps).real
            expected = float(torch.sqrt(2 * per_pixel.sum()) / torch.linalg.norm(truth))
            assert 0.8 * expected < error < 1.2 * expected, (error, expected)
            assert error < 0.1


def test_noise_has_the_known_covariance(volume) -> None:
    images = coil_images(volume.kspace)  # (S, C, 2H, W)
    rows = central_rows(2 * HEIGHT, HEIGHT)
    # The rows outside the reconstruction FOV hold no object: pure coil noise.
    background = torch.cat([images[:, :, : rows.start], images[:, :, rows.stop :]], dim=2)
    assert float(background.abs().max()) < 0.2  # no signal leaked into the empty rows
    estimate = noise_covariance(background, coil_dim=1).numpy()
    truth = volume.noise_covariance
    relative = np.linalg.norm(estimate - truth) / np.linalg.norm(truth)
    assert relative < 0.2, relative
    # The coupling is real, not just a diagonal.
    off_diagonal = truth - np.diag(np.diag(truth))
    assert np.linalg.norm(off_diagonal) > 0.1 * np.linalg.norm(truth)


# Reading ---------------------------------------------------------------------------------------


def test_round_trip(volume, volume_file) -> None:
    with open_volume(volume_file) as vol:
        assert vol.path == str(volume_file)
        assert vol.kspace_shape == (SLICES, COILS, 2 * HEIGHT, WIDTH)
        assert (vol.num_slices, vol.num_coils) == (SLICES, COILS)
        assert vol.encoded_size == (2 * HEIGHT, WIDTH)
        assert vol.recon_size == (HEIGHT, WIDTH)
        assert vol.encoding.phase_encode_center == WIDTH // 2
        assert vol.encoding.phase_encode_maximum == WIDTH - 1
        assert vol.acquisition == "AXT2"
        assert vol.patient_id == "patient-7"
        rss = rss_reconstruction(volume.kspace, HEIGHT)
        assert vol.attrs["max"] == pytest.approx(float(rss.max()))
        assert vol.attrs["norm"] == pytest.approx(float(np.linalg.norm(rss)))
        np.testing.assert_array_equal(vol.read_slices(range(SLICES)), volume.kspace)
        some = vol.read_slices([4, 0, 2, 0])
        assert some.dtype == np.complex64
        np.testing.assert_array_equal(some, volume.kspace[[4, 0, 2, 0]])
        np.testing.assert_array_equal(vol.read_slices(3), volume.kspace[[3]])
        assert vol.read_slices([]).shape == (0, COILS, 2 * HEIGHT, WIDTH)
        np.testing.assert_array_equal(vol.read_reconstruction_rss([1, 3]), rss[[1, 3]])
        with pytest.raises(IndexError, match=str(volume_file)):
            vol.read_slices([SLICES])


def test_reconstruction_rss_is_the_rss_of_the_cropped_coil_images(volume, volume_file) -> None:
    rows = central_rows(2 * HEIGHT, HEIGHT)
    expected = torch.sqrt(torch.sum(coil_images(volume.kspace)[:, :, rows].abs() ** 2, dim=1)).numpy()
    with open_volume(volume_file) as vol:
        np.testing.assert_allclose(vol.read_reconstruction_rss(range(SLICES)), expected, rtol=1e-5, atol=1e-6)


def write_raw(path: Path, *, kspace: np.ndarray | None, header: bytes | None, **attrs) -> Path:
    """A hand-made HDF5 file with exactly the given datasets (for schema tests)."""
    with h5py.File(path, "w") as f:
        if kspace is not None:
            f.create_dataset("kspace", data=kspace)
        if header is not None:
            f.create_dataset("ismrmrd_header", data=np.bytes_(header))
        for key, value in attrs.items():
            f.attrs[key] = value
    return path


def small_header(n_slices: int = 1) -> bytes:
    return ismrmrd_header_xml(encoded_size=(8, 6), recon_size=(4, 6), n_coils=2, n_slices=n_slices)


def small_kspace(n_slices: int) -> np.ndarray:
    return np.zeros((n_slices, 2, 8, 6), dtype=np.complex64)


@pytest.mark.parametrize(
    ("total", "n", "expected"),
    [(7, 3, [2, 3, 4]), (8, 2, [3, 4]), (8, 5, [2, 3, 4, 5, 6]), (7, 4, [1, 2, 3, 4]), (5, 5, [0, 1, 2, 3, 4]),
     (16, 5, [6, 7, 8, 9, 10]), (1, 1, [0])],
)
def test_centre_slices(tmp_path, total, n, expected) -> None:
    path = write_raw(tmp_path / "v.h5", kspace=small_kspace(total), header=small_header(total))
    with open_volume(path) as vol:
        assert vol.centre_slices(n) == expected
        assert total // 2 in vol.centre_slices(n)


def test_centre_slices_rejects_impossible_counts(tmp_path) -> None:
    path = write_raw(tmp_path / "v.h5", kspace=small_kspace(4), header=small_header(4))
    with open_volume(path) as vol:
        with pytest.raises(ValueError, match=f"{path}.*5 centre slices.*only 4"):
            vol.centre_slices(5)
        with pytest.raises(ValueError, match=">= 1"):
            vol.centre_slices(0)


def test_missing_attributes_fall_back(tmp_path) -> None:
    path = write_raw(tmp_path / "file_brain_AXT2_200_6002.h5", kspace=small_kspace(2), header=small_header(2))
    with open_volume(path) as vol:
        assert vol.patient_id == "file_brain_AXT2_200_6002"
        assert vol.acquisition is None
        assert not vol.has_reconstruction_rss
        with pytest.raises(FastMRIFormatError, match="reconstruction_rss"):
            vol.read_reconstruction_rss([0])


def test_header_without_namespace_is_accepted() -> None:
    xml = b"<ismrmrdHeader><encoding><encodedSpace><matrixSize><x>640</x><y>320</y></matrixSize></encodedSpace>" \
        b"<reconSpace><matrixSize><x>320</x><y>320</y></matrixSize></reconSpace></encoding></ismrmrdHeader>"
    info = parse_ismrmrd_header(xml)
    assert (info.encoded_size, info.recon_size) == ((640, 320), (320, 320))


def _truncated(tmp_path: Path, volume) -> Path:
    path = tmp_path / "truncated.h5"
    write_volume(path, volume)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_file(tmp_path: Path, volume) -> Path:
    path = tmp_path / "notes.h5"
    path.write_text("this is not an HDF5 file\n")
    return path


MALFORMED = {
    "truncated": (_truncated, "truncated"),
    "text file": (_text_file, "not an HDF5 file"),
    "missing kspace": (lambda d, v: write_raw(d / "a.h5", kspace=None, header=small_header()), "no 'kspace'"),
    "single-coil kspace": (
        lambda d, v: write_raw(d / "a.h5", kspace=np.zeros((1, 8, 6), np.complex64), header=small_header()),
        "4-D.*single-coil",
    ),
    "real kspace": (
        lambda d, v: write_raw(d / "a.h5", kspace=np.zeros((1, 2, 8, 6), np.float32), header=small_header()),
        "complex",
    ),
    "zero slices": (lambda d, v: write_raw(d / "a.h5", kspace=small_kspace(0), header=small_header()), "zero slices"),
    "missing header": (lambda d, v: write_raw(d / "a.h5", kspace=small_kspace(1), header=None), "ismrmrd_header"),
    "header not XML": (
        lambda d, v: write_raw(d / "a.h5", kspace=small_kspace(1), header=b"<ismrmrdHeader><enc"),
        "not valid XML",
    ),
    "header without sizes": (
        lambda d, v: write_raw(d / "a.h5", kspace=small_kspace(1), header=b"<ismrmrdHeader/>"),
        "encodedSpace/matrixSize/x",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_a_format_error_naming_the_file(tmp_path, case) -> None:
    small = synthetic_volume(0, n_slices=2, n_coils=2, height=16, width=12)
    make, reason = MALFORMED[case]
    path = make(tmp_path, small)
    with pytest.raises(FastMRIFormatError, match=reason) as info:
        with open_volume(path):
            pass
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors as user errors


def test_format_error_survives_pickling() -> None:
    # Ray hands exceptions from tasks to the driver by pickling them.
    err = pickle.loads(pickle.dumps(FastMRIFormatError("s3://b/x.h5", "no 'kspace' dataset")))
    assert (err.path, err.reason, str(err)) == ("s3://b/x.h5", "no 'kspace' dataset", "s3://b/x.h5: no 'kspace' dataset")


def test_missing_file_is_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        with open_volume(tmp_path / "nothing.h5"):
            pass


# Local storage ---------------------------------------------------------------------------------


def test_paths() -> None:
    assert storage.is_s3("s3://bucket/key") and not storage.is_s3("/data/s3") and not storage.is_s3(Path("s3:/x"))
    assert storage.split_s3("s3://bucket/raw/a.h5") == ("bucket", "raw/a.h5")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3"):
        storage.split_s3("/local/path")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///key")
    assert storage.join("s3://bucket", "raw/", "a.h5") == "s3://bucket/raw/a.h5"
    assert storage.join("s3://bucket/prefix/", "a.h5") == "s3://bucket/prefix/a.h5"
    assert storage.join("/data", "raw", "a.h5") == "/data/raw/a.h5"
    assert storage.basename("s3://bucket/raw/a.h5") == "a.h5" and storage.basename("/data/a.h5") == "a.h5"


def test_local_storage(tmp_path) -> None:
    root = tmp_path / "raw"
    with pytest.raises(FileNotFoundError, match=str(root)):
        storage.list_files(root)
    storage.write_bytes_atomic(root / "b.h5", b"second")  # creates the folder
    storage.write_bytes_atomic(str(root / "a.h5"), b"first")
    storage.write_bytes_atomic(root / "notes.txt", b"x")
    storage.write_bytes_atomic(root / "sub" / "c.h5", b"deeper")  # not listed: one level only
    assert storage.list_files(root) == [str(root / "a.h5"), str(root / "b.h5")]
    assert storage.read_bytes(root / "a.h5") == b"first"
    storage.write_bytes_atomic(root / "a.h5", b"replaced")
    assert storage.read_bytes(root / "a.h5") == b"replaced"
    storage.upload_file_atomic(root / "b.h5", root / "copy.h5")
    assert storage.read_bytes(root / "copy.h5") == b"second"
    assert storage.exists(root / "copy.h5") and not storage.exists(root / "missing.h5")
    with storage.local_copy(root / "a.h5") as local:
        assert local == root / "a.h5"
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        storage.read_bytes(root / "missing.h5")
    # A failed write leaves neither the file nor a temporary one behind.
    with pytest.raises(RuntimeError), storage.atomic_write_path(root / "failed.h5") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not storage.exists(root / "failed.h5")
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name]
    storage.remove(root / "copy.h5")
    assert not storage.exists(root / "copy.h5")


def test_synthesize_dataset_cycles_acquisitions(tmp_path) -> None:
    paths = synthesize_dataset(
        tmp_path / "raw", n_volumes=3, n_slices=2, n_coils=4, height=16, width=12, seed=4,
        acquisitions=("AXT2", "AXT1"), progress=False,
    )
    assert [Path(p).name for p in paths] == [
        "file_brain_AXT2_synth_0000.h5", "file_brain_AXT1_synth_0001.h5", "file_brain_AXT2_synth_0002.h5",
    ]
    assert list_volumes(tmp_path / "raw") == sorted(paths)
    ids, acquisitions, first_slices = [], [], []
    for path in paths:
        with open_volume(path) as vol:
            ids.append(vol.patient_id)
            acquisitions.append(vol.acquisition)
            first_slices.append(vol.read_slices([0]))
    assert acquisitions == ["AXT2", "AXT1", "AXT2"]
    assert len(set(ids)) == 3
    assert not np.array_equal(first_slices[0], first_slices[2])


def test_adps_synth_command(tmp_path) -> None:
    out = tmp_path / "synth"
    result = subprocess.run(
        [sys.executable, "-m", "adps", "synth", str(out), "--volumes", "2", "--slices", "2", "--coils", "4",
         "--height", "32", "--width", "24", "--seed", "1", "--acquisitions", "AXT2", "AXT1", "--noise-std", "0.01"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 2 volumes" in result.stdout and str(out) in result.stdout
    paths = list_volumes(out)
    assert len(paths) == 2
    with open_volume(paths[0]) as vol:
        assert vol.kspace_shape == (2, 4, 64, 24) and vol.recon_size == (32, 24)


# S3 --------------------------------------------------------------------------------------------


SMALL_SYNTH = ["--volumes", "2", "--slices", "3", "--coils", "4", "--height", "16", "--width", "12", "--seed", "2"]


def test_synth_to_s3_reads_back_like_a_local_write(bucket, tmp_path, capsys) -> None:
    root = f"s3://{bucket}/raw"
    assert adps_main(["synth", root, *SMALL_SYNTH, "--acquisitions", "AXT2", "AXT1"]) == 0
    assert "wrote 2 volumes" in capsys.readouterr().out
    remote = list_volumes(root)
    assert remote == [f"{root}/file_brain_AXT1_synth_0001.h5", f"{root}/file_brain_AXT2_synth_0000.h5"]  # sorted

    local_root = tmp_path / "raw"
    assert adps_main(["synth", str(local_root), *SMALL_SYNTH, "--acquisitions", "AXT2", "AXT1"]) == 0
    local = list_volumes(local_root)
    assert [storage.basename(p) for p in remote] == [Path(p).name for p in local]
    for remote_path, local_path in zip(remote, local, strict=True):
        with open_volume(remote_path) as r, open_volume(local_path) as lo:
            assert r.path == remote_path  # errors and logs name the S3 URI, not a temporary file
            assert (r.kspace_shape, r.encoded_size, r.recon_size) == (lo.kspace_shape, lo.encoded_size, lo.recon_size)
            assert r.attrs == lo.attrs
            np.testing.assert_array_equal(r.read_slices(range(r.num_slices)), lo.read_slices(range(lo.num_slices)))
    # The S3 bytes are those of the local file.
    assert storage.read_bytes(remote[0]) == Path(local[0]).read_bytes()


def test_s3_storage(bucket, tmp_path) -> None:
    root = f"s3://{bucket}/shards"
    assert storage.list_files(root) == []  # an empty prefix: S3 has no folders to be missing
    storage.write_bytes_atomic(f"{root}/b.h5", b"second")
    storage.write_bytes_atomic(f"{root}/a.h5", b"first")
    storage.write_bytes_atomic(f"{root}/manifest.json", b"{}")
    storage.write_bytes_atomic(f"{root}/sub/c.h5", b"deeper")  # not listed: one level only
    assert storage.list_files(root) == [f"{root}/a.h5", f"{root}/b.h5"]
    assert storage.list_files(root + "/", ".json") == [f"{root}/manifest.json"]
    assert storage.read_bytes(f"{root}/a.h5") == b"first"
    assert storage.exists(f"{root}/a.h5") and not storage.exists(f"{root}/missing.h5")
    assert storage.exists(f"s3://{bucket}")

    source = tmp_path / "local.bin"
    source.write_bytes(b"uploaded")
    storage.upload_file_atomic(source, f"{root}/uploaded.bin")
    assert storage.read_bytes(f"{root}/uploaded.bin") == b"uploaded"

    with storage.atomic_write_path(f"{root}/written.h5") as tmp:
        tmp.write_bytes(b"via a path")
    assert storage.read_bytes(f"{root}/written.h5") == b"via a path"
    with pytest.raises(RuntimeError), storage.atomic_write_path(f"{root}/failed.h5") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not storage.exists(f"{root}/failed.h5") and not tmp.exists()

    with storage.local_copy(f"{root}/b.h5") as local:
        assert local.read_bytes() == b"second"
    assert not local.exists()  # the temporary download is gone

    storage.remove(f"{root}/b.h5")
    assert not storage.exists(f"{root}/b.h5")
    with pytest.raises(FileNotFoundError, match=f"{root}/missing.h5"):
        storage.read_bytes(f"{root}/missing.h5")
    with pytest.raises(FileNotFoundError, match=f"{root}/missing.h5"), storage.local_copy(f"{root}/missing.h5"):
        pass


def test_s3_missing_bucket_is_named(s3_server, tmp_path, capsys) -> None:
    missing = f"s3://adps-missing-{uuid.uuid4().hex[:8]}/raw"
    with pytest.raises(FileNotFoundError, match=missing.split("/raw")[0]):
        storage.list_files(missing)
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        storage.write_bytes_atomic(f"{missing}/a.bin", b"x")
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        storage.upload_file_atomic(source, f"{missing}/f.bin")
    with pytest.raises(FileNotFoundError, match=missing.split("/raw")[0]):
        with open_volume(f"{missing}/a.h5"):
            pass
    assert adps_main(["synth", missing, *SMALL_SYNTH]) == 2
    assert "no such bucket" in capsys.readouterr().err


def test_s3_malformed_file_names_the_uri(bucket) -> None:
    uri = f"s3://{bucket}/raw/broken.h5"
    storage.write_bytes_atomic(uri, b"not hdf5")
    with pytest.raises(FastMRIFormatError) as info:
        with open_volume(uri):
            pass
    assert info.value.path == uri

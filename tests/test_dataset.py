"""The PyTorch dataset over prepared shards: items, DataLoader workers, shard subsets, checksums.

A tiny dataset (8 coils, 64 x 48, 2 slices per volume, L1 reconstructions with few iterations)
is prepared once on the session's Ray instance; the S3 path is covered in test_prepare.py.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from adps.data import storage
from adps.data.dataset import PreparedSliceDataset
from adps.data.preprocess import PrepareConfig
from adps.data.shards import MANIFEST_NAME, ShardError, file_sha256, read_manifest
from adps.data.synth import synthesize_dataset
from adps.orchestration.prepare import prepare_dataset

HEIGHT, WIDTH, COILS = 64, 48, 8
KEYS = {"kspace", "maps", "reference", "mask", "mask_further", "slice_id"}


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("dataset-raw")
    synthesize_dataset(raw, n_volumes=4, n_slices=3, n_coils=COILS, height=HEIGHT, width=WIDTH, seed=3,
                       noise_std=0.005, progress=False)
    output = tmp_path_factory.mktemp("dataset") / "prepared"
    config = PrepareConfig.from_dict({
        "source": str(raw), "output": str(output), "n_volumes": 4, "slices_per_volume": 2,
        "test_volumes": 1, "val_volumes": 1, "crop": (HEIGHT, WIDTH), "noise_patch": 8,
        "accelerations": (2, 4), "acs": 8, "shard_size": 3, "l1": True, "l1_iterations": 5,
    })
    prepare_dataset(config, progress=False)
    return output


def manifest_of(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def test_items_have_exactly_the_training_keys_shapes_and_dtypes(root: Path) -> None:
    dataset = PreparedSliceDataset(root, "train", acceleration=4)
    entries = manifest_of(root)["splits"]["train"]["slices"]
    assert len(dataset) == len(entries) == 4
    for index, entry in enumerate(entries):
        item = dataset[index]
        assert set(item) == KEYS
        assert item["kspace"].shape == (4, HEIGHT, WIDTH) and item["kspace"].dtype == torch.complex64
        assert item["maps"].shape == (4, HEIGHT, WIDTH) and item["maps"].dtype == torch.complex64
        assert item["reference"].shape == (HEIGHT, WIDTH) and item["reference"].dtype == torch.complex64
        assert item["mask"].shape == (WIDTH,) and item["mask"].dtype == torch.bool
        assert item["mask_further"].shape == (WIDTH,) and item["mask_further"].dtype == torch.bool
        assert item["slice_id"].shape == () and item["slice_id"].dtype == torch.int64
        assert int(item["slice_id"]) == entry["slice_id"]
        assert int(item["mask"].sum()) == WIDTH // 4 and int(item["mask_further"].sum()) == WIDTH // 5
        assert bool((item["mask_further"] <= item["mask"]).all())
        with h5py.File(root / entry["shard"], "r") as f:
            np.testing.assert_array_equal(item["kspace"].numpy(), f["kspace"][entry["row"]])
            np.testing.assert_array_equal(item["mask"].numpy(), f["mask/r4"][entry["row"]])
            np.testing.assert_array_equal(item["mask_further"].numpy(), f["mask_further/r4"][entry["row"]])

    with_l1 = PreparedSliceDataset(root, "train", acceleration=2, load_l1=True)
    item = with_l1[0]
    assert set(item) == KEYS | {"l1"}
    assert item["l1"].shape == (HEIGHT, WIDTH) and item["l1"].dtype == torch.complex64
    assert int(item["mask"].sum()) == WIDTH // 2

    # Test keeps every coil.
    assert PreparedSliceDataset(root, "test", acceleration=2)[0]["kspace"].shape == (COILS, HEIGHT, WIDTH)


def test_dataloader_with_two_workers_batches_every_slice_once(root: Path) -> None:
    dataset = PreparedSliceDataset(root, "train", acceleration=4, load_l1=True)
    dataset[0]  # open a file in the parent: workers must not reuse its handle
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    ids = []
    for batch in loader:
        assert set(batch) == KEYS | {"l1"}
        n = batch["slice_id"].shape[0]
        assert batch["kspace"].shape == (n, 4, HEIGHT, WIDTH) and batch["mask"].shape == (n, WIDTH)
        assert batch["reference"].shape == (n, HEIGHT, WIDTH) and batch["l1"].shape == (n, HEIGHT, WIDTH)
        ids += batch["slice_id"].tolist()
    assert ids == [s["slice_id"] for s in manifest_of(root)["splits"]["train"]["slices"]]


def test_read_batch_equals_the_stacked_items(root: Path) -> None:
    """read_batch (the worker loop's batching) gives what the default collate makes of the items,
    across a shard boundary and in any order; with load_l1 too."""
    for load_l1 in (False, True):
        dataset = PreparedSliceDataset(root, "train", acceleration=4, load_l1=load_l1)
        indices = [3, 0, 2, 1]  # rows of both shards (3 + 1 slices), out of order
        batch = dataset.read_batch(indices)
        items = [dataset[i] for i in indices]
        assert set(batch) == set(items[0]) == KEYS | ({"l1"} if load_l1 else set())
        for key, value in batch.items():
            expected = torch.stack([item[key] for item in items])
            assert value.dtype == expected.dtype and value.shape == expected.shape, key
            assert torch.equal(value, expected), key
        assert not batch["kspace"].is_pinned()
    with pytest.raises(IndexError, match="index 4 out of range for 4 slices"):
        dataset.read_batch([0, 4])
    with pytest.raises(ValueError, match="no indices"):
        dataset.read_batch([])


def test_read_batch_reads_raw_chunks_where_it_can_and_hdf5_elsewhere(root: Path, tmp_path: Path) -> None:
    """Prepared shards store each row as one unfiltered chunk: read_batch reads its bytes with one
    positional read. A compressed or contiguous dataset goes through HDF5; both give the same batch."""
    from adps.data.dataset import _rows_are_chunks

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with h5py.File(copy / "train-00000.h5", "r+") as f:
        kspace, maps = f["kspace"][()], f["maps"][()]
        del f["kspace"], f["maps"]
        f.create_dataset("kspace", data=kspace, chunks=(1, *kspace.shape[1:]), compression="gzip")
        f.create_dataset("maps", data=maps)  # contiguous
    with h5py.File(root / "train-00000.h5", "r") as f:
        assert _rows_are_chunks(f["kspace"]) and _rows_are_chunks(f["mask/r4"])
    with h5py.File(copy / "train-00000.h5", "r") as f:
        assert not _rows_are_chunks(f["kspace"]) and not _rows_are_chunks(f["maps"])
    indices = [2, 3, 0]
    expected = PreparedSliceDataset(root, "train", acceleration=4, load_l1=True).read_batch(indices)
    mixed = PreparedSliceDataset(copy, "train", acceleration=4, load_l1=True, verify=False).read_batch(indices)
    assert set(mixed) == set(expected)
    for key, value in expected.items():
        assert torch.equal(mixed[key], value), key


@pytest.mark.gpu
def test_read_batch_reads_into_page_locked_memory(root: Path) -> None:
    batch = PreparedSliceDataset(root, "train", acceleration=4).read_batch([0, 1], pin_memory=True)
    assert all(value.is_pinned() for value in batch.values())


def test_read_batch_names_the_slices_it_cannot_batch(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    entries = manifest_of(copy)["splits"]["train"]["slices"]
    with h5py.File(copy / "train-00000.h5", "r+") as f:
        f["maps"][1] = 0
    with h5py.File(copy / "train-00001.h5", "r+") as f:  # 2 coils instead of 4
        maps = f["maps"][:, :2]
        del f["maps"]
        f.create_dataset("maps", data=maps)
    dataset = PreparedSliceDataset(copy, "train", acceleration=2, verify=False)
    with pytest.raises(ShardError, match=rf"train-00000\.h5: slice id {entries[1]['slice_id']} \(row 1\): coil maps are all"):
        dataset.read_batch([0, 1])
    message = (rf"train-00001\.h5: slice id {entries[3]['slice_id']} \(row 0\): 'maps' has shape \(2, {HEIGHT}, "
               rf"{WIDTH}\), slice id {entries[0]['slice_id']} of train-00000\.h5 \(4, {HEIGHT}, {WIDTH}\)")
    with pytest.raises(ShardError, match=message):
        dataset.read_batch([0, 3])
    assert dataset.read_batch([3])["maps"].shape == (1, 2, HEIGHT, WIDTH)  # alone, it reads


def test_keys_read_only_what_a_step_uses_and_never_touch_the_rest(root: Path, tmp_path: Path) -> None:
    """``keys``: the items and batches hold those keys and ``slice_id``, equal to the full read;
    the other datasets are never read (a shard whose ``reference`` is gone still serves an
    ambient run's keys, and a full read of it names what is missing)."""
    ambient = ("kspace", "maps", "mask", "mask_further")
    full = PreparedSliceDataset(root, "train", acceleration=4)
    picked = PreparedSliceDataset(root, "train", acceleration=4, keys=ambient)
    assert picked.keys == (*ambient, "slice_id") and set(full.keys) == KEYS
    for index in range(len(full)):
        item, whole = picked[index], full[index]
        assert set(item) == set(picked.keys)
        for key in item:
            torch.testing.assert_close(item[key], whole[key], rtol=0, atol=0)
    batch = picked.read_batch([0, 2, 3])
    assert set(batch) == set(picked.keys)
    torch.testing.assert_close(batch["kspace"], full.read_batch([0, 2, 3])["kspace"], rtol=0, atol=0)
    edm = PreparedSliceDataset(root, "train", acceleration=4, keys=("reference",))
    assert set(edm.read_batch([1])) == {"reference", "slice_id"}

    copy = tmp_path / "no-reference"
    shutil.copytree(root, copy)
    for shard in copy.glob("train-*.h5"):
        with h5py.File(shard, "r+") as handle:
            del handle["reference"]
    picked = PreparedSliceDataset(copy, "train", acceleration=4, keys=ambient, verify=False)
    assert len(picked.read_batch(list(range(len(picked))))["kspace"]) == len(picked)
    with pytest.raises(ShardError, match=r"train-00000\.h5: no dataset 'reference'"):
        PreparedSliceDataset(copy, "train", acceleration=4, verify=False)[0]

    with pytest.raises(ValueError, match=r"unknown item key 'image'; the items have kspace, maps, reference"):
        PreparedSliceDataset(root, "train", acceleration=4, keys=("kspace", "image"))
    with pytest.raises(ValueError, match=r"unknown item key 'l1' \(it needs load_l1=True\)"):
        PreparedSliceDataset(root, "train", acceleration=4, keys=("l1",))
    assert PreparedSliceDataset(root, "train", acceleration=4, keys=("l1",), load_l1=True).keys == ("l1", "slice_id")


def test_a_subset_of_shards(root: Path) -> None:
    shards = manifest_of(root)["splits"]["train"]["shards"]
    assert [s["n_slices"] for s in shards] == [3, 1]
    last = PreparedSliceDataset(root, "train", acceleration=2, shards=["train-00001.h5"])
    assert len(last) == 1
    assert int(last[0]["slice_id"]) == manifest_of(root)["splits"]["train"]["slices"][3]["slice_id"]
    with pytest.raises(ValueError, match="shard 'val-00000.h5' is not in split 'train'"):
        PreparedSliceDataset(root, "train", acceleration=2, shards=["val-00000.h5"])


def test_pickles_without_file_handles(root: Path) -> None:
    dataset = PreparedSliceDataset(root, "val", acceleration=2)
    first = dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._files == {}
    for key, value in clone[0].items():
        assert torch.equal(value, first[key])


def test_corrupt_or_missing_shards_are_refused_by_name(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    path = copy / "train-00000.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    dataset = PreparedSliceDataset(copy, "train", acceleration=2)
    with pytest.raises(ShardError, match=r"train-00000\.h5: checksum mismatch"):
        dataset[0]
    assert int(dataset[3]["slice_id"]) > 0  # the other shard still reads
    (copy / "train-00001.h5").unlink()
    with pytest.raises(ShardError, match=r"train-00001\.h5: shard listed in the manifest is missing"):
        PreparedSliceDataset(copy, "train", acceleration=2)[3]


def test_bad_arguments_are_named(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"R=3 was not prepared \(available: 2, 4\)"):
        PreparedSliceDataset(root, "train", acceleration=3)
    with pytest.raises(ValueError, match="split must be one of"):
        PreparedSliceDataset(root, "training", acceleration=2)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        PreparedSliceDataset(tmp_path, "train", acceleration=2)
    copy = tmp_path / "no-l1"
    shutil.copytree(root, copy)
    manifest = manifest_of(copy)
    manifest["config"]["l1"] = False
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="prepared without L1"):
        PreparedSliceDataset(copy, "train", acceleration=2, load_l1=True)
    with pytest.raises(IndexError):
        PreparedSliceDataset(root, "train", acceleration=2)[99]


# Shard names outside the folder, all-zero maps (docs/errors.md) ------------------------------

OUTSIDE_NAMES = ["../other/train-00000.h5", "/etc/passwd", "s3://other-bucket/prepared/train-00000.h5"]


def _rename_first_train_shard(manifest: dict, name: str) -> dict:
    """The manifest with train's first shard (and its slices' references) renamed to ``name``."""
    manifest = json.loads(json.dumps(manifest))
    train = manifest["splits"]["train"]
    old = train["shards"][0]["name"]
    train["shards"][0]["name"] = name
    for entry in train["slices"]:
        if entry["shard"] == old:
            entry["shard"] = name
    return manifest


@pytest.mark.parametrize("name", OUTSIDE_NAMES)
def test_a_manifest_naming_shards_outside_its_folder_is_refused(root: Path, tmp_path: Path, name: str) -> None:
    # A real dataset next to a valid shard "outside" it, which the manifest's sha256 matches:
    # without the check, "../other/train-00000.h5" would be read (and "/etc/passwd" hashed).
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (tmp_path / "other").mkdir()
    shutil.copyfile(root / "train-00000.h5", tmp_path / "other" / "train-00000.h5")
    (copy / MANIFEST_NAME).write_text(json.dumps(_rename_first_train_shard(manifest_of(root), name)))
    message = (
        rf"{copy / MANIFEST_NAME}: split 'train' names the shard '{name}'; shard names must be plain file names "
        r"inside the dataset folder \(like 'train-00000\.h5'\)"
    )
    with pytest.raises(ValueError, match=message):
        read_manifest(str(copy))
    with pytest.raises(ValueError, match=message):
        PreparedSliceDataset(copy, "train", acceleration=2)
    # Another split of the same manifest is refused too: the whole manifest is untrusted.
    with pytest.raises(ValueError, match="shard names must be plain file names"):
        PreparedSliceDataset(copy, "val", acceleration=2)


def test_an_s3_manifest_naming_shards_outside_its_prefix_is_refused(root: Path, tmp_path: Path, s3_server) -> None:
    storage.s3_client().create_bucket(Bucket="dataset-names")
    cache = tmp_path / "cache"
    for index, name in enumerate(OUTSIDE_NAMES):
        prefix = f"s3://dataset-names/prepared-{index}"
        storage.upload_file_atomic(root / "train-00000.h5", f"{prefix}/train-00000.h5")
        storage.write_bytes_atomic(
            f"{prefix}/{MANIFEST_NAME}", json.dumps(_rename_first_train_shard(manifest_of(root), name)).encode()
        )
        with pytest.raises(ValueError, match=rf"{prefix}/manifest\.json: split 'train' names the shard '{name}'; "
                                             "shard names must be plain file names inside the dataset folder"):
            PreparedSliceDataset(prefix, "train", acceleration=2, cache_dir=cache)
    assert not cache.exists()  # refused before any download


def test_a_slice_with_all_zero_maps_is_refused_naming_it(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = copy / "train-00000.h5"
    with h5py.File(shard, "r+") as f:
        f["maps"][1] = 0
    sid = manifest_of(copy)["splits"]["train"]["slices"][1]["slice_id"]

    # The edit changes the file: with the manifest as it is, the checksum catches it first.
    with pytest.raises(ShardError, match=r"train-00000\.h5: checksum mismatch"):
        PreparedSliceDataset(copy, "train", acceleration=2)[1]

    # Re-hashed in the manifest (or read with verify=False), the maps themselves are refused.
    message = rf"train-00000\.h5: slice id {sid} \(row 1\): coil maps are all zero"
    with pytest.raises(ShardError, match=message):
        PreparedSliceDataset(copy, "train", acceleration=2, verify=False)[1]
    manifest = manifest_of(copy)
    manifest["splits"]["train"]["shards"][0].update(sha256=file_sha256(shard), size=shard.stat().st_size)
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    dataset = PreparedSliceDataset(copy, "train", acceleration=2)
    with pytest.raises(ValueError, match=message):
        dataset[1]
    assert int(dataset[0]["slice_id"]) == manifest["splits"]["train"]["slices"][0]["slice_id"]  # the others read

    # Zero-padded coils of a test slice are zero maps too, but not all of them: those read.
    test = PreparedSliceDataset(root, "test", acceleration=2)
    assert all(bool(test[i]["maps"].abs().sum() > 0) for i in range(len(test)))

"""Natural-image data: synthetic images, ImageDataset (folder, zip, S3), erasure masks, bad files,
and ``adps synth-images``.

Small images (16 to 32 pixels, a handful per dataset) keep the file fast; the S3 tests use the
session's moto server (the ``s3_server`` fixture of conftest.py).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adps.cli import main as adps_main
from adps.data import storage
from adps.images import (
    ImageDataset,
    fixed_erasure_mask,
    synthetic_image,
    write_image_folder,
    write_image_zip,
)

RES = 32


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """The dataset's encoding of a uint8 (H, W, 3) image: (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "train"
    write_image_folder(root, 6, resolution=RES, seed=1)
    return root


# Synthetic images ------------------------------------------------------------------------------


def test_synthetic_image_is_deterministic_and_varied() -> None:
    image = synthetic_image(3, RES, seed=7)
    assert image.shape == (RES, RES, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, synthetic_image(3, RES, seed=7))
    assert not np.array_equal(image, synthetic_image(4, RES, seed=7))
    assert not np.array_equal(image, synthetic_image(3, RES, seed=8))
    # A picture, not a flat colour or noise: spread-out values, and neighbours mostly alike.
    assert image.std() > 20
    as_float = image.astype(np.float64)
    assert np.abs(np.diff(as_float, axis=1)).mean() < 0.25 * np.abs(as_float - as_float.mean()).mean()
    # Resolution-independent: the same picture sampled finer.
    fine = synthetic_image(3, 2 * RES, seed=7).astype(np.float64)
    coarse = fine.reshape(RES, 2, RES, 2, 3).mean(axis=(1, 3))
    assert np.abs(coarse - as_float).mean() < 6


def test_synthetic_image_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="index"):
        synthetic_image(-1)
    with pytest.raises(ValueError, match="resolution"):
        synthetic_image(0, resolution=0)
    with pytest.raises(ValueError, match="seed"):
        synthetic_image(0, seed=-2)


# Folder and zip round trips --------------------------------------------------------------------


def test_folder_round_trip(folder) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"img-{i:05d}.png" for i in range(6)]
    dataset = ImageDataset(folder, resolution=RES)
    assert len(dataset) == 6 and dataset.files == [str(folder / name) for name in names]
    for index in (0, 5):
        item = dataset[index]
        assert set(item) == {"image", "index"}
        image = item["image"]
        assert image.shape == (3, RES, RES) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
        assert item["index"].dtype == torch.int64 and int(item["index"]) == index
        # PNG is lossless and no resize happens: exactly what synthetic_image drew.
        assert torch.equal(image, as_tensor(synthetic_image(index, RES, seed=1)))
    # Indexable the way worker_share deals items out (numpy integers), and negative indices.
    assert torch.equal(dataset[np.int64(2)]["image"], dataset[-4]["image"])
    with pytest.raises(IndexError, match="out of range"):
        dataset[6]
    # Batches with the default collate.
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, RES, RES) and batch["index"].tolist() == [0, 1, 2, 3]


def test_zip_round_trip_matches_the_folder(folder, tmp_path) -> None:
    path = write_image_zip(tmp_path / "train.zip", 6, resolution=RES, seed=1)
    assert path == str(tmp_path / "train.zip")
    # Reproducible bytes (fixed timestamps), so a dataset is identified by its checksum.
    again = write_image_zip(tmp_path / "again.zip", 6, resolution=RES, seed=1)
    assert Path(path).read_bytes() == Path(again).read_bytes()

    from_zip, from_folder = ImageDataset(path, resolution=16), ImageDataset(folder, resolution=16)
    assert from_zip.files == [f"img-{i:05d}.png" for i in range(6)]
    for index in range(6):
        a, b = from_zip[index]["image"], from_folder[index]["image"]
        assert a.shape == (3, 16, 16)
        assert torch.equal(a, b)
    # Pickled for a DataLoader worker or Ray: the copy reopens the zip itself.
    copy = pickle.loads(pickle.dumps(from_zip))
    assert torch.equal(copy[3]["image"], from_zip[3]["image"])
    from_zip.close()
    assert torch.equal(from_zip[1]["image"], from_folder[1]["image"])  # reopens after close()


def test_zip_members_in_subfolders_are_read_and_junk_skipped(tmp_path) -> None:
    """CelebA's zip holds img_align_celeba/*.jpg; macOS adds __MACOSX/ and ._ files."""
    path = tmp_path / "celeba.zip"
    good = png_bytes(synthetic_image(0, 8))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("img_align_celeba/000002.png", good)
        archive.writestr("img_align_celeba/000001.JPG", png_bytes(synthetic_image(1, 8)))  # PIL sniffs the format
        archive.writestr("img_align_celeba/._000001.png", b"resource fork")
        archive.writestr("__MACOSX/img_align_celeba/000001.png", b"junk")
        archive.writestr("list_attr_celeba.txt", b"attributes")
    dataset = ImageDataset(path, resolution=8)
    assert dataset.files == ["img_align_celeba/000001.JPG", "img_align_celeba/000002.png"]
    assert torch.equal(dataset[1]["image"], as_tensor(synthetic_image(0, 8)))


def test_folder_formats_and_case(tmp_path) -> None:
    write_image_folder(tmp_path, 2, resolution=16, seed=4, fmt="jpg")
    write_image_folder(tmp_path / "webp", 1, resolution=16, seed=4, fmt="webp")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "img-00009.PNG").write_bytes(png_bytes(synthetic_image(9, 16, seed=4)))
    dataset = ImageDataset(tmp_path, resolution=16)
    assert [Path(f).name for f in dataset.files] == ["img-00000.jpg", "img-00001.jpg", "img-00009.PNG"]
    # JPEG is lossy, but close; webp reads too.
    reference = as_tensor(synthetic_image(0, 16, seed=4))
    assert (dataset[0]["image"] - reference).abs().mean() < 0.05
    assert ImageDataset(tmp_path / "webp", resolution=16)[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="fmt"):
        write_image_folder(tmp_path / "x", 1, fmt="gif")


# Crop and resize -------------------------------------------------------------------------------


def test_non_square_images_are_centre_cropped_and_resized(tmp_path) -> None:
    red, green = (255, 0, 0), (0, 255, 0)
    wide = np.empty((20, 60, 3), np.uint8)  # H = 20, W = 60: the centre square is columns 20..40
    wide[:] = green
    wide[:, 20:40] = red
    tall = np.swapaxes(wide, 0, 1).copy()  # H = 60, W = 20: rows 20..40
    (tmp_path / "a_wide.png").write_bytes(png_bytes(wide))
    (tmp_path / "b_tall.png").write_bytes(png_bytes(tall))
    # A grey-scale, non-square image with a dark left half and a bright right half, upscaled.
    halves = np.zeros((6, 4), np.uint8)
    halves[:, 2:] = 255
    Image.fromarray(halves, mode="L").save(tmp_path / "c_halves.png")

    dataset = ImageDataset(tmp_path, resolution=10)
    expected_red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 10, 10)
    assert torch.equal(dataset[0]["image"], expected_red)
    assert torch.equal(dataset[1]["image"], expected_red)

    halves_item = dataset[2]["image"]
    assert halves_item.shape == (3, 10, 10)
    assert torch.equal(halves_item[0], halves_item[2])  # grey converted to RGB
    # Not transposed: left columns dark, right columns bright, on every row.
    assert (halves_item[:, :, :3] < -0.9).all() and (halves_item[:, :, -3:] > 0.9).all()


# Erasure masks ---------------------------------------------------------------------------------


def test_erasure_masks_are_fixed_per_image(folder) -> None:
    clean = ImageDataset(folder, resolution=RES)
    corrupted = ImageDataset(folder, resolution=RES, erasure_p=0.6, seed=3, keep_clean=True)
    masks = []
    for index in range(len(corrupted)):
        item = corrupted[index]
        assert set(item) == {"image", "mask", "clean", "index"}
        mask = item["mask"]
        assert mask.shape == (1, RES, RES) and mask.dtype == torch.bool
        assert torch.equal(item["clean"], clean[index]["image"])
        assert torch.equal(item["image"], mask * item["clean"])
        assert (item["image"][:, ~mask[0]] == 0).all()
        # Fixed: the same on a second read, in another dataset object, and from the public function.
        assert torch.equal(corrupted[index]["mask"], mask)
        assert torch.equal(fixed_erasure_mask(3, index, RES, 0.6), mask)
        masks.append(mask)
    masks = torch.stack(masks)
    assert not torch.equal(masks[0], masks[1])  # independent between images
    other_seed = ImageDataset(folder, resolution=RES, erasure_p=0.6, seed=4)
    assert not torch.equal(other_seed[0]["mask"], masks[0])
    assert "clean" not in other_seed[0]
    # About the right fraction kept: 1 - p of 6 * 1024 pixels (binomial sd 0.006).
    assert abs(masks.float().mean().item() - 0.4) < 0.03
    assert abs(fixed_erasure_mask(0, 0, 128, 0.2).float().mean().item() - 0.8) < 0.02


def test_bad_arguments_are_named(folder) -> None:
    with pytest.raises(ValueError, match="resolution"):
        ImageDataset(folder, resolution=0)
    with pytest.raises(ValueError, match="erasure_p"):
        ImageDataset(folder, erasure_p=1.0)
    with pytest.raises(ValueError, match="seed"):
        ImageDataset(folder, erasure_p=0.5, seed=-1)
    with pytest.raises(ValueError, match="out_zip"):
        write_image_zip(folder.parent / "images.tar", 1)
    with pytest.raises(ValueError, match="n: "):
        write_image_folder(folder.parent / "none", 0)


# Bad files and empty roots -----------------------------------------------------------------------


def test_corrupt_files_are_named_and_listed_by_check(tmp_path) -> None:
    write_image_folder(tmp_path, 3, resolution=16)
    (tmp_path / "img-00003.png").write_bytes(b"this is not a png")
    full = png_bytes(synthetic_image(4, 16))
    (tmp_path / "img-00004.png").write_bytes(full[: len(full) // 2])  # truncated
    dataset = ImageDataset(tmp_path, resolution=16)  # opening decodes nothing
    assert len(dataset) == 5
    dataset[0]
    with pytest.raises(ValueError, match="img-00003.png: cannot decode"):
        dataset[3]
    with pytest.raises(ValueError, match="img-00004.png"):
        dataset[4]
    bad = dataset.check()
    assert [Path(name).name for name, _ in bad] == ["img-00003.png", "img-00004.png"]
    assert all("cannot decode" in reason for _, reason in bad)

    # In a zip, the error names the zip and the member.
    path = tmp_path / "broken.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.png", full)
        archive.writestr("b.png", b"garbage")
    zipped = ImageDataset(path, resolution=16)
    with pytest.raises(ValueError, match=r"broken\.zip: member b\.png: cannot decode"):
        zipped[1]
    assert [name for name, _ in zipped.check()] == [f"{path}: member b.png"]
    assert ImageDataset(tmp_path / "broken.zip", resolution=8).check()[0][0].endswith("b.png")


def test_empty_or_missing_roots_are_refused(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: no image files"):
        ImageDataset(empty)
    (empty / "readme.txt").write_text("no images here")
    (empty / "sub").mkdir()
    (empty / "sub" / "img.png").write_bytes(png_bytes(synthetic_image(0, 8)))  # not searched
    with pytest.raises(ValueError, match="no image files"):
        ImageDataset(empty)

    no_images = tmp_path / "no_images.zip"
    with zipfile.ZipFile(no_images, "w") as archive:
        archive.writestr("labels.json", b"{}")
    with pytest.raises(ValueError, match=f"{no_images}: no image files in this zip"):
        ImageDataset(no_images)

    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=f"{not_zip}: not a valid zip"):
        ImageDataset(not_zip)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        ImageDataset(tmp_path / "missing.zip")
    with pytest.raises(ValueError, match="expected a folder of images or a .zip"):
        ImageDataset(empty / "readme.txt")


# S3 --------------------------------------------------------------------------------------------


def test_s3_folder_and_zip_read_like_local(bucket, folder) -> None:
    root = f"s3://{bucket}/train"
    written = write_image_folder(root, 6, resolution=RES, seed=1)
    assert written == [f"{root}/img-{i:05d}.png" for i in range(6)]
    storage.write_bytes_atomic(f"{root}/img-00006.png", b"broken on S3")
    storage.write_bytes_atomic(f"{root}/sub/img-00000.png", b"deeper: not listed")

    remote, local = ImageDataset(root, resolution=RES), ImageDataset(folder, resolution=RES)
    assert len(remote) == 7 and remote.files[:6] == written
    for index in (0, 5):
        assert torch.equal(remote[index]["image"], local[index]["image"])
    with pytest.raises(ValueError, match=f"{root}/img-00006.png: cannot decode"):
        remote[6]
    assert [name for name, _ in remote.check()] == [f"{root}/img-00006.png"]

    zip_uri = write_image_zip(f"s3://{bucket}/train.zip", 6, resolution=RES, seed=1)
    with ImageDataset(zip_uri, resolution=RES, erasure_p=0.5, seed=2, keep_clean=True) as zipped:
        download = zipped._zip_path
        assert download is not None and download.is_file()
        item = zipped[4]
        assert torch.equal(item["clean"], local[4]["image"])
        assert torch.equal(item["mask"], fixed_erasure_mask(2, 4, RES, 0.5))
    assert not download.exists()  # the temporary download is deleted on close

    with pytest.raises(ValueError, match=f"s3://{bucket}/empty: no image files"):
        ImageDataset(f"s3://{bucket}/empty")
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        ImageDataset(f"s3://{bucket}-missing/train")


# CLI -------------------------------------------------------------------------------------------


def test_cli_synth_images(tmp_path, capsys, s3_server) -> None:
    out = tmp_path / "synthetic"
    assert adps_main(["synth-images", str(out), "--count", "3", "--resolution", "16", "--seed", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"adps synth-images: wrote 3 images (16 x 16 png, seed 2) to {out}"
    dataset = ImageDataset(out, resolution=16)
    assert len(dataset) == 3
    assert torch.equal(dataset[2]["image"], as_tensor(synthetic_image(2, 16, seed=2)))

    zip_path = tmp_path / "synthetic.zip"
    assert adps_main(["synth-images", str(zip_path), "--count", "2", "--resolution", "16", "--zip"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert len(ImageDataset(zip_path, resolution=16)) == 2

    # Usage errors: exit code 2 and a message naming the bad input.
    assert adps_main(["synth-images", str(tmp_path / "none"), "--count", "0"]) == 2
    assert "adps synth-images: error: n: expected an integer >= 1" in capsys.readouterr().err
    assert adps_main(["synth-images", str(tmp_path / "folder"), "--zip", "--count", "1"]) == 2
    assert "ending in .zip" in capsys.readouterr().err
    assert adps_main(["synth-images", "s3://adps-images-no-such-bucket/x", "--count", "1"]) == 2
    assert "no such bucket" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        adps_main(["synth-images", str(out), "--format", "gif"])
    assert info.value.code == 2

"""LPIPS and FID (adps.perceptual) with locally created weights: never a download.

The tests save randomly initialised torchvision state dicts under torchvision's file names in
a temporary folder and point the code at it (``weights=``, ``$ADPS_WEIGHTS_DIR`` or
``$TORCH_HOME``). Random backbones make the values meaningless as image quality, but every
property checked here (zero for identical inputs, growth with noise, the Fréchet formula, the
lookup and its error) holds for any weights.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from adps import perceptual
from adps.data.phantom import brain_phantom
from adps.perceptual import (
    WEIGHT_FILES,
    clear_model_cache,
    feature_statistics,
    fid,
    fid_features,
    find_weights,
    frechet_distance,
    lpips_distance,
    lpips_rgb,
)
from conftest import write_stand_in_weights


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread() -> Iterator[None]:
    # On a loaded 2-core machine OpenBLAS threads spin against each other: one 512 x 512
    # sqrtm took 25 s with the default threads and 1 s with one. Only the test run is limited.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/scipy stacks
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random torchvision weights under torchvision's file names."""
    return write_stand_in_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def phantom_images() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([brain_phantom(64, 48, rng) for _ in range(6)]))


@pytest.fixture()
def no_lookup_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """Empty $ADPS_WEIGHTS_DIR and $TORCH_HOME, so only what a test puts there is found."""
    env_dir, torch_home = tmp_path / "env", tmp_path / "torch_home"
    env_dir.mkdir()
    monkeypatch.setenv("ADPS_WEIGHTS_DIR", str(env_dir))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return env_dir, torch_home


# ---------------------------------------------------------------------------------------------
# Weights lookup
# ---------------------------------------------------------------------------------------------


def test_missing_weights_error_names_file_places_and_url(no_lookup_dirs: tuple[Path, Path]) -> None:
    env_dir, torch_home = no_lookup_dirs
    file_name = "alexnet-owt-7be5be79.pth"
    with pytest.raises(FileNotFoundError) as info:
        lpips_distance(torch.ones(1, 16, 16), torch.ones(1, 16, 16))
    message = str(info.value)
    assert file_name in message
    assert str(env_dir / file_name) in message
    assert str(torch_home / "hub" / "checkpoints" / file_name) in message
    assert f"https://download.pytorch.org/models/{file_name}" in message

    for backbone in ("vgg16", "inception_v3"):
        with pytest.raises(FileNotFoundError, match=WEIGHT_FILES[backbone]):
            fid_features(torch.ones(2, 16, 16), backbone)


def test_explicit_path_is_the_only_place_looked(no_lookup_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "alex.pth"
    with pytest.raises(FileNotFoundError) as info:
        find_weights("alexnet", missing)
    assert str(missing) in str(info.value)
    assert "ADPS_WEIGHTS_DIR:" not in str(info.value)


def test_unset_env_var_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ADPS_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\$ADPS_WEIGHTS_DIR: not set"):
        find_weights("vgg16")


def test_lookup_order(weights_dir: Path, no_lookup_dirs: tuple[Path, Path]) -> None:
    env_dir, torch_home = no_lookup_dirs
    source = weights_dir / WEIGHT_FILES["alexnet"]
    hub_file = torch_home / "hub" / "checkpoints" / WEIGHT_FILES["alexnet"]
    hub_file.parent.mkdir(parents=True)
    hub_file.symlink_to(source)
    assert find_weights("alexnet") == hub_file
    env_file = env_dir / WEIGHT_FILES["alexnet"]
    env_file.symlink_to(source)
    assert find_weights("alexnet") == env_file  # the env var wins over the hub cache
    assert find_weights("alexnet", weights_dir) == source  # a folder argument wins over both
    assert find_weights("alexnet", source) == source  # and so does a file argument


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


def test_lpips_zero_for_identical_and_grows_with_noise(weights_dir: Path, phantom_images: torch.Tensor) -> None:
    gt = phantom_images[:4]
    assert torch.equal(lpips_distance(gt, gt, weights=weights_dir), torch.zeros(4))
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(gt.shape, generator=generator, dtype=torch.float32)
    peak = gt.abs().amax()
    values = [lpips_distance(gt, gt.abs() + level * peak * noise, weights=weights_dir) for level in (0.02, 0.1, 0.3)]
    assert torch.all(values[0] > 0)
    assert torch.all(values[1] > values[0])
    assert torch.all(values[2] > values[1])


def test_lpips_batching_magnitude_and_shapes(weights_dir: Path, phantom_images: torch.Tensor) -> None:
    gt, estimate = phantom_images[:3], phantom_images[3:]
    whole = lpips_distance(gt, estimate, weights=weights_dir, device="cpu")
    assert whole.shape == (3,) and whole.dtype == torch.float32
    torch.testing.assert_close(lpips_distance(gt, estimate, weights=weights_dir, batch_size=2), whole)
    # Complex inputs are reduced to magnitude.
    torch.testing.assert_close(lpips_distance(gt.abs(), estimate.abs(), weights=weights_dir), whole)
    with pytest.raises(ValueError, match="does not match"):
        lpips_distance(gt, estimate[:2], weights=weights_dir)


def test_lpips_scales_each_pair_by_the_ground_truth_max(weights_dir: Path, phantom_images: torch.Tensor) -> None:
    gt, estimate = phantom_images[:3].abs(), phantom_images[3:].abs()
    # A common factor changes nothing (the scale comes from max|gt| of the pair) ...
    torch.testing.assert_close(
        lpips_distance(7.5 * gt, 7.5 * estimate, weights=weights_dir), lpips_distance(gt, estimate, weights=weights_dir)
    )
    # ... but an intensity error of the estimate alone is seen (a per-image max would hide it).
    assert torch.all(lpips_distance(gt, 1.5 * gt, weights=weights_dir) > 0)
    # Overshoot above max|gt| is clipped only when asked.
    clipped = lpips_distance(gt, 1.5 * gt, weights=weights_dir, clip=True)
    assert torch.all(clipped < lpips_distance(gt, 1.5 * gt, weights=weights_dir))


def test_lpips_uses_the_shipped_linear_heads(weights_dir: Path) -> None:
    import lpips

    model = perceptual._lpips_model(str((weights_dir / WEIGHT_FILES["alexnet"]).resolve()), "cpu")
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    shipped = torch.load(heads, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.lin0.model[1].weight, shipped["lin0.model.1.weight"])
    backbone = torch.load(weights_dir / WEIGHT_FILES["alexnet"], weights_only=True)
    torch.testing.assert_close(model.net.slice5.get_submodule("10").weight, backbone["features.10.weight"])


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method: str) -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = rng.uniform(0.1, 2.0, 8), rng.uniform(0.1, 2.0, 8)
    by_hand = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    value = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert value == pytest.approx(by_hand, rel=1e-10)
    # One dimension by hand: (1 - 4)^2 + 4 + 9 - 2 * sqrt(36) = 10.
    assert frechet_distance([1.0], [[4.0]], [4.0], [[9.0]], method=method) == pytest.approx(10.0)


@pytest.mark.parametrize("samples", [200, 6])  # full-rank and singular (fewer samples than dims)
def test_frechet_distance_identical_sets_and_methods_agree(samples: int) -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((samples, 32)) @ rng.standard_normal((32, 32))
    mu, sigma = feature_statistics(features)
    scale = np.trace(sigma)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-4 * scale
    assert abs(frechet_distance(mu, sigma, mu, sigma, method="eigh")) < 1e-6 * scale
    mu2, sigma2 = feature_statistics(rng.standard_normal((samples, 32)) + 0.5)
    sqrtm_value = frechet_distance(mu, sigma, mu2, sigma2)
    assert sqrtm_value > 0.1 * scale
    assert frechet_distance(mu, sigma, mu2, sigma2, method="eigh") == pytest.approx(sqrtm_value, rel=1e-4)


def test_frechet_distance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="inconsistent shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))


# ---------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------


def test_vgg_features_default_input_size(weights_dir: Path, phantom_images: torch.Tensor) -> None:
    features = fid_features(phantom_images[:2], weights=weights_dir)  # resized to 224 x 224
    assert features.shape == (2, 512) and features.dtype == torch.float64
    assert torch.all(torch.isfinite(features))
    # Batching does not change the features.
    torch.testing.assert_close(fid_features(phantom_images[:2], weights=weights_dir, batch_size=1), features)


def test_fid_zero_for_the_same_set_and_larger_when_shifted(weights_dir: Path, phantom_images: torch.Tensor) -> None:
    real = phantom_images.abs()
    shifted = real + 0.5 * real.amax()  # a bright offset: lower contrast after max scaling
    kwargs = {"weights": weights_dir, "input_size": 64}  # small inputs keep the CPU test fast
    same = fid(real, real, **kwargs)
    different = fid(real, shifted, **kwargs)
    assert different > 0
    assert abs(same) < 1e-6 * different


def test_inception_option_runs(weights_dir: Path, phantom_images: torch.Tensor) -> None:
    # Inception at 299 x 299 is slow on a CPU: few images. Its feature shape is checked in
    # test_no_network_access_is_attempted.
    real = phantom_images[:3]
    # eigh: sqrtm of a singular 2048 x 2048 product takes about a minute on one core.
    different = fid(real, real + 0.5 * real.abs().amax(), "inception_v3", weights=weights_dir, method="eigh")
    assert np.isfinite(different) and different > 0


def test_env_var_and_torch_home_are_used(
    weights_dir: Path, phantom_images: torch.Tensor, no_lookup_dirs: tuple[Path, Path]
) -> None:
    env_dir, torch_home = no_lookup_dirs
    (env_dir / WEIGHT_FILES["vgg16"]).symlink_to(weights_dir / WEIGHT_FILES["vgg16"])
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / WEIGHT_FILES["alexnet"]).symlink_to(weights_dir / WEIGHT_FILES["alexnet"])
    assert fid_features(phantom_images[:2], input_size=64).shape == (2, 512)
    assert lpips_distance(phantom_images[:2], phantom_images[:2]).shape == (2,)


# ---------------------------------------------------------------------------------------------
# No network
# ---------------------------------------------------------------------------------------------


def test_no_network_access_is_attempted(
    weights_dir: Path, phantom_images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    clear_model_cache()  # build every network afresh under the patches
    started = time.perf_counter()
    assert lpips_distance(phantom_images[:2], phantom_images[2:4], weights=weights_dir).shape == (2,)
    assert fid_features(phantom_images[:2], weights=weights_dir, input_size=64).shape == (2, 512)
    assert fid_features(phantom_images[:2], "inception_v3", weights=weights_dir).shape == (2, 2048)
    assert not attempts
    assert time.perf_counter() - started < 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(weights_dir: Path, phantom_images: torch.Tensor) -> None:
    gt, estimate = phantom_images[:3], phantom_images[3:]
    cpu = lpips_distance(gt, estimate, weights=weights_dir)
    gpu = lpips_distance(gt.cuda(), estimate.cuda(), weights=weights_dir)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        fid_features(phantom_images, weights=weights_dir, device="cuda"),
        fid_features(phantom_images, weights=weights_dir),
        rtol=1e-3,
        atol=1e-3,
    )


# ---------------------------------------------------------------------------------------------
# LPIPS of RGB images (the natural-image study)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_images() -> torch.Tensor:
    """Six synthetic 64 x 64 RGB images in [-1, 1]."""
    from adps.images import synthetic_image

    arrays = [synthetic_image(i, resolution=64, seed=3) for i in range(6)]
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])


def test_lpips_rgb_zero_for_identical_and_grows_with_noise(weights_dir: Path, rgb_images: torch.Tensor) -> None:
    gt = rgb_images[:3]
    assert torch.equal(lpips_rgb(gt, gt, weights=weights_dir), torch.zeros(3))
    noise = torch.randn(gt.shape, generator=torch.Generator().manual_seed(2))
    values = [lpips_rgb(gt, gt + level * noise, weights=weights_dir) for level in (0.02, 0.1, 0.3)]
    assert torch.all(values[0] > 0) and torch.all(values[1] > values[0]) and torch.all(values[2] > values[1])


def test_lpips_rgb_takes_images_as_they_are(weights_dir: Path, rgb_images: torch.Tensor) -> None:
    """No scaling by the ground truth (unlike lpips_distance), the same network and heads: a
    grey image repeated to RGB scores as lpips_distance scores it once that scaling is undone."""
    gt, estimate = rgb_images[:3], rgb_images[3:]
    whole = lpips_rgb(gt, estimate, weights=weights_dir)
    assert whole.shape == (3,) and whole.dtype == torch.float32
    torch.testing.assert_close(lpips_rgb(gt, estimate, weights=weights_dir, batch_size=2), whole)
    # A common factor changes the value: the images are not rescaled.
    assert not torch.allclose(lpips_rgb(0.5 * gt, 0.5 * estimate, weights=weights_dir), whole)
    # Grey images in [0, 1] -> lpips_distance maps 2 x / max - 1; lpips_rgb gets that directly.
    grey_gt, grey_x = (rgb_images[i, 0].clamp(0, 1) for i in (0, 1))
    grey_gt = grey_gt / grey_gt.max()
    by_magnitude = lpips_distance(grey_gt[None], grey_x[None], weights=weights_dir)
    as_rgb = lpips_rgb((2 * grey_gt - 1).expand(1, 3, -1, -1), (2 * grey_x - 1).expand(1, 3, -1, -1), weights=weights_dir)
    torch.testing.assert_close(as_rgb, by_magnitude)
    # The estimate is clamped to [-1, 1] only when asked.
    clipped = lpips_rgb(gt, 1.8 * gt, weights=weights_dir, clip=True)
    torch.testing.assert_close(clipped, lpips_rgb(gt, (1.8 * gt).clamp(-1, 1), weights=weights_dir))
    assert not torch.allclose(clipped, lpips_rgb(gt, 1.8 * gt, weights=weights_dir))


def test_lpips_rgb_small_images_need_resize(weights_dir: Path, rgb_images: torch.Tensor) -> None:
    small = torch.nn.functional.avg_pool2d(rgb_images[:2], 4)  # 16 x 16
    with pytest.raises(ValueError, match=r"16 x 16: .*at least 32 pixels.*resize=64"):
        lpips_rgb(small, small, weights=weights_dir)
    values = lpips_rgb(small, small.flip(0), weights=weights_dir, resize=64)
    assert values.shape == (2,) and torch.all(values > 0)
    with pytest.raises(ValueError, match="resize=16"):
        lpips_rgb(small, small, weights=weights_dir, resize=16)
    with pytest.raises(ValueError, match=r"RGB images of shape \(N, 3, H, W\)"):
        lpips_rgb(rgb_images[:, 0], rgb_images[:, 0], weights=weights_dir)
    with pytest.raises(ValueError, match="does not match"):
        lpips_rgb(rgb_images[:2], rgb_images[:3], weights=weights_dir)

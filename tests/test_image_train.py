"""Natural-image ambient training (paper section 3.1) through the platform's training path.

* :mod:`adps.nn.image_diffusion`: the ambient inpainting loss (erased pixels never matter,
  gradients, the further-corrupted mask), EDM's loss for ``p = 0``, shape errors, model kinds;
* the ``image`` method of :func:`adps.nn.train_step.train_step` (the loss falls on a fixed
  batch at p = 0 and p = 0.6) and its :class:`~adps.orchestration.train_config.TrainConfig` checks;
* the worker loop without Ray (checkpoint record, validation on observed pixels);
* with Ray: p = 0 and p = 0.6 of the grid ``configs/images/*.yaml`` trained by one sweep and
  registered in MLflow (the session fixture ``image_models`` of conftest.py, shared with later
  tests); the grid's six configs differ in p alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from adps.images import ImageDataset, further_corrupt, write_image_folder
from adps.nn import EMA, build_model, method_loss, train_step, validation_metric
from adps.nn.image_diffusion import (
    PAPER_ERASURE_P,
    ambient_image_input,
    ambient_image_loss,
    build_image_model,
    is_ambient_image_model,
    sampling_mask,
)
from adps.nn.learning_config import IMAGE_GRID
from adps.nn.objectives import edm_loss, edm_weight
from adps.orchestration.registry import image_model_name, model_name, predict_arrays, registered_name
from adps.orchestration.sweep import SweepRun, format_summary, grid_gaps
from adps.orchestration.train_config import TrainConfig
from adps.orchestration.train_worker import (
    WorkerContext,
    build_trainee,
    load_training_checkpoint,
    train_one_step,
    worker_loop,
)

REPO = Path(__file__).resolve().parents[1]
RES = 16

# Small tensors: one intra-op thread is faster and immune to busy neighbours (see conftest).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """16 synthetic 16 x 16 images."""
    folder = tmp_path_factory.mktemp("images") / "train"
    write_image_folder(folder, 16, RES, seed=3)
    return str(folder)


def image_batch(folder: str, erasure_p: float, n: int = 8) -> dict[str, Tensor]:
    dataset = ImageDataset(folder, RES, erasure_p=erasure_p, seed=1)
    items = [dataset[i] for i in range(n)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def random_images(n: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Images in [-1, 1], a p = 0.5 mask and standard normal noise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, RES, RES, generator=g) * 2 - 1
    mask = torch.rand(n, 1, RES, RES, generator=g) >= 0.5
    return images, mask, torch.randn(n, 3, RES, RES, generator=g)


class Recorder(nn.Module):
    """A denoiser that records its input and returns ``scale * x`` (a differentiable parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.seen: dict[str, Tensor] = {}

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        self.seen = {"x": x.detach().clone(), "sigma": torch.as_tensor(sigma).detach().clone()}
        if cond is not None:
            self.seen["cond"] = cond.detach().clone()
        return self.scale * x


# ------------------------------------------------------------------------------ image_diffusion
def test_ambient_loss_ignores_the_content_of_erased_pixels() -> None:
    torch.manual_seed(0)
    model = build_image_model("tiny", ambient=True)
    images, mask, noise = random_images()
    poisoned = torch.where(mask, images, torch.full_like(images, float("nan")))
    sigma = torch.tensor([0.3, 2.0])
    further = further_corrupt(mask, 0.1, generator=torch.Generator().manual_seed(1))
    clean_loss = ambient_image_loss(model, images, mask, sigma, noise, mask_further=further)
    loss = ambient_image_loss(model, poisoned, mask, sigma, noise, mask_further=further)
    assert torch.isfinite(loss) and torch.equal(loss, clean_loss)
    # Other values in the erased pixels, same loss; the same generator draws the same A~.
    other = torch.where(mask, images, torch.full_like(images, 7.0))
    a = ambient_image_loss(model, other, mask, sigma, noise, generator=torch.Generator().manual_seed(2))
    b = ambient_image_loss(model, poisoned, mask, sigma, noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_ambient_loss_gradients_are_finite_and_reach_every_layer() -> None:
    torch.manual_seed(0)
    model = build_image_model("tiny", ambient=True)
    images, mask, noise = random_images()
    poisoned = torch.where(mask, images, torch.full_like(images, float("nan")))
    loss = ambient_image_loss(model, poisoned, mask, torch.tensor([0.5, 1.0]), noise,
                              generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) > len(grads) // 2


def test_ambient_loss_sees_a_further_corrupted_subset_and_scores_the_kept_pixels() -> None:
    images, mask, noise = random_images(seed=3)
    denoiser = Recorder()
    sigma = torch.tensor([0.2, 0.7])
    per_image = ambient_image_loss(denoiser, images, mask, sigma, noise, delta=0.3,
                                   generator=torch.Generator().manual_seed(5), reduce=False)
    cond = denoiser.seen["cond"].bool()
    assert cond.shape == mask.shape and not bool((cond & ~mask).any())  # A~ inside A
    assert int(cond.sum()) < int(mask.sum())  # delta erased some kept pixels
    x = denoiser.seen["x"]
    assert bool((x[~cond.expand_as(x)] == 0).all())  # hidden pixels are exactly zero in the input
    # The loss: lambda(sigma) * || A (D(input) - A x0) ||^2 with D = 0.5 x.
    measured = torch.where(mask, images, 0.0)
    residual = torch.where(mask, 0.5 * x - measured, 0.0)
    expected = edm_weight(sigma) * residual.square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(per_image, expected)
    # The sampling mask is a training-like A~: p erased, then delta more.
    drawn = sampling_mask((64, 3, RES, RES), 0.6, delta=0.1, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (64, 1, RES, RES) and drawn.dtype == torch.bool
    assert abs(float(drawn.float().mean()) - 0.4 * 0.9) < 0.02
    assert 0.0 in PAPER_ERASURE_P and 0.9 in PAPER_ERASURE_P


def test_p0_loss_is_edms_loss_on_clean_images() -> None:
    images, _, noise = random_images(seed=4)
    denoiser = Recorder()
    sigma = torch.tensor([0.1, 3.0])
    loss = edm_loss(denoiser, images, sigma, noise, reduce=False)
    noisy = images + sigma.view(-1, 1, 1, 1) * noise
    assert "cond" not in denoiser.seen and torch.equal(denoiser.seen["x"], noisy)
    torch.testing.assert_close(loss, edm_weight(sigma) * (0.5 * noisy - images).square().sum(dim=(1, 2, 3)))
    torch.manual_seed(0)
    model = build_image_model("tiny", ambient=False)
    edm_loss(model, images, sigma, noise).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_shape_errors_name_the_argument() -> None:
    images, mask, noise = random_images()
    model = Recorder()
    with pytest.raises(ValueError, match=r"images: expected real \(N, 3, H, W\)"):
        ambient_image_loss(model, images[:, :2], mask, 0.5, noise[:, :2])
    with pytest.raises(ValueError, match=r"images: expected complex \(N, H, W\) or real \(N, C, H, W\)"):
        edm_loss(model, torch.complex(images, images), 0.5, noise)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 1, 16, 16\)"):
        ambient_image_loss(model, images, mask[:, :, :8], 0.5, noise)
    with pytest.raises(ValueError, match=r"mask_further: expected shape"):
        ambient_image_loss(model, images, mask, 0.5, noise, mask_further=mask[0])
    with pytest.raises(ValueError, match="noise shape"):
        ambient_image_loss(model, images, mask, 0.5, noise[:1])
    with pytest.raises(ValueError, match="noise shape"):
        edm_loss(model, images, 0.5, noise[..., :8])
    with pytest.raises(ValueError, match=r"x: expected real"):
        ambient_image_input(images[0], mask[0])


def test_model_kinds_and_build_model() -> None:
    ambient = build_model("image", "tiny", ambient=True)
    clean = build_model("image", "tiny", ambient=False)
    assert is_ambient_image_model(ambient) and not is_ambient_image_model(clean)
    assert ambient.net.config.in_channels == 4 and clean.net.config.in_channels == 3
    assert ambient.net.config.out_channels == clean.net.config.out_channels == 3
    assert is_ambient_image_model(nn.Sequential(ambient)[0])
    with pytest.raises(TypeError, match="expected an image denoiser"):
        is_ambient_image_model(build_model("edm", "tiny"))
    with pytest.raises(ValueError, match="image: build_model needs ambient=True"):
        build_model("image", "tiny")
    with pytest.raises(ValueError, match="'ambient' applies to method 'image' only"):
        build_model("edm", "tiny", ambient=True)
    with pytest.raises(ValueError, match="image: preset must be 'image' or 'tiny'"):
        build_model("image", "edm", ambient=False)
    with pytest.raises(ValueError, match="unknown image preset"):
        build_image_model("huge", ambient=True)


# ------------------------------------------------------------------------------ train_step
def _fixed_loss(model: nn.Module, batch: dict[str, Tensor], seeds: int = 8) -> float:
    """The loss at fixed draws (sigma, noise, A~): comparable before and after training."""
    with torch.no_grad():
        return sum(float(method_loss("image", model, batch, generator=torch.Generator().manual_seed(100 + s)))
                   for s in range(seeds)) / seeds


@pytest.mark.parametrize("erasure_p", [0.0, 0.6])
def test_train_step_lowers_the_loss_on_a_fixed_batch(image_folder: str, erasure_p: float) -> None:
    batch = image_batch(image_folder, erasure_p)
    assert ("mask" in batch) == (erasure_p > 0)
    torch.manual_seed(0)
    model = build_model("image", "tiny", ambient=erasure_p > 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    ema = EMA(model, half_life_images=10)
    generator = torch.Generator().manual_seed(0)
    before = _fixed_loss(model, batch)
    for _ in range(30):
        out = train_step("image", model, batch, optimizer, generator=generator, ema=ema, delta=0.1)
        assert not out["skipped"] and math.isfinite(out["loss"]) and out["nonfinite_grads"] == 0
    after = _fixed_loss(model, batch)
    assert after < 0.9 * before, f"p = {erasure_p}: loss {before:.4g} -> {after:.4g}"
    assert ema.images_seen == 30 * 8


def test_image_loss_refuses_a_model_of_the_other_kind(image_folder: str) -> None:
    masked, clean = image_batch(image_folder, 0.4, n=2), image_batch(image_folder, 0.0, n=2)
    with pytest.raises(ValueError, match="batch has erasure masks .* takes no mask channel"):
        method_loss("image", build_model("image", "tiny", ambient=False), masked)
    with pytest.raises(ValueError, match="ambient image model .* batch has no 'mask'"):
        method_loss("image", build_model("image", "tiny", ambient=True), clean)
    with pytest.raises(KeyError, match="image: batch lacks key 'image'"):
        method_loss("image", build_model("image", "tiny", ambient=False), {"index": clean["index"]})
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be \(N, 1, H, W\)"):
        method_loss("image", build_model("image", "tiny", ambient=True), {**masked, "mask": masked["mask"][:, 0]})
    # The erased pixels of a corrupted batch never reach the loss.
    model = build_model("image", "tiny", ambient=True)
    poisoned = {**masked, "image": torch.where(masked["mask"], masked["image"], float("nan"))}
    losses = [method_loss("image", model, b, generator=torch.Generator().manual_seed(0)) for b in (masked, poisoned)]
    assert torch.equal(losses[0], losses[1])


def test_validation_mse_is_on_observed_pixels_and_reproducible(image_folder: str) -> None:
    masked = image_batch(image_folder, 0.6, n=4)
    torch.manual_seed(0)
    model = build_model("image", "tiny", ambient=True).train()

    def score(batch: dict[str, Tensor], seed: int = 0) -> float:
        return validation_metric("image", model, batch, generator=torch.Generator().manual_seed(seed))["val_mse"]

    value = score(masked)
    assert math.isfinite(value) and value > 0 and value == score(masked) and value != score(masked, 1)
    assert score({**masked, "image": torch.where(masked["mask"], masked["image"], float("nan"))}) == value
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="needs the batch's 'mask'"):
        score({"image": masked["image"]})
    clean_model = build_model("image", "tiny", ambient=False)
    with pytest.raises(ValueError, match="takes no mask channel"):
        validation_metric("image", clean_model, masked)
    assert math.isfinite(validation_metric("image", clean_model, image_batch(image_folder, 0.0, n=2))["val_mse"])


# ------------------------------------------------------------------------------ config
def image_config(dataset: str = "", **changes: object) -> TrainConfig:
    values = {"method": "image", "preset": "tiny", "dataset": dataset, "resolution": RES, "batch_size": 4,
              "lr_rampup": 0, "log_every_steps": 1,
              "controller_poll_s": 0.1}  # a report waits for the controller's next poll
    return TrainConfig.from_dict({**values, **changes})


def test_image_config_checks_name_the_key(image_folder: str, tmp_path: Path) -> None:
    ok = image_config(image_folder, erasure_p=0.6, r_train=1)  # r_train does not apply
    ok.validate()
    assert ok.resolved_run_name == "image_p0.6" and ok.resolved_preset == "tiny"
    assert image_config(image_folder, preset="").resolved_preset == "image"
    assert image_config(image_folder).resolved_run_name == "image_p0"
    for changes, message in (
        ({"erasure_p": 1.0}, r"'erasure_p' must be in \[0, 1\)"),
        ({"erasure_p": -0.1}, r"'erasure_p' must be in \[0, 1\)"),
        ({"delta": 0.0}, r"'delta' must be in \(0, 1\)"),
        ({"resolution": 20}, "'resolution' must be a multiple of 8"),
        ({"resolution": 0}, "'resolution' must be a multiple of 8"),
        ({"preset": "edm"}, "'preset': image takes 'image' or 'tiny'"),
        ({"dataset": ""}, "'dataset' is required: a folder, .zip or s3:// prefix of images"),
        ({"dataset": str(tmp_path / "missing")}, "'dataset': not an image folder.*no such folder"),
        ({"batch_size": 9, "num_workers": 2}, r"'dataset': .* holds 16 image\(s\), fewer than one step needs "
                                              r"\(batch_size 9 x num_workers 2 = 18\)"),
    ):
        with pytest.raises(ValueError, match=message):
            image_config(**{"dataset": image_folder, **changes}).validate()
    prepared_like = tmp_path / "prepared"
    prepared_like.mkdir()
    (prepared_like / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="'dataset': not an image folder.*no image files"):
        image_config(str(prepared_like)).validate()
    # The image keys are refused for the MRI methods.
    for key, value in (("erasure_p", 0.5), ("delta", 0.2), ("resolution", 32)):
        with pytest.raises(ValueError, match=f"config key '{key}' applies to method 'image' only"):
            TrainConfig(method="ambient", dataset="x", **{key: value}).validate(check_dataset=False)


def test_names_configs_grid_and_summary() -> None:
    config = TrainConfig(method="image", erasure_p=0.6, dataset="x")
    assert registered_name(config) == image_model_name(0.6) == "adps-image-p0.6"
    assert registered_name(config.replace(erasure_p=0)) == "adps-image-p0"
    assert registered_name(TrainConfig(method="ambient", r_train=4)) == model_name("ambient", 4) == "adps-ambient-r4"
    files = sorted((REPO / "configs" / "images").glob("*.yaml"))
    configs = [TrainConfig.from_yaml(path, {"dataset": "unused"}) for path in files]
    assert sorted(c.erasure_p for c in configs) == sorted(IMAGE_GRID) == sorted(PAPER_ERASURE_P)
    for path, loaded in zip(files, configs, strict=True):
        loaded.validate(check_dataset=False)
        assert loaded.resolved_run_name == path.stem and loaded.method == "image"
        assert (loaded.resolved_preset, loaded.resolution, loaded.amp, loaded.use_gpu) == ("image", 64, "bf16", True)
    # One grid: the configs differ in p alone (so the two that the image_models fixture trains
    # through Ray Train stand for the six).
    assert len({json.dumps({**c.to_dict(), "erasure_p": 0, "run_name": ""}, sort_keys=True) for c in configs}) == 1
    assert grid_gaps(configs) == []
    assert grid_gaps([c for c in configs if c.erasure_p != 0.4]) == ["image_p0.4"]
    mri = [TrainConfig.from_yaml(path) for path in sorted((REPO / "configs").glob("*.yaml"))]
    assert grid_gaps(mri) == [] and grid_gaps(mri + configs) == []
    rows = [SweepRun("image_p0.6", "image", 4, "finished", 20, 600.0, val_mse=0.031, model="adps-image-p0.6/1")]
    table = format_summary(rows)
    assert table.splitlines()[0].split() == ["run", "status", "step", "loss", "val_mse", "model", "minutes"]
    assert "0.031" in table and "adps-image-p0.6/1" in table
    mixed = format_summary([*rows, SweepRun("ambient_r4", "ambient", 4, "finished", 2, 0.5, 0.21)])
    assert mixed.splitlines()[0].split()[4:6] == ["val_nrmse", "val_mse"]


def test_predict_refuses_image_models() -> None:
    model = build_model("image", "tiny", ambient=True)
    with pytest.raises(ValueError, match="'image' models are priors of natural images.*adps evaluate"):
        predict_arrays("image", model, {})


# ------------------------------------------------------------------------------ worker loop
def test_worker_loop_on_images_without_ray(image_folder: str, tmp_path: Path) -> None:
    """The loop Ray runs, in-process: image batches, val_mse, the checkpoint's record, resume."""
    reports: list[tuple[dict, str | None]] = []
    folders: list[Path] = []

    def report(metrics: dict, folder: str | None) -> None:
        reports.append((metrics, folder))
        if folder:
            folders.append(Path(shutil.copytree(folder, tmp_path / f"ckpt-{metrics['step']}")))

    config = image_config(image_folder, erasure_p=0.6, max_steps=3, checkpoint_every_steps=2, validate_every_steps=2,
                          validation_slices=3)
    final = worker_loop(config, WorkerContext(rank=0, world_size=1, report=report))
    assert [m["step"] for m, _ in reports] == [1, 2, 3] and final["step"] == 3
    assert "val_mse" in reports[1][0] and "val_mse" in final and "val_nrmse" not in final
    assert all(0 <= i < 16 for m, _ in reports for i in m["slice_ids"]) and len(final["slice_ids"]) == 4
    record = json.loads((folders[-1] / "ema" / "config.json").read_text())
    assert {k: record[k] for k in ("method", "erasure_p", "delta", "resolution", "preset")} == {
        "method": "image", "erasure_p": 0.6, "delta": 0.1, "resolution": RES, "preset": "tiny"}
    assert "r_train" not in record and "R" not in record
    restored = build_trainee(config)
    assert load_training_checkpoint(folders[-1], restored)["step"] == 3
    assert is_ambient_image_model(restored.model)
    out = train_one_step(restored, image_batch(image_folder, 0.6, n=4))
    assert restored.step == 4 and math.isfinite(out["loss"])


# ------------------------------------------------------------------------------ with Ray
@pytest.mark.slow
def test_the_image_grid_trains_and_registers(image_models: dict) -> None:
    """The grid's runs that the fixture trained (p = 0 and 0.6, ``adps sweep --only``) finished
    and registered ``adps-image-p<p>``; each registered model loads back, is ambient exactly
    when p > 0 and records how it was trained."""
    from mlflow import MlflowClient

    import adps
    from adps.orchestration.tracking import image_listing_checksum

    print(f"image grid fixture: {image_models['seconds']:.0f} s")
    rows = image_models["rows"]
    assert sorted((r.run_name, r.status, r.step) for r in rows) == [
        ("image_p0", "finished", 20), ("image_p0.6", "finished", 20)], [r.error for r in rows]
    assert sorted(image_models["models"]) == [0.0, 0.6]
    assert all(r.val_mse is not None and r.val_mse > 0 and r.val_nrmse is None for r in rows)
    client = MlflowClient(image_models["tracking_uri"])
    listing = image_listing_checksum(image_models["images"])
    files = sorted(p.name for p in Path(image_models["images"]).iterdir())
    assert listing == hashlib.sha256("\n".join(files).encode()).hexdigest()
    for p, uri in image_models["models"].items():
        name = f"adps-image-p{p:g}"
        assert uri.startswith(f"models:/{name}/")
        model, config = adps.load_model(uri, tracking_uri=image_models["tracking_uri"], with_config=True)
        assert is_ambient_image_model(model) == (p > 0), p
        assert (config["method"], config["erasure_p"], config["delta"], config["resolution"]) == ("image", p, 0.1, RES)
        version = client.get_model_version(name, uri.rsplit("/", 1)[1])
        assert version.tags["adps.erasure_p"] == f"{p:g}" and version.tags["adps.dataset_sha256"] == listing
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and run.data.params["erasure_p"] == f"{p:g}"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mse")] == [20]
        # It denoises: finite output of the image's shape.
        x = torch.zeros(2, 3, RES, RES)
        cond = torch.ones(2, 1, RES, RES) if p > 0 else None
        with torch.no_grad():
            out = model(x, 0.5, cond=cond)
        assert out.shape == x.shape and bool(torch.isfinite(out).all())

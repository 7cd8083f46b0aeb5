"""Tests of adps.nn.train_step: one optimisation step of every method, and its benchmark."""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from adps.data.phantom import synthetic_batch
from adps.mri import SenseOperator, lines_at
from adps.nn import (
    BATCH_KEYS,
    EMA,
    METHODS,
    MRI_METHODS,
    MoDL,
    NCSNv2,
    build_model,
    make_optimizer,
    method_loss,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]
# Small enough for 2 CPU cores, large enough for METHOD.md's 20 ACS columns at R + 1 = 3.
SMALL = dict(n=2, coils=2, height=32, width=64, acceleration=2, seed=0)


# Small tensors: one intra-op thread is faster and immune to busy neighbours (see conftest).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def small_batch() -> dict[str, Tensor]:
    return synthetic_batch(**SMALL)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fixed_loss(method: str, model: nn.Module, batch: dict[str, Tensor], seeds: int = 4) -> float:
    """The loss at fixed draws (sigma, noise, split), dropout off: comparable before and after."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        total = sum(
            float(method_loss(method, model, batch, generator=torch.Generator().manual_seed(100 + s)))
            for s in range(seeds)
        )
    model.train(was_training)
    return total / seeds


# ------------------------------------------------------------------------------ the batch


def test_synthetic_batch_has_the_dataset_layout() -> None:
    batch = synthetic_batch(3, 4, 32, 120, 4, seed=5)
    assert set(batch) == {"kspace", "maps", "reference", "mask", "mask_further", "l1", "slice_id"}
    assert batch["kspace"].shape == batch["maps"].shape == (3, 4, 32, 120)
    assert batch["kspace"].dtype == batch["maps"].dtype == batch["reference"].dtype == torch.complex64
    assert batch["reference"].shape == batch["l1"].shape == (3, 32, 120)
    assert batch["mask"].dtype == batch["mask_further"].dtype == torch.bool
    assert batch["mask"].shape == batch["mask_further"].shape == (3, 120)
    assert batch["slice_id"].tolist() == [0, 1, 2] and batch["slice_id"].dtype == torch.int64
    assert (batch["mask"].sum(1) == lines_at(120, 4)).all() and (batch["mask_further"].sum(1) == lines_at(120, 5)).all()
    assert not bool((batch["mask_further"] & ~batch["mask"]).any())  # A~ inside A
    assert not torch.equal(batch["mask"][0], batch["mask"][1])  # one mask per slice
    # Normalised maps: the coil combination of the fully sampled k-space is the reference.
    combined = SenseOperator(batch["maps"]).adjoint(batch["kspace"])
    torch.testing.assert_close(combined, batch["reference"], rtol=1e-4, atol=1e-5)
    again = synthetic_batch(3, 4, 32, 120, 4, seed=5)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


# ------------------------------------------------------------------------------ every method


@pytest.mark.parametrize("method", MRI_METHODS)
def test_step_changes_the_weights_and_lowers_the_loss_on_a_fixed_batch(method: str, small_batch: dict) -> None:
    torch.manual_seed(0)
    model = build_model(method, "tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    ema = EMA(model, half_life_images=10)
    generator = torch.Generator().manual_seed(0)
    before = _fixed_loss(method, model, small_batch)
    weights = _snapshot(model)

    result = train_step(method, model, small_batch, optimizer, generator=generator, ema=ema)
    per_sample = {"sigma", "sample_loss"} if method in ("ambient", "edm", "edm_l1") else set()
    assert set(result) == {"loss", "grad_norm", "skipped", "nonfinite_grads"} | per_sample
    assert not result["skipped"] and math.isfinite(result["loss"]) and result["grad_norm"] > 0
    assert result["nonfinite_grads"] == 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert len(changed) > len(weights) // 2, f"only {changed} changed"
    assert ema.images_seen == SMALL["n"]
    assert all(p.dtype == torch.float32 for p in model.parameters())

    for _ in range(7):
        assert not train_step(method, model, small_batch, optimizer, generator=generator, ema=ema)["skipped"]
    after = _fixed_loss(method, model, small_batch)
    assert after < before, f"{method}: loss {before:.4g} -> {after:.4g}"


@pytest.mark.parametrize("method", ["ambient", "ncsnv2", "modl", "ssdu"])
def test_step_at_the_paper_matrix_size(method: str) -> None:
    # 384 x 320 with 4 coils: the training size. (edm and edm_l1 share the ambient UNet and
    # run at the small size above: a 384 x 320 step of each would cost seconds on 2 cores.)
    batch = synthetic_batch(1, 4, 384, 320, 4, seed=1)
    torch.manual_seed(1)
    model = build_model(method, "tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    weights = _snapshot(model)
    result = train_step(method, model, batch, optimizer, generator=torch.Generator().manual_seed(1))
    assert not result["skipped"] and math.isfinite(result["loss"])
    assert any(not torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# Where each method reads the value that the NaN test poisons (a measured ACS column).
_POISON_KEY = {"ambient": "kspace", "edm": "reference", "edm_l1": "l1", "ncsnv2": "reference",
               "modl": "kspace", "ssdu": "kspace"}


@pytest.mark.parametrize("method", MRI_METHODS)
def test_a_nan_in_the_batch_skips_the_step(method: str, small_batch: dict) -> None:
    torch.manual_seed(2)
    model = build_model(method, "tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = EMA(model)
    batch = {k: v.clone() for k, v in small_batch.items()}
    key = _POISON_KEY[method]
    centre = SMALL["width"] // 2  # an ACS column: measured, and in SSDU's input set
    batch[key][(0, 0, 5, centre) if batch[key].ndim == 4 else (0, 5, centre)] = float("nan")
    weights = _snapshot(model)
    result = train_step(method, model, batch, optimizer, generator=torch.Generator().manual_seed(0), ema=ema)
    assert result["skipped"] and math.isnan(result["loss"])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not optimizer.state  # Adam took no step
    assert ema.images_seen == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["ambient", "modl", "ssdu"])
def test_measurement_methods_never_see_unmeasured_kspace(method: str, small_batch: dict) -> None:
    torch.manual_seed(3)
    model = build_model(method, "tiny").eval()
    tampered = dict(small_batch)
    outside = ~small_batch["mask"][:, None, None, :]
    tampered["kspace"] = torch.where(outside, torch.full_like(small_batch["kspace"], float("nan")),
                                     small_batch["kspace"])
    with torch.no_grad():
        clean = method_loss(method, model, small_batch, generator=torch.Generator().manual_seed(4))
        poisoned = method_loss(method, model, tampered, generator=torch.Generator().manual_seed(4))
    assert math.isfinite(float(clean))
    assert torch.equal(clean, poisoned)


class _SqrtDenoiser(nn.Module):
    """D(x) = x + sqrt(p) * mean(x) + q * x: finite output at p = 0, infinite d/dp."""

    sigma_data = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.q = nn.Parameter(torch.full((), 0.3))

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        return x + self.p.sqrt() * x.mean() + self.q * x


def test_nonfinite_gradients_are_zeroed_and_the_norm_clipped(small_batch: dict) -> None:
    model = _SqrtDenoiser()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = train_step("edm", model, small_batch, optimizer, generator=torch.Generator().manual_seed(0))
    assert result["nonfinite_grads"] == 1 and not result["skipped"]
    assert float(model.p.detach()) == 0.0  # its gradient was zeroed, not applied
    # The finite gradient (q's) was large and is clipped to norm 1: SGD moved q by exactly 1.
    assert result["grad_norm"] > 1.0
    assert abs(float(model.q.detach()) - 0.3) == pytest.approx(1.0, rel=1e-5)


def test_clipping_can_be_switched_off(small_batch: dict) -> None:
    model = _SqrtDenoiser()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    result = train_step("edm", model, small_batch, optimizer, generator=torch.Generator().manual_seed(0),
                        grad_clip=None)
    assert abs(float(model.q.detach()) - 0.3) == pytest.approx(1e-6 * result["grad_norm"], rel=1e-3)


def test_bf16_autocast_keeps_float32_master_weights(small_batch: dict) -> None:
    torch.manual_seed(5)
    model = build_model("ambient", "tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    result = train_step("ambient", model, small_batch, optimizer, generator=torch.Generator().manual_seed(0),
                        amp="bf16")
    assert not result["skipped"] and math.isfinite(result["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="amp"):
        train_step("ambient", model, small_batch, optimizer, amp="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cuda(amp: str, small_batch: dict) -> None:
    device = torch.device("cuda")
    torch.manual_seed(6)
    model = build_model("ambient", "tiny").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    generator = torch.Generator(device=device).manual_seed(0)
    results = [train_step("ambient", model, small_batch, optimizer, generator=generator, amp=amp, scaler=scaler)
               for _ in range(3)]
    assert all(math.isfinite(r["loss"]) for r in results)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for method in ("ssdu", "ncsnv2"):
        model = build_model(method, "tiny").to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        assert math.isfinite(train_step(method, model, small_batch, opt, generator=generator, amp=amp)["loss"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_build_trainee_sets_cudnn_benchmark_on_gpu_only(device: str) -> None:
    """TrainConfig.cudnn_benchmark reaches torch on a GPU worker; a CPU worker leaves the flag alone."""
    from adps.orchestration.train_config import TrainConfig
    from adps.orchestration.train_worker import build_trainee

    before = torch.backends.cudnn.benchmark
    try:
        for wanted in (True, False):
            torch.backends.cudnn.benchmark = not wanted
            build_trainee(TrainConfig(method="ambient", preset="tiny", cudnn_benchmark=wanted), device=device)
            assert torch.backends.cudnn.benchmark == (wanted if device == "cuda" else not wanted)
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_make_optimizer_is_fused_on_cuda_only(device: str) -> None:
    optimizer = make_optimizer(build_model("edm", "tiny").to(device), lr=1e-3, betas=(0.8, 0.99), eps=1e-6)
    assert bool(optimizer.defaults["fused"]) == (device == "cuda")
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["eps"]) == (1e-3, (0.8, 0.99), 1e-6)


def test_fused_adam_takes_the_default_steps_and_state(small_batch: dict) -> None:
    """What make_optimizer switches on for CUDA, checked with torch's CPU build of the same fused
    kernel: the same weights after three steps, and state dicts that move between the two."""
    runs = {}
    for fused in (None, True):
        torch.manual_seed(3)
        model = build_model("ambient", "tiny")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            train_step("ambient", model, small_batch, optimizer, generator=generator)
        runs[fused] = (model, optimizer)
    for (name, a), b in zip(runs[None][0].named_parameters(), runs[True][0].parameters(), strict=True):
        # Rounding only: the two differ by up to 1.1e-5 here (with the mask channels scaled by
        # c_in; 1.6e-6 without), under 1 % of the three steps' 1.5e-3 change: Adam divides by the
        # root of tiny second moments, which magnifies rounding. atol is 2 % of one step of lr 1e-3.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    fused_again = torch.optim.Adam(runs[True][0].parameters(), lr=1e-3, fused=True)
    fused_again.load_state_dict(runs[None][1].state_dict())  # a checkpoint of the default optimiser
    assert len(fused_again.state) == len(runs[None][1].state)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of the DDP test: rank 0 gets a NaN batch; both must skip, then both step."""
    torch.set_num_threads(1)  # two ranks on two cores
    # A timeout turns a rank waiting alone in an all-reduce into an error instead of a hang.
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = nn.parallel.DistributedDataParallel(build_model("modl", "tiny"))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(rank)
        maps = torch.complex(torch.randn(1, 2, 16, 24, generator=gen), torch.randn(1, 2, 16, 24, generator=gen))
        maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()
        image = torch.complex(torch.randn(1, 16, 24, generator=gen), torch.randn(1, 16, 24, generator=gen))
        mask = torch.zeros(1, 24, dtype=torch.bool)
        mask[:, ::2] = True
        batch = {"kspace": SenseOperator(maps).forward(image), "maps": maps, "reference": image, "mask": mask}
        poisoned = {**batch, "kspace": batch["kspace"].clone()}
        if rank == 0:
            poisoned["kspace"][0, 0, 3, 4] = float("nan")  # column 4 is measured
        weights = _snapshot(model)
        first = train_step("modl", model, poisoned, optimizer, generator=gen)
        unchanged = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        second = train_step("modl", model, batch, optimizer, generator=gen)
        final = {k: v.tolist() for k, v in model.state_dict().items()}
        result = {"first_skipped": first["skipped"], "unchanged": unchanged, "second": second, "weights": final}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        # Both ranks leave together: a rank that tore its process group down while the other still
        # used the connection aborted the other once ("terminate called without an active exception").
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_skip_together(tmp_path: Path) -> None:
    # Rank 0's loss is NaN and rank 1's is finite: rank 1 must not enter the gradient
    # all-reduce alone (it would hang); both skip, then a clean step keeps them in sync.
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["first_skipped"] and r["unchanged"] for r in ranks)
    assert all(not r["second"]["skipped"] and math.isfinite(r["second"]["loss"]) for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged over both ranks


# ------------------------------------------------------------------------------ errors and helpers


def test_errors_name_the_problem(small_batch: dict) -> None:
    model = build_model("edm", "tiny")
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="unknown method 'vae'"):
        train_step("vae", model, small_batch, optimizer)
    without_l1 = {k: v for k, v in small_batch.items() if k != "l1"}
    with pytest.raises(KeyError, match=r"edm_l1: batch lacks key\(s\) \['l1'\]"):
        train_step("edm_l1", build_model("edm_l1", "tiny"), without_l1, optimizer)
    with pytest.raises(TypeError, match="expected a MoDL model"):
        method_loss("ssdu", model, small_batch)
    with pytest.raises(ValueError, match="preset must be 'modl' or 'tiny'"):
        build_model("ssdu", "ambient")


def test_build_model_gives_each_method_its_network() -> None:
    assert isinstance(build_model("modl"), MoDL) and isinstance(build_model("ssdu"), MoDL)
    assert isinstance(build_model("ncsnv2"), NCSNv2)
    assert build_model("ambient").net.config.in_channels == 4
    assert build_model("edm").net.config.in_channels == 2 and build_model("edm_l1").net.config.out_channels == 2
    assert set(BATCH_KEYS) == set(METHODS)
    assert "reference" not in BATCH_KEYS["ambient"] and "reference" not in BATCH_KEYS["ssdu"]


# ------------------------------------------------------------------------------ benchmark


def test_train_step_bench_prints_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.train_step", "--device", "cpu", "--threads", "1", "--batch", "1", "--coils", "2",
         "--height", "32", "--width", "64", "--warmup", "0", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["method"] for row in rows] == list(MRI_METHODS)
    for row in rows:
        assert row["device"].startswith("cpu") and row["device"].endswith(", 1 threads)")
        assert row["preset"] == "tiny"
        assert (row["batch"], row["height"], row["width"], row["coils"]) == (1, 32, 64, 2)
        assert row["slices_per_s"] > 0 and row["peak_memory_gb"] > 0 and row["loss_finite"]
    ambient = rows[0]["paper_reference"]
    assert ambient["slices_per_s"] == 19.7 and ambient["peak_memory_gb"] == 54.0 and ambient["precision"] == "fp16"
    assert all(row["paper_reference"] is None for row in rows[1:])


def test_loss_by_sigma_bins_each_sample_by_its_noise_level() -> None:
    """The training loss per sigma bin: each sample in the bin of its sigma, the mean per bin,
    empty bins absent, non-finite losses skipped, and the bins emptied once read."""
    from adps.nn.train_step import SIGMA_BIN_EDGES, LossBySigma

    bins = LossBySigma()
    assert bins.labels() == ["lt0.01", "0.01-0.05", "0.05-0.2", "0.2-1", "1-5", "gt5"] and len(SIGMA_BIN_EDGES) == 5
    bins.add([0.003, 0.1, 0.15, 7.0, 0.3], [100.0, 2.0, 4.0, 0.5, float("nan")])
    assert bins.means() == {"loss_by_sigma/lt0.01": 100.0, "loss_by_sigma/0.05-0.2": 3.0, "loss_by_sigma/gt5": 0.5}
    assert bins.means() == {}


def test_train_step_reports_each_samples_sigma_and_loss() -> None:
    """A diffusion step returns its samples' sigma and loss (the mean of which is its loss);
    a method without a noise level returns neither."""
    torch.manual_seed(0)
    batch = synthetic_batch(3, 2, 16, 16, 2, seed=0, with_l1=False)
    model = build_model("edm", "tiny")
    out = train_step("edm", model, batch, make_optimizer(model), generator=torch.Generator().manual_seed(0))
    assert len(out["sigma"]) == len(out["sample_loss"]) == 3 and all(s > 0 for s in out["sigma"])
    assert sum(out["sample_loss"]) / 3 == pytest.approx(out["loss"], rel=1e-5)
    modl = build_model("modl", "tiny")
    assert "sigma" not in train_step("modl", modl, batch, make_optimizer(modl))

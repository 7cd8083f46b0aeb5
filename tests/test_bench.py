"""The benchmark scripts run and print what they promise (a tiny size, on CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_operators_bench_prints_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "bench/operators.py", "--device", "cpu", "--slices", "2", "--coils", "3",
         "--height", "32", "--width", "40", "--acceleration", "1", "--warmup", "1", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 5
    assert all(row["device"].startswith("cpu") and row["median_ms"] > 0 for row in rows)
    assert rows[0]["shape"] == [2, 3, 32, 40]


def test_baseline_in_bench_equals_the_operator() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from operators import normal_with_shifts
    finally:
        sys.path.pop(0)
    from adps.mri import SenseOperator

    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 16, 12, dtype=torch.complex64, generator=generator)
    image = torch.randn(2, 16, 12, dtype=torch.complex64, generator=generator)
    op = SenseOperator(maps, torch.rand(12, generator=generator) > 0.5)
    torch.testing.assert_close(normal_with_shifts(op, image), op.normal(image), rtol=1e-5, atol=1e-5)


def _load_bench(name: str):
    """A bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_scaling_bench_measures_every_configuration(ray_session, tmp_path: Path) -> None:
    """CPU mode, tiny: the bare step, worker_loop without Ray, and Ray Train with 2 workers on the
    session's Ray instance (which the bench reuses and leaves running). One Ray Train run costs
    30-50 s here (the 1-worker run is the same code; the default benchmark runs both), and the
    shards are written directly (the prepare path is the one tests/test_train.py's fixture uses)."""
    out = tmp_path / "scaling.json"
    code = _load_bench("train_scaling").main([
        "--data", "direct", "--height", "48", "--width", "32", "--coils", "2", "--slices", "8", "--batch-size", "1",
        "--steps", "3", "--warmup", "1", "--workers", "2", "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu" and result["settings"]["height"] == 48
    rows = {(row["kind"], row["workers"]): row for row in result["rows"]}
    # Steps 1..4: step 2 follows nothing (the "ray" row), step 4 follows step 3's report.
    assert {("bare", 1), ("loop", 1), ("ray", 2), ("ray_report", 2)} <= set(rows)
    for row in result["rows"]:
        assert row["error"] is None and row["samples"] >= 1
        assert row["slices_per_s"] > 0 and row["median_ms"] > 0 and row["vs_bare"] > 0
        assert row["compile"] == "off"
    assert rows[("ray", 2)]["global_batch"] == 2
    assert ray_session.is_initialized()
    # --compile (DDP + torch.compile in the Ray rows) compiles in the first step: it needs one
    # warm-up step, and says so before anything runs.
    with pytest.raises(SystemExit) as exit_info:
        _load_bench("train_scaling").main(["--compile", "default", "--warmup", "0"])
    assert exit_info.value.code == 2


def test_train_scaling_gpu_mode_needs_no_ray_mlflow_or_sigpy(tmp_path: Path) -> None:
    """The GPU-mode code path (here on the CPU, tiny) with Ray, MLflow and sigpy unimportable,
    as on the GPU machine: the dataset is written directly and the batch has sigpy-free maps."""
    out = tmp_path / "gpu.json"
    blocked = "ray", "mlflow", "sigpy", "boto3"
    script = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        f"sys.argv = ['bench/train_scaling.py', '--gpu', '--device', 'cpu', '--preset', 'tiny', '--height', '32',"
        f" '--width', '40', '--coils', '2', '--slices', '4', '--batch-size', '2', '--steps', '2', '--warmup', '1',"
        f" '--json', {str(out)!r}]\n"
        "runpy.run_path('bench/train_scaling.py', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == "gpu" and "ray" not in data["environment"]
    assert [(row["kind"], row["amp"]) for row in data["rows"]] == [
        ("bare", "bf16"), ("loop", "bf16"), ("load", "-"), ("bare", "fp32"), ("loop", "fp32")]
    assert all(row["error"] is None and row["slices_per_s"] > 0 for row in data["rows"])
    # The data path alone against the step (issue 10: at least 5x), per precision.
    assert all(data["derived"][amp]["data_path_vs_step"] > 0 for amp in ("bf16", "fp32"))
    assert "worker_loop, no Ray" in result.stdout


def test_sample_speed_bench_prints_json_lines(tmp_path: Path) -> None:
    """The CPU case of bench/sample_speed.py at a tiny size and a few steps: one JSON line per
    batch size, with the device name and a finite seconds-per-slice, and the --json file."""
    out = tmp_path / "sample_speed.json"
    result = subprocess.run(
        [sys.executable, "bench/sample_speed.py", "--device", "cpu", "--batches", "1", "2", "--height", "16",
         "--width", "16", "--coils", "2", "--steps", "10", "--warmup", "1", "--timed-steps", "2", "--threads", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["device"].startswith("cpu") and row["sampler"] == "a_dps" and row["error"] is None
        assert row["steps"] == 10 and row["measured_steps"] == 2 and row["finite"]
        assert row["s_per_slice"] > 0 and row["median_step_ms"] > 0
    assert "s/slice" in result.stderr  # the table
    assert json.loads(out.read_text())["rows"] == rows


@pytest.mark.slow
def test_memory_plan_sums_what_the_compiled_step_saves() -> None:
    """bench/memory_plan.py partitions the compiled tiny step as Inductor would, without running it
    (about 12 s of tracing per row): a lower activation memory budget saves less, by recomputing
    element-wise work and under 1 % of the convolution FLOPs; the residual stream is saved in
    bf16; the plan is the saved tensors plus the optimiser states. A budget outside (0, 1] is
    refused. Not here: ``--checkpointing``'s row (about a third of the step's convolution FLOPs
    recomputed), whose tracing cost the suite 13 s more."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        plan = _load_bench("memory_plan")
    finally:
        sys.path.pop(0)
    shape = dict(preset="tiny", batch_size=2, height=64, width=64, coils=2, acceleration=4, amp="bf16")
    full = plan.plan_row(budget=1.0, checkpointing=False, **shape)
    lean = plan.plan_row(budget=0.5, checkpointing=False, **shape)
    assert full["parameters"] == 208674 and full["states_gib"] == pytest.approx(208674 * 20 / 2**30, abs=1e-3)
    assert full["planned_gib"] == pytest.approx(full["saved_gib"] + full["states_gib"], abs=2e-3)
    by_dtype = full["saved_gib_by_dtype"]
    # Autocast reached the traced graph, and the residual stream stays in bf16: float32 only for
    # GroupNorm statistics and the preconditioning's float32 input.
    assert by_dtype["bfloat16"] > 0 and by_dtype.get("float32", 0) < 0.1 * by_dtype["bfloat16"], by_dtype
    assert full["recomputed_convolutions"] == 0 and lean["recompute_share"] < 0.01, lean
    assert lean["saved_gib"] < 0.7 * full["saved_gib"]
    assert full["measured_reference"] is None  # only the paper-size step has one

    refused = subprocess.run([sys.executable, "bench/memory_plan.py", "--budgets", "1.5"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--budgets must be in (0, 1], got [1.5]" in refused.stderr


@pytest.mark.slow
def test_kernel_plan_schedules_the_gpu_kernels_on_the_cpu() -> None:
    """bench/kernel_plan.py lowers the compiled A-DPS step (tiny, 32 x 32) with Inductor's GPU
    scheduler on this machine, where no GPU exists: it finds generated kernels and library calls
    moving bytes, counts the convolutions of a forward pass and a gradient to x (two forward
    passes, as flop_count.py), derives its floors from those figures, and leaves torch.cuda as
    it found it once the stand-in device is gone; ``inline`` patches Inductor's thresholds only
    while it plans."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        plan = _load_bench("kernel_plan")
        flops = _load_bench("flop_count")
    finally:
        sys.path.pop(0)
    import torch._inductor.config as inductor_config

    available, properties = torch.cuda.is_available(), torch.cuda.get_device_properties
    reads_threshold = inductor_config.realize_reads_threshold
    opcount_threshold = inductor_config.realize_opcount_threshold
    row = plan.plan_row("a_dps", "tiny", batch_size=2, height=32, width=32, coils=2, amp="bf16", top=4)
    assert torch.cuda.is_available() == available and torch.cuda.get_device_properties is properties
    forward, step = flops.count_flops("tiny", 32, 32, weights_grad=False)
    assert row["convolution_flop"] == pytest.approx(step, rel=0.02)
    assert row["generated_kernels"] > 50 and row["library_calls"] > 20
    assert row["generated_bytes"] > 1e6 and row["library_gb"] > 0 and row["saved_gib"] > 0
    assert 0 < row["generated_gb_forward"] < row["generated_gb"]
    # Inductor's own heuristic keeps this U-Net's convolutions NCHW (the H200 profile's cuDNN
    # transposes); bench/train_step.py's nhwc forces channels-last.
    assert row["nhwc"] is False and row["channels_last_layouts"] == {"forward": False, "backward": False}
    h100 = plan.DEVICES["h100"]
    floor = row["convolution_flop"] / h100["bf16_dense_tflops"] / 1e9 + row["generated_bytes"] / h100["memory_tbps"] / 1e9
    assert row["floor_ms_h100"] == pytest.approx(floor, abs=0.006)
    assert row["floor_ms_h200"] <= row["floor_ms_h100"] <= row["floor_ms_h100_at_measured_conv_rate"]
    assert row["floor_s_per_slice_h100"] == pytest.approx(row["floor_ms_h100"] * 0.5, abs=0.01)
    # The stand-in picks cuDNN's convolutions, as a GPU would: channels-last in, channels-last out.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with plan.stand_in_gpu(), FakeTensorMode():
        x = torch.empty(1, 8, 8, 8, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.empty(4, 8, 3, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        assert torch.nn.functional.conv2d(x, w).is_contiguous(memory_format=torch.channels_last)
    top = row["top_kernels"]
    assert len(top) == 4 and [k["gb"] for k in top] == sorted((k["gb"] for k in top), reverse=True)
    assert any(k["kernel"].startswith("library: convolution") for k in top)
    # Inlining (bench/train_step.py's inductor_inlining) raises Inductor's realize thresholds
    # while a graph is lowered and restores them after. Its effect (the same convolutions, fewer
    # kernels and 9.7 % fewer bytes here, 10.7 % at the paper's size) is planned by
    # `kernel_plan.py --inline off on` (bench/results/2026-12-03_cpu_kernel_plan.jsonl); a second
    # plan would add about a minute to this, CI's slowest test.
    assert row["inline"] is False and inductor_config.realize_reads_threshold == reads_threshold
    with plan.inductor_inlining(True):
        assert inductor_config.realize_reads_threshold > reads_threshold
        assert inductor_config.realize_opcount_threshold not in (None, opcount_threshold)
    assert (inductor_config.realize_reads_threshold, inductor_config.realize_opcount_threshold) == (
        reads_threshold, opcount_threshold)  # restored


def test_eager_memory_plans_what_the_eager_step_keeps() -> None:
    """bench/eager_memory.py (tiny presets, 32 and 64 px): the kept bytes grow with the pixels;
    the fixed part of the fit is autocast's bf16 copy of the weights (2 bytes per parameter);
    with activation checkpointing, U-Net and NCSNv2 keep under a third of it."""
    sys.path.insert(0, str(ROOT / "bench"))  # it imports bench/memory_plan.py
    try:
        plan = _load_bench("eager_memory")
    finally:
        sys.path.pop(0)
    rows = {}
    for method in ("ambient", "ncsnv2"):
        for checkpointing in (False, True):
            rows[method, checkpointing] = row = plan.plan_row(
                method, checkpointing=checkpointing, sizes=((32, 32), (64, 64)), target=(8, 384, 320), preset="tiny")
            small, large = row["kept_mib_at_fit_sizes"]
            assert 0 < small < large and row["activations_gib"] > 0
            assert row["planned_gib"] == pytest.approx(
                row["activations_gib"] + row["fixed_mib"] / 1024 + row["optimizer_gib"], abs=0.02)
        plain, lean = rows[method, False], rows[method, True]
        assert plain["fixed_mib"] == pytest.approx(2 * plain["parameters"] / 2**20, abs=0.05)
        assert lean["activations_gib"] < plain["activations_gib"] / 3


def test_flop_count_gives_each_target_its_rate() -> None:
    """bench/flop_count.py on the meta device: a training step is three forward passes of
    convolutions (forward, input and weight gradients), an A-DPS step two (no weight gradient),
    and each target's rate is its FLOPs times its speed."""
    result = subprocess.run([sys.executable, "bench/flop_count.py", "--preset", "tiny", "--height", "64",
                             "--width", "64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    train, a_dps = (json.loads(line) for line in result.stdout.splitlines())
    forward = train["forward_flop_per_slice"]
    assert forward > 1e8 and forward == a_dps["forward_flop_per_slice"]
    assert train["flop_per_slice"] == pytest.approx(3 * forward, rel=0.02)
    assert a_dps["flop_per_slice_step"] == pytest.approx(2 * forward, rel=0.02)
    assert train["target_tflops"] == pytest.approx(train["flop_per_slice"] * 40 / 1e12, abs=0.06)
    assert a_dps["tflop_per_slice"] == pytest.approx(a_dps["flop_per_slice_step"] * 500 / 1e12, abs=0.06)
    assert "of the H100's dense bf16 peak" in result.stderr


def test_train_step_rows_parse_into_their_settings() -> None:
    """bench/train_step.py --rows: each comma-separated option sets one field of the row, the JSON
    row names them, and an unknown option or a budget outside (0, 1] is refused by name."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        bench = _load_bench("train_step")
    finally:
        sys.path.pop(0)
    spec = bench.parse_row("compile=reduce-overhead,cudnn,nhwc,inline,budget=0.7")
    assert spec == bench.RowSpec(compile="reduce-overhead", cudnn=True, nhwc=True, inline=True, budget=0.7)
    fields = spec.row_fields()
    assert fields["inductor_inline"] is True and fields["inductor_nhwc"] is True
    assert fields["activation_memory_budget"] == 0.7
    # The precision check compiles the plain denoiser: it stands for no row with other kernels.
    assert not spec.has_plain_graph and bench.parse_row("compile,nhwc").has_plain_graph
    assert bench.parse_row("eager") == bench.RowSpec()
    with pytest.raises(argparse.ArgumentTypeError, match="unknown row option 'inlined'"):
        bench.parse_row("compile,inlined")
    with pytest.raises(argparse.ArgumentTypeError, match="budget must be in"):
        bench.parse_row("compile,budget=1.5")
    # A ckpt row of NCSNv2 (gpu_check's train_step_ncsnv2 measures its paper preset): it runs
    # with the lean mode on; MoDL has no such mode and the row says so.
    cpu = torch.device("cpu")
    row = bench.bench_one("ncsnv2", "tiny", cpu, 1, 32, 40, 2, 4, None, 1, 1, bench.parse_row("ckpt"))
    assert row["activation_checkpointing"] is True and row["loss_finite"] is True
    with pytest.raises(ValueError, match="modl's network has no activation checkpointing"):
        bench.bench_one("modl", "tiny", cpu, 1, 32, 40, 2, 4, None, 1, 1, bench.parse_row("ckpt"))


def test_tiny_rows_run_the_gpu_rows_configurations_on_the_cpu(monkeypatch, capsys) -> None:
    """bench/train_step.py --tiny-rows (gpu_check.sh's GPU_CHECK_DRY_RUN=compiled): the rows, which
    otherwise run at the paper's size on CUDA only, run with the tiny preset at the given size on
    the CPU, for the --paper-methods only; the tiny rows of every method come first, as always."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        bench = _load_bench("train_step")
    finally:
        sys.path.pop(0)
    argv = ["train_step.py", "--device", "cpu", "--methods", "ambient", "modl", "--height", "16", "--width", "16",
            "--coils", "2", "--warmup", "1", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", "ckpt"])
    assert bench.main() == 0
    assert [row["method"] for row in map(json.loads, capsys.readouterr().out.splitlines())] == ["ambient", "modl"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", "ckpt", "--tiny-rows"])
    assert bench.main() == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["method"], row["activation_checkpointing"]) for row in rows] == [
        ("ambient", False), ("modl", False), ("ambient", True)]
    assert all(row["preset"] == "tiny" and row["height"] == 16 and row["loss_finite"] for row in rows)


def test_sample_speed_precision_check_compares_with_float32(capsys) -> None:
    """--precision-check adds one JSON line comparing a complete (short) A-DPS run under --amp with
    the float32 run. On the CPU autocast is not applied, so the two agree exactly; with no
    tolerance at all the same agreement fails the check and the exit status says so."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        bench = _load_bench("sample_speed")
    finally:
        sys.path.pop(0)
    argv = ["--device", "cpu", "--batches", "1", "--height", "16", "--width", "16", "--coils", "2", "--steps", "4",
            "--warmup", "1", "--timed-steps", "1", "--precision-check", "--precision-steps", "3",
            "--precision-batch", "2"]
    assert bench.main(argv) == 0
    check = next(row for row in map(json.loads, capsys.readouterr().out.splitlines()) if "check" in row)
    assert check["check"] == "a_dps_amp_vs_fp32" and check["steps"] == 3 and check["batch"] == 2
    assert check["recon_rel_diff"] == 0.0 and check["passed"] and check["finite"]
    assert 0 < check["nrmse_fp32"] == check["nrmse_none"]
    bench.RECON_RTOL = 0.0
    assert bench.main(argv) == 1
    assert not next(row for row in map(json.loads, capsys.readouterr().out.splitlines()) if "check" in row)["passed"]

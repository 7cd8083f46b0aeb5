"""The benchmark scripts run and print what they promise (a tiny size, on CPU)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adps.mri import SenseOperator
from bench import fewer_calls, sample_speed, train_scaling, train_step
from bench.operators import normal_with_shifts

ROOT = Path(__file__).resolve().parents[1]


def test_operators_bench_prints_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.operators", "--device", "cpu", "--slices", "2", "--coils", "3",
         "--height", "32", "--width", "40", "--acceleration", "1", "--warmup", "1", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 5
    assert all(row["device"].startswith("cpu") and row["median_ms"] > 0 for row in rows)
    assert rows[0]["shape"] == [2, 3, 32, 40]


def test_baseline_in_bench_equals_the_operator() -> None:

    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 16, 12, dtype=torch.complex64, generator=generator)
    image = torch.randn(2, 16, 12, dtype=torch.complex64, generator=generator)
    op = SenseOperator(maps, torch.rand(12, generator=generator) > 0.5)
    torch.testing.assert_close(normal_with_shifts(op, image), op.normal(image), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_train_scaling_bench_measures_every_configuration(ray_session, tmp_path: Path) -> None:
    """CPU mode, tiny: the bare step, worker_loop without Ray, and Ray Train with 2 workers on the
    session's Ray instance (which the bench reuses and leaves running). One Ray Train run costs
    30-50 s here (the 1-worker run is the same code; the default benchmark runs both), and the
    shards are written directly (the prepare path is the one tests/test_train.py's fixture uses)."""
    out = tmp_path / "scaling.json"
    code = train_scaling.main([
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
        train_scaling.main(["--compile", "default", "--warmup", "0"])
    assert exit_info.value.code == 2


def test_train_scaling_gpu_mode_needs_no_ray_mlflow_or_sigpy(tmp_path: Path) -> None:
    """The GPU-mode code path (here on the CPU, tiny) with Ray, MLflow and sigpy unimportable,
    as on the GPU machine: the dataset is written directly and the batch has sigpy-free maps."""
    out = tmp_path / "gpu.json"
    blocked = "ray", "mlflow", "sigpy", "boto3"
    script = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        f"sys.argv = ['bench.train_scaling', '--gpu', '--device', 'cpu', '--preset', 'tiny', '--height', '32',"
        f" '--width', '40', '--coils', '2', '--slices', '4', '--batch-size', '2', '--steps', '2', '--warmup', '1',"
        f" '--json', {str(out)!r}]\n"
        "runpy.run_module('bench.train_scaling', run_name='__main__')\n"
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
        [sys.executable, "-m", "bench.sample_speed", "--device", "cpu", "--batches", "1", "2", "--height", "16",
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


def test_train_step_rows_parse_into_their_settings() -> None:
    """bench/train_step.py --rows: each comma-separated option sets one field of the row, the JSON
    row names them, and an unknown option or a budget outside (0, 1] is refused by name."""
    spec = train_step.parse_row("compile=reduce-overhead,cudnn,nhwc,inline,budget=0.7")
    assert spec == train_step.RowSpec(compile="reduce-overhead", cudnn=True, nhwc=True, inline=True, budget=0.7)
    fields = spec.row_fields()
    assert fields["inductor_inline"] is True and fields["inductor_nhwc"] is True
    assert fields["activation_memory_budget"] == 0.7
    # The precision check compiles the plain denoiser (with the row's memory budget): it stands
    # for no row with other kernels.
    assert not spec.has_plain_graph and train_step.parse_row("compile,nhwc,budget=0.7").has_plain_graph
    assert train_step.parse_row("eager") == train_step.RowSpec()
    with pytest.raises(argparse.ArgumentTypeError, match="unknown row option 'inlined'"):
        train_step.parse_row("compile,inlined")
    with pytest.raises(argparse.ArgumentTypeError, match="budget must be in"):
        train_step.parse_row("compile,budget=1.5")
    # A ckpt row of NCSNv2 (gpu_check's train_step_ncsnv2 measures its paper preset): it runs
    # with the lean mode on; MoDL has no such mode and the row says so.
    cpu = torch.device("cpu")
    row = train_step.bench_one("ncsnv2", "tiny", cpu, 1, 32, 40, 2, 4, None, 1, 1, train_step.parse_row("ckpt"))
    assert row["activation_checkpointing"] is True and row["loss_finite"] is True
    with pytest.raises(ValueError, match="modl's network has no activation checkpointing"):
        train_step.bench_one("modl", "tiny", cpu, 1, 32, 40, 2, 4, None, 1, 1, train_step.parse_row("ckpt"))


def test_tiny_rows_run_the_gpu_rows_configurations_on_the_cpu(monkeypatch, capsys) -> None:
    """bench/train_step.py --tiny-rows (gpu_check.sh's GPU_CHECK_DRY_RUN=compiled): the rows, which
    otherwise run at the paper's size on CUDA only, run with the tiny preset at the given size on
    the CPU, for the --paper-methods only; the tiny rows of every method come first, as always."""
    argv = ["train_step.py", "--device", "cpu", "--methods", "ambient", "modl", "--height", "16", "--width", "16",
            "--coils", "2", "--warmup", "1", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", "ckpt"])
    assert train_step.main() == 0
    assert [row["method"] for row in map(json.loads, capsys.readouterr().out.splitlines())] == ["ambient", "modl"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", "ckpt", "--tiny-rows"])
    assert train_step.main() == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["method"], row["activation_checkpointing"]) for row in rows] == [
        ("ambient", False), ("modl", False), ("ambient", True)]
    assert all(row["preset"] == "tiny" and row["height"] == 16 and row["loss_finite"] for row in rows)


def test_sample_speed_precision_check_compares_with_float32(monkeypatch, capsys) -> None:
    """--precision-check adds one JSON line comparing a complete (short) A-DPS run under --amp with
    the float32 run. On the CPU autocast is not applied, so the two agree exactly; with no
    tolerance at all the same agreement fails the check and the exit status says so."""
    argv = ["--device", "cpu", "--batches", "1", "--height", "16", "--width", "16", "--coils", "2", "--steps", "4",
            "--warmup", "1", "--timed-steps", "1", "--precision-check", "--precision-steps", "3",
            "--precision-batch", "2"]
    assert sample_speed.main(argv) == 0
    check = next(row for row in map(json.loads, capsys.readouterr().out.splitlines()) if "check" in row)
    assert check["check"] == "a_dps_amp_vs_fp32" and check["steps"] == 3 and check["batch"] == 2
    assert check["recon_rel_diff"] == 0.0 and check["passed"] and check["finite"]
    assert 0 < check["nrmse_fp32"] == check["nrmse_none"]
    monkeypatch.setattr(sample_speed, "RECON_RTOL", 0.0)
    assert sample_speed.main(argv) == 1
    assert not next(row for row in map(json.loads, capsys.readouterr().out.splitlines()) if "check" in row)["passed"]


def test_fewer_calls_bench_finds_the_calls_within_tolerance_of_the_protocol(capsys, tmp_path: Path) -> None:
    """bench/fewer_calls.py with the exact Gaussian denoisers: every solver x step count plus the
    500-step Euler reference, per sampler; the summary names the fewest network calls within 1 %
    of the reference's NRMSE. With exact denoisers a few Euler steps are already there (the
    protocol's 500 are for learned denoisers; bench/README.md has the table)."""
    out = tmp_path / "fewer.json"
    assert fewer_calls.main(["--steps", "5", "10", "--json", str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows = [line for line in lines if "summary" not in line]
    summary = [line for line in lines if "summary" in line]
    assert {(r["sampler"], r["solver"], r["steps"], r["network_calls"]) for r in rows} == {
        (sampler, solver, steps, steps if solver == "euler" else 2 * steps - 1)
        for sampler in ("a_dps", "dps") for solver, steps in
        (("euler", 5), ("euler", 10), ("euler", 500), ("heun", 5), ("heun", 10))}
    assert all(0 < r["nrmse"] < 1 and r["s_per_slice"] > 0 and r["device"].startswith("cpu") for r in rows)
    assert {(s["sampler"], s["solver"]) for s in summary} == {(a, b) for a in ("a_dps", "dps") for b in ("euler", "heun")}
    for line in summary:
        reference = next(r for r in rows if (r["sampler"], r["solver"], r["steps"]) == (line["sampler"], "euler", 500))
        assert line["reference_nrmse"] == reference["nrmse"] and line["reference_calls"] == 500
        if line["solver"] == "euler":  # exact denoisers: 10 calls or fewer reach the protocol's NRMSE
            assert line["network_calls"] <= 10 and line["nrmse"] <= reference["nrmse"] * 1.01
    assert json.loads(out.read_text())["summary"] == summary


def test_fewer_calls_bench_trains_a_model_first_and_compares_it_with_zero_filling(capsys, tmp_path: Path) -> None:
    """--train-steps: an ambient model trained in the script (gpu_check.sh's row on the GPU), then
    A-DPS on other phantoms; the summary carries the zero-filled NRMSE beside the protocol's."""
    out = tmp_path / "trained.json"
    assert fewer_calls.main(["--train-steps", "3", "--train-batch", "2", "--train-slices", "4", "--height", "32",
                             "--width", "32", "--coils", "2", "--slices", "2", "--steps", "5", "--solvers", "euler",
                             "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["training"]["train_steps"] == 3 and document["training"]["train_preset"] == "tiny"
    assert {(r["problem"], r["sampler"], r["steps"]) for r in document["rows"]} == {
        ("trained-ambient-tiny", "a_dps", 5), ("trained-ambient-tiny", "a_dps", 500)}
    (line,) = document["summary"]
    assert 0 < line["zero_filled_nrmse"] < 1.5 and line["reference_nrmse"] > 0
    with pytest.raises(SystemExit):
        fewer_calls.main(["--model", "x", "--dataset", "y", "--train-steps", "3"])
    assert "exclude each other" in capsys.readouterr().err

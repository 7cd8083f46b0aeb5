"""The embedded demo and the command line, run as a user runs them."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def adps(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adps", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_console_entry_point_is_installed(tmp_path: Path) -> None:
    script = BIN / "adps"
    if not script.exists():
        pytest.skip("adps is not installed in this environment (run through bootstrap.py)")
    result = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("adps ")


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    """``adps demo --quick`` as a user runs it (its own local Ray): every stage runs, the MLflow
    store in the work folder holds the registered models (the searched one tagged with its
    tuned guidance), the evaluation run with the cross-over and the figures."""
    from mlflow import MlflowClient

    workdir = tmp_path / "demo"
    first = adps("demo", "--quick", "--workdir", str(workdir), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert all(f"[{n}/6]" in out for n in range(1, 7)), out
    assert "mean nrmse over slices" in out and "cross-over" in out and "where everything is" in out

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    models = {m.name: m for m in client.search_registered_models()}
    assert set(models) == {"adps-ambient-r4", "adps-edm-r1"}
    tuned = client.get_model_version("adps-ambient-r4", "1").tags
    assert 0.1 <= float(tuned["adps.tuned.r8.guidance"]) <= 10 and tuned["adps.tuned.r8.steps"] == "10"
    assert 0.02 <= float(tuned["adps.tuned.r8.sigma_min"]) <= 0.5 and 0.003 <= float(tuned["adps.tuned.r4.a_os.sigma"]) <= 1
    # A fair comparison: the clean model was searched alike (same budget, same split).
    edm = client.get_model_version("adps-edm-r1", "1").tags
    assert 0.1 <= float(edm["adps.tuned.r8.guidance"]) <= 10 and edm["adps.tuned.r8.budget"] == tuned["adps.tuned.r8.budget"]
    assert edm["adps.tuned.r8.split"] == tuned["adps.tuned.r8.split"] == "val"

    experiment = client.get_experiment_by_name("adps-demo-eval")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.parquet", "results.csv", "crossover.csv", "nrmse_vs_r.png", "reconstructions.png"} <= artifacts
    report = workdir / "evaluation" / "report"
    with (report / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # The cross-over of the ambient model against edm_r1, per metric: what the printout, the CSV
    # and MLflow say is what the results table gives when computed again.
    from adps.crossover import crossover

    table = [{**r, "r_inf": float(r["r_inf"]), **{m: float(r[m]) for m in ("nrmse", "psnr", "ssim")}} for r in rows
             if r["sampler"] in ("a_dps", "dps")]
    with (report / "crossover.csv").open() as handle:
        logged = {r["metric"]: r for r in csv.DictReader(handle)}
    tagged = {o: set(filter(None, run.data.tags[f"adps.crossover_{o}"].split(","))) for o in ("none", "inconclusive")}
    for metric in ("nrmse", "psnr", "ssim"):
        again = crossover(table, "ambient_r4", "edm_r1", metric, n_boot=1000, seed=0)
        assert logged[metric]["outcome"] == again.outcome and float(logged[metric]["level"]) == 0.95
        key = f"ambient_r4.{metric}"
        said = [f"crossover_r.{key}" in run.data.metrics, f"crossover_inconclusive_r.{key}" in run.data.metrics,
                key in tagged["inconclusive"], key in tagged["none"]]
        expected = {"crossover": [True, False, False, False], "inconclusive": [False, True, True, False],
                    "none": [False, False, False, True]}[again.outcome]
        assert said == expected, (metric, again, said)
        assert f"ambient_r4     {metric:6s} {again.outcome}" in out
    # ambient_r4 by A-DPS at R_inf 4 and 8 and A-OS at 4, edm_r1 by DPS at both: 5 cells x 2 test
    # slices; zero-filled and CG-SENSE at both for scale: 4 cells x 2.
    assert len(rows) == 18 and {float(r["r_inf"]) for r in rows} == {4.0, 8.0}
    trained = [r for r in rows if r["model"] in ("ambient_r4", "edm_r1")]
    assert len(trained) == 10 and {r["steps"] for r in trained if r["sampler"] != "a_os"} == {"10"}
    assert {r["steps"] for r in trained if r["sampler"] == "a_os"} == {"0"}  # one call, no steps
    assert {r["model"] for r in rows} - {r["model"] for r in trained} == {"zero_filled", "cg_sense"}
    # The ambient model's schedule ends where the demo (or its search) says, not at 0.004; the
    # searched settings are used at R_inf 8, for both models, and each row says so.
    assert all("sigma_min=" in r["options"] for r in rows if r["sampler"] == "a_dps")
    assert {r["settings"] for r in trained if r["r_inf"] == "8.0"} == {"tuned"}
    assert {r["settings"] for r in trained if r["r_inf"] == "4.0" and r["sampler"] != "a_os"} == {"config"}
    assert "what the table shows" not in out  # no L1 row in --quick: nothing to compare with
    assert (report / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(workdir.rglob("*.tmp*")), "temporary files left behind"
    # A second run reuses every stage. Not run here (about 45 s, over the suite's budget): the
    # sweep's skipping of finished runs and the evaluation's reading back of cells have their
    # own tests (test_tracking.py, test_evaluate.py); the demo's reuse of a finished search
    # (demo.py) is now untested.


def test_demo_refuses_bad_settings_before_starting(tmp_path: Path) -> None:
    result = adps("demo", "--quick", "--accelerations", "12", "--workdir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 2
    assert "fewer than the 4 ACS columns" in result.stderr and "Traceback" not in result.stderr
    result = adps("demo", "--quick", "--methods", "ambient", "gan", "--workdir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 2 and "methods: unknown gan" in result.stderr
    assert not (tmp_path / "d").exists()  # nothing started, nothing written


def test_fresh_deletes_only_a_demo_folder(tmp_path: Path) -> None:
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    result = adps("demo", "--quick", "--fresh", "--workdir", str(precious), cwd=tmp_path)
    assert result.returncode == 2 and "was not made by adps demo" in result.stderr
    assert (precious / "chapter1.tex").exists()


def test_demo_verdict_reads_the_table() -> None:
    """The demo's closing lines: the fully sampled prior with DPS at R_inf 4 and the best ambient
    model with A-DPS at R_inf 8, each against L1-wavelet (mean NRMSE over the slices)."""
    from adps.demo import demo_verdict

    def rows(model: str, sampler: str, r_inf: float, *values: float) -> list[dict]:
        return [{"model": model, "sampler": sampler, "r_inf": r_inf, "slice": i, "nrmse": v} for i, v in enumerate(values)]

    table = (rows("edm_r1", "dps", 4, 0.1, 0.2) + rows("l1", "l1_wavelet", 4, 0.2, 0.3) + rows("l1", "l1_wavelet", 8, 0.3, 0.4)
             + rows("ambient_r2", "a_dps", 8, 0.3, 0.3) + rows("ambient_r4", "a_dps", 8, 0.4, 0.5)
             + rows("ambient_r2", "a_os", 8, 0.01, 0.01))
    lines = demo_verdict(table)
    assert len(lines) == 2
    assert "R_inf 4" in lines[0] and "edm_r1 (dps), NRMSE 0.150: ahead of L1-wavelet (0.250)" in lines[0]
    assert "R_inf 8" in lines[1] and "ambient_r2 (a_dps), NRMSE 0.300: ahead of L1-wavelet (0.350)" in lines[1]
    worse = [dict(r, nrmse=0.9) if r["model"] == "edm_r1" else r for r in table]
    assert "NOT ahead of" in demo_verdict(worse)[0]
    assert demo_verdict([r for r in table if r["model"] != "l1"]) == []


def test_reconstruction_grid_is_compact_with_one_stated_error_scale() -> None:
    """A dozen methods at three R_inf fit one screen (paper figure 6), the error maps share one
    colour scale that the colour bar states, and no panel is a strip."""
    import io

    import numpy as np
    from PIL import Image

    from adps.orchestration.figures import ERROR_SCALE, reconstruction_grid

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(64, 48)) + 1j * rng.normal(size=(64, 48))
    images = {(f"model_{i} sampler", r): (reference + 0.1 * i * rng.normal(size=(64, 48)), reference)
              for i in range(12) for r in (2.0, 4.0, 8.0)}
    figure = reconstruction_grid(images)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, bbox_inches="tight")
    width, height = Image.open(buffer).size
    assert width < 1400 and height < 2400 and 0.3 < width / height < 3, (width, height)
    bars = [axis for axis in figure.axes if "of max |x|" in axis.get_ylabel()]
    assert len(bars) == 1 and f"{ERROR_SCALE:.0%}" in bars[0].get_ylabel()
    limits = {image.get_clim() for axis in figure.axes for image in axis.get_images() if image.get_cmap().name == "magma"}
    assert limits == {(0.0, ERROR_SCALE * float(np.abs(reference).max()))}

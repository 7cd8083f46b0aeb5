"""Write configs/<method>_r<R>.yaml for every training run of the paper grid.

    python scripts/make_train_configs.py

Each file holds only what differs from :class:`adps.nn.train_config.TrainConfig`'s defaults
(METHOD.md's values); ``dataset`` and ``storage_path`` are given at run time with ``--set``.
"""

from pathlib import Path

from adps.nn.train_config import PAPER_GRID

OUT = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for method, accelerations in PAPER_GRID.items():
        for r in accelerations:
            lines = [
                f"# Paper grid: {method} at R = {r}. Defaults (METHOD.md) come from TrainConfig;",
                "# give the data at run time: adps train --config THIS --set dataset=s3://.../prepared",
                f"method: {method}",
                f"acceleration: {r:g}",
                f"run_name: {method}_r{r:g}",
                "amp: bf16  # METHOD.md: mixed precision (GPU)",
                "use_gpu: true",
                "num_workers: 2  # one per GPU: infra/kuberay/rayjob.yaml has 2 x 1 GPU",
            ]
            if method in ("modl", "ssdu"):
                # Supervised / self-supervised unrolled baselines: no EDM warm-up schedule.
                lines.append("lr_rampup_images: 0")
            (OUT / f"{method}_r{r:g}.yaml").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

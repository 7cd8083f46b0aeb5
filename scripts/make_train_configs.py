"""Write configs/<method>_r<R>.yaml for every MRI training run of the paper grid, and
configs/images/image_p<p>.yaml for every natural-image model (paper section 3.1).

    python scripts/make_train_configs.py

Each file holds only what differs from :class:`adps.orchestration.train_config.TrainConfig`'s defaults
(METHOD.md's values); ``dataset`` and ``storage_path`` are given at run time with ``--set``.
The image configs live in a folder of their own, so that ``adps sweep --configs configs`` and
``adps sweep --configs configs/images`` each train one grid.
"""

from pathlib import Path

from adps.nn.learning_config import CHECKPOINTING_METHODS, IMAGE_GRID, PAPER_GRID, UNET_METHODS, image_run_name

OUT = Path(__file__).resolve().parents[1] / "configs"
IMAGES_OUT = OUT / "images"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for method, accelerations in PAPER_GRID.items():
        for r in accelerations:
            lines = [
                f"# Paper grid: {method} at R = {r}. Defaults (METHOD.md) come from TrainConfig;",
                "# give the data at run time: adps train --config THIS --set dataset=s3://.../prepared",
                f"method: {method}",
                f"r_train: {r:g}",
                f"run_name: {method}_r{r:g}",
                "amp: bf16  # METHOD.md: mixed precision (GPU)",
                "use_gpu: true",
                "num_workers: 2  # one per GPU: infra/kuberay/rayjob.yaml has 2 x 1 GPU",
            ]
            if method in CHECKPOINTING_METHODS:
                # The memory-lean mode: ray_cluster.yaml's GPUs are 24 GB A10Gs. The paper-size
                # ambient step at batch 8 peaked at 18.3 GB with it and 82.7 GB without (eager, one
                # H200); NCSNv2 keeps about 29 GiB of activations without it (README, Benchmarks).
                faster = "false with compile_mode: default" if method in UNET_METHODS else "false on 80 GB"
                lines.append(f"activation_checkpointing: true  # for 24 GB cards; faster where it fits: {faster}")
            if method in ("modl", "ssdu"):
                # Supervised / self-supervised unrolled baselines: no EDM warm-up schedule.
                lines.append("lr_rampup: 0  # no warm-up (the unrolled baselines train 10 epochs at lr)")
            else:
                lines.append("lr_rampup: 0.05  # lr rises to 2e-4 over the first 5 % of the run (~125 k of 2.5 M images)")
            (OUT / f"{method}_r{r:g}.yaml").write_text("\n".join(lines) + "\n")
    IMAGES_OUT.mkdir(parents=True, exist_ok=True)
    for p in IMAGE_GRID:
        corruption = "clean images (plain EDM)" if p == 0 else f"{p:.0%} of the pixels erased (Ambient Diffusion)"
        lines = [
            f"# Paper grid (section 3.1): the natural-image model trained on {corruption}.",
            "# Defaults come from TrainConfig; give the images (a folder, .zip or s3:// prefix) at run time:",
            "# adps train --config THIS --set dataset=s3://.../celeba64",
            "method: image",
            f"erasure_p: {p:g}",
            f"run_name: {image_run_name(p)}",
            "preset: image  # EDM's DDPM++ for 64 x 64 images",
            "resolution: 64",
            "amp: bf16  # mixed precision (GPU)",
            "lr_rampup: 0.05  # lr rises over the first 5 % of the run (Ambient Diffusion: 10 M of 200 M images)",
            "use_gpu: true",
            "num_workers: 2  # one per GPU: infra/kuberay/rayjob.yaml has 2 x 1 GPU",
        ]
        (IMAGES_OUT / f"{image_run_name(p)}.yaml").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

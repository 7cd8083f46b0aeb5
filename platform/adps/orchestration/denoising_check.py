"""The denoising check (docs/evaluation.md): before any sampler runs, each diffusion model denoises a few slices of the
split it is used on; a model whose output is not closer to the truth than its noisy input is used on data unlike its
training data. Run by ``adps evaluate`` (test split) and ``adps tune`` (its split)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from adps.data.dataset import PreparedSliceDataset
from adps.data.shards import read_manifest
from adps.nn.reconstruct import DENOISER_METHODS, denoising_check
from adps.nn.samplers import train_masks
from adps.orchestration.registry import load_model_entry, model_label

__all__ = ["check_denoisers", "format_denoising_check"]


def check_denoisers(models: Sequence[tuple[str, dict[str, Any]]], dataset: str, split: str, *, slices: int = 4,
                    sigmas: Sequence[float] = (0.05, 0.1, 0.2), seed: int = 0, tracking_uri: str | None = None,
                    device: str = "cpu") -> list[dict[str, Any]]:
    """Does each model denoise the slices it is about to reconstruct? One row per model and sigma:
    ``{"model", "uri", "method", "split", "sigma", "input_nrmse", "output_nrmse", "passed"}`` (``passed``: the model's
    verdict over all sigmas, repeated on each of its rows).

    :func:`adps.nn.reconstruct.denoising_check` on the first ``slices`` slices of ``split`` for every model with a
    denoiser (ambient, edm, edm_l1, ncsnv2; the others are skipped): the complex NRMSE of the noisy input and of the
    model's output, averaged over the slices. An ambient model is fed ``A~^H A~ (x + sigma n)`` with R_train + 1
    masks drawn as A-DPS draws its A_tr (:func:`adps.nn.samplers.train_masks`, from ``seed``). A model whose output
    is not closer to the truth than its input at every sigma fails, and a warning names it: it was trained on data of
    another convention than ``split`` (schema version, phase, scale) or not at all, and will reconstruct poorly.
    """
    checked = [(uri, model_config) for uri, model_config in models if model_config["method"] in DENOISER_METHODS]
    if not checked:
        return []
    manifest = read_manifest(dataset)
    acceleration = float(manifest["config"]["accelerations"][0])
    data = PreparedSliceDataset(dataset, split, acceleration=acceleration, keys=("reference", "maps"))
    try:
        items = [data[i] for i in range(min(slices, len(data)))]
    finally:
        data.close()
    batch = {key: torch.stack([item[key] for item in items]) for key in ("reference", "maps")}
    slice_ids = [int(item["slice_id"]) for item in items]
    rows: list[dict[str, Any]] = []
    for uri, model_config in checked:
        method, label = model_config["method"], model_label(model_config)
        model, _ = load_model_entry(uri, device, tracking_uri)
        train_mask = None
        if method == "ambient":
            train_mask = train_masks(batch["reference"].shape[-1], float(model_config["r_train"]), len(items), seed,
                                     slice_ids, acs=manifest["config"].get("acs", 20))
        found = denoising_check(method, model, batch, sigmas=tuple(sigmas), train_mask=train_mask,
                                generator=torch.Generator().manual_seed(seed))
        model_rows = [{"model": label, "uri": uri, "method": method, "split": split, "sigma": sigma,
                       "input_nrmse": float(errors["input"].mean()), "output_nrmse": float(errors["output"].mean())}
                      for sigma, errors in found.items()]
        passed = all(row["output_nrmse"] < row["input_nrmse"] for row in model_rows)
        rows += [{**row, "passed": passed} for row in model_rows]
        if not passed:
            worse = ", ".join(f"sigma {r['sigma']:g}: {r['output_nrmse']:.3f} vs input {r['input_nrmse']:.3f}"
                              for r in model_rows if r["output_nrmse"] >= r["input_nrmse"])
            warnings.warn(f"{label} ({uri}) does not denoise the {split} slices of {dataset}: its output is no closer "
                          f"to the truth than its noisy input ({worse}; complex NRMSE over {len(items)} slices). "
                          "Was it trained on a dataset of another preparation (schema version, phase convention)? "
                          "Its reconstructions will not be trustworthy.", stacklevel=2)
    return rows


def format_denoising_check(rows: Sequence[dict[str, Any]]) -> str:
    """The denoising check as a table: one line per model, input -> output error per sigma."""
    if not rows:
        return "(no diffusion model to check)"
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault((row["model"], row.get("uri", "")), []).append(row)
    lines = []
    for (model, _), found in by_model.items():
        cells = "  ".join(f"s={r['sigma']:g}: {r['input_nrmse']:.3f} -> {r['output_nrmse']:.3f}" for r in found)
        lines.append(f"  {model:14s} {'ok    ' if found[0]['passed'] else 'FAILED'}  {cells}")
    return "\n".join(lines)

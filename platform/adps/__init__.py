"""adps: Ambient Diffusion Posterior Sampling as a platform.

Layers (ARCHITECTURE.md), lowest first; a layer never imports a higher one:

1. ``adps.mri``, ``adps.data``: physics and data
2. ``adps.nn``, ``adps.metrics``: learning (networks, objectives, samplers, metrics)
3. orchestration on Ray and MLflow
4. ``adps.cli``, ``adps.demo``: interfaces

``adps.load_model("models:/adps-ambient-r4@latest")`` pulls a ready network from the MLflow
registry (:func:`adps.orchestration.registry.load_model`). It is resolved on first use, so
``import adps`` (and every layer-1/2 module) still loads neither MLflow nor Ray.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    # The package's one facade entry point into layer 3, imported lazily (PEP 562): a GPU
    # benchmark importing adps.nn must not need MLflow installed.
    if name == "load_model":
        from adps.orchestration.registry import load_model

        return load_model
    raise AttributeError(f"module 'adps' has no attribute {name!r}")

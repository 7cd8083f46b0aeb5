"""adps: Ambient Diffusion Posterior Sampling as a platform.

Layers (ARCHITECTURE.md), lowest first; a layer never imports a higher one:

1. ``adps.mri``, ``adps.data``: physics and data
2. ``adps.nn``, ``adps.metrics``: learning (networks, objectives, samplers, metrics)
3. orchestration on Ray and MLflow
4. ``adps.cli``, ``adps.demo``: interfaces
"""

__version__ = "0.1.0"

"""Benchmarks of the platform on real hardware: each module is a script that prints JSON lines.

Run them from the repository root as modules, e.g. ``python -m bench.operators --device cuda``;
``bash bench/gpu_check.sh`` runs the GPU set in one go. What they measured is in
``bench/README.md`` and ``bench/results/``.
"""

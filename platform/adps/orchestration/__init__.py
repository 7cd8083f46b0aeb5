"""Orchestration: Ray tasks, Ray Train, Ray Tune and MLflow around the physics and learning core.

Layer 3 of the platform (see ARCHITECTURE.md): the only layer that imports Ray. Submodules are
imported explicitly (``from adps.orchestration.prepare import prepare_dataset``) so that
importing this package stays cheap.
"""

"""Data: synthetic multi-coil phantoms (and, later, FastMRI reading and prepared shards).

Layer 1 of the platform (see ARCHITECTURE.md): no Ray, no MLflow.
"""

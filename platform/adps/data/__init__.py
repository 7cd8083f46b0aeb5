"""Data: storage (local or s3://), FastMRI reading, synthetic phantoms and FastMRI-schema
volumes, per-slice preprocessing, the prepared shard format and its torch dataset.

Layer 1 of the platform (see ARCHITECTURE.md): no Ray, no MLflow.
"""

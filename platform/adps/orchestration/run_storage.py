"""Where Ray Train keeps a run (checkpoints and its own state): a local folder, or S3 through a filesystem that rides
out an unreachable endpoint.

pyarrow's default S3 filesystem tries a request 3 times, and gave up after about 6 s of a refusing endpoint here; Ray
Train then fails the run (a controller's failed state write is not retried at all). :func:`run_storage` hands Ray a
:class:`PatientS3FileSystem` instead: :data:`S3_STORAGE_ATTEMPTS` attempts with the AWS SDK's exponential backoff,
which rode out a 30 s outage here. It must be a subclass with its own pickling, because Ray ships the filesystem to
its controller and workers, and pyarrow's pickling of ``S3FileSystem`` drops the retry strategy.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs

__all__ = ["S3_STORAGE_ATTEMPTS", "PatientS3FileSystem", "patient_s3_filesystem", "run_storage"]

S3_STORAGE_ATTEMPTS = 12
"""Attempts per S3 request of a run's storage (backoff doubling, capped at 20 s by the SDK)."""


def patient_s3_filesystem(region: str, endpoint: str | None, attempts: int = S3_STORAGE_ATTEMPTS) -> PatientS3FileSystem:
    """An S3 filesystem for ``region`` (and an S3-compatible ``endpoint``, if any) that retries each request
    ``attempts`` times. Credentials come from the environment or the instance role (none are held here)."""
    return PatientS3FileSystem(region=region, endpoint_override=endpoint,
                               retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts))


class PatientS3FileSystem(pyarrow.fs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` that keeps its retry strategy when pickled."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return patient_s3_filesystem, (self.region, self._adps_endpoint, self._adps_attempts)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # What __reduce__ needs to rebuild it (pyarrow exposes neither the endpoint nor the strategy).
        self._adps_endpoint = kwargs.get("endpoint_override")
        strategy = kwargs.get("retry_strategy")
        self._adps_attempts = getattr(strategy, "max_attempts", S3_STORAGE_ATTEMPTS)


def run_storage(storage: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: a local folder as it is (no filesystem), an
    ``s3://`` URI as ``bucket/prefix`` with a :class:`PatientS3FileSystem` (the bucket's region as pyarrow resolves
    it, the endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores)."""
    if not storage.startswith("s3://"):
        return storage, None
    resolved, path = pyarrow.fs.FileSystem.from_uri(storage)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return path, patient_s3_filesystem(resolved.region, endpoint)

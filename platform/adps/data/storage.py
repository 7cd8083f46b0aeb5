"""Storage paths that are either local folders or ``s3://bucket/key`` URIs.

Every reader and writer of raw data, prepared shards and manifests goes through these helpers,
so the same code runs on a laptop and on a cluster (S3, or any S3-compatible server: MinIO, moto).

S3 is configured by the standard AWS environment and config files only: credentials
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or a profile), region (``AWS_DEFAULT_REGION``)
and endpoint (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, read by boto3 >= 1.28 and by the
pyarrow Ray uses for its own storage, so one setting serves both).

Writes are atomic: locally a file is written under a temporary name in the destination folder,
flushed and renamed over the destination (``os.replace``); an S3 object appears only once its
upload (single or multipart) completes. An S3 endpoint that is unreachable or answers 5xx is
retried with backoff for up to :data:`S3_OUTAGE_SECONDS`, with one warning line naming the URI;
every operation is idempotent, so a retry cannot leave a duplicate or a partial object.

Errors a user can cause name the URI: a missing local file or folder, bucket or key raises
``FileNotFoundError("<uri>: ...")``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike

S3_SCHEME = "s3://"

# Environment variables that change which client boto3 builds; the client cache is keyed on
# them so that a changed endpoint or credentials (e.g. a test's S3 server) takes effect.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE")
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()

# S3 error codes that mean "not there" (head_object answers a bare "404").
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


# Paths -----------------------------------------------------------------------------------------
def is_s3(uri: PathLike) -> bool:
    """Whether ``uri`` is an ``s3://`` URI (anything else is a local path)."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b.h5"`` -> ``("bucket", "a/b.h5")``; the key may be empty."""
    if not is_s3(uri):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: the S3 URI has no bucket name")
    return bucket, key


def join(base: PathLike, *parts: str) -> str:
    """Join path components onto a local folder or an S3 prefix, returning a string."""
    if not is_s3(base):
        return str(Path(base, *parts))
    pieces = [str(base).rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def basename(uri: PathLike) -> str:
    """The last component of a local path or an S3 key (``"s3://b/raw/x.h5"`` -> ``"x.h5"``)."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1] if is_s3(uri) else Path(uri).name


# S3 client -------------------------------------------------------------------------------------
def s3_client() -> Any:
    """A boto3 S3 client configured from the standard AWS environment, with patient retries.

    Cached per process and AWS environment (building one costs about 0.3 s). A client is
    thread-safe but creating one from boto3's shared default session is not, hence a fresh
    session under a lock. botocore's ``standard`` retries (8 attempts) ride out blips of a few
    seconds; this module's helpers retry longer outages themselves (:data:`S3_OUTAGE_SECONDS`).
    """
    key = (os.getpid(), tuple(os.environ.get(name) for name in _CLIENT_ENV))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3  # deferred: only S3 paths need boto3, and its import is slow
            from botocore.config import Config

            config = Config(retries={"max_attempts": 8, "mode": "standard"})
            client = boto3.session.Session().client("s3", config=config)
            _clients[key] = client
    return client


def _error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None


def _is_not_found(err: BaseException) -> bool:
    return _error_code(err) in _NOT_FOUND_CODES


def _check_bucket(uri: str) -> None:
    """Raise FileNotFoundError naming ``uri`` if its bucket does not exist. Other answers (e.g. 403
    for a role that may write objects but not list the bucket) are no verdict: the operation will tell."""
    from botocore.exceptions import ClientError

    bucket, _ = split_s3(uri)
    try:
        _retrying(uri, lambda: s3_client().head_bucket(Bucket=bucket))
    except ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"{uri}: no such bucket {bucket!r}") from None


# Outages -----------------------------------------------------------------------------------------
S3_OUTAGE_SECONDS = float(os.environ.get("ADPS_S3_OUTAGE_SECONDS", "300"))
"""How long an S3 operation keeps retrying while the endpoint is unreachable or answers 5xx
(``$ADPS_S3_OUTAGE_SECONDS``, default 300 s), backing off from 0.5 s to 15 s between tries."""

# botocore's own retries spend all 8 attempts within about 3 s, and its client-wide retry quota
# stops retrying once many requests fail: neither rides out an endpoint that is down for a while.
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "RequestTimeTooSkewed"}


def _is_transient(err: BaseException) -> bool:
    """Whether ``err`` means "try again later": no connection, a dropped one, a timeout, a 5xx."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ResponseStreamingError

    if isinstance(err, ConnectionError | HTTPClientError | ResponseStreamingError):
        return True
    if isinstance(err, ClientError):
        return _error_code(err) in _TRANSIENT_CODES
    import boto3.exceptions

    if isinstance(err, boto3.exceptions.S3UploadFailedError | boto3.exceptions.RetriesExceededError):
        return not any(code in str(err) for code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"))
    return False


def _retrying(uri: str, operation: Any) -> Any:
    """``operation()``, tried again with backoff for up to :data:`S3_OUTAGE_SECONDS` while S3 is
    unreachable; one warning line names the URI. Every S3 call here is idempotent (a put writes
    the whole object again), so a retry after a dropped connection cannot duplicate anything."""
    deadline = time.monotonic() + S3_OUTAGE_SECONDS
    delay, warned = 0.5, False
    while True:
        try:
            return operation()
        except Exception as err:
            if not _is_transient(err) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                print(f"adps: warning: S3 unreachable for {uri} ({type(err).__name__}); retrying with backoff for "
                      f"up to {S3_OUTAGE_SECONDS:g} s", flush=True)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def _retrying_found(uri: str, operation: Any) -> Any:
    """:func:`_retrying`, with a missing bucket or object raised as FileNotFoundError naming ``uri``."""
    from botocore.exceptions import ClientError

    try:
        return _retrying(uri, operation)
    except ClientError as err:
        if _is_not_found(err):
            what = "no such bucket" if _error_code(err) == "NoSuchBucket" else "no such S3 object"
            raise FileNotFoundError(f"{uri}: {what}") from None
        raise


@contextlib.contextmanager
def _temporary_file(uri: PathLike) -> Iterator[Path]:
    """A local temporary file named after ``uri``, deleted on exit (also on error)."""
    fd, tmp_name = tempfile.mkstemp(prefix="adps-", suffix="-" + basename(uri))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


# Reading ---------------------------------------------------------------------------------------
def list_files(root: PathLike, suffix: str = ".h5") -> list[str]:
    """The files directly under ``root`` whose names end with ``suffix``, sorted.

    ``root`` is a local folder (not searched recursively) or an ``s3://bucket/prefix`` (the
    objects one level below it). Raises FileNotFoundError if the local folder or the bucket does
    not exist; an S3 prefix with no objects is simply empty (S3 has no folders to be missing).
    """
    if not is_s3(root):
        folder = Path(root)
        if not folder.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))

    from botocore.exceptions import ClientError

    bucket, key = split_s3(str(root))
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""

    def listing() -> list[str]:
        # Delimiter "/" keeps the listing one level deep, like a local folder.
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        return [f"{S3_SCHEME}{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", [])
                if obj["Key"].endswith(suffix)]

    try:
        found = _retrying(str(root), listing)
    except ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"{root}: no such bucket {bucket!r}") from None
        raise
    return sorted(found)


def exists(uri: PathLike) -> bool:
    """Whether a local file or folder, or an S3 object (a bucket for ``s3://bucket``), exists."""
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(str(uri))
    try:
        if key:
            _retrying(str(uri), lambda: s3_client().head_object(Bucket=bucket, Key=key))
        else:
            _retrying(str(uri), lambda: s3_client().head_bucket(Bucket=bucket))
    except ClientError as err:
        if _is_not_found(err):
            return False
        raise
    return True


def read_bytes(uri: PathLike) -> bytes:
    """The whole content of a local file or an S3 object."""
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such file") from None
    bucket, key = split_s3(str(uri))
    return _retrying_found(str(uri), lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


@contextlib.contextmanager
def local_copy(uri: PathLike) -> Iterator[Path]:
    """A local path holding the file at ``uri``, for libraries that need a real file (h5py).

    A local path is yielded as it is. An S3 object is downloaded to a temporary file deleted when
    the context exits (also on error), so a worker's disk does not fill up with processed volumes.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri}: no such file")
        yield path
        return
    bucket, key = split_s3(str(uri))
    with _temporary_file(uri) as tmp:
        _retrying_found(str(uri), lambda: s3_client().download_file(bucket, key, str(tmp)))
        yield tmp


# Writing ---------------------------------------------------------------------------------------
def _fsync_folder(folder: Path) -> None:
    """Persist a rename: the directory entry lives in the folder, not in the file."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms / file systems do not open folders; the rename still holds
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write_path(uri: PathLike) -> Iterator[Path]:
    """A local path to write a file to; on success it is published at ``uri`` in one step.

    Use it for files written by a library that wants a path (h5py, safetensors)::

        with storage.atomic_write_path("s3://bucket/shards/000.h5") as tmp:
            with h5py.File(tmp, "w") as f:
                ...

    Local: ``tmp`` is ``name.tmp-<uuid>`` in the destination folder (created if missing),
    fsynced and renamed over ``uri``. S3: ``tmp`` is a local temporary file, uploaded to ``uri``
    in one upload. If the block raises, the temporary file is removed and nothing appears.
    """
    if is_s3(uri):
        _check_bucket(str(uri))  # fail before the caller's work, not after it
        with _temporary_file(uri) as tmp:
            yield tmp
            upload_file_atomic(tmp, uri)
        return

    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")  # same folder, so the rename is atomic
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_folder(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(uri: PathLike, data: bytes) -> None:
    """Write ``data`` to a local file or S3 object so that readers see all of it or nothing."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        _retrying_found(str(uri), lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    with atomic_write_path(uri) as tmp:
        tmp.write_bytes(data)


def upload_file_atomic(local_path: PathLike, uri: PathLike) -> None:
    """Copy a local file to ``uri`` (local or S3) so that readers see all of it or nothing."""
    source = Path(local_path)
    if not source.is_file():
        raise FileNotFoundError(f"{local_path}: no such file")
    if not is_s3(uri):
        with atomic_write_path(uri) as tmp:
            shutil.copyfile(source, tmp)
        return

    import boto3.exceptions

    bucket, key = split_s3(str(uri))
    try:
        # A large file goes up in a multipart upload; the object still appears only once it completes.
        _retrying(str(uri), lambda: s3_client().upload_file(str(source), bucket, key))
    except boto3.exceptions.S3UploadFailedError:
        _check_bucket(str(uri))  # the usual cause: name the missing bucket
        raise


def remove(uri: PathLike, *, missing_ok: bool = True) -> None:
    """Delete a local file or an S3 object."""
    if not is_s3(uri):
        try:
            Path(uri).unlink()
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(f"{uri}: no such file") from None
        return
    if not missing_ok and not exists(uri):
        raise FileNotFoundError(f"{uri}: no such S3 object")
    bucket, key = split_s3(str(uri))
    _retrying(str(uri), lambda: s3_client().delete_object(Bucket=bucket, Key=key))

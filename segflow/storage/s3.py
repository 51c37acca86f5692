"""Folders on S3-compatible object stores (AWS, MinIO, SeaweedFS, Ceph) with boto3.

Endpoint, region and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles...), which
boto3 reads itself. Transient errors (5xx, throttling, dropped connections) are retried by
botocore with exponential backoff and jitter; large files go up and down in multipart pieces.

Publishing a folder is all-or-nothing for readers that use :func:`download`: files are uploaded
under a hidden staging prefix, copied server-side into place, and a completion marker listing
every file's sha256 is written last. :func:`download` checks every file against that marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from segflow.errors import SegflowError

MARKER = "_SEGFLOW_COMPLETE.json"
MIB = 1024 * 1024
_THREADS = 8


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``) without a trailing slash."""
    if not uri.startswith("s3://"):
        raise SegflowError(f"{uri!r} is not an s3:// URI.")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise SegflowError(f"{uri!r} names no bucket: use s3://BUCKET/PREFIX.")
    return bucket, key.strip("/")


@cache
def client():
    """A boto3 S3 client configured from the environment, with retries and path-style addressing."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": int(os.environ.get("SEGFLOW_S3_MAX_ATTEMPTS", "8")), "mode": "standard"},
        # Path-style works everywhere (MinIO and most self-hosted stores need it).
        s3={"addressing_style": os.environ.get("SEGFLOW_S3_ADDRESSING_STYLE", "path")},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=_THREADS * 2,
    )
    return boto3.session.Session().client("s3", config=config)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    # 8 MiB parts: multipart starts above 8 MiB; S3 needs parts of at least 5 MiB.
    return TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=4)


def _friendly(exc: Exception, uri: str, action: str) -> SegflowError:
    """Turn botocore errors a user can cause into a message that says what to do."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return SegflowError(
            f"cannot {action} {uri}: no S3 credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and AWS_ENDPOINT_URL for MinIO or another S3-compatible store)."
        )
    if isinstance(exc, EndpointConnectionError):
        return SegflowError(f"cannot {action} {uri}: S3 endpoint unreachable ({exc}). Check AWS_ENDPOINT_URL.")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        hint = {
            "NoSuchBucket": "the bucket does not exist: create it or fix the URI",
            "404": "the bucket does not exist: create it or fix the URI",
            "403": "access denied: check the credentials and the bucket policy",
            "AccessDenied": "access denied: check the credentials and the bucket policy",
            "InvalidAccessKeyId": "the access key is not known to this endpoint",
            "SignatureDoesNotMatch": "the secret key is wrong",
        }.get(code, str(exc))
        return SegflowError(f"cannot {action} {uri}: {hint}.")
    return SegflowError(f"cannot {action} {uri}: {exc}")


def _boto_errors():
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def list_keys(bucket: str, prefix: str) -> list[str]:
    """All keys under ``prefix/`` (the folder), sorted."""
    paginator = client().get_paginator("list_objects_v2")
    keys: list[str] = []
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(keys)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def check_free(uri: str, overwrite: bool) -> None:
    """Refuse to publish over an existing folder unless ``overwrite``."""
    bucket, prefix = split_uri(uri)
    try:
        client().head_bucket(Bucket=bucket)
        taken = bool(list_keys(bucket, prefix))
    except _boto_errors() as exc:
        raise _friendly(exc, uri, "write to") from None
    if taken and not overwrite:
        raise SegflowError(
            f"output {uri} already holds objects: choose a new prefix, or pass --overwrite to replace it."
        )


def publish_dir(local_dir: Path, uri: str, overwrite: bool = False) -> None:
    """Upload ``local_dir`` to ``uri`` so that readers see all of it or none of it."""
    bucket, prefix = split_uri(uri)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    rels = [p.relative_to(local_dir).as_posix() for p in files]
    parent, _, name = prefix.rpartition("/")
    staging = f"{parent + '/' if parent else ''}.{name}.staging-{uuid.uuid4().hex[:8]}"
    s3 = client()
    copied: list[str] = []
    try:
        with ThreadPoolExecutor(_THREADS) as pool:
            checksums = dict(zip(rels, pool.map(sha256_file, files), strict=True))
            list(
                pool.map(
                    lambda item: s3.upload_file(str(item[0]), bucket, f"{staging}/{item[1]}", Config=transfer_config()),
                    zip(files, rels, strict=True),
                )
            )
            old_keys = set(list_keys(bucket, prefix)) if overwrite else set()
            if old_keys:  # the old marker goes first: a half-replaced folder must not look complete
                s3.delete_object(Bucket=bucket, Key=f"{prefix}/{MARKER}")

            def copy(rel: str) -> None:
                s3.copy(
                    {"Bucket": bucket, "Key": f"{staging}/{rel}"}, bucket, f"{prefix}/{rel}", Config=transfer_config()
                )
                copied.append(rel)

            list(pool.map(copy, rels))
        stale = old_keys - {f"{prefix}/{rel}" for rel in rels} - {f"{prefix}/{MARKER}"}
        _delete(bucket, sorted(stale))
        marker = {"files": checksums, "count": len(rels)}
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{MARKER}", Body=json.dumps(marker, indent=1).encode())
    except _boto_errors() as exc:
        if not overwrite:  # nothing was there before: remove what we placed
            _delete(bucket, [f"{prefix}/{rel}" for rel in copied], quiet=True)
        raise _friendly(exc, uri, "upload to") from None
    finally:
        _delete(bucket, [f"{staging}/{rel}" for rel in rels], quiet=True)


def _delete(bucket: str, keys: list[str], quiet: bool = False) -> None:
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        try:
            client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
        except _boto_errors():
            if not quiet:
                raise


def download(uri: str, local_dir: Path) -> Path:
    """Download the folder ``uri`` (or a single object) into ``local_dir``; verify checksums.

    A folder published by segflow carries a completion marker; every file is checked against the
    sha256 it lists. A folder without a marker (a user's own upload) is downloaded as it is.
    """
    bucket, prefix = split_uri(uri)
    local_dir = Path(local_dir)
    s3 = client()
    try:
        keys = list_keys(bucket, prefix)
        if not keys and prefix:  # maybe a single object
            s3.head_object(Bucket=bucket, Key=prefix)
            target = local_dir.parent / Path(prefix).name
            local_dir.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, prefix, str(target), Config=transfer_config())
            return target
    except _boto_errors() as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey"):
            raise SegflowError(f"{uri} does not exist: no objects under that prefix.") from None
        raise _friendly(exc, uri, "read") from None

    rels = [k[len(prefix) + 1 :] if prefix else k for k in keys]
    expected: dict[str, str] | None = None
    if MARKER in rels:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{MARKER}" if prefix else MARKER)["Body"].read()
        expected = json.loads(body)["files"]
        rels = sorted(expected)

    def fetch(rel: str) -> None:
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        key = f"{prefix}/{rel}" if prefix else rel
        s3.download_file(bucket, key, str(target), Config=transfer_config())
        if expected is not None and sha256_file(target) != expected[rel]:
            raise SegflowError(f"{uri}/{rel}: checksum mismatch after download: the object changed or is corrupt.")

    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(fetch, rels))
    except _boto_errors() as exc:
        raise _friendly(exc, uri, "download") from None
    return local_dir

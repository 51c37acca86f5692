"""Folders on S3-compatible object stores (AWS, MinIO, SeaweedFS, Ceph) with boto3.

Endpoint, region and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles...), which
boto3 reads itself. Transient errors (5xx, throttling, dropped connections) are retried by
botocore with backoff (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``); a dead or silent endpoint
fails within about a minute (``SEGFLOW_S3_CONNECT_TIMEOUT``, ``SEGFLOW_S3_READ_TIMEOUT``).

A segflow artifact on S3 is *sealed*: files are uploaded under a hidden staging prefix beside
the destination, copied server-side into place while the writer holds a lock object (created
with a conditional write, ``If-None-Match: *``), and a completion marker listing every file's
sha256 is written last. Readers of artifacts accept only sealed prefixes and check every file
against the marker. Only raw inputs (a dataset for ``segflow data import``, a folder of images)
are read without a marker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from segflow.errors import SegflowError
from segflow.storage.paths import confined, sha256_file

MARKER = "_SEGFLOW_COMPLETE.json"
MIB = 1024 * 1024
_THREADS = 8
log = logging.getLogger(__name__)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SegflowError(f"{name}={raw!r} is not a number.") from None


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
    """A boto3 S3 client configured from the environment, with bounded timeouts and retries."""
    import boto3
    from botocore.config import Config

    config = Config(
        # 5 attempts of at most 10 s each, with backoff between: a silent endpoint fails in about a
        # minute (botocore's defaults wait several), while a store answering 503 now and then is ridden out.
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "total_max_attempts": int(_env_number("AWS_MAX_ATTEMPTS", 5)),
        },
        # Path-style works everywhere (MinIO and most self-hosted stores need it).
        s3={"addressing_style": os.environ.get("SEGFLOW_S3_ADDRESSING_STYLE", "path")},
        connect_timeout=_env_number("SEGFLOW_S3_CONNECT_TIMEOUT", 5),
        read_timeout=_env_number("SEGFLOW_S3_READ_TIMEOUT", 10),
        max_pool_connections=_THREADS * 2,
    )
    return boto3.session.Session().client("s3", config=config)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    # 8 MiB parts: multipart starts above 8 MiB; S3 needs parts of at least 5 MiB.
    return TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=4)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _friendly(exc: Exception, uri: str, action: str) -> SegflowError:
    """Turn botocore errors a user can cause into a message that says what to do."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, NoCredentialsError):
        return SegflowError(
            f"cannot {action} {uri}: no S3 credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and AWS_ENDPOINT_URL for MinIO or another S3-compatible store)."
        )
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return SegflowError(
            f"cannot {action} {uri}: the S3 endpoint did not answer in time ({exc}). Check AWS_ENDPOINT_URL "
            "and the network; SEGFLOW_S3_READ_TIMEOUT and AWS_MAX_ATTEMPTS set how long to wait."
        )
    if isinstance(exc, EndpointConnectionError):
        return SegflowError(f"cannot {action} {uri}: S3 endpoint unreachable ({exc}). Check AWS_ENDPOINT_URL.")
    if isinstance(exc, ClientError):
        code = _code(exc)
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


def list_objects(bucket: str, prefix: str) -> list[dict]:
    """Every object whose key starts with ``prefix`` (a string prefix, not a folder), by key."""
    paginator = client().get_paginator("list_objects_v2")
    found: list[dict] = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        found.extend(page.get("Contents", []))
    return sorted(found, key=lambda o: o["Key"])


def listing(uri: str) -> list[list]:
    """[key under the prefix, size, ETag] of every object under ``uri``: what the data is, from one
    listing, without a download."""
    bucket, prefix = split_uri(uri.rstrip("/"))
    base = f"{prefix}/" if prefix else ""
    try:
        objects = list_objects(bucket, base)
    except _boto_errors() as exc:
        raise _friendly(exc, uri, "list") from None
    return [[o["Key"][len(base) :], o["Size"], o.get("ETag", "")] for o in objects]


def list_matching(bucket: str, prefix: str, uri: str) -> list[str]:
    """The keys below the folder ``prefix``, or ``[prefix]`` when it names one object."""
    try:
        keys = [k for k in list_keys(bucket, prefix) if not k.endswith("/")]
        if not keys and prefix:
            client().head_object(Bucket=bucket, Key=prefix)
            keys = [prefix]
    except _boto_errors() as exc:
        if _code(exc) in ("404", "NoSuchKey"):
            raise SegflowError(f"{uri} does not exist: no objects under that prefix.") from None
        raise _friendly(exc, uri, "read") from None
    return keys


def download_object(bucket: str, key: str, target: Path) -> None:
    """One object to the local file ``target``."""
    try:
        client().download_file(bucket, key, str(target), Config=transfer_config())
    except _boto_errors() as exc:
        raise _friendly(exc, f"s3://{bucket}/{key}", "download") from None


def list_keys(bucket: str, prefix: str) -> list[str]:
    """All keys under ``prefix/`` (the folder), sorted."""
    return [o["Key"] for o in list_objects(bucket, f"{prefix}/" if prefix else "")]


def _sibling(prefix: str, suffix: str) -> str:
    """A hidden key beside the folder ``prefix``: ``parent/.name<suffix>``."""
    parent, _, name = prefix.rpartition("/")
    return f"{parent + '/' if parent else ''}.{name}{suffix}"


def prefix_state(bucket: str, prefix: str) -> str:
    """``empty``, ``sealed`` (a complete segflow artifact) or ``unsealed`` (objects but no marker)."""
    keys = list_keys(bucket, prefix)
    if not keys:
        return "empty"
    return "sealed" if f"{prefix}/{MARKER}" in keys else "unsealed"


def _taken_message(uri: str, state: str) -> str:
    if state == "sealed":
        return f"output {uri} already holds a segflow artifact: choose a new prefix, or pass --overwrite to replace it."
    return (
        f"output {uri} already holds objects without a completion marker (an interrupted publish, or someone "
        "else's files): choose a new prefix, or pass --overwrite to replace them."
    )


def check_free(uri: str, overwrite: bool) -> None:
    """Before any work: the bucket exists and is reachable, and the prefix is free (or ``overwrite``)."""
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise SegflowError(f"output {uri} is a whole bucket: write into a prefix, e.g. s3://{bucket}/run1.")
    try:
        client().head_bucket(Bucket=bucket)
        state = prefix_state(bucket, prefix)
        check_unlocked(bucket, prefix, uri)
    except _boto_errors() as exc:
        raise _friendly(exc, uri, "write to") from None
    if state != "empty" and not overwrite:
        raise SegflowError(_taken_message(uri, state))


# --- the writer's lock ---------------------------------------------------------------------------


def _lock_ttl() -> float:
    """Seconds after which a lock is taken to belong to a killed writer (publishing itself is quick)."""
    return _env_number("SEGFLOW_S3_LOCK_TTL", 600)


@contextmanager
def _publish_lock(bucket: str, prefix: str, uri: str) -> Iterator[None]:
    """Hold ``parent/.name.lock`` while publishing. It is created with ``If-None-Match: *``, so of
    two writers exactly one gets it; the other fails with a clear message."""
    s3 = client()
    key = _sibling(prefix, ".lock")
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    body = json.dumps({"owner": owner, "created": time.time()}).encode()
    for attempt in range(2):
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            break
        except _boto_errors() as exc:
            code = _code(exc)
            if code in ("NotImplemented", "501"):  # an endpoint without conditional writes
                _lock_without_conditions(bucket, key, body, owner, uri)
                break
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise
            holder = _read_lock(bucket, key)
            if attempt == 0 and _stale(holder):
                log.warning("removing a stale lock on %s: %s", uri, _stale(holder))
                s3.delete_object(Bucket=bucket, Key=key)
                continue
            raise SegflowError(_held_message(holder, uri)) from None
    try:
        yield
    finally:
        if _read_lock(bucket, key).get("owner") == owner:
            s3.delete_object(Bucket=bucket, Key=key)


def _stale(holder: dict) -> str:
    """Why a lock no longer belongs to a live writer ("" when it may): older than the TTL, or
    taken by a process of this host that is gone (a killed publish)."""
    try:
        age = time.time() - float(holder.get("created", 0))
    except (TypeError, ValueError):
        age = float("inf")
    if age > _lock_ttl():
        return f"left {age:.0f} s ago by {holder.get('owner')}"
    host, _, rest = str(holder.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return f"its writer, process {pid} on this host, is gone"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _held_message(holder: dict, uri: str) -> str:
    return (
        f"another segflow run ({holder.get('owner', 'unknown')}) is publishing to {uri} right now: "
        "two writers cannot share one output. Choose another prefix, or wait and pass --overwrite."
    )


def check_unlocked(bucket: str, prefix: str, uri: str) -> None:
    """Before any work: no live writer holds the output's lock (a stale one is left for the
    publish to take over)."""
    holder = _read_lock(bucket, _sibling(prefix, ".lock"))
    if holder and not _stale(holder):
        raise SegflowError(_held_message(holder, uri))


def _read_lock(bucket: str, key: str) -> dict:
    try:
        holder = json.loads(client().get_object(Bucket=bucket, Key=key)["Body"].read())
    except _boto_errors():
        return {}
    except (ValueError, RecursionError):
        return {"created": 0}
    return holder if isinstance(holder, dict) else {"created": 0}


def _lock_without_conditions(bucket: str, key: str, body: bytes, owner: str, uri: str) -> None:
    """Best effort where the endpoint ignores If-None-Match: write, then read back who won."""
    holder = _read_lock(bucket, key)
    if holder and not _stale(holder):
        raise SegflowError(_held_message(holder, uri))
    client().put_object(Bucket=bucket, Key=key, Body=body)
    time.sleep(0.5)
    if _read_lock(bucket, key).get("owner") != owner:
        raise SegflowError(f"another segflow run is publishing to {uri} right now.")


def _remove_stale_staging(bucket: str, prefix: str, mine: str) -> None:
    """Staging prefixes of earlier publishes that died, older than the lock TTL: removed, and said."""
    start = _sibling(prefix, ".staging-")
    groups: dict[str, list[dict]] = {}
    for obj in list_objects(bucket, start):
        staging = obj["Key"].split("/", start.count("/") + 1)
        staging_prefix = "/".join(staging[: start.count("/") + 1])
        if staging_prefix != mine:
            groups.setdefault(staging_prefix, []).append(obj)
    now = time.time()
    for staging_prefix, objects in groups.items():
        newest = max(o["LastModified"].timestamp() for o in objects)
        if now - newest > _lock_ttl():
            log.warning(
                "removed %d objects under s3://%s/%s, left by an interrupted publish",
                len(objects),
                bucket,
                staging_prefix,
            )
            _delete(bucket, [o["Key"] for o in objects])


def publish_dir(local_dir: Path, uri: str, overwrite: bool = False) -> None:
    """Upload ``local_dir`` to ``uri`` so that readers see all of it or none of it."""
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise SegflowError(f"output {uri} is a whole bucket: write into a prefix, e.g. s3://{bucket}/run1.")
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    rels = [p.relative_to(local_dir).as_posix() for p in files]
    staging = _sibling(prefix, f".staging-{uuid.uuid4().hex[:12]}")
    s3 = client()
    copied: list[str] = []
    old_keys: set[str] = set()
    try:
        with ThreadPoolExecutor(_THREADS) as pool:
            checksums = dict(zip(rels, pool.map(sha256_file, files), strict=True))
            list(
                pool.map(
                    lambda item: s3.upload_file(str(item[0]), bucket, f"{staging}/{item[1]}", Config=transfer_config()),
                    zip(files, rels, strict=True),
                )
            )
            with _publish_lock(bucket, prefix, uri):
                # Checked again under the lock: another writer may have finished since we started.
                old_keys = set(list_keys(bucket, prefix))
                if old_keys and not overwrite:
                    raise SegflowError(_taken_message(uri, prefix_state(bucket, prefix)))
                _remove_stale_staging(bucket, prefix, staging)
                if old_keys:  # the old marker goes first: a half-replaced folder must not look complete
                    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{MARKER}")

                def copy(rel: str) -> None:
                    source = {"Bucket": bucket, "Key": f"{staging}/{rel}"}
                    s3.copy(source, bucket, f"{prefix}/{rel}", Config=transfer_config())
                    copied.append(rel)

                list(pool.map(copy, rels))
                stale = old_keys - {f"{prefix}/{rel}" for rel in rels} - {f"{prefix}/{MARKER}"}
                _delete(bucket, sorted(stale))
                marker = {"files": checksums, "count": len(rels)}
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{MARKER}", Body=json.dumps(marker, indent=1).encode())
    except _boto_errors() as exc:
        if not old_keys:  # nothing was there before: remove what we placed
            _delete(bucket, [f"{prefix}/{rel}" for rel in copied], quiet=True)
        raise _friendly(exc, uri, "upload to") from None
    finally:
        _delete(bucket, [f"{staging}/{rel}" for rel in rels], quiet=True)


def put_file(path: Path, uri: str) -> None:
    """One object from a local file (a single PUT or multipart upload: readers see the whole file
    or the one before it)."""
    bucket, key = split_uri(uri)
    try:
        client().upload_file(str(path), bucket, key, Config=transfer_config())
    except _boto_errors() as exc:
        raise _friendly(exc, uri, "upload to") from None


def _delete(bucket: str, keys: list[str], quiet: bool = False) -> None:
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        try:
            client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
        except _boto_errors():
            if not quiet:
                raise


def delete_prefix(uri: str) -> int:
    """Remove every object under the folder ``uri``; return how many."""
    bucket, prefix = split_uri(uri)
    try:
        keys = list_keys(bucket, prefix)
        _delete(bucket, keys)
    except _boto_errors() as exc:
        raise _friendly(exc, uri, "delete") from None
    return len(keys)


# --- reading -------------------------------------------------------------------------------------


def download(uri: str, local_dir: Path, sealed: bool = True) -> Path:
    """Download the folder ``uri`` (or a single object) into ``local_dir``; verify checksums.

    ``sealed``: the folder must be a complete segflow artifact (completion marker present), and
    only the files the marker lists are fetched, each checked against its sha256. Without it (raw
    inputs), every object is fetched. Every key is confined to ``local_dir``.
    """
    bucket, prefix = split_uri(uri)
    local_dir = Path(local_dir)
    s3 = client()
    try:
        keys = list_keys(bucket, prefix)
        if not keys and prefix:  # maybe a single object
            s3.head_object(Bucket=bucket, Key=prefix)
            if sealed:
                raise SegflowError(f"{uri} is a single object, not a segflow artifact folder.")
            target = local_dir.parent / Path(prefix).name
            local_dir.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, prefix, str(target), Config=transfer_config())
            return target
    except _boto_errors() as exc:
        if _code(exc) in ("404", "NoSuchKey"):
            raise SegflowError(f"{uri} does not exist: no objects under that prefix.") from None
        raise _friendly(exc, uri, "read") from None

    rels = [k[len(prefix) + 1 :] if prefix else k for k in keys]
    expected: dict[str, str] | None = None
    if MARKER in rels:
        try:
            body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{MARKER}" if prefix else MARKER)["Body"].read()
            expected = json.loads(body)["files"]
            if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
                raise TypeError("files is not a mapping of name -> sha256")
        except _boto_errors() as exc:
            raise _friendly(exc, uri, "read") from None
        except (ValueError, KeyError, TypeError, RecursionError):
            raise SegflowError(f"{uri}/{MARKER} is damaged (not the JSON segflow writes): publish it again.") from None
        rels = sorted(expected)
    elif sealed:
        raise SegflowError(
            f"{uri} has no completion marker ({MARKER}): it is a partial publish that was interrupted, or not a "
            "segflow artifact. Run the stage that writes it again; raw data goes through `segflow data import`."
        )
    rels = [r for r in rels if not r.endswith("/")]  # "folder" placeholder objects made by consoles

    def key_of(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    targets = {rel: confined(local_dir, rel, f"S3 key {key_of(rel)!r} in s3://{bucket}/{prefix}") for rel in rels}

    def fetch(rel: str) -> None:
        target = targets[rel]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            s3.download_file(bucket, key_of(rel), str(target), Config=transfer_config())
        except _boto_errors() as exc:
            if expected is not None and _code(exc) in ("404", "NoSuchKey"):
                raise SegflowError(
                    f"{uri}/{rel} is listed in its completion marker but missing: republish it."
                ) from None
            raise
        if expected is not None and sha256_file(target) != expected[rel]:
            raise SegflowError(f"{uri}/{rel}: checksum mismatch after download: the object changed or is corrupt.")

    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(fetch, rels))
    except _boto_errors() as exc:
        raise _friendly(exc, uri, "download") from None
    return local_dir

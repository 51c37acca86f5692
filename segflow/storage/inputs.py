"""Inputs: a local folder for any URI (an s3:// one is downloaded, and must be sealed when it is an
artifact), images one at a time, and a fingerprint of raw data without reading it twice."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from segflow.errors import SegflowError
from segflow.storage import s3
from segflow.storage.paths import is_s3, sha256_file, walk_files


def source_fingerprint(uri: str) -> str:
    """A fingerprint of the raw data under ``uri`` without reading it twice: sha256 over every
    file's relative path and content hash (locally), or its key, size and ETag (S3: a listing, no
    download). The same data gives the same fingerprint; any added, removed or changed file, another."""

    if is_s3(uri):
        entries = s3.listing(str(uri))
    else:
        root = Path(uri)
        if not root.is_dir():
            raise SegflowError(f"{uri}: not a folder. Point data_uri at the dataset's folder (or s3:// prefix).")
        entries = [[p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p)] for p in walk_files(root)]
    if not entries:
        raise SegflowError(f"{uri}: no files. Point data_uri at the dataset's folder (or s3:// prefix).")
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


@contextlib.contextmanager
def local_input(uri: str | Path, what: str = "input", sealed: bool = True) -> Iterator[Path]:
    """Yield a local folder (or file) holding ``uri``'s content; temporary when ``uri`` is on S3.

    ``sealed``: ``uri`` must be a segflow artifact (on S3: completion marker and checksums).
    """
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="segflow-in-") as tmp:
            yield s3.download(str(uri), Path(tmp) / "data", sealed=sealed)
        return
    path = Path(uri).expanduser()
    if not path.exists():
        raise SegflowError(f"{what} {path} does not exist: check the path.")
    yield path


@dataclass(frozen=True)
class InputFiles:
    """Files to read one at a time: local paths used in place, or S3 objects each downloaded only
    while it is read (large images from S3 never all sit on local disk at once).

    ``names``: each file's path below the source folder (its name when the source is one file)."""

    source: str
    names: list[str]
    paths: list[Path] | None = None  # local
    keys: list[str] | None = None  # S3: bucket / key of each

    @classmethod
    def local(cls, source: Path, paths: list[Path]) -> InputFiles:
        names = [p.name if source.is_file() else p.relative_to(source).as_posix() for p in paths]
        return cls(str(source), names, paths=paths)

    @classmethod
    def on_s3(cls, uri: str, suffixes: set[str]) -> InputFiles:
        """Every object below ``uri`` with one of ``suffixes`` (or ``uri`` itself, one object)."""
        bucket, prefix = s3.split_uri(uri)
        keys = s3.list_matching(bucket, prefix, uri)
        keys = [k for k in keys if PurePosixPath(k).suffix.lower() in suffixes]
        if not keys:
            raise SegflowError(f"{uri} holds no images ({', '.join(sorted(suffixes))}).")
        names = [k[len(prefix) + 1 :] if len(keys) > 1 or k != prefix else PurePosixPath(k).name for k in keys]
        return cls(uri, names, keys=[f"{bucket}/{k}" for k in keys])

    def __len__(self) -> int:
        return len(self.names)

    def location(self, index: int) -> str:
        """Where file ``index`` is, for messages: its local path or its s3:// URI."""
        return str(self.paths[index]) if self.paths is not None else f"s3://{self.keys[index]}"

    @contextlib.contextmanager
    def read(self, index: int) -> Iterator[Path]:
        """A local path holding file ``index``; a downloaded copy is removed afterwards."""
        if self.paths is not None:
            yield self.paths[index]
            return
        bucket, _, key = self.keys[index].partition("/")
        with tempfile.TemporaryDirectory(prefix="segflow-file-") as tmp:
            target = Path(tmp) / PurePosixPath(key).name
            s3.download_object(bucket, key, target)
            yield target

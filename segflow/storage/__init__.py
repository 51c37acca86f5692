"""Local paths and ``s3://`` URIs behind one small interface.

Stages read inputs with :func:`local_input` and write outputs with :func:`staged_output`. Both
hide where the bytes live:

- a local path is used in place; a local output is built in a hidden sibling folder and renamed
  into place when complete (rename is atomic on one file system);
- an ``s3://`` input is downloaded to a temporary folder (checksums verified); an ``s3://`` output
  is built locally, then published with :func:`segflow.storage.s3.publish_dir`.

Either way a failed stage leaves no output behind and never damages one that already exists.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from segflow.errors import SegflowError
from segflow.storage import s3


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


@contextlib.contextmanager
def local_input(uri: str | Path, what: str = "input") -> Iterator[Path]:
    """Yield a local folder (or file) holding ``uri``'s content; temporary when ``uri`` is on S3."""
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="segflow-in-") as tmp:
            yield s3.download(str(uri), Path(tmp) / "data")
        return
    path = Path(uri).expanduser()
    if not path.exists():
        raise SegflowError(f"{what} {path} does not exist: check the path.")
    yield path


def _check_free(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise SegflowError(f"output {path} exists and is a file: choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SegflowError(
            f"output {path} already exists and is not empty: choose a new path, or pass --overwrite to replace it."
        )


@contextlib.contextmanager
def staged_output(uri: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty local folder to build an output in; publish it to ``uri`` only on success."""
    if is_s3(uri):
        s3.check_free(str(uri), overwrite)
        with tempfile.TemporaryDirectory(prefix="segflow-out-") as tmp:
            staging = Path(tmp) / "artifact"
            staging.mkdir()
            yield staging
            s3.publish_dir(staging, str(uri), overwrite=overwrite)
        return

    final = Path(uri).expanduser().absolute()
    _check_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same file system, so the final rename is atomic.
    staging = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _swap_into_place(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    if not final.exists():
        staging.rename(final)
        return
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    final.rename(old)
    try:
        staging.rename(final)
    except BaseException:
        old.rename(final)  # put the previous artifact back untouched
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["is_s3", "local_input", "s3", "staged_output"]

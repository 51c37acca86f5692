"""Outputs: one overwrite rule for local paths and s3:// URIs, checked before any work; built in a
staging folder and published whole; one writer per destination (locks); nothing half-written
left behind, and an existing output never damaged by a failed writer."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from segflow.errors import SegflowError
from segflow.storage import s3
from segflow.storage.paths import is_s3

log = logging.getLogger(__name__)

Inputs = dict[str, "str | Path"]  # what the input is called (a flag, "IMAGES") -> where it is


def _location(uri: str | Path) -> PurePosixPath:
    """A comparable absolute location: /bucket/prefix for s3://, else the resolved local path
    (links followed as far as the path exists)."""
    if is_s3(uri):
        return PurePosixPath("/", *str(uri)[len("s3://") :].strip("/").split("/"))
    return PurePosixPath(Path(uri).expanduser().resolve().as_posix())


def check_apart(output: str | Path, inputs: Inputs | None) -> None:
    """No output inside an input, and no input inside an output (with --overwrite or without):
    writing there would replace or change what the command reads, or publish it as an output."""
    for what, uri in (inputs or {}).items():
        if not uri or not output or is_s3(uri) != is_s3(output):
            continue
        out, source = _location(output), _location(uri)
        if out == source:
            relation = "is"
        elif source in out.parents:
            relation = "lies inside"
        elif out in source.parents:
            relation = "holds"
        else:
            continue
        raise SegflowError(
            f"output {output} {relation} the input {what} {uri}: writing there would replace or change it. "
            "Choose an output outside every input."
        )


def check_output(uri: str | Path, overwrite: bool, inputs: Inputs | None = None) -> None:
    """The one overwrite rule, checked before any work: an output that exists is refused unless
    ``overwrite``; it may not be, hold or lie inside any of ``inputs``; an S3 bucket must exist and
    answer; a local path must not be a file."""
    check_apart(uri, inputs)
    if is_s3(uri):
        s3.check_free(str(uri), overwrite)
        return
    path = Path(uri).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise SegflowError(f"output {path} exists and is a file: choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SegflowError(
            f"output {path} already exists and is not empty: choose a new path, or pass --overwrite to replace it."
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SegflowError(f"output {path}: {parent} is a file, so no folder can be made below it.")
            break


@contextlib.contextmanager
def staged_output(
    uri: str | Path, overwrite: bool = False, publish: bool = True, inputs: Inputs | None = None
) -> Iterator[Path]:
    """Yield an empty local folder to build an output in; publish it to ``uri`` only on success.

    ``inputs``: what the stage reads (name -> path or URI); the output may not be, hold or lie
    inside any of them. ``publish=False`` (the other processes of a distributed run) yields a
    scratch folder that is thrown away: exactly one process writes an output.
    """
    if not publish:
        with tempfile.TemporaryDirectory(prefix="segflow-scratch-") as tmp:
            yield Path(tmp)
        return
    check_output(uri, overwrite, inputs)
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="segflow-out-") as tmp:
            staging = Path(tmp) / "artifact"
            staging.mkdir()
            yield staging
            s3.publish_dir(staging, str(uri), overwrite=overwrite)
        return

    final = Path(uri).expanduser().absolute()
    with removing_new_folders(final.parent), exclusive(final), writing(final):
        check_output(final, overwrite)  # again, now that no other writer can change it
        _remove_stale_staging(final)
        # A sibling on the same file system, so the final rename is atomic.
        staging = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
        _mkdir(staging)
        try:
            yield staging
            _swap_into_place(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def removing_new_folders(folder: Path) -> Iterator[None]:
    """On failure, remove the folders up to ``folder`` that did not exist before and are empty
    now: a failed command leaves nothing behind, not even the parents of its output."""
    folder = Path(folder).absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for path in missing:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty
        raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or quota) is full: an OSError, or a library's own error
    type that only says so in words (safetensors, torch.save)."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    text = str(exc)
    return any(sign in text for sign in ("No space left on device", "os error 28", "Disk quota exceeded"))


def mount_point(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() or not os.path.ismount(path):
        if path == path.parent:
            break
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """A full disk while writing ``path`` becomes one clear error that names the disk and the path."""
    try:
        yield
    except SegflowError:
        raise
    except Exception as exc:
        if not no_space(exc):
            raise
        raise SegflowError(
            f"no space left on {mount_point(Path(path))} while writing {path}: free space there, or choose "
            "a place on another disk. Nothing was published."
        ) from None


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegflowError(
            f"cannot create {path}: {exc.strerror or exc}. Choose an output in a writable place."
        ) from None


@contextlib.contextmanager
def exclusive(final: Path) -> Iterator[None]:
    """An exclusive lock on ``.NAME.lock`` beside ``final`` (an output, a checkpoint folder) for as
    long as the writer runs. The kernel releases it when the process dies, so a killed writer
    never blocks the next one; a second live writer fails at once with a clear message."""
    final = Path(final).absolute()
    _mkdir(final.parent)
    lock_path = final.parent / f".{final.name}.lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SegflowError(
                f"cannot write beside {final}: {exc.strerror or exc}. Choose an output in a writable place."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise SegflowError(
                    f"another segflow process is writing {final} right now: two writers cannot share one output. "
                    "Choose another path, or wait for it to finish."
                ) from None
            raise
        # The previous holder may have removed the file between our open and our lock: retry then.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def write_file(path: str | Path, write: Callable[[Path], None], overwrite: bool = False, what: str = "output") -> Path:
    """One file output under the same rules as a folder: an existing file is refused unless
    ``overwrite``, one writer at a time (the lock beside it), and ``write(partial)`` fills a
    temporary name of this process's own (same suffix) that is renamed over ``path`` only when
    complete."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise SegflowError(f"{what} {path} is a folder: give a file name.")
    if path.exists() and not overwrite:
        raise SegflowError(f"{what} {path} already exists: choose a new name, or pass --overwrite to replace it.")
    with exclusive(path):
        partial = path.with_name(f".{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
        try:
            write(partial)
            partial.replace(path)
        except OSError as exc:
            raise SegflowError(f"cannot write {path}: {exc.strerror or exc}. Choose a writable place.") from None
        finally:
            partial.unlink(missing_ok=True)
    return path


def _remove_stale_staging(final: Path) -> None:
    """Staging and swap folders of earlier writers that were killed: removed, and said. We hold
    the lock, so no live writer owns them."""
    for stale in final.parent.glob(f".{final.name}.staging-*"):
        log.warning("removing %s, left by an interrupted write to %s", stale, final)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in final.parent.glob(f".{final.name}.old-*"):
        log.warning("removing %s, left by an interrupted replacement of %s", stale, final)
        shutil.rmtree(stale, ignore_errors=True)


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

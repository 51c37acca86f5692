"""Local paths and ``s3://`` URIs behind one small interface.

Stages read inputs with :func:`local_input` and write outputs with :func:`staged_output`. Both
hide where the bytes live:

- a local input is used in place; an ``s3://`` input is downloaded to a temporary folder. An
  artifact (``sealed=True``, the default) must carry its completion marker and every file must
  match its checksum; raw inputs (a dataset to import, a folder of images) need no marker;
- an output is built in a staging folder and published only when complete: locally by a rename
  (atomic on one file system), on S3 by :func:`segflow.storage.s3.publish_dir`.

One overwrite rule for every writer, local or S3 (:func:`check_output`): an existing output is
refused unless ``overwrite``, and this is checked before any work starts. One writer per
destination: a second one fails with a clear message instead of silently replacing the first.
A failed stage leaves no output behind and never damages one that already exists.
"""

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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from segflow.errors import SegflowError
from segflow.storage import s3
from segflow.storage.paths import confined, read_json, sha256_file, walk_files

log = logging.getLogger(__name__)


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def home() -> Path:
    """Where local state lives: pipeline outputs, MLflow's SQLite store, checkpoints of s3:// outputs
    (``$SEGFLOW_HOME``, default ``./runs``)."""
    return Path(os.environ.get("SEGFLOW_HOME", "runs")).expanduser().absolute()


def checkpoint_dir(out: str, explicit: str = "") -> Path:
    """Where a run writing to ``out`` keeps its checkpoints: beside a local OUT (``OUT.checkpoints``),
    under $SEGFLOW_HOME for an s3:// OUT (keyed by the URI, so a rerun finds them)."""
    if explicit:
        return Path(explicit)
    if is_s3(out):
        import hashlib

        return home() / "checkpoints" / hashlib.sha256(out.encode()).hexdigest()[:16]
    path = Path(out).expanduser().absolute()
    return path.parent / f"{path.name}.checkpoints"


def task_checkpoints(pipeline_root: str, run_key: str, task_name: str) -> str:
    """Where a pipeline task keeps its checkpoints: under the pipeline root, keyed by run and task,
    so a retry of the task (a new pod, maybe on another node) finds them; empty without a root."""
    if not pipeline_root:
        return ""
    return f"{str(pipeline_root).rstrip('/')}/checkpoints/{run_key or 'run'}/{task_name or 'task'}"


def source_fingerprint(uri: str) -> str:
    """A fingerprint of the raw data under ``uri`` without reading it twice: sha256 over every
    file's relative path and content hash (locally), or its key, size and ETag (S3: a listing, no
    download). The same data gives the same fingerprint; any added, removed or changed file, another."""
    import hashlib
    import json

    if is_s3(uri):
        bucket, prefix = s3.split_uri(str(uri).rstrip("/"))
        base = f"{prefix}/" if prefix else ""
        try:
            objects = s3.list_objects(bucket, base)
        except s3._boto_errors() as exc:
            raise s3._friendly(exc, str(uri), "list") from None
        entries = [[o["Key"][len(base) :], o["Size"], o.get("ETag", "")] for o in objects]
    else:
        root = Path(uri)
        if not root.is_dir():
            raise SegflowError(f"{uri}: not a folder. Point data_uri at the dataset's folder (or s3:// prefix).")
        entries = [[p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p)] for p in walk_files(root)]
    if not entries:
        raise SegflowError(f"{uri}: no files. Point data_uri at the dataset's folder (or s3:// prefix).")
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def remove_task_checkpoints(uri: str) -> None:
    """Remove a pipeline task's checkpoints (local or S3) once its output is published."""
    if is_s3(uri):
        s3.delete_prefix(uri)
    elif uri:
        shutil.rmtree(uri, ignore_errors=True)


class Checkpoints:
    """Where a training run keeps its checkpoints.

    Locally: ``OUT.checkpoints`` beside a local OUT, under $SEGFLOW_HOME for an s3:// OUT, or the
    folder ``explicit`` names. When ``explicit`` is an s3:// prefix (a pipeline task passes one
    under its pipeline root, keyed by run and task), the local folder is a working copy that is
    pushed there after every epoch and pulled from there when a resumed run has none, so a task
    that restarts in a fresh pod on another node carries on where the lost one stopped.
    """

    # Uploaded in this order: the newest last.pt never names a best epoch whose weights are not there.
    ORDER = ("best.safetensors", "last.pt")

    def __init__(self, out: str, explicit: str = "") -> None:
        self.remote = str(explicit).rstrip("/") if is_s3(explicit) else ""
        self.local = checkpoint_dir(self.remote or out, "" if self.remote else explicit)

    def pull(self) -> bool:
        """Bring the remote checkpoints into an empty local folder; True when there were some."""
        if not self.remote or (self.local / self.ORDER[-1]).exists():
            return False
        bucket, prefix = s3.split_uri(self.remote)
        if f"{prefix}/{self.ORDER[-1]}" not in s3.list_keys(bucket, prefix):
            return False
        log.info("resuming from the checkpoints in %s", self.remote)
        s3.download(self.remote, self.local, sealed=False)
        return True

    def push(self) -> None:
        if self.remote:
            for name in self.ORDER:
                if (self.local / name).exists():
                    s3.put_file(self.local / name, f"{self.remote}/{name}")

    def discard(self) -> None:
        """Once the output is published: the remote copy goes (the local one stays for a rerun
        with --resume unless it was only a working copy)."""
        if self.remote:
            s3.delete_prefix(self.remote)
            shutil.rmtree(self.local, ignore_errors=True)


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


__all__ = [
    "SegflowError",
    "check_apart",
    "check_output",
    "checkpoint_dir",
    "confined",
    "exclusive",
    "home",
    "is_s3",
    "local_input",
    "read_json",
    "s3",
    "sha256_file",
    "staged_output",
    "walk_files",
    "write_file",
]

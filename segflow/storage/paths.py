"""Paths built from outside data (S3 keys, dataset item ids, symlinks) are confined to their root.

Anyone who can write to a bucket or hand over a dataset chooses those names, so a name like
``../../etc/cron.d/x`` must never reach ``open(..., "w")``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path, PurePosixPath

from segflow.errors import SegflowError

log = logging.getLogger(__name__)


def confined(root: str | Path, rel: str, what: str = "", links: bool = True) -> Path:
    """``root / rel``, refused unless it stays inside ``root`` (after resolving ``..`` and links).

    ``what`` says where ``rel`` came from in the error ("S3 key 'a/../b' in s3://bucket/a", ...).
    ``links=False`` checks the name only: for callers that already walked ``root`` with
    :func:`walk_files`, which refuses links that leave it.
    """
    what = what or f"path {rel!r}"
    posix = PurePosixPath(rel.replace("\\", "/"))
    if not rel or posix.is_absolute() or ".." in posix.parts:
        raise SegflowError(
            f"{what} points outside its folder (absolute, empty or '..' parts): refusing to use it. "
            "Remove or rename it."
        )
    if not links:
        return Path(root) / Path(*posix.parts)
    base = Path(root).resolve()
    path = (base / Path(*posix.parts)).resolve()
    if path != base and base not in path.parents:
        raise SegflowError(f"{what} resolves outside {base} (a symbolic link?): refusing to use it.")
    return base / Path(*posix.parts)


def read_json(path: str | Path, fix: str = "produce it again", object_pairs_hook=None):
    """A JSON file, or an error that names it and says ``fix``: damaged, not UTF-8 text, or
    nested too deeply for the parser (a crafted file otherwise ends in a RecursionError).
    ``object_pairs_hook`` is json's; a ValueError it raises is reported the same way."""
    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=object_pairs_hook)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise SegflowError(f"{path} is not valid JSON ({reason}): {fix}.") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in blocks by hashlib itself)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def walk_files(root: str | Path, suffixes: set[str] | None = None) -> list[Path]:
    """Files below ``root`` (sorted), following links only where they stay inside ``root``.

    A link that points outside ``root`` or back into one of its own parents (a loop) is an error
    that names it: reading it would either leak another file into an artifact or never end.
    Only regular files are listed: FIFOs, sockets and devices are skipped with a warning.
    """
    base = Path(root).resolve()
    found: list[Path] = []
    pending = [Path(root)]
    seen: set[Path] = set()
    while pending:
        folder = pending.pop()
        real = folder.resolve()
        if real in seen:  # two links to one folder: list its files once
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.is_symlink():
                    target = path.resolve()
                    if not target.exists():
                        raise SegflowError(f"{path} is a broken symbolic link: remove it or fix its target.")
                    if target != base and base not in target.parents:
                        raise SegflowError(
                            f"{path} is a symbolic link to {target}, outside {base}: copy the file in instead."
                        )
                    if target.is_dir() and (target in (base, real) or target in real.parents):
                        raise SegflowError(f"{path} is a symbolic link loop (it leads back to {target}): remove it.")
                if entry.is_dir():
                    pending.append(path)
                elif not entry.is_file():
                    # A FIFO, socket or device: reading one can block forever, or never end.
                    log.warning("skipping %s: not a regular file (a FIFO, socket or device)", path)
                elif suffixes is None or os.path.splitext(entry.name)[1].lower() in suffixes:
                    found.append(path)
    return sorted(found)


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def home() -> Path:
    """Where local state lives: pipeline outputs, MLflow's SQLite store, checkpoints of s3:// outputs
    (``$SEGFLOW_HOME``, default ``./runs``)."""
    return Path(os.environ.get("SEGFLOW_HOME", "runs")).expanduser().absolute()

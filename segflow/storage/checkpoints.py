"""Where a training run keeps its checkpoints: beside a local output, under $SEGFLOW_HOME for an
s3:// one, or under a pipeline's root on S3 so that a retried task in a fresh pod resumes."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from segflow.storage import s3
from segflow.storage.paths import home, is_s3

log = logging.getLogger(__name__)


def checkpoint_dir(out: str, explicit: str = "") -> Path:
    """Where a run writing to ``out`` keeps its checkpoints: beside a local OUT (``OUT.checkpoints``),
    under $SEGFLOW_HOME for an s3:// OUT (keyed by the URI, so a rerun finds them)."""
    if explicit:
        return Path(explicit)
    if is_s3(out):
        return home() / "checkpoints" / hashlib.sha256(out.encode()).hexdigest()[:16]
    path = Path(out).expanduser().absolute()
    return path.parent / f"{path.name}.checkpoints"


def task_checkpoints(pipeline_root: str, run_key: str, task_name: str) -> str:
    """Where a pipeline task keeps its checkpoints: under the pipeline root, keyed by run and task,
    so a retry of the task (a new pod, maybe on another node) finds them; empty without a root."""
    if not pipeline_root:
        return ""
    return f"{str(pipeline_root).rstrip('/')}/checkpoints/{run_key or 'run'}/{task_name or 'task'}"


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

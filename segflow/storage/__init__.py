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

from segflow.errors import SegflowError
from segflow.storage import s3
from segflow.storage.checkpoints import Checkpoints, checkpoint_dir, remove_task_checkpoints, task_checkpoints
from segflow.storage.inputs import InputFiles, local_input, source_fingerprint
from segflow.storage.outputs import (
    Inputs,
    check_apart,
    check_output,
    exclusive,
    no_space,
    staged_output,
    write_file,
    writing,
)
from segflow.storage.paths import confined, home, is_s3, read_json, sha256_file, walk_files

__all__ = [
    "Checkpoints",
    "InputFiles",
    "Inputs",
    "SegflowError",
    "check_apart",
    "check_output",
    "checkpoint_dir",
    "confined",
    "exclusive",
    "home",
    "is_s3",
    "local_input",
    "no_space",
    "read_json",
    "remove_task_checkpoints",
    "s3",
    "sha256_file",
    "source_fingerprint",
    "staged_output",
    "task_checkpoints",
    "walk_files",
    "write_file",
    "writing",
]

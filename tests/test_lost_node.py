"""A training task whose node is lost resumes in a fresh pod from its checkpoints on S3.

The task runs as KFP runs it in a pod: the train component's function, with the pipeline root on
S3 (moto's server). It is killed mid-run (SIGKILL: a lost node gives no warning), everything on
its disk is deleted (a new pod has none), and the retry, in a fresh working directory and a fresh
$SEGFLOW_HOME, ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segflow.storage import s3 as s3_lib

TASK = """
import sys
from kfp import dsl
from segflow_kfp.train import train_model

data, out, root = sys.argv[1:4]
train_model.python_func(
    dataset=dsl.Dataset(uri=data), model=dsl.Model(uri=out), metrics=dsl.Metrics(uri=out + ".metrics"),
    epochs=6, iters_per_epoch=4, batch_size=4, input_size=64, processes=1,
    checkpoint_root=root, task_name="train-model", run_key="run-1", run_name="lost-node",
)
"""


def pod(tmp_path: Path, name: str, data: Path, root: str) -> tuple[list[str], dict, Path]:
    """A fresh 'pod': its own working directory and $SEGFLOW_HOME."""
    work = tmp_path / name
    work.mkdir()
    script = work / "task.py"
    script.write_text(TASK)
    env = {**os.environ, "SEGFLOW_HOME": str(work / "home"), "MLFLOW_TRACKING_URI": ""}
    return [sys.executable, str(script), str(data), str(work / "model"), root], env, work


def keys(bucket: str, prefix: str) -> list[str]:
    return s3_lib.list_keys(bucket, prefix)


@pytest.mark.slow
def test_retry_in_a_fresh_pod_resumes_from_s3_to_the_same_weights(tiny, s3, tmp_path):
    data = tiny["data"]
    command, env, straight = pod(tmp_path, "straight", data, f"s3://{s3}/straight")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert keys(s3, "straight/checkpoints") == [], "checkpoints are removed once the model is published"

    command, env, lost = pod(tmp_path, "lost", data, f"s3://{s3}/lost")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while "lost/checkpoints/run-1/train-model/last.pt" not in keys(s3, "lost/checkpoints/run-1/train-model"):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before a checkpoint reached S3"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the node is gone
    proc.wait()
    assert not (lost / "model").exists(), "a killed task publishes nothing"
    import shutil

    shutil.rmtree(lost)  # and so is everything on its disk

    command, env, retry = pod(tmp_path, "retry", data, f"s3://{s3}/lost")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the checkpoints in s3://" in done.stderr
    assert "resuming from" in done.stderr and "after epoch" in done.stderr

    a, b = (
        load_file(str(straight / "model" / "model.safetensors")),
        load_file(str(retry / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert keys(s3, "lost/checkpoints") == [], "the checkpoint prefix is cleaned up after publishing"

"""A training task with several GPUs runs torchrun inside its pod, and resumes exactly when killed.

Locally the 'GPUs' are 2 CPU processes on gloo: the train component with processes=2 (what a
task compiled with --gpus 2 runs) is killed with its whole process group after a checkpoint, and
the retry ends with the same weights as a 2-process run that was never interrupted.
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

TASK = """
import sys
from kfp import dsl
from segflow_kfp.train import train_model

data, out, root = sys.argv[1:4]
train_model.python_func(
    dataset=dsl.Dataset(uri=data), model=dsl.Model(uri=out), metrics=dsl.Metrics(uri=out + ".metrics"),
    epochs=4, iters_per_epoch=3, batch_size=2, input_size=64, processes=2,
    checkpoint_root=root, task_name="train-model", run_key="run-2", run_name="two-gpus",
)
"""


def task(tmp_path: Path, name: str, data: Path) -> tuple[list[str], dict, Path]:
    work = tmp_path / name
    work.mkdir(exist_ok=True)
    (work / "task.py").write_text(TASK)
    env = {**os.environ, "SEGFLOW_HOME": str(work / "home"), "MLFLOW_TRACKING_URI": ""}
    return [sys.executable, str(work / "task.py"), str(data), str(work / "model"), str(work / "root")], env, work


@pytest.mark.slow
def test_two_process_task_resumes_to_the_same_weights(tiny, tmp_path):
    command, env, straight = task(tmp_path, "straight", tiny["data"])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = __import__("re").findall(r"rank (\d): final weights (\w+)", done.stderr)
    assert sorted(r for r, _ in digests) == ["0", "1"] and len({d for _, d in digests}) == 1, digests

    command, env, killed = task(tmp_path, "killed", tiny["data"])
    last = killed / "root" / "checkpoints" / "run-2" / "train-model" / "last.pt"
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not last.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the pod is gone: torchrun and both workers
    proc.wait()
    assert not (killed / "model").exists()

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "after epoch" in done.stderr

    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not last.parent.exists(), "the task's checkpoints are removed once its model is published"

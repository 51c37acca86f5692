"""Training engine, objectives and evaluation on tiny data (64 px, lite_hrnet_s, a few steps).

These tests check behaviour (learning happens, resume is exact, errors are clear), not speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_evaluate, run_import, run_train
from safetensors.torch import load_file, save_file

from segflow.data.synth import synthesize
from segflow.errors import SegflowError
from segflow.evaluate.evaluation import EvalConfig
from segflow.storage import sha256_file
from segflow.train.config import MeanTeacherConfig, SupConConfig, TrainConfig

TIMINGS = ("epoch_seconds", "data_wait_seconds", "data_wait_share")
TINY = {"model": "lite_hrnet_s", "input_size": 64, "batch_size": 4, "early_stop_patience": 100}


@pytest.fixture
def dataset(tiny) -> Path:
    """Target-domain scenes (the camera look), imported: 18 train, 6 val (the session's dataset)."""
    return tiny["data"]


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("unl") / "u", "target", num_images=8, size=64, seed=12, unlabeled=True)


def cfg(dataset: Path, out: Path, **kwargs) -> TrainConfig:
    return TrainConfig(data=str(dataset), out=str(out), **{**TINY, **kwargs})


def trivial_mdice(dataset: Path) -> float:
    """mDice of predicting the most frequent val class everywhere."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    pixels = np.asarray(manifest["subsets"]["val"]["label_pixels"], dtype=np.float64)
    share = pixels.max() / pixels.sum()
    return (2 * share / (1 + share)) / np.count_nonzero(pixels)


def test_training_learns_and_publishes_a_model(tiny, tmp_path):
    """The session's model (8 epochs x 6 steps) learnt, and what it published evaluates the same."""
    dataset, model, summary = tiny["data"], tiny["model"], tiny["summary"]
    losses = [h["train_loss"] for h in summary.record["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert summary.best_val_mDice > 2 * trivial_mdice(dataset), summary.best_val_mDice
    files = sorted(p.name for p in model.iterdir())
    assert files == ["config.json", "model.safetensors", "training.json"]
    config = json.loads((model / "config.json").read_text())
    assert config["architecture"] == "lite_hrnet_s" and config["labels"][0] == "sky"
    assert len(config["normalization"]["mean"]) == 3

    metrics = run_evaluate(EvalConfig(model=str(model), data=str(dataset), out=str(tmp_path / "eval")))
    assert metrics.mDice == pytest.approx(summary.best_val_mDice, abs=2e-3)
    assert 0 <= metrics.mIoU <= metrics.mDice <= 1
    assert set(metrics.record["per_class"]) == set(config["labels"])
    assert np.asarray(metrics.confusion_matrix).sum() == metrics.record["pixels"] == 6 * 64 * 64
    for name in ("metrics.json", "confusion_matrix.png", "predictions.png", "report.md"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_same_seed_same_result_with_or_without_loader_workers(dataset, tmp_path):
    """Augmentation draws from (seed, epoch, item), so worker processes change nothing but the wait."""
    a = run_train(cfg(dataset, tmp_path / "a", epochs=2, seed=3))
    b = run_train(cfg(dataset, tmp_path / "b", epochs=2, seed=3, loader_workers=2))

    def timeless(summary):
        return [{k: v for k, v in h.items() if k not in TIMINGS} for h in summary.record["history"]]

    assert timeless(a) == timeless(b)
    for record in a.record["history"] + b.record["history"]:
        assert 0 < record["data_wait_seconds"] < record["epoch_seconds"] and 0 < record["data_wait_share"] < 1
    first, second = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(v, second[k]) for k, v in first.items())


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_result(dataset, tmp_path):
    args = [
        "--data",
        str(dataset),
        "--model",
        "lite_hrnet_s",
        "--input-size",
        "64",
        "--batch-size",
        "4",
        "--epochs",
        "4",
        "--iters-per-epoch",
        "4",
        "--no-track",
        "--early-stop-patience",
        "100",
    ]
    cli = [sys.executable, "-m", "segflow.cli", "train"]
    subprocess.run([*cli, *args, "--out", str(tmp_path / "straight")], check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    checkpoint = tmp_path / "killed.checkpoints" / "last.pt"
    proc = subprocess.Popen([*cli, *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "a killed run must not publish a model"

    again = subprocess.run([*cli, *args, "--out", str(killed)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(
        [*cli, *args, "--out", str(killed), "--resume"], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    straight, after = _weights(tmp_path / "straight"), _weights(killed)
    assert all(torch.equal(straight[k], after[k]) for k in straight)
    s = json.loads((tmp_path / "straight" / "training.json").read_text())
    r = json.loads((killed / "training.json").read_text())
    assert s["best_val_mDice"] == r["best_val_mDice"] and s["iterations"] == r["iterations"] == 16


def test_supcon_contrastive_loss_falls(dataset, tmp_path):
    """The contrastive branch learns: its loss over label-map regions falls as training goes on."""
    supcon = SupConConfig(every=1)
    summary = run_train(cfg(dataset, tmp_path / "m", epochs=4, iters_per_epoch=5, supcon=supcon))
    assert summary.record["objective"] == "supcon"
    contrastive = [h["train_contrastive"] for h in summary.record["history"]]
    assert all(np.isfinite(contrastive)) and contrastive[-1] < contrastive[0], contrastive


def test_mean_teacher_warms_up_then_ramps_and_learns_the_confident_pseudo_labels(dataset, unlabeled, tmp_path):
    """Supervised only during the warm-up steps; then the unsupervised weight ramps to its full
    value, and the student's loss against the teacher's confident pseudo-labels falls."""
    mt = MeanTeacherConfig(
        unlabeled=str(unlabeled), warmup_steps=4, ramp_steps=8, confidence=0.2, unlabeled_batch_size=2
    )
    summary = run_train(cfg(dataset, tmp_path / "m", epochs=6, iters_per_epoch=4, mean_teacher=mt))
    assert summary.record["objective"] == "mean_teacher"
    first, *taught = summary.record["history"]
    assert "train_unsup" not in first
    weights = [h["train_unsup_weight"] for h in taught]
    assert weights == sorted(weights) and weights[-1] == pytest.approx(1.0) and weights[0] < 1.0, weights
    shares = [h["train_confident_share"] for h in taught]
    assert all(0 <= share <= 1 for share in shares) and max(shares) > 0, shares
    assert np.isfinite([h["train_unsup"] for h in taught]).all()


class FixedLogits(torch.nn.Module):
    """A "network" whose output is a fixed (trainable) logit tensor, for checking a loss by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, images):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits[: images.shape[0]])


def test_mean_teacher_learns_only_where_the_teacher_is_sure():
    """The student gets gradient from an unlabelled pixel only when the teacher's confidence there
    reaches the threshold; during the warm-up, from none."""
    from segflow.train.objective import Step, Stream
    from segflow.train.objectives import MeanTeacher

    classes, size = 4, 6
    teacher_logits = torch.zeros(1, classes, size, size)
    teacher_logits[0, 2, :, :3] = 10.0  # sure of class 2 on the left half, undecided on the right
    mt = MeanTeacher(MeanTeacherConfig(unlabeled="u", warmup_steps=5, ramp_steps=0), Stream([], 1))
    mt.teacher = FixedLogits(teacher_logits)
    batch = {
        "image": torch.zeros(1, 3, size, size),
        "mask": torch.zeros(1, size, size, dtype=torch.long),
        "unlabeled": {"image": torch.zeros(1, 3, size, size), "strong": torch.zeros(1, 3, size, size)},
    }
    student = FixedLogits(torch.zeros(2, classes, size, size))
    loss, logs = mt.loss(student, batch, Step(epoch=0, iteration=5, seed=0, total=10))
    loss.backward()
    unlabelled_grad = student.logits.grad[1].abs().sum(0)
    assert logs["confident_share"] == pytest.approx(0.5) and logs["unsup_weight"] == 1.0
    assert (unlabelled_grad[:, :3] > 0).all() and (unlabelled_grad[:, 3:] == 0).all()
    student.logits.grad = None
    loss, logs = mt.loss(student, batch, Step(epoch=0, iteration=4, seed=0, total=10))  # still warming up
    assert "unsup" not in logs


def test_mean_teacher_settings_are_checked():
    bad = MeanTeacherConfig(unlabeled="u", confidence=1.5)
    with pytest.raises(SegflowError, match="confidence must be between 0 and 1"):
        TrainConfig(data="d", out="o", mean_teacher=bad).validate()


def test_ddp_with_two_cpu_processes(dataset, tmp_path):
    """torchrun, gloo backend: both processes train in step; one model is published."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on loopback
        "--nproc-per-node",
        "2",
        "-m",
        "segflow.cli",
        "train",
        "--data",
        str(dataset),
        "--out",
        str(tmp_path / "ddp"),
        "--input-size",
        "64",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--no-track",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "training.json").read_text())
    # 18 train images, batch 2 per process, 2 processes: 4 steps per epoch.
    assert summary["iterations"] == 8
    digests = dict(re.findall(r"rank (\d): final weights (\w+)", result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests


def test_init_backbone_is_checked(dataset, tmp_path):
    from segflow.models import create_model

    folder = tmp_path / "pretrained"
    folder.mkdir()
    model = create_model("lite_hrnet_18", 7)
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(folder / "backbone.safetensors"))
    tag = {
        "format": "segflow.backbone/2",
        "files": {"backbone.safetensors": sha256_file(folder / "backbone.safetensors")},
    }
    (folder / "config.json").write_text(json.dumps({**tag, "architecture": "lite_hrnet_18"}))
    with pytest.raises(SegflowError, match="'lite_hrnet_18' backbone but the model is 'lite_hrnet_s'"):
        run_train(cfg(dataset, tmp_path / "m", epochs=1, init_backbone=str(folder)))
    (folder / "config.json").write_text(json.dumps({**tag, "architecture": "lite_hrnet_s"}))
    with pytest.raises(SegflowError, match="do not fit"):
        run_train(cfg(dataset, tmp_path / "m", epochs=1, init_backbone=str(folder)))
    (folder / "config.json").write_text(json.dumps({"architecture": "lite_hrnet_s"}))
    with pytest.raises(SegflowError, match=r"format None is not 'segflow\.backbone/2'"):
        run_train(cfg(dataset, tmp_path / "m", epochs=1, init_backbone=str(folder)))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SegflowError, match=r"no config\.json"):
        run_train(cfg(dataset, tmp_path / "m", epochs=1, init_backbone=str(tmp_path / "nothing")))
    (folder / "config.json").write_text(json.dumps({**tag, "architecture": "lite_hrnet_18", "files": {}}))
    with pytest.raises(SegflowError, match=r"records no checksum of \['backbone\.safetensors'\]"):
        run_train(cfg(dataset, tmp_path / "m", epochs=1, init_backbone=str(folder)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "unet"}, "--model"),
        ({"batch_size": 1}, "--batch-size"),
        ({"input_size": 50}, "--input-size"),
        ({"amp": "fp8"}, "--amp"),
        ({"mean_teacher": MeanTeacherConfig()}, "--unlabeled"),
    ],
)
def test_bad_settings_are_named(dataset, tmp_path, change, message):
    with pytest.raises(SegflowError, match=message):
        run_train(replace(cfg(dataset, tmp_path / "m", epochs=1), **change))


def test_evaluation_refuses_other_labels(dataset, tmp_path):
    run_train(cfg(dataset, tmp_path / "m", epochs=1))
    other = synthesize(tmp_path / "other", "source", 6, 64, 0)
    meta = json.loads((other / "dataset_meta.json").read_text())
    meta["label_map"]["0"] = "heaven"
    (other / "dataset_meta.json").write_text(json.dumps(meta))
    run_import(other, tmp_path / "other_ds")
    with pytest.raises(SegflowError, match="labels"):
        run_evaluate(EvalConfig(model=str(tmp_path / "m"), data=str(tmp_path / "other_ds"), out=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()


def test_a_pipeline_task_overwrites_its_output_and_removes_its_checkpoints_once_published(tiny, tmp_path):
    """segflow.launch.run_task: the policy every training component shares."""
    from segflow.adapt.config import AdaptConfig
    from segflow.launch import run_task, task_key
    from segflow.tracking import RunContext

    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier try")
    task = cfg(tiny["data"], out, epochs=1, iters_per_epoch=2)
    result = run_task("train", task, RunContext("run-1", "", ""), 1, str(tmp_path / "root"), "train-model")
    assert result.best_epoch == 1 and (out / "model.safetensors").exists() and not (out / "stale.txt").exists()
    assert (tmp_path / "root").exists() and not (tmp_path / "root/checkpoints/run-1/train-model").exists()
    branch = AdaptConfig(source="s", target="t", init="i", out="o", method="dacs", levels="single")
    assert task_key("adapt", branch, "adapt-model") == "adapt-model-dacs-single"
    assert task_key("train", task, "train-model") == "train-model"

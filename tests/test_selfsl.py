"""DetCon pseudo masks and self-supervised pretraining on tiny unlabelled image folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, run_pretrain, run_train
from PIL import Image
from safetensors.torch import load_file

from segflow.data.synth import synthesize
from segflow.errors import SegflowError
from segflow.selfsl.config import PretrainConfig
from segflow.selfsl.pseudo_masks import FelzenszwalbParams, make_pseudo_masks, segment
from segflow.storage import s3 as s3_lib
from segflow.train.config import TrainConfig

SMALL = FelzenszwalbParams(scale=100, sigma=0.8, min_size=20)


@pytest.fixture
def images(tmp_path) -> Path:
    return synthesize(tmp_path / "unl" / "images", "target", num_images=8, size=64, seed=5, unlabeled=True)


def test_masks_go_beside_the_images_and_are_reused(images):
    first = make_pseudo_masks(images, params=SMALL, workers=2)
    masks = images.parent / "detcon_mask"
    assert {k: first[k] for k in ("images", "made", "reused", "out")} == {
        "images": 8,
        "made": 8,
        "reused": 0,
        "out": str(masks),
    }
    assert first["params"] == {"scale": 100, "sigma": 0.8, "min_size": 20} and first["params_chosen_by"] == "as set"
    mask = np.asarray(Image.open(masks / "target_00000.png"))
    assert mask.dtype == np.uint8 and mask.shape == (64, 64) and len(np.unique(mask)) >= 3
    stamps = {p.name: p.stat().st_mtime_ns for p in masks.glob("*.png")}
    assert make_pseudo_masks(images, params=SMALL)["reused"] == 8
    assert {p.name: p.stat().st_mtime_ns for p in masks.glob("*.png")} == stamps, "reused masks must not be rewritten"
    # A changed image makes a new mask; so do other parameters, but only when told to replace.
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "target_00003.png")
    assert make_pseudo_masks(images, params=SMALL)["made"] == 1
    other = FelzenszwalbParams(scale=50, min_size=20)
    with pytest.raises(SegflowError, match=r"other Felzenszwalb parameters \(scale 100, sigma 0.8, min size 20\)"):
        make_pseudo_masks(images, params=other)
    assert {p.name: p.stat().st_mtime_ns for p in masks.glob("*.png")}.keys() == stamps.keys()
    assert make_pseudo_masks(images, params=other, replace=True)["made"] == 8


def test_auto_parameters_adopt_existing_masks_and_otherwise_follow_the_image_size(images, tmp_path):
    """Left at auto, the parameters are those of the masks already made (a user's own), else the
    size rule fitted to about 20 segments per image, on 64 px and 256 px images alike."""
    made = make_pseudo_masks(images, params=SMALL)
    again = make_pseudo_masks(images)  # auto
    assert again["reused"] == 8 and again["params"] == made["params"]
    assert again["params_chosen_by"] == "those of the masks already made"
    for size in (64, 256):
        folder = synthesize(tmp_path / f"u{size}" / "images", "target", num_images=6, size=size, seed=1, unlabeled=True)
        result = make_pseudo_masks(folder)
        assert result["params_chosen_by"].startswith(f"size rule for {size} px images x"), result
        assert 10 <= result["segments_per_image"] <= 32, result
    # OTX's fixed defaults (made for ~512 px images) collapse a 64 px image into one or two segments.
    otx = FelzenszwalbParams(scale=1000, sigma=0.8, min_size=1000)
    image = np.asarray(Image.open(sorted((tmp_path / "u64" / "images").iterdir())[0]).convert("RGB"))
    assert len(np.unique(segment(image, otx))) <= 3


def test_pretrain_command_uses_the_masks_a_user_made_and_never_replaces_them(tmp_path):
    """The README's command-line path: masks made with `segflow pseudo-masks --scale --min-size`
    are what `segflow pretrain --images --out --epochs` trains on; asking for other parameters
    stops with a clear error and leaves them as they were; on fresh 96 px images the defaults give
    a sane number of segments and fit the view size to the images."""
    images = synthesize(tmp_path / "unl" / "images", "target", num_images=6, size=96, seed=2, unlabeled=True)
    masks = tmp_path / "unl" / "detcon_mask"
    code, out, err = run_cli("pseudo-masks", images, "--scale", "150", "--min-size", "30")
    assert code == 0, err
    stamps = {p.name: p.stat().st_mtime_ns for p in masks.glob("*.png")}
    code, out, err = run_cli(
        "pretrain",
        "--images",
        images,
        "--out",
        tmp_path / "bb",
        "--epochs",
        "1",
        "--iters-per-epoch",
        "1",
        "--no-track",
    )
    assert code == 0, err
    assert "auto iters_per_epoch" not in out  # set by the user
    assert "0 made, 6 reused" in out and "scale 150, sigma 0.8, min size 30: those of the masks already made" in out
    assert "auto input_size = 96" in out and "auto lr = 0.05" in out
    assert {p.name: p.stat().st_mtime_ns for p in masks.glob("*.png")} == stamps
    code, out, err = run_cli(
        "pretrain", "--images", images, "--out", tmp_path / "bb2", "--epochs", "1", "--scale", "300", "--no-track"
    )
    assert code == 2 and "other Felzenszwalb parameters (scale 150, sigma 0.8, min size 30)" in err, err
    assert "Traceback" not in err and not (tmp_path / "bb2").exists()
    assert {p.name: p.stat().st_mtime_ns for p in masks.glob("*.png")} == stamps
    code, out, err = run_cli("pretrain", "--images", images, "--out", tmp_path / "bb3", "--lr", "fast", "--no-track")
    assert code == 2 and "--lr must be a number or 'auto'" in err
    # Fresh images, defaults only.
    fresh = synthesize(tmp_path / "fresh", "target", num_images=6, size=96, seed=3, unlabeled=True)
    code, out, err = run_cli("pretrain", "--images", fresh, "--out", tmp_path / "bb4", "--epochs", "1", "--no-track")
    assert code == 0, err
    segments = float(re.search(r"([\d.]+) segments per image", out).group(1))
    assert 10 <= segments <= 32 and "size rule for 96 px images" in out, out
    # Six images are one step a pass: a short run repeats them, 50 steps an epoch.
    assert "auto iters_per_epoch = 50 (one pass (1 steps) or 50, the larger)" in out, out


def test_same_image_same_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    assert np.array_equal(segment(image, SMALL), segment(image, SMALL))


def test_unreadable_image_is_named_and_the_rest_are_kept(images):
    (images / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SegflowError, match=r"broken\.png: cannot read image"):
        make_pseudo_masks(images, params=SMALL)
    index = json.loads((images.parent / "detcon_mask" / "index.json").read_text())
    assert len(index) == 8 and "broken.png" not in index


def test_not_a_folder_of_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegflowError, match="holds no images"):
        make_pseudo_masks(tmp_path / "empty")
    with pytest.raises(SegflowError, match="not a folder"):
        make_pseudo_masks(tmp_path / "missing")


def pretrain_cfg(images: Path, out: Path, **kwargs) -> PretrainConfig:
    args = {
        "images": str(images),
        "out": str(out),
        "epochs": 3,
        "batch_size": 4,
        "input_size": 64,
        "iters_per_epoch": 3,
        "lr": 0.05,
        "felzenszwalb": SMALL,
    } | kwargs
    return PretrainConfig(**args)


def test_pretraining_lowers_the_loss_and_feeds_finetuning(images, tmp_path, tiny):
    result = run_pretrain(pretrain_cfg(images, tmp_path / "bb", epochs=4))
    assert result.metrics["final_loss"] < result.metrics["first_loss"]
    assert result.pseudo_masks["made"] == 8
    config = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert config["architecture"] == "lite_hrnet_s" and config["format"] == "segflow.backbone/2"
    weights = load_file(str(tmp_path / "bb" / "backbone.safetensors"))

    run_train(
        TrainConfig(
            data=str(tiny["data"]),
            out=str(tmp_path / "m"),
            input_size=64,
            batch_size=4,
            epochs=1,
            init_backbone=str(tmp_path / "bb"),
            lr=1e-12,
            warmup_iters=1,
        )
    )
    tuned = load_file(str(tmp_path / "m" / "model.safetensors"))
    # With a vanishing learning rate the fine-tuned backbone still holds the pretrained weights.
    key = "stem.conv1.0.weight"
    assert torch.allclose(tuned[f"backbone.{key}"], weights[key], atol=1e-6)


def test_pretraining_resumes(images, tmp_path):
    straight = run_pretrain(pretrain_cfg(images, tmp_path / "a", epochs=2))
    run_pretrain(pretrain_cfg(images, tmp_path / "b", epochs=1))
    os.rename(tmp_path / "b", tmp_path / "b-first")  # as if the run had stopped after epoch 1
    with pytest.raises(SegflowError, match="--resume"):
        run_pretrain(pretrain_cfg(images, tmp_path / "b", epochs=2))
    with pytest.raises(SegflowError, match=r"lr: 0\.05 -> 0\.1"):
        run_pretrain(pretrain_cfg(images, tmp_path / "b", epochs=2, resume=True, lr=0.1))
    resumed = run_pretrain(pretrain_cfg(images, tmp_path / "b", epochs=2, resume=True))
    assert resumed.record["history"] == [
        h | {k: r[k] for k in ("epoch_seconds", "data_wait_seconds", "data_wait_share")}
        for h, r in zip(straight.record["history"], resumed.record["history"], strict=True)
    ]
    a = load_file(str(tmp_path / "a" / "backbone.safetensors"))
    b = load_file(str(tmp_path / "b" / "backbone.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_reads_images_from_s3(s3, images, tmp_path):
    s3_lib.publish_dir(images, f"s3://{s3}/unlabeled")
    result = run_pretrain(pretrain_cfg(f"s3://{s3}/unlabeled", tmp_path / "bb", epochs=1))
    assert result.record["images"] == 8 and (tmp_path / "bb" / "backbone.safetensors").exists()


def test_bad_settings(images, tmp_path):
    with pytest.raises(SegflowError, match="--batch-size"):
        run_pretrain(pretrain_cfg(images, tmp_path / "x", batch_size=1))
    with pytest.raises(SegflowError, match="--input-size"):
        run_pretrain(pretrain_cfg(images, tmp_path / "x", input_size=70))
    with pytest.raises(SegflowError, match="--model"):
        run_pretrain(pretrain_cfg(images, tmp_path / "x", model="vit"))


def test_detcon_with_two_processes_keeps_ranks_identical(images, tmp_path):
    """torchrun, gloo: gradients are synchronised (both ranks end with the same weights), and only
    rank 0 writes the output."""
    make_pseudo_masks(images, params=SMALL)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "segflow.cli",
        "pretrain",
        "--images",
        str(images),
        "--out",
        str(tmp_path / "bb"),
        "--epochs",
        "2",
        "--iters-per-epoch",
        "3",
        "--batch-size",
        "2",
        "--input-size",
        "64",
        "--no-track",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d): final weights (\w+)", result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    assert sorted(p.name for p in (tmp_path / "bb").iterdir()) == ["backbone.safetensors", "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb", "bb.checkpoints", "unl"]

"""DetCon pretraining on local folders (``segflow.stages`` stages s3:// and makes the masks):

    train_detcon(cfg, images_dir, masks_dir, out_dir, checkpoints)

Output: backbone weights (``backbone.safetensors`` + ``config.json``, ``segflow.models.artifact``)
for ``segflow train --init-backbone``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from segflow.configs import json_safe
from segflow.data.datasets import Normalization, image_files, read_rgb
from segflow.errors import SegflowError
from segflow.models import artifact as model_artifact
from segflow.models.lite_hrnet import SPECS
from segflow.selfsl.config import PretrainConfig, auto_settings
from segflow.selfsl.detcon import DetCon, DetConNet, PseudoMaskedImages
from segflow.train.loop import fit, training_for


def image_statistics(files: list[Path], limit: int = 256) -> Normalization:
    """RGB mean/std of (up to ``limit``) unlabelled images, every 4th pixel."""
    pixels = np.concatenate([read_rgb(f)[::4, ::4].reshape(-1, 3) for f in files[:limit]]).astype(np.float64)
    return Normalization(pixels.mean(0).tolist(), pixels.std(0).tolist())


def train_detcon(
    cfg: PretrainConfig,
    images_dir: Path,
    masks_dir: Path,
    out_dir: Path,
    checkpoints: Path,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """DetCon on the images and their pseudo masks; publish backbone weights into ``out_dir``."""
    cfg.validate()
    started = time.monotonic()
    cfg, chosen = auto_settings(cfg, image_files(images_dir))
    norm = image_statistics(image_files(images_dir))
    dataset = PseudoMaskedImages(images_dir, masks_dir, cfg.input_size, norm, cfg.seed)
    if len(dataset) < 2:
        raise SegflowError(f"--images {cfg.images}: DetCon needs at least 2 images.")
    loop = cfg.loop()
    if len(dataset) < loop.batch_size:
        loop = replace(loop, batch_size=len(dataset))

    def publish(model: DetConNet, summary: dict) -> None:
        config = {
            "architecture": cfg.model,
            "normalization": norm.as_dict(),
            "images": len(dataset),
            "history": summary["history"],
            "pretrain": json_safe(asdict(cfg)),
        }
        model_artifact.save_backbone(out_dir, model.backbone, config)

    run = training_for(
        cfg,
        build_model=lambda: DetConNet(cfg.model),
        objective=DetCon(cfg, sum(SPECS[cfg.model].out_channels)),
        data=dataset,
        loop=loop,
        checkpoints=checkpoints,
        publish=publish,
    )
    summary = fit(run, on_epoch)
    losses = [h["train_loss"] for h in summary["history"]]
    return {
        "history": summary["history"],
        "images": len(dataset),
        "chosen": chosen,
        "metrics": {
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "epochs": summary["epochs_run"],
            "images": len(dataset),
            "train_seconds": round(time.monotonic() - started, 1),
        },
    }

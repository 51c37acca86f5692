"""DetCon-B self-supervised pretraining of a Lite-HRNet backbone on unlabelled images, as an
objective of the one training engine.

Two augmented views of each image are cut with the same crops from its Felzenszwalb pseudo mask.
The backbone's branches are upsampled to the finest one and concatenated. Features are pooled per
region and fed through a projector and predictor (online network). A region's prediction must pick
out the same region's projection in the other view, computed by an EMA target network, among all
regions in the batch (temperature 0.1, both directions). Recipe (OTX): SGD, momentum 0.9, weight
decay 1e-3, no warmup or decay.

Inputs and outputs are local folders (``segflow.stages`` stages s3:// and makes the masks):

    train_detcon(cfg, images_dir, masks_dir, out_dir, checkpoints)

Output: backbone weights (``backbone.safetensors`` + ``config.json``, ``segflow.models.artifact``)
for ``segflow train --init-backbone``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from segflow.configs import check_numbers, json_safe
from segflow.data import IGNORE_INDEX
from segflow.data.datasets import Normalization, image_files, read_rgb, to_tensor
from segflow.data.transforms import contrastive_pair
from segflow.errors import SegflowError
from segflow.models import artifact as model_artifact
from segflow.models import check_input_size, check_name
from segflow.models.lite_hrnet import SPECS, LiteHRNet
from segflow.selfsl.pseudo_masks import FelzenszwalbParams, mask_path_for, median_side
from segflow.train.config import check_loop
from segflow.train.contrastive import ContrastBranch, ContrastObjective
from segflow.train.loop import LoopConfig, fit, training_for
from segflow.train.objective import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    images: str
    out: str
    model: str = "lite_hrnet_s"
    epochs: int = 10
    batch_size: int = 16
    input_size: int = 0  # view side; 0: auto (see auto_settings)
    seed: int = 0
    lr: float = 0.0  # SGD, momentum 0.9, weight decay 1e-3 (OTX DetCon recipe); 0: auto
    momentum: float = 0.9
    weight_decay: float = 1e-3
    temperature: float = 0.1
    ema_momentum: float = 0.996
    num_masks: int = 16  # regions sampled per image
    iters_per_epoch: int = 0  # at least this many steps per epoch; 0: auto (see auto_settings)
    masks: str = ""  # pseudo-mask folder; default: detcon_mask/ beside the images
    felzenszwalb: FelzenszwalbParams = field(default_factory=FelzenszwalbParams)
    amp: str = "auto"
    channels_last: str = "auto"
    loader_workers: int = -1  # -1: auto (engine.loader_workers)
    resume: bool = False
    overwrite: bool = False
    checkpoint_dir: str = ""  # local folder or s3:// prefix; default: beside OUT (see storage.Checkpoints)

    RESUME_MAY_CHANGE = ("epochs", "resume", "overwrite", "loader_workers", "checkpoint_dir", "out")

    def validate(self) -> None:
        check_numbers(self)
        check_name(self.model)
        if self.input_size:
            check_input_size(self.input_size)
        check_loop(self.epochs, self.batch_size, self.amp, self.channels_last)
        if self.lr < 0:
            raise SegflowError("--lr must be positive (or 0 / auto).")

    def loop(self) -> LoopConfig:
        return LoopConfig(**{f.name: getattr(self, f.name) for f in fields(LoopConfig) if hasattr(self, f.name)})

    def recipe(self) -> Recipe:
        return Recipe(optimizer="sgd", lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


# OTX's DetCon recipe (224 px views, lr 1e-3) is for long runs on large images. A short run on a
# few hundred small images needs views no larger than the images and a much larger step: lr 0.05
# for 20 epochs on 96 images at 96 px gave +9.5 test mDice where 1e-3 gave nothing (the label
# efficiency benchmark). The rule keeps 0.05 up to 1000 steps and shrinks it with the square root
# of the step budget beyond, to OTX's 1e-3 at the longest runs.
MAX_VIEW = 224
SHORT_RUN_STEPS = 1000
# DetCon's gain keeps growing with the number of steps long after a few hundred images have been
# seen many times: on 96 unlabelled 96 px images (6 steps a pass), 8 labels, the gain over
# supervised went +3.2 / +3.1 / +5.0 (indoor) and +4.0 / +8.3 / +16.0 (street) at 120 / 240 / 480
# steps (RESULTS.md). So on small sets an epoch is at least this many steps (the images repeat),
# and the usual 20 epochs are 1000 steps; sets of 800+ images (batch 16) are not affected.
MIN_STEPS_PER_EPOCH = 50


def auto_settings(cfg: PretrainConfig, files: list[Path]) -> tuple[PretrainConfig, dict]:
    """Fill the settings left at 0 (``auto``) from the images; return the config and what was chosen."""
    chosen: dict = {}
    if not cfg.input_size:
        side = median_side(files)
        size = max(32, min(MAX_VIEW, side // 32 * 32))
        cfg = replace(cfg, input_size=size)
        chosen["input_size"] = size
        chosen["input_size_rule"] = f"median short side {side} px, floored to a multiple of 32, at most {MAX_VIEW}"
    batch = min(cfg.batch_size, len(files))
    one_pass = max(len(files) // max(batch, 1), 1)
    if not cfg.iters_per_epoch:
        cfg = replace(cfg, iters_per_epoch=max(one_pass, MIN_STEPS_PER_EPOCH))
        chosen["iters_per_epoch"] = cfg.iters_per_epoch
        chosen["iters_per_epoch_rule"] = f"one pass ({one_pass} steps) or {MIN_STEPS_PER_EPOCH}, the larger"
    if not cfg.lr:
        steps = cfg.epochs * max(cfg.iters_per_epoch, one_pass)
        lr = 0.05 if steps <= SHORT_RUN_STEPS else max(1e-3, 0.05 * math.sqrt(SHORT_RUN_STEPS / steps))
        cfg = replace(cfg, lr=round(lr, 5))
        chosen["lr"] = cfg.lr
        chosen["lr_rule"] = f"{steps} SGD steps: 0.05 up to {SHORT_RUN_STEPS}, then 0.05*sqrt({SHORT_RUN_STEPS}/steps)"
    return cfg, chosen


class PseudoMaskedImages(Dataset):
    """Unlabelled images with their pseudo masks, as DetCon-B's two views."""

    def __init__(self, images: Path, masks: Path, size: int, norm: Normalization, seed: int) -> None:
        self.files = image_files(images)
        self.masks = [mask_path_for(images, f, masks) for f in self.files]
        missing = [str(m) for m in self.masks if not m.exists()]
        if missing:
            raise SegflowError(f"{masks}: {len(missing)} pseudo mask(s) are missing:", problems=missing)
        self.size, self.norm, self.seed = size, norm, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index, 7])
        mask = np.asarray(Image.open(self.masks[index]))
        v1, m1, v2, m2 = contrastive_pair(rng, read_rgb(self.files[index]), mask, self.size)
        return {
            "v1": to_tensor(v1, self.norm.mean, self.norm.std),
            "m1": torch.from_numpy(m1.astype(np.int64)),
            "v2": to_tensor(v2, self.norm.mean, self.norm.std),
            "m2": torch.from_numpy(m2.astype(np.int64)),
        }


class DetConNet(nn.Module):
    """Backbone + the concatenation of its branches at the finest resolution."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.backbone = LiteHRNet(SPECS[model])
        self.channels = sum(SPECS[model].out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self.backbone(x)
        size = branches[0].shape[-2:]
        ups = [branches[0]] + [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in branches[1:]]
        return torch.cat(ups, dim=1)


def compact_ids(m1: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Renumber the region ids present in a batch to 0..K-1 (same mapping for both views)."""
    both = torch.cat([m1.flatten(), m2.flatten()])
    present = torch.unique(both[both != IGNORE_INDEX])
    lut = torch.full((256,), len(present), dtype=torch.long, device=m1.device)
    lut[present] = torch.arange(len(present), device=m1.device)
    return lut[m1], lut[m2], len(present)


class DetCon(ContrastObjective):
    name = "detcon"

    def __init__(self, cfg: PretrainConfig, channels: int) -> None:
        self.branch = ContrastBranch(channels, cfg.temperature, cfg.num_masks, cfg.ema_momentum, by_class=False)

    def loss(self, net, batch, step):
        m1, m2, k = compact_ids(batch["m1"], batch["m2"])
        n = batch["v1"].shape[0]
        views = torch.cat([batch["v1"], batch["v2"]])
        feats = net(views)
        with torch.no_grad():
            self.branch.target.train()
            target = self.branch.target(views)
        loss = self.branch.loss((feats[:n], feats[n:]), (target[:n], target[n:]), (m1, m2), k, step.generator(9))
        return loss, {}


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

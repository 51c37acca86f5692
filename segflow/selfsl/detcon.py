"""DetCon-B self-supervised pretraining of a Lite-HRNet backbone on unlabelled images.

Two augmented views of each image are cut with the same crops from its Felzenszwalb pseudo mask.
The backbone's branches are upsampled to the finest one and concatenated. Features are pooled per
region and fed through a projector and predictor (online network). A region's prediction must pick
out the same region's projection in the other view, computed by an EMA target network, among all
regions in the batch (temperature 0.1, both directions).

Output (WEIGHTS_DIR): ``backbone.safetensors`` and ``config.json``; ``segflow train
--init-backbone WEIGHTS_DIR`` starts from it.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segflow import storage
from segflow.data import IGNORE_INDEX
from segflow.data.augment import flip
from segflow.data.datasets import Normalization, image_files, read_rgb, to_tensor
from segflow.errors import SegflowError
from segflow.models import MODEL_NAMES
from segflow.models import artifact as model_artifact
from segflow.models.lite_hrnet import SPECS, LiteHRNet
from segflow.progress import progress
from segflow.selfsl.pseudo_masks import FelzenszwalbParams, default_mask_dir, make_pseudo_masks, mask_path_for
from segflow.selfsl.regions import mlp, region_loss
from segflow.train.engine import Dist, EpochSampler, atomic_torch_save, checkpoint_dir, seed_everything
from segflow.train.objectives import Step, ema_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    images: str
    out: str
    model: str = "lite_hrnet_s"
    epochs: int = 10
    batch_size: int = 16
    input_size: int = 224
    seed: int = 0
    lr: float = 1e-3  # SGD, momentum 0.9, weight decay 1e-3 (OTX DetCon recipe)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    temperature: float = 0.1
    ema_momentum: float = 0.996
    num_masks: int = 16  # regions sampled per image
    iters_per_epoch: int = 0  # at least this many steps per epoch; 0 = one pass
    masks: str = ""  # pseudo-mask folder; default: detcon_mask/ beside the images
    felzenszwalb: FelzenszwalbParams = field(default_factory=FelzenszwalbParams)
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if self.model not in MODEL_NAMES:
            raise SegflowError(f"--model {self.model!r} is not known: choose one of {', '.join(MODEL_NAMES)}.")
        if self.batch_size < 2:
            raise SegflowError("--batch-size must be at least 2 (contrast needs other images).")
        if self.input_size % 32 or not 64 <= self.input_size <= 1024:
            raise SegflowError("--input-size must be a multiple of 32 between 64 and 1024.")
        if self.epochs < 1:
            raise SegflowError("--epochs must be at least 1.")


# --- views ------------------------------------------------------------------------------------


def resized_crop(rng, image, mask, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop of an image and its mask (mask by nearest neighbour)."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        ch, cw, y, x = h, w, 0, 0
    image = cv2.resize(image[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_NEAREST)
    return image, mask


def color_jitter(rng, image):
    """Brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (with probability 0.8), then greyscale 0.2."""
    out = image.astype(np.float32)
    if rng.random() < 0.8:
        out *= rng.uniform(0.6, 1.4)
        mean = out.mean()
        out = (out - mean) * rng.uniform(0.6, 1.4) + mean
        hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.8, 1.2), 0, 255)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18)) % 180
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if rng.random() < 0.2:
        out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(out, 0, 255).astype(np.uint8)


def detcon_view(rng, image, mask, size, blur_p: float, solarize_p: float):
    image, mask = resized_crop(rng, image, mask, size)
    if rng.random() < 0.5:
        image, mask = flip(image, mask)
    image = color_jitter(rng, image)
    if rng.random() < blur_p:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.1, 2.0))
    if rng.random() < solarize_p:
        image = np.where(image >= 128, 255 - image, image).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class PseudoMaskedImages(Dataset):
    def __init__(self, images: Path, masks: Path, size: int, norm: Normalization, seed: int) -> None:
        self.files = image_files(images)
        self.masks = [mask_path_for(images, f, masks) for f in self.files]
        self.size, self.norm, self.seed = size, norm, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index, 7])
        image = read_rgb(self.files[index])
        mask = np.asarray(Image.open(self.masks[index]))
        v1, m1 = detcon_view(rng, image, mask, self.size, blur_p=1.0, solarize_p=0.0)
        v2, m2 = detcon_view(rng, image, mask, self.size, blur_p=0.1, solarize_p=0.2)
        t = lambda a: to_tensor(a, self.norm.mean, self.norm.std)  # noqa: E731
        return {
            "v1": t(v1),
            "m1": torch.from_numpy(m1.astype(np.int64)),
            "v2": t(v2),
            "m2": torch.from_numpy(m2.astype(np.int64)),
        }


# --- networks ---------------------------------------------------------------------------------


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


def image_statistics(files: list[Path], limit: int = 256) -> Normalization:
    """RGB mean/std of (up to ``limit``) unlabelled images, every 4th pixel."""
    pixels = np.concatenate([read_rgb(f)[::4, ::4].reshape(-1, 3) for f in files[:limit]]).astype(np.float64)
    return Normalization(pixels.mean(0).tolist(), pixels.std(0).tolist())


# --- the loop ---------------------------------------------------------------------------------


def pretrain(cfg: PretrainConfig, on_epoch=None) -> dict:
    """Pseudo masks (when missing), then DetCon; publish backbone weights to ``cfg.out``."""
    cfg.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    storage.check_output(cfg.out, cfg.overwrite)
    with storage.local_input(cfg.images, "--images", sealed=False) as images:
        # Default: detcon_mask/ beside the images (beside the downloaded copy for s3:// images).
        masks_dir = Path(cfg.masks) if cfg.masks else default_mask_dir(images)
        made = make_pseudo_masks(images, masks_dir, cfg.felzenszwalb)
        log.info("pseudo masks: %d made, %d reused, in %s", made["made"], made["reused"], made["out"])

        seed_everything(cfg.seed)
        norm = image_statistics(image_files(images))
        dataset = PseudoMaskedImages(images, masks_dir, cfg.input_size, norm, cfg.seed)
        if len(dataset) < 2:
            raise SegflowError(f"--images {cfg.images}: DetCon needs at least 2 images.")
        batch = min(cfg.batch_size, len(dataset))
        online = DetConNet(cfg.model).to(device)
        projector = mlp(online.channels, 256, 128).to(device)
        predictor = mlp(128, 256, 128).to(device)
        target = copy.deepcopy(online).requires_grad_(False)
        target_projector = copy.deepcopy(projector).requires_grad_(False)
        trainable = [*online.parameters(), *projector.parameters(), *predictor.parameters()]
        optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        dist = Dist()
        iters = max(len(dataset) // batch, 1, cfg.iters_per_epoch)
        sampler = EpochSampler(len(dataset), batch, iters, cfg.seed, dist)
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=0)
        ckpt_dir = checkpoint_dir(cfg.out)
        ckpt = ckpt_dir / "last.pt"
        modules = {
            "online": online,
            "projector": projector,
            "predictor": predictor,
            "target": target,
            "target_projector": target_projector,
        }
        state = {"epoch": 0, "iteration": 0, "history": []}
        if cfg.resume and ckpt.exists():
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            for name, module in modules.items():
                module.load_state_dict(saved["modules"][name])
            optimizer.load_state_dict(saved["optimizer"])
            state = saved["state"]
            log.info("resuming DetCon from %s after epoch %d", ckpt, state["epoch"])
        elif ckpt.exists() and not cfg.overwrite:
            raise SegflowError(f"{ckpt} exists from an earlier run: pass --resume to continue, or --overwrite.")
        ckpt_dir.mkdir(parents=True, exist_ok=True)

        heads = (projector, predictor, target_projector)
        while state["epoch"] < cfg.epochs:
            epoch, started, total = state["epoch"], time.monotonic(), 0.0
            dataset.epoch = sampler.epoch = epoch
            online.train()
            projector.train()
            predictor.train()
            target.train()
            for b in progress(loader, iters, f"detcon epoch {epoch + 1}/{cfg.epochs}", every_s=60):
                step = Step(epoch, state["iteration"], cfg.seed)
                m1, m2, k = compact_ids(b["m1"].to(device), b["m2"].to(device))
                n = b["v1"].shape[0]
                feats = online(torch.cat([b["v1"], b["v2"]]).to(device))
                with torch.no_grad():
                    target_feats = target(torch.cat([b["v1"], b["v2"]]).to(device))
                g = step.generator(9)
                loss = region_loss(
                    (feats[:n], m1), (target_feats[n:], m2), k, heads, cfg.temperature, cfg.num_masks, False, g
                )
                loss = loss + region_loss(
                    (feats[n:], m2), (target_feats[:n], m1), k, heads, cfg.temperature, cfg.num_masks, False, g
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema_update(target, online, cfg.ema_momentum)
                ema_update(target_projector, projector, cfg.ema_momentum)
                state["iteration"] += 1
                total += loss.item()
            record = {"loss": total / iters, "epoch_seconds": time.monotonic() - started}
            state["history"].append({"epoch": epoch, **record})
            state["epoch"] = epoch + 1
            atomic_torch_save(
                {
                    "modules": {k: m.state_dict() for k, m in modules.items()},
                    "optimizer": optimizer.state_dict(),
                    "state": state,
                },
                ckpt,
            )
            log.info(
                "detcon epoch %d/%d loss %.4f (%.1fs)", epoch + 1, cfg.epochs, record["loss"], record["epoch_seconds"]
            )
            if on_epoch is not None:
                on_epoch(epoch, record)

        config = {
            "architecture": cfg.model,
            "normalization": norm.as_dict(),
            "images": len(dataset),
            "history": state["history"],
            "pretrain": asdict(cfg),
        }
        with storage.staged_output(cfg.out, cfg.overwrite) as stage:
            model_artifact.save_backbone(stage, online.backbone, json.loads(json.dumps(config, default=str)))
    return {
        "final_loss": state["history"][-1]["loss"],
        "first_loss": state["history"][0]["loss"],
        "epochs": state["epoch"],
        "images": len(dataset),
        "pseudo_masks": made,
        "history": state["history"],
    }


__all__ = ["PretrainConfig", "pretrain"]

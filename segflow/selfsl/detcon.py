"""DetCon-B self-supervised pretraining of a Lite-HRNet backbone on unlabelled images, as an
objective of the one training engine.

Two augmented views of each image are cut with the same crops from its Felzenszwalb pseudo mask.
The backbone's branches are upsampled to the finest one and concatenated. Features are pooled per
region and fed through a projector and predictor (online network). A region's prediction must pick
out the same region's projection in the other view, computed by an EMA target network, among all
regions in the batch (temperature 0.1, both directions). Recipe (OTX): SGD, momentum 0.9, weight
decay 1e-3, no warmup or decay.

The data, network and objective; ``segflow.selfsl.pretraining.train_detcon`` runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from segflow.data import IGNORE_INDEX
from segflow.data.datasets import Normalization, image_files, read_rgb, to_tensor
from segflow.data.transforms import contrastive_pair
from segflow.errors import SegflowError
from segflow.models.lite_hrnet import SPECS, LiteHRNet
from segflow.selfsl.config import PretrainConfig
from segflow.selfsl.pseudo_masks import mask_path_for
from segflow.train.contrastive import ContrastBranch, ContrastObjective


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

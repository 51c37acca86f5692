"""What segmentation training optimises, beyond plain cross-entropy (the engine's base objective).

- ``SupCon``: a contrastive branch beside the segmentation head. Every Nth step the batch's two
  extra views (DetCon-B views cut from the label maps, made by the dataset) go through the
  network too; pooled features of the same class attract across views and images, other
  classes repel. The targets come from an EMA copy of the network, as in DetCon-B.
- ``MeanTeacher``: an EMA teacher labels unlabelled images under weak augmentation; the student
  learns those labels under strong augmentation; the most uncertain pixels are dropped, fewer
  as training goes on.

Each objective runs the (possibly DDP-wrapped) model once per step: extra inputs are
concatenated to the batch, so DDP sees one forward and one backward.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from segflow.data import IGNORE_INDEX
from segflow.models.outputs import entropy_map
from segflow.train.config import MeanTeacherConfig, SupConConfig
from segflow.train.contrastive import ContrastBranch, ContrastObjective
from segflow.train.engine import Objective, Stream, ema_update, frozen_copy

Supervised = Objective


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


class SupCon(ContrastObjective):
    name = "supcon"

    def __init__(self, cfg: SupConConfig, num_classes: int, feature_channels: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.branch = ContrastBranch(feature_channels, cfg.temperature, cfg.num_masks, cfg.ema_momentum, by_class=True)

    def loss(self, net, batch, step):
        if step.iteration % self.cfg.every:
            return super().loss(net, batch, step)
        images, masks = batch["image"], batch["mask"]
        v1, m1, v2, m2 = batch["v1"], batch["m1"], batch["v2"], batch["m2"]
        n = images.shape[0]
        out = net(torch.cat([images, v1, v2]), with_features=True)
        ce = cross_entropy(out.logits[:n], masks)
        with torch.no_grad():
            self.branch.target.train()
            target = self.branch.target(torch.cat([v1, v2]), with_features=True).features
        online = (out.features[n : 2 * n], out.features[2 * n :])
        contrast = self.branch.loss(online, (target[:n], target[n:]), (m1, m2), self.num_classes, step.generator(5))
        total = ce + self.cfg.weight * contrast
        return total, {"ce": ce.item(), "contrastive": float(contrast.detach())}

    def after_step(self, net, step):
        if step.iteration % self.cfg.every == 0:  # the targets move only when the branch was trained
            super().after_step(net, step)


class MeanTeacher(Objective):
    name = "mean_teacher"

    def __init__(self, cfg: MeanTeacherConfig, unlabeled: Stream, epochs: int) -> None:
        if cfg.start_epoch < 0:
            # OTX starts at epoch 1-2 of long runs; on short runs an untrained teacher's labels
            # drown the few real ones, so wait until the student has seen a quarter of training.
            cfg = replace(cfg, start_epoch=max(1, epochs // 4))
        self.cfg = cfg
        self.unlabeled = unlabeled
        self.teacher: nn.Module | None = None

    def streams(self) -> dict[str, Stream]:
        return {"unlabeled": self.unlabeled}

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def setup(self, model, device):
        super().setup(model, device)
        self.teacher = frozen_copy(model)

    def drop_fraction(self, epoch: int) -> float:
        return self.cfg.drop_start * max(0.0, 1.0 - epoch / max(self.cfg.drop_decay_epochs, 1))

    def loss(self, net, batch, step):
        if step.epoch < self.cfg.start_epoch:
            return super().loss(net, batch, step)
        images, masks = batch["image"], batch["mask"]
        n = images.shape[0]
        weak, strong = batch["unlabeled"]["image"], batch["unlabeled"]["strong"]
        with torch.no_grad():
            self.teacher.eval()
            probs = self.teacher(weak).logits.float().softmax(1)
            entropy = entropy_map(probs)
            pseudo = probs.argmax(1)
            drop = self.drop_fraction(step.epoch)
            if drop > 0:
                limit = torch.quantile(entropy.flatten(1), 1 - drop, dim=1)[:, None, None]
                pseudo[entropy > limit] = IGNORE_INDEX
        logits = net(torch.cat([images, strong])).logits
        ce = cross_entropy(logits[:n], masks)
        unsup = cross_entropy(logits[n:], pseudo)  # mean over kept pixels
        return ce + self.cfg.weight * unsup, {"ce": ce.item(), "unsup": unsup.item(), "dropped": drop}

    def after_step(self, net, step):
        # Before the teacher starts, it simply follows the student.
        momentum = self.cfg.ema_momentum if step.epoch >= self.cfg.start_epoch else 0.0
        ema_update(self.teacher, net, momentum)
